"""One denoising step of the flow ODE, or of an SDE with the same marginals, as a Gaussian.

FLUX is a rectified flow: x_sigma = (1 - sigma) x0 + sigma eps, and the transformer predicts the
velocity v = eps - x0. The ODE (Euler) step is FlowMatchEulerDiscreteScheduler.step. The SDEs
make every step a Gaussian transition p(x_next | x) = N(mean, std^2 I) whose log-density is the
policy log-probability of GRPO:

- "flow_grpo": Flow-GRPO's reverse-time SDE, std_t = noise_level * sqrt(sigma / (1 - sigma));
- "cps": coefficients-preserving sampling, which keeps the noise fraction of x_next at exactly
  sigma_next: x_next = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) eps_hat + std z.

All maths runs in float32 whatever the dtype of the inputs. Sigmas are scalars shared by the
batch, so a transition's std is a 0-dim tensor.

Log-probabilities and KL are per-element means over all non-batch dimensions, as in Flow-GRPO,
not sums: a ratio exp(logp_new - logp_old) is therefore a per-element (geometric mean) ratio,
which is why GRPO clip ranges are as small as 1e-4.

Both SDEs use the full Gaussian log-density, -(x - mean)^2 / (2 std^2) - log std - log sqrt(2 pi).
Flow-GRPO's own CPS code keeps only -(x - mean)^2, without the 1 / (2 std^2): there a step's
log-ratio is 2 std^2 times the one here, so the same clip_range clips differently and steps
with different std weigh differently. Tune cps clip ranges for the full density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

SdeType = Literal["flow_grpo", "cps"]


@dataclass
class Transition:
    """p(x_next | x) = N(mean, std^2 I); std == 0 is a deterministic (ODE) step."""

    mean: torch.Tensor  # like x, float32
    std: torch.Tensor  # 0-dim float32


def ode_step(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """The Euler step of FlowMatchEulerDiscreteScheduler.step, operation for operation."""
    return x + (sigma_next - sigma) * v


def transition(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    noise_level: float,
    sde_type: SdeType,
) -> Transition:
    """The Gaussian step from x at sigma to sigma_next given the velocity v.

    noise_level 0 is the ODE step exactly, with std 0.
    """
    x, v = x.float(), v.float()
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device)
    if noise_level == 0:
        return Transition(ode_step(x, v, sigma, sigma_next), torch.zeros((), device=x.device))
    if sde_type == "flow_grpo":
        return _flow_grpo_transition(x, v, sigma, sigma_next, noise_level)
    if sde_type == "cps":
        return _cps_transition(x, v, sigma, sigma_next, noise_level)
    raise ValueError(f"sde_type must be 'flow_grpo' or 'cps', got {sde_type!r}")


def _flow_grpo_transition(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
    noise_level: float,
) -> Transition:
    dt = sigma_next - sigma  # negative: sigma decreases towards the image
    # sigma / (1 - sigma) is infinite at sigma = 1 (the first step); Flow-GRPO evaluates the
    # denominator at the schedule's second sigma there, which is this step's sigma_next.
    std_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma))) * noise_level
    mean = (
        x * (1 + std_t**2 / (2 * sigma) * dt)
        + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    return Transition(mean, std_t * torch.sqrt(-dt))


def _cps_transition(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
    noise_level: float,
) -> Transition:
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    x0_hat = x - sigma * v
    eps_hat = x + (1 - sigma) * v
    mean = (1 - sigma_next) * x0_hat + torch.sqrt(sigma_next**2 - std**2) * eps_hat
    return Transition(mean, std)


def sample_next(step: Transition, noise: torch.Tensor) -> torch.Tensor:
    """x_next = mean + std * noise, with noise ~ N(0, I) shaped like the mean."""
    return step.mean + step.std * noise.float()


def gaussian_log_prob(
    x_next: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor
) -> torch.Tensor:
    """log N(x_next; mean, std^2), averaged over all but the batch dim: [B] float32.

    Undefined for std 0 (an ODE step has no density), which raises.
    """
    x_next, mean = x_next.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    if not bool((std > 0).all()):
        raise ValueError("log-prob of a deterministic step (std 0) is undefined")
    log_density = (
        -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    )
    return log_density.mean(dim=tuple(range(1, log_density.ndim)))


def gaussian_kl(
    mean_a: torch.Tensor, mean_b: torch.Tensor, std: float | torch.Tensor
) -> torch.Tensor:
    """KL(N(mean_a, std^2) || N(mean_b, std^2)) per element, averaged like the log-prob: [B]."""
    mean_a, mean_b = mean_a.float(), mean_b.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=mean_a.device)
    kl = (mean_a - mean_b) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
