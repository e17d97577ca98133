"""Rollout actors on real Ray with tiny FLUX: reproducible seeds across actors, groups scored
by the reward deployment from inside the actor, and weights published by the DeepSpeed
learner group."""

import pytest
import ray
import torch

from spatialrl.actors.local_cluster import LocalRayHead, connected
from spatialrl.actors.reward import start_reward_deployment
from spatialrl.actors.rollout import RolloutActor, unpack_group
from spatialrl.config import load_config
from spatialrl.flux.sampler import Trajectory
from spatialrl.learners.policy_learner import LearnerGroup
from spatialrl.train_batch import build_train_batch

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.deepspeed]  # a LearnerGroup

PROMPTS = ["a red circle left of a blue square", "a green triangle above a yellow circle"]


def tiny_config(tiny_flux_path):
    return load_config("configs/tiny.yaml", [
        f"model.pretrained={tiny_flux_path}", "grpo.group_size=4", "grpo.top_k=1",
        "sampling.num_steps=4", "optim.micro_batch_size=2", "optim.updates_per_iteration=1",
        "learner.num_workers=1", "learner.gpus_per_worker=0", "learner.cpus_per_worker=0.5",
    ])


@pytest.fixture(scope="module")
def local_ray(tiny_flux_path):
    with connected(LocalRayHead(num_cpus=2)):
        start_reward_deployment(tiny_config(tiny_flux_path))  # the brightness reward
        yield


@pytest.fixture
def make_actor(tiny_flux_path, local_ray):
    actors = []

    def make():
        actors.append(RolloutActor.options(num_cpus=0.25).remote(tiny_config(tiny_flux_path)))
        return actors[-1]

    yield make
    for actor in actors:
        ray.kill(actor)


def rollout(actor, prompts: list[str], group_ids: list[int], iteration: int
            ) -> tuple[dict, Trajectory, ray.ObjectRef]:
    """The summary, the fetched trajectories and their reference."""
    summary_ref, trajectories_ref = actor.rollout.remote(prompts, group_ids, iteration)
    summary, packed = ray.get([summary_ref, trajectories_ref])
    return summary, Trajectory.from_tensors(**packed), trajectories_ref


def test_same_group_iteration_and_index_give_the_same_trajectory_on_any_actor(make_actor):
    first, second = make_actor(), make_actor()
    both, both_trajectories, _ = rollout(first, PROMPTS, [0, 7], 3)
    alone, alone_trajectories, _ = rollout(second, PROMPTS[1:], [7], 3)
    _, later_trajectories, _ = rollout(second, PROMPTS[1:], [7], 4)
    _, other_group_trajectories, _ = rollout(second, PROMPTS[1:], [8], 3)

    # Drawn in another batch, at another position, by another actor: the same samples, and
    # the reward deployment scores them alike.
    second_group = both_trajectories.select(torch.arange(4, 8))
    torch.testing.assert_close(alone_trajectories.states, second_group.states, rtol=0, atol=1e-5)
    assert alone["groups"][0]["seeds"] == both["groups"][1]["seeds"]
    assert alone_trajectories.seeds.tolist() == alone["groups"][0]["seeds"]
    torch.testing.assert_close(alone["groups"][0]["mu"], both["groups"][1]["mu"], rtol=0,
                               atol=1e-2)
    assert not torch.allclose(later_trajectories.states, alone_trajectories.states, atol=1e-3)
    # the same prompt as another group of the iteration (a prompt file with repeats)
    assert not torch.allclose(other_group_trajectories.states, alone_trajectories.states,
                              atol=1e-3)
    assert alone["groups"][0]["mu"].std() > 0, "distinct samples get distinct rewards"
    # The summary carries no pixels and no trajectories: only scores, seeds and names.
    assert {k for g in both["groups"] for k in g} == {
        "prompt", "group_id", "iteration", "version", "seeds", "mu", "sigma",
        "reward_batch_sizes", "reward_retries"}

    scored = unpack_group(alone["groups"][0], "the trajectories' reference", 0)
    assert (scored.prompt, scored.group_id, scored.iteration, scored.version) == (
        PROMPTS[1], 7, 3, 0)
    assert len(scored.mu) == len(scored.sigma) == len(scored.seeds) == 4


def test_published_weights_reach_the_rollout_actor(make_actor, tiny_flux_path):
    cfg = tiny_config(tiny_flux_path)
    actor = make_actor()
    summary, before, reference = rollout(actor, PROMPTS, [0, 1], 0)
    # The learner ranks fetch the kept samples through the reference.
    batch = build_train_batch([unpack_group(g, reference, row * 4)
                               for row, g in enumerate(summary["groups"])], cfg.grpo)
    learners = LearnerGroup(cfg)
    try:
        learners.update(batch)
        version, state_ref, checksum = learners.publish()
    finally:
        learners.shutdown()

    assert ray.get(actor.load_weights.remote(version, state_ref))["checksum"] == checksum
    assert ray.get(actor.version.remote()) == version == 1
    summary, after, _ = rollout(actor, PROMPTS[:1], [0], 0)
    assert summary["version"] == 1
    assert not torch.equal(after.states, before.states[:4]), "the new policy samples differently"

    # Different values, one key short: a partial copy would show in the samples.
    state = {name: 2 * tensor for name, tensor in ray.get(state_ref).items()}
    del state[next(iter(state))]
    with pytest.raises(ValueError, match="missing"):
        ray.get(actor.load_weights.remote(2, state))
    # The failed load changed nothing: same version, same samples.
    assert ray.get(actor.version.remote()) == 1
    _, again, _ = rollout(actor, PROMPTS[:1], [0], 0)
    assert torch.equal(again.states, after.states)
