"""The SpatialReward engines without Ray: the transformers engine's cached-prefix inputs give
the judge's own answers, its LRU counts hits and misses, the affinity key depends on exactly
the source pixels and the instruction, the vLLM engine without vllm fails naming the extra,
and an answer becomes the service's judgement (reward, or invalid with its reason)."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from spatialrl.spatialreward.answers import EditAnswer, QualityAnswer, parse_answer
from spatialrl.spatialreward.engines import (
    EditItem,
    EngineUnavailable,
    PrefixCache,
    ScoredEdit,
    TransformersEngine,
    VllmEngine,
    affinity_key,
)
from spatialrl.spatialreward.model import SpatialReward, SpatialRewardConfig
from spatialrl.spatialreward.reward import RewardWeights, combine


@pytest.fixture(scope="module")
def judge(tiny_models_dir) -> SpatialReward:
    return SpatialReward.from_config(SpatialRewardConfig(
        model=str(tiny_models_dir / "qwen3-vl"), dtype="float32", max_new_tokens=12))


def noise(seed: int, size=(64, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def item(source: Image.Image, edited: Image.Image, instruction: str) -> EditItem:
    return EditItem(source, edited, instruction, affinity_key(np.asarray(source), instruction))


def test_cached_prefixes_give_the_judges_own_answers_and_count_hits(judge):
    engine = TransformersEngine(judge, prefix_cache_size=8)
    # Sizes differ, so the prompts have different lengths and the batch is padded.
    sources = [noise(1), noise(2, (96, 64)), noise(1)]
    edits = [noise(3), noise(4), noise(5, (64, 96))]
    instructions = ["move the red circle left", "recolour the square", "move the red circle left"]
    expected = judge.score(sources, edits, instructions)
    items = [item(*sample) for sample in zip(sources, edits, instructions, strict=True)]

    first = engine.score(items)
    assert [scored.result for scored in first] == expected
    assert [scored.prefix_hit for scored in first] == [False, False, True]  # 3rd: same key
    again = engine.score(items)
    assert [scored.result for scored in again] == expected
    assert [scored.prefix_hit for scored in again] == [True, True, True]
    assert (engine.prefix_cache.hits, engine.prefix_cache.misses) == (4, 2)


def test_the_prefix_cache_evicts_the_least_recently_used_key():
    cache = PrefixCache(capacity=2)
    built = []
    for key in ["a", "b", "a", "c", "b", "a"]:
        cache.get_or_build(key, lambda key=key: built.append(key) or key)
    # "b" was evicted by "c" (after "a" was used again), then "a" by "b".
    assert built == ["a", "b", "c", "b", "a"]
    assert (cache.hits, cache.misses, len(cache)) == (1, 5, 2)


def test_the_affinity_key_is_the_source_pixels_and_the_instruction():
    source = np.asarray(noise(7))
    key = affinity_key(source, "remove the circle")
    assert key == affinity_key(source.copy(), "remove the circle")
    assert key != affinity_key(source, "remove the square")
    changed = source.copy()
    changed[0, 0, 0] ^= 1
    assert key != affinity_key(changed, "remove the circle")
    # The same bytes in another shape are another image.
    assert key != affinity_key(source.reshape(32, 128, 3), "remove the circle")


def test_the_vllm_engine_without_vllm_names_the_missing_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # absent even where it is installed
    with pytest.raises(EngineUnavailable, match=r"spatialrl\[vllm\]"):
        VllmEngine(SpatialRewardConfig())


GOOD_EDIT = {"edit_region": [{"id": 0, "label": "circle", "bbox_2d": [10, 20, 300, 400]}],
             "reasoning": "<|bbox_0|> moved. <|global|> done.", "score": [20, 25]}
GOOD_QUALITY = {"reasoning": "clean", "score": [15, 25]}


def scored(edit_text: str) -> ScoredEdit:
    result = combine(parse_answer(edit_text, EditAnswer),
                     parse_answer(json.dumps(GOOD_QUALITY), QualityAnswer), RewardWeights(), 25)
    return ScoredEdit(result, prefix_hit=True)


def test_a_parsed_answer_becomes_a_reward_and_a_bad_one_invalid_with_its_reason():
    pytest.importorskip("ray")
    from spatialrl.actors.spatialreward import judgement

    good = judgement(scored(json.dumps(GOOD_EDIT)), "k", "replica-1", 3)
    assert good.reward == pytest.approx(8.8**0.8 * 8.0**0.2 / 10)
    assert good.answer.edit.edit_region[0].bbox_2d == (10, 20, 300, 400)
    assert good.answer.quality.score == (15, 25) and good.invalid is None
    assert (good.replica, good.prefix_cache_hit, good.batch_size) == ("replica-1", True, 3)

    bad = judgement(scored(json.dumps(GOOD_EDIT)[:-9]), "k", "replica-1", 3)
    assert (bad.reward, bad.answer) == (None, None)
    assert bad.invalid.reason == "edit:truncated" and "JSON ends early" in bad.invalid.detail
