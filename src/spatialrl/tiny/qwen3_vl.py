"""A tiny random Qwen3-VL-8B-Instruct (the backbone of SpatialReward-8B): the real model,
tokenizer and image processor classes with toy sizes.

The folder has the files of a Qwen3-VL hub repo (config, safetensors weights, tokenizer with
its chat template, preprocessor_config.json), so it loads through the same `from_pretrained`
calls as "SpatialReward/SpatialReward-8B". The weights are random. The vision tower keeps the
real patch (16), temporal patch (2) and spatial merge (2), learned position embeddings and
DeepStack features fed into the first text layers; a 64x64 image costs 4 LLM tokens, at most
16. The tokenizer is the tiny Qwen2.5-VL's byte-level BPE with merges for the words of the
SpatialReward instructions too, and Qwen3-VL's chat template (no default system turn).
As for the tiny Qwen2.5-VL, no processor with a video part is saved (it needs torchvision).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from spatialrl.spatialreward.prompts import EDIT_TEMPLATE, QUALITY_TEMPLATE
from spatialrl.tiny import save_atomically
from spatialrl.tiny.qwen_vl import chat_template, fan_in_std, qwen2_tokenizer

TEXT_HIDDEN_SIZE = 64
VISION_HIDDEN_SIZE = 32
PATCH_SIZE = 16
MERGED_PATCH = 2 * PATCH_SIZE  # one LLM token per 32x32 pixels
MIN_PIXELS = MERGED_PATCH**2
MAX_PIXELS = 16 * MERGED_PATCH**2  # 128x128: at most 16 image tokens
PROMPT_WORDS = sorted(set(re.findall(r"[a-z_]+", (EDIT_TEMPLATE + QUALITY_TEMPLATE).lower())))


def write_tiny_qwen3_vl(out_dir: Path, seed: int = 0, layers: int = 2) -> Path:
    """Build the tiny model and processor parts and `save_pretrained` them into `out_dir`
    (atomically). The same seed gives the same weights, bit for bit."""
    tokenizer = qwen2_tokenizer(PROMPT_WORDS, chat_template(default_system=None))
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE, merge_size=2, temporal_patch_size=2,
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],  # Qwen3-VL's normalisation
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_tiny_model(tokenizer, layers)
    return save_atomically(Path(out_dir), [model, tokenizer, image_processor])


def build_tiny_model(tokenizer, layers: int = 2) -> Qwen3VLForConditionalGeneration:
    """Random weights from torch's global generator, std 1/sqrt(width) per tower; the
    vocabulary padded to a multiple of 64 rows, as Qwen's is."""
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=-(-len(tokenizer) // 64) * 64,
            hidden_size=TEXT_HIDDEN_SIZE,
            intermediate_size=2 * TEXT_HIDDEN_SIZE,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped-query attention, as in the 8B
            head_dim=16,
            max_position_embeddings=4096,
            initializer_range=fan_in_std(TEXT_HIDDEN_SIZE),
            # rotary halves split into temporal/height/width sections, interleaved as in 3-VL
            rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                             "mrope_section": [2, 3, 3], "mrope_interleaved": True},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=VISION_HIDDEN_SIZE,
            intermediate_size=2 * VISION_HIDDEN_SIZE,
            initializer_range=fan_in_std(VISION_HIDDEN_SIZE),
            num_heads=2,
            patch_size=PATCH_SIZE,
            temporal_patch_size=2,
            spatial_merge_size=2,
            out_hidden_size=TEXT_HIDDEN_SIZE,
            num_position_embeddings=64,  # an 8x8 grid, interpolated to other image sizes
            deepstack_visual_indexes=[0, 1],  # the 8B taps blocks 8, 16, 24 of 27
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return Qwen3VLForConditionalGeneration(config).eval()
