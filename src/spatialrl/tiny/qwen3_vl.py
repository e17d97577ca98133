"""A tiny random Qwen3-VL-8B-Instruct (the backbone of SpatialReward-8B): the real model,
tokenizer and image processor classes with toy sizes.

The folder has the files of a Qwen3-VL hub repo (config, safetensors weights, tokenizer with
its chat template, preprocessor_config.json), so it loads through the same `from_pretrained`
calls as "SpatialReward/SpatialReward-8B". The weights are random. The vision tower keeps the
real patch (16), temporal patch (2) and spatial merge (2), learned position embeddings and
DeepStack features fed into the first text layers; a 64x64 image costs 4 LLM tokens. The
default size (tests) takes at most 16 tokens an image; JUDGE_BACKBONE, the one a tiny
SpatialReward is trained on, is wider and deeper and takes up to 64. The tokenizer is the tiny
Qwen2.5-VL's byte-level BPE with merges for the words of the SpatialReward instructions too,
and Qwen3-VL's chat template (no default system turn).
As for the tiny Qwen2.5-VL, no processor with a video part is saved (it needs torchvision).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from spatialrl.spatialreward.prompts import EDIT_TEMPLATE, QUALITY_TEMPLATE
from spatialrl.tiny import save_atomically
from spatialrl.tiny.qwen_vl import chat_template, fan_in_std, qwen2_tokenizer

PATCH_SIZE = 16
MERGED_PATCH = 2 * PATCH_SIZE  # one LLM token per 32x32 pixels
PROMPT_WORDS = sorted(set(re.findall(r"[a-z_]+", (EDIT_TEMPLATE + QUALITY_TEMPLATE).lower())))


@dataclass(frozen=True)
class Qwen3VLSize:
    """The toy sizes. Head width 16 throughout, so the rotary sections stay [2, 3, 3]."""
    layers: int = 2
    text_width: int = 64
    vision_width: int = 32
    vision_depth: int = 2
    max_image_tokens: int = 16  # 128x128
    # vision blocks whose features DeepStack adds into the first text layers (the 8B taps
    # blocks 8, 16, 24 of 27); at most one per text layer
    deepstack_blocks: tuple[int, ...] = (0, 1)


# The backbone a tiny SpatialReward is trained on (configs/spatialreward): wider and deeper,
# and 64 tokens an image (256x256), so that boxes can be read finer than one 32-pixel token.
JUDGE_BACKBONE = Qwen3VLSize(layers=4, text_width=192, vision_width=96, vision_depth=4,
                             max_image_tokens=64, deepstack_blocks=(1, 2, 3))


def write_tiny_qwen3_vl(out_dir: Path, seed: int = 0, size: Qwen3VLSize = Qwen3VLSize()) -> Path:
    """Build the tiny model and processor parts and `save_pretrained` them into `out_dir`
    (atomically). The same seed gives the same weights, bit for bit."""
    tokenizer = qwen2_tokenizer(PROMPT_WORDS, chat_template(default_system=None))
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE, merge_size=2, temporal_patch_size=2,
        min_pixels=MERGED_PATCH**2, max_pixels=size.max_image_tokens * MERGED_PATCH**2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],  # Qwen3-VL's normalisation
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_tiny_model(tokenizer, size)
    return save_atomically(Path(out_dir), [model, tokenizer, image_processor])


def build_tiny_model(tokenizer, size: Qwen3VLSize = Qwen3VLSize()
                     ) -> Qwen3VLForConditionalGeneration:
    """Random weights from torch's global generator, std 1/sqrt(width) per tower; the
    vocabulary padded to a multiple of 64 rows, as Qwen's is."""
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=-(-len(tokenizer) // 64) * 64,
            hidden_size=size.text_width,
            intermediate_size=2 * size.text_width,
            num_hidden_layers=size.layers,
            num_attention_heads=size.text_width // 16,
            num_key_value_heads=size.text_width // 32,  # grouped-query attention, as in the 8B
            head_dim=16,
            max_position_embeddings=4096,
            initializer_range=fan_in_std(size.text_width),
            # rotary halves split into temporal/height/width sections, interleaved as in 3-VL
            rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                             "mrope_section": [2, 3, 3], "mrope_interleaved": True},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=size.vision_depth,
            hidden_size=size.vision_width,
            intermediate_size=2 * size.vision_width,
            initializer_range=fan_in_std(size.vision_width),
            num_heads=size.vision_width // 16,
            patch_size=PATCH_SIZE,
            temporal_patch_size=2,
            spatial_merge_size=2,
            out_hidden_size=size.text_width,
            num_position_embeddings=64,  # an 8x8 grid, interpolated to other image sizes
            deepstack_visual_indexes=list(size.deepstack_blocks),
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return Qwen3VLForConditionalGeneration(config).eval()
