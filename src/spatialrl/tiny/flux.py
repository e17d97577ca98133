"""A tiny random FLUX.1-dev: the real pipeline classes with toy sizes, for CPU tests.

The folder written by `write_tiny_flux` loads with `FluxPipeline.from_pretrained`, exactly like
"black-forest-labs/FLUX.1-dev", so every code path that runs in production runs here too. The
weights are random; only shapes, classes and configs mirror FLUX.1-dev. Both tokenizers are built
offline from a word list that covers shapes-world prompts: words outside it still tokenize
(CLIP falls back to byte-level pieces, T5 to single letters, then `<unk>`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from spatialrl.tiny import save_atomically

VOCABULARY_WORDS = """
a an the one two three four five six some of to and or with on in at by is are it its this that
left right above below under over behind front top bottom beside next near between inside
outside across against along around center middle side corner far close upper lower
circle square triangle rectangle star hexagon pentagon diamond oval ellipse cross heart ring
cube sphere cone cylinder pyramid disk dot line arrow shape shapes object objects
red green blue yellow orange purple pink brown black white gray grey cyan magenta gold silver
small large big tiny huge little medium tall short wide narrow thin thick bright dark light
mug laptop lamp cup book chair table sofa bed desk plant vase bottle box ball car tree house
dog cat bird person man woman child window door clock phone keyboard screen picture
photo image painting drawing background scene room floor wall ground sky
""".split()

LATENT_CHANNELS = 4


@dataclass(frozen=True)
class FluxSize:
    """The sizes a small FLUX.1-dev is built with; the defaults are the tiny test model."""

    text_hidden_size: int = 32  # CLIP and T5 width
    text_layers: int = 2
    # One entry per VAE resolution level: the image is 2**(levels - 1) times the latent side.
    vae_channels: tuple[int, ...] = (16, 32)
    num_layers: int = 1  # double-stream blocks
    num_single_layers: int = 2
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)  # sums to attention_head_dim
    # FLUX.1-dev's dynamic shift is tuned for 256-4096 image tokens.
    base_image_seq_len: int = 256


TINY = FluxSize()
# The shapes-world base generator (spatialrl pretrain generator): 64 px images, 4x VAE,
# so 8 x 8 = 64 packed image tokens. Its text encoders' size is a build setting
# (GeneratorPretraining.text_hidden_size, text_layers).
SHAPES_GENERATOR = FluxSize(
    vae_channels=(16, 32, 32),
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    axes_dims_rope=(8, 12, 12),
    base_image_seq_len=64,
)


def write_tiny_flux(out_dir: Path, seed: int = 0, size: FluxSize = TINY) -> Path:
    """Build a tiny random FluxPipeline and `save_pretrained` it into `out_dir`.

    The same seed gives the same weights, bit for bit. The folder appears atomically: the
    pipeline is written next to it and renamed into place, replacing an existing folder.
    """
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipeline = build_tiny_flux(size)
    return save_atomically(out_dir, [pipeline])


def build_tiny_flux(size: FluxSize = TINY) -> FluxPipeline:
    """A small FLUX.1-dev with random weights drawn from torch's global generator."""
    tokenizer = clip_tokenizer(VOCABULARY_WORDS)
    tokenizer_2 = t5_tokenizer(VOCABULARY_WORDS)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=size.text_hidden_size,
            intermediate_size=2 * size.text_hidden_size,
            projection_dim=size.text_hidden_size,
            num_hidden_layers=size.text_layers,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=size.text_hidden_size,
            d_kv=8,
            d_ff=2 * size.text_hidden_size,
            num_layers=size.text_layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as in FLUX's t5-v1_1-xxl
            dropout_rate=0.0,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
        )
    )
    # The tiny model has two resolution levels: vae_scale_factor 2, so a 64x64 image is 32x32
    # latents, packed into 16x16 = 256 tokens (FLUX's base_image_seq_len, i.e. mu = base_shift).
    levels = len(size.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=size.vae_channels,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.3611,  # FLUX.1-dev's VAE normalisation
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # latents are packed in 2x2 patches
        num_layers=size.num_layers,
        num_single_layers=size.num_single_layers,
        attention_head_dim=size.attention_head_dim,
        num_attention_heads=size.num_attention_heads,
        joint_attention_dim=size.text_hidden_size,
        pooled_projection_dim=size.text_hidden_size,
        guidance_embeds=True,  # FLUX.1-dev is guidance-distilled
        axes_dims_rope=size.axes_dims_rope,
    )
    # FLUX.1-dev's scheduler config.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=size.base_image_seq_len,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def clip_tokenizer(words: list[str]) -> CLIPTokenizer:
    """CLIP's byte-level BPE with merges learned from `words`, so each word is one token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = learn_bpe_merges(words)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += alphabet + [char + "</w>" for char in alphabet]  # every byte: nothing is unknown
    tokens += [left + right for left, right in merges]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def learn_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training with ties broken alphabetically (the `tokenizers` trainer breaks
    ties in hash order, so its merges change from run to run). Runs until every word is a
    single symbol; words end in "</w>" as in CLIP."""
    corpus = [tuple(word[:-1]) + (word[-1] + "</w>",) for word in sorted(set(words))]
    merges = []
    while True:
        pairs = Counter(pair for symbols in corpus for pair in pairwise(symbols))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        corpus = [merge_pair(symbols, best) for symbols in corpus]


def merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if symbols[index : index + 2] == pair:
            merged.append(pair[0] + pair[1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def t5_tokenizer(words: list[str]) -> T5TokenizerFast:
    """T5's SentencePiece-style unigram model: whole words first, then single characters."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    word_pieces = [("\u2581" + word, -1.0) for word in sorted(set(words))]
    characters = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-"
    char_pieces = [(char, -5.0) for char in characters]
    return T5TokenizerFast(
        vocab=specials + word_pieces + char_pieces, extra_ids=0, model_max_length=512
    )
