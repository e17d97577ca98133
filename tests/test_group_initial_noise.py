"""sampling.group_initial_noise: with "shared", the G samples of a prompt start from one
initial noise (DanceGRPO) and differ only by their SDE steps' noise, which the recomputed
log-probs still match; "independent" (the default, Flow-GRPO's) starts each from its own."""

import pytest
import torch

from spatialrl.config import ConfigError, PolicyModelConfig, SamplingConfig, load_config
from spatialrl.flux.loading import load_flux_pipeline
from spatialrl.flux.sampler import recompute_log_probs
from spatialrl.rollout import sample_groups

PROMPTS = ["a red circle left of a blue square", "a green star above a pink hexagon"]


@pytest.fixture(scope="module")
def pipeline(tiny_flux_path):
    return load_flux_pipeline(PolicyModelConfig(
        pretrained=str(tiny_flux_path), dtype="float32", gradient_checkpointing=False))


def groups(pipeline, noise: str, noise_level: float = 0.7):
    cfg = SamplingConfig(height=32, width=32, num_steps=3, batch_size=3, max_sequence_length=16,
                         noise_level=noise_level, group_initial_noise=noise)
    return sample_groups(pipeline, PROMPTS, [0, 1], iteration=2, version=0, run_seed=0,
                         group_size=4, cfg=cfg)


def test_shared_noise_starts_a_group_in_one_place_and_its_steps_apart(pipeline):
    shared, independent = groups(pipeline, "shared"), groups(pipeline, "independent")
    for group in shared:
        starts, ends = group.trajectory.states[:, 0], group.trajectory.states[:, -1]
        assert all(torch.equal(starts[0], start) for start in starts[1:])
        assert not any(torch.allclose(ends[0], end) for end in ends[1:])
    assert not torch.equal(shared[0].trajectory.states[0, 0], shared[1].trajectory.states[0, 0])
    for group in independent:
        starts = group.trajectory.states[:, 0]
        assert not any(torch.equal(starts[0], start) for start in starts[1:])


def test_shared_noise_without_step_noise_gives_one_image_per_group(pipeline):
    for group in groups(pipeline, "shared", noise_level=0.0):
        ends = group.trajectory.states[:, -1]
        assert all(torch.equal(ends[0], end) for end in ends[1:])


def test_recomputed_log_probs_match_the_rollout_with_shared_noise(pipeline):
    trajectory = groups(pipeline, "shared")[0].trajectory
    steps = list(range(trajectory.num_steps))
    with torch.no_grad():
        recomputed = recompute_log_probs(pipeline.transformer, trajectory, steps)
    torch.testing.assert_close(recomputed, trajectory.log_probs[:, steps], rtol=0, atol=1e-5)


def test_an_unknown_choice_is_named():
    with pytest.raises(ConfigError, match="sampling.group_initial_noise"):
        load_config("configs/tiny.yaml", ["sampling.group_initial_noise=same"])


def test_two_groups_of_one_prompt_in_an_iteration_are_drawn_apart(pipeline):
    """A prompt file with repeats puts one prompt in two groups of an iteration: each group
    is seeded by its id too, so they are not copies."""
    cfg = SamplingConfig(height=32, width=32, num_steps=2, batch_size=4, max_sequence_length=16)
    first, second = sample_groups(pipeline, [PROMPTS[0]] * 2, [4, 5], iteration=0, version=0,
                                  run_seed=0, group_size=2, cfg=cfg)
    assert not torch.allclose(first.trajectory.states, second.trajectory.states, atol=1e-3)
