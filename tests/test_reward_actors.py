"""Reward deployment on a real local Ray + Serve (2 CPUs, no HTTP proxy): scores equal the
in-process reward, items batch across callers, bad requests fail alone, a killed replica is
replaced and callers get their answer."""

import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from spatialrl.actors.local_cluster import LocalRayHead, connected
from spatialrl.actors.reward import score_group, score_on_deployment, start_reward_deployment
from spatialrl.config import RewardConfig
from spatialrl.data.grammar import sample_scene, scene_to_prompt
from spatialrl.data.perturb import perturb
from spatialrl.data.render import render
from spatialrl.reward import SpatialScore, SpatialScoreConfig
from spatialrl.reward_functions import build_reward

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPT = "a red circle to the left of a blue square"
RULE_APP, NAN_APP, SPATIALSCORE_APP = "test-rule", "test-nan", "test-spatialscore"
# Long enough that concurrent callers always share a batch and a request is still queued in
# the replica when the kill test kills it; a full batch does not wait.
RULE_WAIT_S = 3.0


def reward_config(max_batch_size: int, batch_wait_timeout_s: float, **fields) -> RewardConfig:
    serving = {
        "max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s,
        "gpus_per_replica": 0, "cpus_per_replica": 0.25, **fields.pop("serving", {}),
    }
    return RewardConfig.model_validate({**fields, "serving": serving})


RULE = reward_config(8, RULE_WAIT_S, kind="shapes_rule",
                     serving={"custom_resources": {"reward_node": 0.1}})
# A NaN weight makes every score NaN; one item per batch. The config refuses non-finite
# values, so the weight is set past validation.
NAN = reward_config(1, 0.0, kind="weighted", weights={"shapes_rule": 1.0}).model_copy(
    update={"weights": {"shapes_rule": 1.0, "brightness_left": float("nan")}})


@pytest.fixture(scope="module")
def local_serve():
    with connected(LocalRayHead(num_cpus=2, resources={"reward_node": 1})):
        yield


@pytest.fixture(scope="module")
def rule_handle(local_serve):
    return start_reward_deployment(RULE, name=RULE_APP)


@pytest.fixture(scope="module")
def nan_handle(local_serve):
    return start_reward_deployment(NAN, name=NAN_APP)


@pytest.fixture(scope="module")
def spatialscore_config(tiny_models_dir, tmp_path_factory):
    torch.manual_seed(0)
    model = SpatialScore.from_config(SpatialScoreConfig(
        base_model=str(tiny_models_dir / "qwen2.5-vl"), dtype="float32", head_hidden_size=32))
    path = model.save_pretrained(tmp_path_factory.mktemp("spatialscore"))
    return reward_config(8, 1.0, kind="spatialscore", spatialscore_path=str(path), serving={
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8}})


@pytest.fixture(scope="module")
def spatialscore_handle(local_serve, spatialscore_config):
    return start_reward_deployment(spatialscore_config, name=SPATIALSCORE_APP)


@pytest.fixture(scope="module")
def shapes_items():
    """Eight (prompt, image) items whose rule scores differ: each scene's prompt with its own
    render and with the render of a scene that has one relation reversed."""
    rng = np.random.default_rng(0)
    prompts, images = [], []
    while len(prompts) < 8:
        scene = sample_scene(rng, num_objects=3, num_relations=2)
        for drawn in (scene, perturb(scene, 1, rng)[0]):
            prompts.append(scene_to_prompt(scene))
            images.append(np.asarray(render(drawn, 64, rng)))
    return prompts, np.stack(images)


def in_process(cfg: RewardConfig, prompts, images):
    return build_reward(cfg, "cpu")([Image.fromarray(image) for image in images], list(prompts))


def noise_images(count: int, seed: int, shape=(64, 64, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def concurrently(calls):
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


def test_rule_scores_equal_the_in_process_reward(rule_handle, shapes_items):
    prompts, images = shapes_items
    expected = in_process(RULE, prompts, images)
    assert len(set(expected.mu.tolist())) > 1, "the items should not all score the same"

    scored = score_group(rule_handle, prompts, images)  # a full batch: no wait
    assert torch.equal(scored.mu, expected.mu)
    assert torch.equal(scored.sigma, expected.sigma)
    assert scored.batch_sizes == [8] * 8 and scored.retries == 0


def test_replicas_hold_the_resources_from_config(rule_handle):
    assert ray.available_resources().get("reward_node", 0) == pytest.approx(1 - 0.1)


def test_items_of_concurrent_callers_share_batches(rule_handle, shapes_items):
    prompts, images = shapes_items
    calls = [lambda i=i: score_group(rule_handle, prompts[i:i + 2], images[i:i + 2])
             for i in range(0, 6, 2)]
    results = concurrently(calls)
    sizes = [size for result in results for size in result.batch_sizes]
    assert max(sizes) > 2, f"a group of 2 was only ever batched with itself: {sizes}"
    assert max(sizes) <= RULE.serving.max_batch_size
    expected = in_process(RULE, prompts[:6], images[:6]).mu
    assert torch.equal(torch.cat([result.mu for result in results]), expected)


def test_batches_hold_one_item_with_max_batch_size_one_and_nan_comes_back(nan_handle):
    calls = [lambda seed=seed: score_group(nan_handle, [PROMPT] * 3, noise_images(3, seed))
             for seed in range(3)]
    results = concurrently(calls)
    assert [result.batch_sizes for result in results] == [[1, 1, 1]] * 3
    assert all(math.isnan(value) for result in results for value in result.mu.tolist())


IMAGE = noise_images(1, 0)[0]
BAD_ITEMS = [  # (item, the error it must get)
    (("", IMAGE), "item 1: prompt must be a non-empty string"),
    ((None, IMAGE), "item 1: prompt must be a non-empty string"),
    (("a cat", IMAGE / 255), "item 1: image must be a uint8 array, got float64"),
    (("a cat", [[[0, 0, 0]]]), "item 1: image must be a uint8 array, got list"),
    (("a cat", IMAGE[..., 0]), r"item 1: image must have shape HxWx3, got \(64, 64\)"),
    (("a cat", noise_images(1, 0, (64, 64, 4))[0]), r"got \(64, 64, 4\)"),
    (("a cat", noise_images(1, 0, (0, 64, 3))[0]), r"got \(0, 64, 3\)"),
    (("a cat",), r"item 1: expected a \(prompt, image\) pair"),
]


def test_bad_requests_fail_alone_with_the_problem_named(rule_handle, shapes_items):
    prompts, images = shapes_items
    good_item = (prompts[0], images[0])
    bad = [(rule_handle.score.remote([good_item, item]), message) for item, message in BAD_ITEMS]
    empty = rule_handle.score.remote([])
    good = score_group(rule_handle, prompts[:1], images[:1])
    assert torch.equal(good.mu, in_process(RULE, prompts[:1], images[:1]).mu)
    for response, message in bad:
        with pytest.raises(ValueError, match=message):
            response.result()
    with pytest.raises(ValueError, match="expected a non-empty list"):
        empty.result()


def test_a_killed_replica_is_replaced_and_the_caller_gets_its_answer(rule_handle, shapes_items):
    prompts, images = shapes_items
    (replica,) = [actor for actor in ray.util.list_named_actors(all_namespaces=True)
                  if actor["name"].startswith(f"SERVE_REPLICA::{RULE_APP}#")]
    with ThreadPoolExecutor(1) as pool:
        # One item waits RULE_WAIT_S in the replica's batch queue: killed while in flight.
        in_flight = pool.submit(score_group, rule_handle, prompts[:1], images[:1])
        time.sleep(1.0)
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
        answer = in_flight.result(timeout=120)
    expected = in_process(RULE, prompts, images).mu
    assert answer.retries >= 1
    assert torch.equal(answer.mu, expected[:1])
    again = score_group(rule_handle, prompts, images)
    assert torch.equal(again.mu, expected) and again.retries == 0


def test_spatialscore_scores_equal_the_in_process_reward(spatialscore_handle, spatialscore_config):
    prompts = ["a red circle to the left of a blue square", "a cat",
               "a green triangle above a yellow star, the star right of a purple box"] * 3
    prompts, images = prompts[:8], noise_images(8, 1)
    expected = in_process(spatialscore_config, prompts, images)

    scored = score_group(spatialscore_handle, prompts, images)  # one full batch, in order
    assert scored.batch_sizes == [8] * 8
    assert torch.equal(scored.mu, expected.mu)
    assert torch.equal(scored.sigma, expected.sigma)


def test_an_item_that_breaks_the_model_fails_only_its_own_request(
        spatialscore_handle, spatialscore_config):
    # Valid input for the API, but Qwen2.5-VL refuses aspect ratios above 200.
    thin = noise_images(1, 2, (1, 500, 3))[0]
    images = noise_images(3, 3)
    bad = spatialscore_handle.score.remote([("a cat", images[0]), ("a thin cat", thin)])
    good = score_group(spatialscore_handle, ["a dog"] * 2, images[1:])
    with pytest.raises(RuntimeError, match="item 1: .*aspect ratio must be smaller than 200"):
        bad.result()
    assert good.batch_sizes == [1, 1], "the good items should have shared the failed batch"
    # Scored again one by one after the shared batch failed, so compare item by item.
    for index in (0, 1):
        alone = in_process(spatialscore_config, ["a dog"], images[1 + index:2 + index])
        assert torch.equal(good.mu[index:index + 1], alone.mu)


def test_edits_reach_spatialreward_as_triples_and_invalid_answers_come_back_nan(
        local_serve, tiny_models_dir):
    """(instruction, edit, source) items reach SpatialReward; the tiny random judge's answers
    do not parse, so each edit is NaN (the loop drops its group), never a default score. The
    edit reward refuses pairs without sources, and a request mixing the two shapes."""
    cfg = reward_config(8, 0.5, kind="spatialreward",
                        spatialreward_path=str(tiny_models_dir / "qwen3-vl"),
                        spatialreward_options={"dtype": "float32", "max_new_tokens": 8})
    handle = start_reward_deployment(cfg, name="test-spatialreward")
    edits, sources = noise_images(2, 4), noise_images(2, 5)
    scored = score_on_deployment(handle, [(["Make it red"] * 2, edits, sources)])[0]
    assert torch.isnan(scored.mu).all() and scored.batch_sizes == [2, 2]
    with pytest.raises(RuntimeError, match="needs source images"):
        score_group(handle, ["Make it red"], edits[:1])
    mixed = handle.score.remote([("Make it red", edits[0], sources[0]), ("a cat", edits[1])])
    with pytest.raises(ValueError, match="item 1: expected a .* pair or an .* triple, all alike"):
        mixed.result()
