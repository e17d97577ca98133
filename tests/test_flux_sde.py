import math
from itertools import pairwise

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from spatialrl.flux.sde import (
    gaussian_kl,
    gaussian_log_prob,
    ode_step,
    sample_next,
    transition,
)


def random_state(shape=(3, 16, 8), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_ode_step_is_the_flow_match_euler_scheduler_step_bit_for_bit():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.8)
    x, _ = random_state()
    for index, timestep in enumerate(scheduler.timesteps):
        _, v = random_state(seed=index + 1)
        expected = scheduler.step(v, timestep, x, return_dict=False)[0]
        ours = ode_step(x, v, scheduler.sigmas[index], scheduler.sigmas[index + 1])
        assert torch.equal(ours, expected)
        x = expected


@pytest.mark.parametrize("sde_type", ["flow_grpo", "cps"])
def test_noise_level_zero_is_exactly_the_ode_step(sde_type):
    x, v = random_state()
    sigma, sigma_next = torch.tensor(0.8), torch.tensor(0.6)
    step = transition(x, v, sigma, sigma_next, 0.0, sde_type)
    assert float(step.std) == 0.0
    assert torch.equal(step.mean, ode_step(x, v, sigma, sigma_next))
    assert torch.equal(sample_next(step, torch.randn_like(x)), step.mean)


def test_flow_grpo_transition_matches_hand_computed_values():
    # sigma 0.5 -> 0.25, noise 0.7: std_t = 0.7 sqrt(0.5 / 0.5) = 0.7, dt = -0.25
    # mean = x (1 + 0.49 / 1 * dt) + v (1 + 0.49 * 0.5 / 1) dt = 0.8775 x - 0.31125 v
    step = transition(torch.tensor([[1.0]]), torch.tensor([[0.5]]), 0.5, 0.25, 0.7, "flow_grpo")
    assert step.mean.item() == pytest.approx(0.8775 - 0.155625, abs=1e-6)
    assert step.std.item() == pytest.approx(0.7 * 0.5, abs=1e-6)


def test_cps_transition_matches_hand_computed_values():
    # x0_hat = 1 - 0.5 * 0.5 = 0.75, eps_hat = 1 + 0.5 * 0.5 = 1.25, std = 0.25 sin(pi / 4)
    step = transition(torch.tensor([[1.0]]), torch.tensor([[0.5]]), 0.5, 0.25, 0.5, "cps")
    std = 0.25 * math.sin(math.pi / 4)
    assert step.std.item() == pytest.approx(std, abs=1e-7)
    mean = 0.75 * 0.75 + math.sqrt(0.25**2 - std**2) * 1.25
    assert step.mean.item() == pytest.approx(mean, abs=1e-6)


def test_flow_grpo_first_step_at_sigma_one_uses_the_next_sigma():
    x, v = random_state()
    step = transition(x, v, 1.0, 0.9, 0.7, "flow_grpo")
    std_t = 0.7 * math.sqrt(1.0 / (1 - 0.9))
    assert torch.isfinite(step.mean).all()
    assert step.std.item() == pytest.approx(std_t * math.sqrt(0.1), rel=1e-5)


def point_mass_velocity(x, sigma, data):
    """Exact velocity eps - x0 when all data sits at `data`: x = (1 - s) data + s eps."""
    return (x - data) / sigma


@pytest.mark.parametrize("sde_type", ["flow_grpo", "cps"])
def test_sdes_keep_the_flow_marginals_with_the_true_velocity(sde_type):
    # Data is a point mass, so x_sigma ~ N((1 - sigma) data, sigma^2): the SDE must keep that
    # marginal. A wrong drift or std changes the mean or the variance of the samples.
    generator = torch.Generator().manual_seed(0)
    data = 0.7
    sigmas = torch.linspace(1.0, 0.3, 141)
    x = torch.randn(40_000, 1, generator=generator)
    for sigma, sigma_next in pairwise(sigmas):
        v = point_mass_velocity(x, sigma, data)
        step = transition(x, v, sigma, sigma_next, 0.8, sde_type)
        x = sample_next(step, torch.randn(x.shape, generator=generator))
    final = float(sigmas[-1])
    assert x.mean().item() == pytest.approx((1 - final) * data, abs=0.01)
    assert x.std().item() == pytest.approx(final, rel=0.03)


def test_gaussian_log_prob_is_the_normal_density_averaged_over_elements():
    mean, x_next = random_state()
    std = torch.tensor(0.3)
    expected = torch.distributions.Normal(mean, std).log_prob(x_next).mean(dim=(1, 2))
    assert torch.allclose(gaussian_log_prob(x_next, mean, std), expected, atol=1e-6)


def test_gaussian_kl_is_the_closed_form_kl_averaged_over_elements():
    mean_a, mean_b = random_state()
    std = torch.tensor(0.2)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean_a, std), torch.distributions.Normal(mean_b, std)
    ).mean(dim=(1, 2))
    assert torch.allclose(gaussian_kl(mean_a, mean_b, std), expected, atol=1e-6)
    assert torch.equal(gaussian_kl(mean_a, mean_a, std), torch.zeros(3))


def test_maths_runs_in_float32_for_bfloat16_inputs():
    x, v = random_state()
    step = transition(x.bfloat16(), v.bfloat16(), 0.8, 0.6, 0.7, "flow_grpo")
    x_next = sample_next(step, torch.randn(x.shape).bfloat16())
    assert step.mean.dtype == step.std.dtype == x_next.dtype == torch.float32
    assert gaussian_log_prob(x_next, step.mean, step.std).dtype == torch.float32


def test_log_prob_of_a_deterministic_step_is_refused():
    x, v = random_state()
    step = transition(x, v, 0.8, 0.6, 0.0, "flow_grpo")
    with pytest.raises(ValueError, match="deterministic"):
        gaussian_log_prob(step.mean, step.mean, step.std)


def test_unknown_sde_type_is_refused():
    x, v = random_state()
    with pytest.raises(ValueError, match="sde_type"):
        transition(x, v, 0.8, 0.6, 0.5, "ddim")
