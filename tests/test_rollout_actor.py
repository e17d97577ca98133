"""Rollout actors on real Ray with tiny FLUX: reproducible seeds across actors, and weights
published by the DeepSpeed learner group."""

import numpy as np
import pytest
import ray
import torch

from spatialrl.actors.rollout import RolloutActor, unpack_group
from spatialrl.config import load_config
from spatialrl.learners.policy_learner import LearnerGroup
from spatialrl.rewards import build_reward
from spatialrl.train_batch import build_train_batch, score_groups

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.deepspeed]  # a LearnerGroup

PROMPTS = ["a red circle left of a blue square", "a green triangle above a yellow circle"]


def tiny_config(tiny_flux_path):
    return load_config("configs/tiny.yaml", [
        f"model.pretrained={tiny_flux_path}", "grpo.group_size=4", "grpo.top_k=1",
        "sampling.num_steps=4", "optim.micro_batch_size=2", "optim.updates_per_iteration=1",
        "learner.num_workers=1", "learner.gpus_per_worker=0", "learner.cpus_per_worker=0.5",
    ])


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture
def make_actor(tiny_flux_path, local_ray):
    actors = []

    def make():
        actors.append(RolloutActor.options(num_cpus=0.25).remote(tiny_config(tiny_flux_path)))
        return actors[-1]

    yield make
    for actor in actors:
        ray.kill(actor)


def states(packed: dict) -> torch.Tensor:
    return packed["tensors"]["states"]


def test_same_prompt_iteration_and_index_give_the_same_trajectory_on_any_actor(make_actor):
    first, second = make_actor(), make_actor()
    both = ray.get(first.rollout.remote(PROMPTS, [0, 1], 3))
    alone, later = ray.get([second.rollout.remote(PROMPTS[1:], [7], 3),
                            second.rollout.remote(PROMPTS[1:], [7], 4)])

    # Drawn in another batch, at another position, by another actor: the same samples.
    torch.testing.assert_close(states(alone[0]), states(both[1]), rtol=0, atol=1e-5)
    assert alone[0]["tensors"]["seeds"].tolist() == both[1]["tensors"]["seeds"].tolist()
    assert np.abs(alone[0]["images"].astype(int) - both[1]["images"].astype(int)).max() <= 1
    assert not torch.allclose(states(later[0]), states(alone[0]), atol=1e-3)

    group = unpack_group(alone[0])
    assert (group.prompt, group.group_id, group.iteration, group.version) == (
        PROMPTS[1], 7, 3, 0)
    assert len(group.trajectory) == len(group.images) == 4
    assert group.images[0].size == (64, 64)


def test_published_weights_reach_the_rollout_actor(make_actor, tiny_flux_path):
    cfg = tiny_config(tiny_flux_path)
    actor = make_actor()
    before = ray.get(actor.rollout.remote(PROMPTS, [0, 1], 0))
    groups = [unpack_group(packed) for packed in before]
    batch = build_train_batch(score_groups(build_reward(cfg.reward, "cpu"), groups), cfg.grpo)
    learners = LearnerGroup(cfg)
    try:
        learners.update(batch)
        version, state_ref, checksum = learners.publish()
    finally:
        learners.shutdown()

    assert ray.get(actor.load_weights.remote(version, state_ref))["checksum"] == checksum
    assert ray.get(actor.version.remote()) == version == 1
    (after,) = ray.get(actor.rollout.remote(PROMPTS[:1], [0], 0))
    assert after["version"] == 1
    assert not torch.equal(states(after), states(before[0])), "the new policy samples differently"

    # Different values, one key short: a partial copy would show in the samples.
    state = {name: 2 * tensor for name, tensor in ray.get(state_ref).items()}
    del state[next(iter(state))]
    with pytest.raises(ValueError, match="missing"):
        ray.get(actor.load_weights.remote(2, state))
    # The failed load changed nothing: same version, same samples.
    assert ray.get(actor.version.remote()) == 1
    (again,) = ray.get(actor.rollout.remote(PROMPTS[:1], [0], 0))
    assert torch.equal(states(again), states(after))
