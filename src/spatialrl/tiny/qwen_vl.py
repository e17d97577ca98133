"""A tiny random Qwen2.5-VL-7B-Instruct: the real model, tokenizer and image processor classes
with toy sizes.

The folder written by `write_tiny_qwen_vl` has the files of the "Qwen/Qwen2.5-VL-7B-Instruct" hub
repo (config, safetensors weights, tokenizer with its chat template, preprocessor_config.json), so
it loads through the same `from_pretrained` calls. The weights are random. The vision tower keeps
the real patch (14), temporal patch (2), spatial merge (2) and window (112 px) structure, and the
image processor's pixel budget is small: a 64x64 image costs 4 LLM tokens, a 512x512 one 16. The
tokenizer is Qwen2's byte-level BPE with merges learned offline from a word list, so any text
still tokenizes (byte by byte outside the list).

No `Qwen2_5_VLProcessor` is built: in transformers 5 it requires a video processor, which needs
torchvision, and CPU machines here have none. `AutoProcessor` finds the same files on machines
that have torchvision, as it does for the hub repo.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
)

from spatialrl.tiny import save_atomically
from spatialrl.tiny.flux import VOCABULARY_WORDS, merge_pair

# Words of the chat template and of the reward instruction, beside the shapes-world ones.
INSTRUCTION_WORDS = """
you are helpful assistant system user given generated from text prompt judge how well
accurately depicts describes spatial relations relation positions objects image rate score
quality does match follow
""".split()

# Qwen2.5-VL's special tokens, in its order (ids follow the learned vocabulary).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]


def chat_template(default_system: str | None) -> str:
    """Qwen's chat format, images as vision_start/pad/end; `default_system` opens a chat that
    has no system turn (Qwen2.5-VL's "You are a helpful assistant."; Qwen3-VL has none)."""
    opening = "" if default_system is None else (
        "{% if loop.first and message['role'] != 'system' %}"
        f"<|im_start|>system\n{default_system}<|im_end|>\n{{% endif %}}"
    )
    return (
        "{% for message in messages %}" + opening
        + "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' or 'image' in part %}"
        "<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


CHAT_TEMPLATE = chat_template("You are a helpful assistant.")

TEXT_HIDDEN_SIZE = 64
VISION_HIDDEN_SIZE = 32
MIN_PIXELS = 28 * 28
MAX_PIXELS = 16 * 28 * 28  # 112x112: at most 16 image tokens
# The backbone a tiny SpatialScore learns shapes-world relations on (the reward curriculum):
# two layers are too shallow, and the 7B's rotary theta 1e6 leaves some of the 4x4 image
# token columns within 1e-3 rad of each other at head_dim 16 (bench/README.md, the
# learnability ladder).
REWARD_BACKBONE = {"layers": 4, "rope_theta": 2.0}


def write_tiny_qwen_vl(
    out_dir: Path, seed: int = 0, layers: int = 2, rope_theta: float = 1e6
) -> Path:
    """Build the tiny model and processor and `save_pretrained` both into `out_dir`.

    The same seed gives the same weights, bit for bit. The folder appears atomically: it is
    written next to `out_dir` and renamed into place, replacing an existing folder.
    """
    out_dir = Path(out_dir)
    tokenizer = qwen2_tokenizer()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_tiny_model(tokenizer, layers, rope_theta)
    return save_atomically(out_dir, [model, tokenizer, image_processor])


def qwen2_tokenizer(
    extra_words: Iterable[str] = (), chat_template: str = CHAT_TEMPLATE
) -> Qwen2Tokenizer:
    """Qwen2's byte-level BPE; every byte is a token, so nothing is unknown. `extra_words`
    get merges of their own, so a longer instruction stays short in tokens."""
    words = sorted(set(VOCABULARY_WORDS) | set(INSTRUCTION_WORDS) | set(extra_words))
    # A word is seen both after a space ("Ġleft", byte-level) and at the start of a line.
    forms = [("Ġ",) + tuple(word) for word in words] + [tuple(word) for word in words]
    merges = learn_merges(forms)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in merges]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, model_max_length=32768, chat_template=chat_template
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tokenizer


def learn_merges(sequences: list[tuple[str, ...]]) -> list[tuple[str, str]]:
    """Plain BPE training with ties broken alphabetically (the `tokenizers` trainer breaks
    ties in hash order), run until every sequence is a single symbol."""
    merges = []
    while True:
        pairs = Counter(
            pair for symbols in sequences for pair in zip(symbols, symbols[1:], strict=False)
        )
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        sequences = [merge_pair(symbols, best) for symbols in sequences]


def fan_in_std(width: int) -> float:
    """Init std 1/sqrt(width). The 7B's 0.02 suits its width 3584; at width 64 it starts the
    tiny model near zero, where learning to bind prompt words to pixels from preference pairs
    waits on a long plateau whose length depends on the seed (bench/README.md, the
    learnability ladder)."""
    return width**-0.5


def build_tiny_model(
    tokenizer: Qwen2Tokenizer, layers: int = 2, rope_theta: float = 1e6
) -> Qwen2_5_VLForConditionalGeneration:
    """Random weights from torch's global generator, std 1/sqrt(width) per tower; the
    vocabulary is padded to a multiple of 64 rows, as Qwen's is (152064 rows for 151665
    tokens)."""
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=-(-len(tokenizer) // 64) * 64,
            hidden_size=TEXT_HIDDEN_SIZE,
            intermediate_size=2 * TEXT_HIDDEN_SIZE,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped-query attention, as in the 7B
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            initializer_range=fan_in_std(TEXT_HIDDEN_SIZE),
            # head_dim 16: rotary halves split into temporal/height/width sections
            rope_parameters={
                "rope_type": "default", "rope_theta": rope_theta, "mrope_section": [2, 3, 3]
            },
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=VISION_HIDDEN_SIZE,
            intermediate_size=2 * VISION_HIDDEN_SIZE,
            initializer_range=fan_in_std(VISION_HIDDEN_SIZE),
            num_heads=2,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=112,
            out_hidden_size=TEXT_HIDDEN_SIZE,
            fullatt_block_indexes=[1],  # block 0 windowed, block 1 full, as the 7B mixes them
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()
