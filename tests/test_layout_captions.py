"""Layout captions and the caption pretraining of the tiny Qwen2.5-VL that reads them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from spatialrl.data.captions import layout_caption, sample_layout_captions
from spatialrl.data.grammar import parse_prompt
from spatialrl.data.render import render
from spatialrl.data.shapes import HELD_OUT_COMBOS
from spatialrl.reward.inputs import QwenVLChatEncoder, load_qwen_vl_processing
from spatialrl.tiny.pretraining import (
    IGNORE_INDEX,
    PRETRAINING_RECORD,
    CaptionPretraining,
    caption_batch,
    pretrain_on_layout_captions,
)


def test_caption_reads_the_relation_from_the_pixels_with_either_object_as_subject():
    scene = parse_prompt("a blue square to the right of a red circle")
    image = render(scene, 64, np.random.default_rng(0))
    openings = {layout_caption(image, scene, np.random.default_rng(seed)).split(",")[0]
                for seed in range(8)}
    assert openings == {"a red circle to the left of a blue square",
                        "a blue square to the right of a red circle"}


def test_caption_of_an_image_missing_an_object_is_none():
    scene = parse_prompt("a blue square to the right of a red circle")
    blank = Image.new("RGB", (64, 64), "white")
    assert layout_caption(blank, scene, np.random.default_rng(0)) is None


def test_train_captions_never_name_a_held_out_combination():
    named = " ".join(caption for _, caption in sample_layout_captions(40, np.random.default_rng(1)))
    assert not [f"{c} {s}" for c, s in HELD_OUT_COMBOS if f"{c} {s}" in named]
    held_out = sample_layout_captions(20, np.random.default_rng(1), split="test")
    assert any(f"{c} {s}" in text for _, text in held_out for c, s in HELD_OUT_COMBOS)


@pytest.fixture(scope="module")
def encoder(tiny_models_dir):
    return QwenVLChatEncoder(*load_qwen_vl_processing(str(tiny_models_dir / "qwen2.5-vl")))


def test_caption_batch_labels_only_the_text_after_the_image(encoder):
    captioned = sample_layout_captions(3, np.random.default_rng(2))
    batch = caption_batch(encoder, captioned)
    for row, (_, caption) in enumerate(captioned):
        labels = batch["labels"][row]
        labelled = labels[labels != IGNORE_INDEX]
        # The caption, then the chat's own closing words ("\nassistant\n"): never an image
        # token, a special token or padding.
        assert encoder.tokenizer.decode(labelled).startswith(caption)
        assert not torch.isin(labelled, torch.tensor(encoder.tokenizer.all_special_ids)).any()
        image_positions = batch["input_ids"][row] == encoder.tokenizer.convert_tokens_to_ids(
            encoder.image_token)
        assert (labels[image_positions] == IGNORE_INDEX).all()


def test_pretraining_lowers_caption_loss_and_saves_a_loadable_model(
    tiny_models_dir, encoder, tmp_path
):
    base = tiny_models_dir / "qwen2.5-vl"
    out = pretrain_on_layout_captions(
        base, tmp_path / "pretrained", CaptionPretraining(steps=15, batch_size=8, lr=3e-3)
    )
    held = caption_batch(encoder, sample_layout_captions(8, np.random.default_rng(99)))

    def loss(folder):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            return model.eval()(**held).loss.item()

    assert loss(out) < loss(base) - 1.0
    record = json.loads((out / PRETRAINING_RECORD).read_text())
    assert record["settings"]["steps"] == 15 and list(record["loss_by_step"]) == ["15"]
    # It loads through the same processing code as the base, image processor included.
    tokenizer, image_processor, _ = load_qwen_vl_processing(str(out))
    assert tokenizer.get_vocab() == encoder.tokenizer.get_vocab()
    assert image_processor.size == encoder.image_processor.size
