"""SpatialReward: answer parsing (never a silent reward), the scalar reward, and the judge on
the tiny random Qwen3-VL loaded like SpatialReward/SpatialReward-8B."""

import json
from collections import Counter

import pytest
from PIL import Image

from spatialrl.spatialreward.answers import EditAnswer, QualityAnswer, parse_answer
from spatialrl.spatialreward.reward import RewardWeights, combine, invalid_counts

GOOD_EDIT = {
    "edit_region": [{"id": 0, "label": "red circle moved", "bbox_2d": [100, 200, 300, 400]}],
    "reasoning": "<|bbox_0|> the circle is now left of the square. <|global|> done.",
    "score": [20, 25],
}
GOOD_QUALITY = {"reasoning": "clean shapes", "score": [15, 25]}


def edit_text(**changes) -> str:
    return json.dumps({**GOOD_EDIT, **changes})


BAD_EDIT_ANSWERS = {
    "truncated": edit_text()[:-12],
    "extra_text": "Here is my answer: " + edit_text(),
    "missing_key": json.dumps({"edit_region": [], "reasoning": "nothing changed"}),
    "box": edit_text(edit_region=[{"id": 0, "label": "x", "bbox_2d": [1200, 0, 1500, 300]}]),
    "score_range": edit_text(score=[26, 3]),
    "region_reference": edit_text(reasoning="<|bbox_3|> moved"),
    "extra_key": edit_text(confidence=0.9),
    "schema": edit_text(score=["20", 25]),
    "not_json": "The edit looks fine, 20/25.",
    "empty": "   ",
}


@pytest.mark.parametrize("reason", sorted(BAD_EDIT_ANSWERS))
def test_a_bad_edit_answer_is_invalid_with_its_reason_and_gets_no_reward(reason):
    parsed = parse_answer(BAD_EDIT_ANSWERS[reason], EditAnswer)
    assert (parsed.valid, parsed.reason, parsed.answer) == (False, reason, None)
    assert parsed.detail
    result = combine(parsed, parse_answer(json.dumps(GOOD_QUALITY), QualityAnswer),
                     RewardWeights(), 25)
    assert (result.valid, result.reward, result.reason) == (False, None, f"edit:{reason}")


def test_invalid_answers_are_counted_by_reason():
    quality = parse_answer(json.dumps(GOOD_QUALITY), QualityAnswer)
    results = [combine(parse_answer(text, EditAnswer), quality, RewardWeights(), 25)
               for text in [*BAD_EDIT_ANSWERS.values(), edit_text(), edit_text()]]
    counts = invalid_counts(results)
    assert counts == Counter({f"edit:{reason}": 1 for reason in BAD_EDIT_ANSWERS})


def test_a_bad_quality_answer_makes_the_sample_invalid():
    result = combine(parse_answer(edit_text(), EditAnswer),
                     parse_answer('{"reasoning": "ok", "score": [3]}', QualityAnswer),
                     RewardWeights(), 25)
    assert (result.valid, result.reward, result.reason) == (False, None, "quality:schema")


def test_boxes_are_clamped_to_0_1000_and_kept_when_still_a_box():
    parsed = parse_answer(
        edit_text(edit_region=[{"id": 0, "label": "x", "bbox_2d": [-40, 10, 400, 1200]}]),
        EditAnswer)
    assert parsed.valid
    assert parsed.answer.edit_region[0].bbox_2d == (0.0, 10.0, 400.0, 1000.0)


def test_an_empty_region_list_is_a_valid_failed_edit():
    parsed = parse_answer(edit_text(edit_region=[], reasoning="<|global|> nothing changed",
                                    score=[0, 25]), EditAnswer)
    assert parsed.valid and parsed.answer.edit_region == []


def test_the_score_range_comes_from_the_caller():
    assert parse_answer(edit_text(score=[9, 10]), EditAnswer, score_range=10).valid
    assert parse_answer(edit_text(score=[11, 10]), EditAnswer, score_range=10).reason == \
        "score_range"


def test_reward_follows_the_public_formula_and_weights():
    edit = parse_answer(edit_text(), EditAnswer)  # success 20, over_editing 25
    quality = parse_answer(json.dumps(GOOD_QUALITY), QualityAnswer)  # 15, 25
    result = combine(edit, quality, RewardWeights(), 25)
    assert result.edit == pytest.approx((0.6 * 20 + 0.4 * 25) / 2.5)
    assert result.quality == pytest.approx((0.5 * 15 + 0.5 * 25) / 2.5)
    assert result.reward == pytest.approx(8.8**0.8 * 8.0**0.2 / 10)
    only_edit = combine(edit, quality, RewardWeights(edit_exponent=1.0), 25)
    assert only_edit.reward == pytest.approx(0.88)


def test_weights_that_do_not_sum_to_one_are_refused():
    with pytest.raises(ValueError, match="success \\+ over_editing must sum to 1"):
        RewardWeights(success=0.7)


# The judge on the tiny random Qwen3-VL.


@pytest.fixture(scope="module")
def tiny_judge(tiny_models_dir):
    from spatialrl.spatialreward.model import SpatialReward, SpatialRewardConfig

    return SpatialReward.from_config(SpatialRewardConfig(
        model=str(tiny_models_dir / "qwen3-vl"), dtype="float32", max_new_tokens=24))


def images():
    return [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]


def test_the_tiny_judge_is_a_qwen3_vl_that_sees_both_images(tiny_judge):
    from transformers import Qwen3VLForConditionalGeneration

    assert isinstance(tiny_judge.model, Qwen3VLForConditionalGeneration)
    source, edited = images()
    inputs = tiny_judge._encode([[{"type": "image"}, {"type": "image"},
                                  {"type": "text", "text": "move it"}]], [[source, edited]])
    assert int(inputs["mm_token_type_ids"].sum()) == 2 * 4  # two 64x64 images, 4 tokens each
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]


def test_the_judge_backbone_is_wider_and_reads_boxes_finer(tiny_models_dir):
    """qwen3-vl-judge, the backbone a tiny SpatialReward trains on: 4 layers of width 192,
    and a 256x256 image costs 64 tokens where the test backbone caps it at 16."""
    from spatialrl.spatialreward.model import SpatialReward, SpatialRewardConfig

    judges = {name: SpatialReward.from_config(SpatialRewardConfig(
        model=str(tiny_models_dir / name), dtype="float32")) for name in ("qwen3-vl",
                                                                          "qwen3-vl-judge")}
    text = judges["qwen3-vl-judge"].model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers) == (192, 4)
    big = [Image.new("RGB", (256, 256), "red")] * 2
    turn = [[{"type": "image"}, {"type": "image"}, {"type": "text", "text": "move it"}]]
    tokens = {name: int(judge._encode(turn, [big])["mm_token_type_ids"].sum())
              for name, judge in judges.items()}
    assert tokens == {"qwen3-vl": 2 * 16, "qwen3-vl-judge": 2 * 64}


def test_score_returns_one_result_per_sample_and_a_random_judge_gets_no_reward(tiny_judge):
    source, edited = images()
    results = tiny_judge.score([source, edited], [edited, source],
                               ["move the red circle left", "recolour the square green"])
    assert len(results) == 2
    for result in results:  # random weights do not write the JSON answer
        assert not result.valid and result.reward is None
        assert result.reason.split(":")[1] in {"not_json", "extra_text", "truncated", "empty"}


def test_generation_is_deterministic(tiny_judge):
    source, edited = images()
    first = tiny_judge.judge_edits([source], [edited], ["remove the circle"])
    assert first == tiny_judge.judge_edits([source], [edited], ["remove the circle"])


def test_an_empty_instruction_is_refused(tiny_judge):
    source, edited = images()
    with pytest.raises(ValueError, match="prompts\\[0\\]: empty prompt"):
        tiny_judge.judge_edits([source], [edited], [" "])


def test_constrained_decoding_keeps_the_answer_in_json_shape(tiny_models_dir):
    pytest.importorskip("outlines")
    from spatialrl.spatialreward.model import SpatialReward, SpatialRewardConfig

    judge = SpatialReward.from_config(SpatialRewardConfig(
        model=str(tiny_models_dir / "qwen3-vl"), dtype="float32", max_new_tokens=60,
        constrained=True, max_reasoning_chars=8))
    source, edited = images()
    texts = judge.judge_quality([edited, source])
    for text in texts:  # unconstrained, the random model writes no JSON at all
        parsed = parse_answer(text, QualityAnswer)
        assert text.startswith('{"reasoning"'), text
        assert parsed.reason in {None, "truncated"}, (parsed, text)
