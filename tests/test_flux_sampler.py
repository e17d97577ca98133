import numpy as np
import pytest
import torch

from spatialrl.config import LoraConfig, PolicyModelConfig, SamplingConfig
from spatialrl.flux.loading import load_flux_pipeline
from spatialrl.flux.lora import add_lora
from spatialrl.flux.sampler import Trajectory, recompute_log_probs, sample, step_distribution
from spatialrl.flux.sde import gaussian_log_prob
from spatialrl.grpo.update import old_log_prob_drift

PROMPTS = [
    "a red circle to the left of a blue square",
    "a green triangle above a yellow star",
    "a purple hexagon in front of an orange cube",
]


def sampling(**overrides) -> SamplingConfig:
    base = dict(height=64, width=64, num_steps=6, max_sequence_length=32, noise_level=0.7)
    base.update(overrides)
    return SamplingConfig(**base)


@pytest.fixture(scope="module")
def pipeline(tiny_flux_path):
    return load_flux_pipeline(PolicyModelConfig(pretrained=str(tiny_flux_path), dtype="float32"))


def prompts_for(batch_size):
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]


def test_noise_level_zero_reproduces_flux_pipeline(pipeline):
    # The same seeds as one CPU generator per sample, which is how the sampler draws noise.
    cfg = sampling(num_steps=5, guidance_scale=5.0)
    seeds = [7, 8]
    trajectory, images = sample(
        pipeline, PROMPTS[:2], seeds, cfg, noise_level=0.0, output_type="np"
    )
    reference = pipeline(
        PROMPTS[:2],
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        num_inference_steps=5,
        guidance_scale=5.0,
        height=64,
        width=64,
        max_sequence_length=32,
        output_type="np",
    ).images
    assert np.abs(images - reference).max() < 1e-5
    reference_latents = pipeline(
        PROMPTS[:2],
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        num_inference_steps=5,
        guidance_scale=5.0,
        height=64,
        width=64,
        max_sequence_length=32,
        output_type="latent",
    ).images
    assert (trajectory.states[:, -1] - reference_latents).abs().max() < 1e-5
    assert not trajectory.sde_mask.any()
    assert torch.isnan(trajectory.log_probs).all()


@pytest.mark.parametrize("sde_type", ["flow_grpo", "cps"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_recomputed_log_probs_give_ratio_one(pipeline, batch_size, sde_type):
    cfg = sampling(sde_type=sde_type, noise_level=0.7 if sde_type == "flow_grpo" else 0.5)
    trajectory, _ = sample(pipeline, prompts_for(batch_size), list(range(batch_size)), cfg)
    steps = torch.nonzero(trajectory.sde_mask).flatten().tolist()
    new = recompute_log_probs(pipeline.transformer, trajectory, steps)
    ratio = torch.exp(new - trajectory.log_probs[:, steps])
    assert (ratio - 1).abs().max() < 1e-5


def test_ratio_is_one_when_the_batch_is_regrouped(pipeline):
    trajectory, _ = sample(pipeline, prompts_for(8), list(range(100, 108)), sampling())
    steps = list(range(trajectory.num_steps))
    for grouping in ([3, 5], [1] * 8):
        starts = np.cumsum([0] + grouping[:-1])
        parts = [trajectory.select(range(s, s + n)) for s, n in zip(starts, grouping, strict=True)]
        new = torch.cat([recompute_log_probs(pipeline.transformer, p, steps) for p in parts])
        assert (torch.exp(new - trajectory.log_probs) - 1).abs().max() < 1e-5
    order = [5, 2, 7, 0]
    shuffled = recompute_log_probs(pipeline.transformer, trajectory.select(order), steps)
    assert (torch.exp(shuffled - trajectory.log_probs[order]) - 1).abs().max() < 1e-5


def test_a_sample_does_not_depend_on_its_batch(pipeline):
    cfg = sampling()
    batch, _ = sample(pipeline, prompts_for(4), [10, 11, 12, 13], cfg)
    alone, _ = sample(pipeline, [prompts_for(4)[2]], [12], cfg)
    assert torch.equal(alone.states[0, 0], batch.states[2, 0])  # the same initial noise
    # CPU matmuls round differently for different batch sizes: equal to float precision.
    assert (alone.states[0] - batch.states[2]).abs().max() < 1e-5
    assert (alone.log_probs[0] - batch.log_probs[2]).abs().max() < 1e-5
    assert (batch.states[1, -1] - batch.states[2, -1]).abs().max() > 0.1  # seeds matter


@pytest.mark.parametrize("sde_type", ["flow_grpo", "cps"])
def test_window_restricts_the_sde_to_its_steps(pipeline, sde_type):
    cfg = sampling(sde_type=sde_type, noise_level=0.5, sde_window=(2, 4))
    trajectory, _ = sample(pipeline, PROMPTS[:2], [1, 2], cfg)
    assert trajectory.sde_mask.tolist() == [False, False, True, True, False, False]
    assert torch.isfinite(trajectory.log_probs[:, 2:4]).all()
    assert torch.isnan(trajectory.log_probs[:, [0, 1, 4, 5]]).all()
    # Outside the window the path is the deterministic ODE: same as with no noise at all.
    ode, _ = sample(pipeline, PROMPTS[:2], [1, 2], cfg, noise_level=0.0)
    assert torch.equal(trajectory.states[:, :3], ode.states[:, :3])
    assert not torch.equal(trajectory.states[:, 3], ode.states[:, 3])


def test_cps_last_step_is_deterministic_and_flow_grpo_last_step_is_not(pipeline):
    cps, _ = sample(pipeline, PROMPTS[:1], [0], sampling(sde_type="cps", noise_level=0.5))
    flow, _ = sample(pipeline, PROMPTS[:1], [0], sampling(sde_type="flow_grpo"))
    assert cps.sde_mask.tolist() == [True] * 5 + [False]  # sigma_next = 0: CPS std is 0
    assert flow.sde_mask.all()
    assert torch.isfinite(cps.log_probs[:, :5]).all() and torch.isfinite(flow.log_probs).all()


def test_images_come_out_as_pil_and_tensor(pipeline):
    _, pil = sample(pipeline, PROMPTS[:2], [0, 1], sampling(num_steps=2))
    _, tensor = sample(pipeline, PROMPTS[:2], [0, 1], sampling(num_steps=2), output_type="pt")
    assert [image.size for image in pil] == [(64, 64), (64, 64)]
    assert tensor.shape == (2, 3, 64, 64) and 0 <= tensor.min() and tensor.max() <= 1
    as_float = np.asarray(pil[1]) / 255.0
    assert np.abs(as_float - tensor[1].permute(1, 2, 0).numpy()).max() < 0.5 / 255 + 1e-6


def test_trajectory_select_concat_and_save_round_trip(pipeline, tmp_path):
    trajectory, _ = sample(pipeline, PROMPTS, [4, 5, 6], sampling(num_steps=3))
    regrouped = Trajectory.concat([trajectory.select([2]), trajectory.select([0, 1])])
    assert regrouped.prompts == [PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    assert torch.equal(regrouped.states, trajectory.states[[2, 0, 1]])
    assert regrouped.seeds.tolist() == [6, 4, 5]
    trajectory.save(tmp_path / "trajectory.safetensors")
    loaded = Trajectory.load(tmp_path / "trajectory.safetensors")
    for name in ("states", "log_probs", "prompt_embeds", "sde_mask", "sigmas", "latent_image_ids"):
        assert torch.equal(getattr(loaded, name), getattr(trajectory, name)), name
    assert torch.isnan(loaded.log_probs).sum() == torch.isnan(trajectory.log_probs).sum()
    assert (loaded.prompts, loaded.height, loaded.sde_type) == (PROMPTS, 64, "flow_grpo")


def test_concat_refuses_records_with_different_schedules(pipeline):
    short, _ = sample(pipeline, PROMPTS[:1], [0], sampling(num_steps=2))
    other, _ = sample(pipeline, PROMPTS[:1], [0], sampling(num_steps=3))
    with pytest.raises(ValueError, match="differ"):
        Trajectory.concat([short, other])


def test_step_distribution_backpropagates_into_lora(tiny_flux_path):
    pipeline = load_flux_pipeline(
        PolicyModelConfig(
            pretrained=str(tiny_flux_path), dtype="float32", gradient_checkpointing=True
        )
    )
    add_lora(pipeline.transformer, LoraConfig(rank=4, alpha=8))
    trajectory, _ = sample(pipeline, PROMPTS[:2], [0, 1], sampling(num_steps=3))
    step = step_distribution(pipeline.transformer, trajectory, 1)
    gaussian_log_prob(trajectory.states[:, 2], step.mean, step.std).sum().backward()
    grads = [p.grad for n, p in pipeline.transformer.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    base = [p for n, p in pipeline.transformer.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in base)


def test_old_log_prob_drift_is_zero_for_fresh_data_and_grows_when_weights_change(pipeline):
    trajectory, _ = sample(pipeline, prompts_for(3), [0, 1, 2], sampling())
    assert old_log_prob_drift(pipeline.transformer, trajectory) < 1e-5
    weight = pipeline.transformer.proj_out.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(1.5)
    try:
        assert old_log_prob_drift(pipeline.transformer, trajectory) > 1e-3
    finally:
        with torch.no_grad():
            weight.copy_(original)
