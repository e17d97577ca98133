"""Layout-caption pretraining of the tiny Qwen2.5-VL: a stand-in for the pretraining the real
Qwen2.5-VL-7B had, tried as the way for a tiny SpatialScore to learn shapes-world relations.

A random VLM does not learn SpatialScore from preference pairs: whether an image is the
preferred one depends on prompt and image jointly, and a random model's score has no first-order
dependence on that. Next-token prediction of layout captions (spatialrl.data.captions) depends
on the image alone, given the words before it. Measured so far (bench/reward_learnability.py
--caption-steps): 1000 and 3000 steps lower the caption loss to 0.38 and 0.29, but SpatialScore
on top still stays at chance; the tiny model has not grounded the relations by then. The
captions come from train-split scenes only, so pairs with held-out (colour, shape) combinations
stay unseen.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import BatchFeature, Qwen2_5_VLForConditionalGeneration

from spatialrl.data.captions import sample_layout_captions
from spatialrl.reward.inputs import QwenVLChatEncoder, load_qwen_vl_processing
from spatialrl.tiny import save_atomically

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # transformers' cross-entropy skips these labels
PRETRAINING_RECORD = "caption_pretraining.json"  # settings and loss history, in the folder


@dataclass(frozen=True)
class CaptionPretraining:
    steps: int = 800
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    image_size: int = 64
    # The pixel budget SpatialScore reads images at (configs/reward/local.yaml): 16 tokens.
    pixels: int = 112 * 112


def pretrain_on_layout_captions(
    base: Path, out_dir: Path, settings: CaptionPretraining = CaptionPretraining()
) -> Path:
    """Load the model at `base`, train every weight on layout captions, save it with its
    tokenizer and image processor into `out_dir` (atomically), with the settings and the loss
    every 50 steps in `PRETRAINING_RECORD`. Returns `out_dir`."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    tokenizer, image_processor, image_token_id = load_qwen_vl_processing(
        str(base), min_pixels=settings.pixels, max_pixels=settings.pixels
    )
    encoder = QwenVLChatEncoder(tokenizer, image_processor, image_token_id)
    rng = np.random.default_rng(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    losses = {}
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        for step in range(settings.steps):
            batch = caption_batch(encoder, sample_layout_captions(
                settings.batch_size, rng, size=settings.image_size))
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if (step + 1) % 50 == 0 or step + 1 == settings.steps:
                losses[step + 1] = loss.item()
                log.info("caption pretraining step %d/%d: loss %.3f",
                         step + 1, settings.steps, loss.item())
    # The saved image processor keeps the base's own budget; only training used `pixels`.
    _, saved_processor, _ = load_qwen_vl_processing(str(base))
    record = PretrainingRecord(base=str(base), settings=asdict(settings), loss_by_step=losses)
    return save_atomically(Path(out_dir), [model.eval(), tokenizer, saved_processor, record])


@dataclass(frozen=True)
class PretrainingRecord:
    base: str
    settings: dict
    loss_by_step: dict[int, float]

    def save_pretrained(self, folder: Path) -> None:
        (Path(folder) / PRETRAINING_RECORD).write_text(json.dumps(asdict(self), indent=2) + "\n")


def caption_batch(encoder: QwenVLChatEncoder, captioned: list) -> BatchFeature:
    """Model inputs for one chat turn per (image, caption), image first, with labels on the
    caption's tokens only: the image, the chat scaffolding and padding are not predicted."""
    contents = [[{"type": "image"}, {"type": "text", "text": text}] for _, text in captioned]
    batch = encoder.encode(contents, [[image] for image, _ in captioned])
    ids = batch["input_ids"]
    vision_end = encoder.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    after_image = (ids == vision_end).cumsum(dim=1) > 0
    special = torch.isin(ids, torch.tensor(encoder.tokenizer.all_special_ids))
    predicted = after_image & ~special & batch["attention_mask"].bool()
    batch["labels"] = torch.where(predicted, ids, IGNORE_INDEX)
    return batch
