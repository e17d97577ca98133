"""The zero-shot pairwise Qwen2.5-VL judge on the tiny random model: the answer read from the
next-token logits, both image orders averaged, determinism and symmetry (its accuracy is
chance with random weights, so none is asserted)."""

import numpy as np
import pytest
import torch
from PIL import Image

from spatialrl.config import ConfigError, validate_config
from spatialrl.reward.judge import PairwiseJudge, PairwiseJudgeConfig

PROMPTS = [
    "a red circle to the left of a blue square",
    "a cat",
    "a green triangle above a yellow star, the star to the right of a small purple box",
]


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# Mixed sizes and prompt lengths, so a batch is padded.
IMAGES_A = [noise_image(64, 64, 0), noise_image(40, 120, 1), noise_image(200, 150, 2)]
IMAGES_B = [noise_image(64, 64, 3), noise_image(96, 64, 4), noise_image(56, 56, 5)]


@pytest.fixture(scope="module")
def judge(tiny_models_dir):
    config = PairwiseJudgeConfig(model=str(tiny_models_dir / "qwen2.5-vl"), dtype="float32")
    return PairwiseJudge.from_config(config)


def test_answers_are_the_tokens_1_and_2(judge):
    assert [judge.encoder.tokenizer.decode([i]) for i in judge.answer_ids] == ["1", "2"]


def test_p_first_is_the_next_token_softmax_of_the_plain_model(judge):
    """The same number as the full transformers forward's last-position logits of "1" and
    "2", for a lone (unpadded) chat with the two images."""
    p = judge.p_first(IMAGES_A[:1], IMAGES_B[:1], PROMPTS[:1])
    contents = [
        [{"type": "text", "text": "Image 1:"}, {"type": "image"},
         {"type": "text", "text": "Image 2:"}, {"type": "image"},
         {"type": "text", "text": judge.config.question.replace("{prompt}", PROMPTS[0])}]
    ]
    inputs = judge.encoder.encode(contents, [[IMAGES_A[0], IMAGES_B[0]]])
    text = judge.encoder.tokenizer.decode(inputs["input_ids"][0])
    assert text.count("<|vision_start|>") == 2 and text.endswith("<|im_start|>assistant\n")
    assert f"Prompt: {PROMPTS[0]}\nAnswer with 1 or 2." in text
    with torch.no_grad():
        # As Qwen2_5_VLProcessor marks them: 1 at image tokens (for the 3D positions).
        image_tokens = inputs["input_ids"] == judge.model.config.image_token_id
        logits = judge.model(**inputs, mm_token_type_ids=image_tokens.int()).logits
    logits = logits[0, -1, judge.answer_ids]
    torch.testing.assert_close(p, logits.softmax(-1)[:1], rtol=1e-5, atol=1e-6)


def test_compare_averages_both_image_orders(judge):
    verdict = judge.compare(IMAGES_A, IMAGES_B, PROMPTS)
    a_first = judge.p_first(IMAGES_A, IMAGES_B, PROMPTS)
    b_first = judge.p_first(IMAGES_B, IMAGES_A, PROMPTS)
    torch.testing.assert_close(verdict.a_shown_first, a_first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(verdict.a_shown_second, 1 - b_first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(verdict.p_a, (a_first + 1 - b_first) / 2, rtol=1e-5, atol=1e-6)
    # The random judge prefers a position; averaging the orders is what cancels it.
    assert (verdict.a_shown_first - verdict.a_shown_second).abs().min() > 1e-3
    assert ((verdict.p_a > 0) & (verdict.p_a < 1)).all()


def test_swapping_the_images_gives_the_complement(judge):
    forward = judge.compare(IMAGES_A, IMAGES_B, PROMPTS)
    swapped = judge.compare(IMAGES_B, IMAGES_A, PROMPTS)
    torch.testing.assert_close(swapped.p_a, 1 - forward.p_a, rtol=0, atol=1e-6)
    torch.testing.assert_close(swapped.a_shown_first, 1 - forward.a_shown_second)


def test_deterministic_and_the_same_alone_or_in_a_batch(judge):
    first = judge.compare(IMAGES_A, IMAGES_B, PROMPTS).p_a
    assert torch.equal(judge.compare(IMAGES_A, IMAGES_B, PROMPTS).p_a, first)
    alone = torch.cat([
        judge.compare([a], [b], [p]).p_a
        for a, b, p in zip(IMAGES_A, IMAGES_B, PROMPTS, strict=True)
    ])
    assert alone.unique().numel() == len(PROMPTS)
    tokenizer = judge.encoder.tokenizer
    side = tokenizer.padding_side
    try:
        for padding_side in ("left", "right"):
            tokenizer.padding_side = padding_side
            batched = judge.compare(IMAGES_A, IMAGES_B, PROMPTS).p_a
            torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    finally:
        tokenizer.padding_side = side


def test_bad_inputs_are_named(judge):
    image = IMAGES_A[0]
    cases = [
        ([image], [image, image], ["a cat"], "got 2 images_b but 1 prompts"),
        ([image], [None], ["a cat"], r"images_b\[0\]: expected a PIL image"),
        ([image], [image], [""], r"prompts\[0\]: empty prompt"),
        ([image], [image], ["a <|image_pad|> cat"], "special tokens"),
    ]
    for images_a, images_b, prompts, message in cases:
        with pytest.raises(ValueError, match=message):
            judge.compare(images_a, images_b, prompts)


def test_config_needs_the_prompt_field():
    with pytest.raises(ConfigError, match="question"):
        validate_config(PairwiseJudgeConfig, {"question": "Which is better?"}, "<test>")
    with pytest.raises(ConfigError, match="max_pixels"):
        validate_config(PairwiseJudgeConfig, {"max_pixels": 0}, "<test>")
