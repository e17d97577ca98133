"""A tiny random OWLv2 ("google/owlv2-base-patch16-ensemble"): the real detector, image
processor and tokenizer classes with toy sizes, for the detector-based judge's tests.

The folder holds what the hub repo holds (config, safetensors weights, preprocessor config,
CLIP tokenizer), so `Owlv2ForObjectDetection.from_pretrained` and
`Owlv2Processor.from_pretrained` load it as they load the real one. Images are read at 64 px
in 16 px patches: 16 candidate boxes per image. Its boxes and scores are random.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessorPil,
    Owlv2Processor,
)

from spatialrl.data.real_world import OBJECT_NAMES
from spatialrl.tiny import save_atomically
from spatialrl.tiny.flux import clip_tokenizer

IMAGE_SIZE = 64
PATCH_SIZE = 16
MAX_QUERY_TOKENS = 16  # OWLv2's text length
HIDDEN_SIZE = 32


def write_tiny_owlv2(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny detector and its processor and `save_pretrained` both into `out_dir`
    (atomically, as the other tiny models). The same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = build_tiny_owlv2()
    return save_atomically(Path(out_dir), [model, processor])


def build_tiny_owlv2() -> tuple[Owlv2ForObjectDetection, Owlv2Processor]:
    words = sorted({w for name in OBJECT_NAMES for w in name.split()}
                   | {"a", "photo", "of"})
    tokenizer = clip_tokenizer(words)
    tokenizer.model_max_length = MAX_QUERY_TOKENS
    layers = {"hidden_size": HIDDEN_SIZE, "intermediate_size": 2 * HIDDEN_SIZE,
              "num_hidden_layers": 2, "num_attention_heads": 2}
    config = Owlv2Config(
        text_config=layers | {
            "vocab_size": len(tokenizer), "max_position_embeddings": MAX_QUERY_TOKENS,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=layers | {"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE},
        projection_dim=HIDDEN_SIZE,
    )
    image_processor = Owlv2ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)
    return Owlv2ForObjectDetection(config).eval(), processor
