"""The clipped GRPO surrogate per trained timestep, and timestep subsampling.

Log-probs are per-element mean Gaussian log-densities (see spatialrl.flux.sde), so ratios
and KL are per-element too, as in Flow-GRPO; clip ranges are small (1e-4 .. 1e-3) for that
reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SurrogateTerms:
    loss: torch.Tensor  # scalar to backpropagate: policy loss + beta * kl
    policy_loss: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor  # 0.5 * E[(logp - logp_old)^2]: drift from the sampling policy
    ratio_mean: torch.Tensor


def clipped_surrogate(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    kl: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> SurrogateTerms:
    """PPO's pessimistic clipped objective, negated so that lower is better.

    All inputs are [B] for one timestep; the loss averages over the batch.
    """
    log_prob = log_prob.float()
    advantages = advantages.float().to(log_prob.device)
    log_ratio = log_prob - old_log_prob.float().to(log_prob.device)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    kl_mean = kl.float().mean() if kl is not None else torch.zeros((), device=log_prob.device)
    with torch.no_grad():
        clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean()
        approx_kl = 0.5 * (log_ratio**2).mean()
    return SurrogateTerms(
        loss=policy_loss + kl_beta * kl_mean,
        policy_loss=policy_loss.detach(),
        kl=kl_mean.detach(),
        clip_fraction=clip_fraction,
        approx_kl=approx_kl,
        ratio_mean=ratio.detach().mean(),
    )


def num_train_steps(num_sde_steps: int, fraction: float) -> int:
    """Timesteps trained per trajectory: ceil(fraction * n), at least 1."""
    return max(1, math.ceil(fraction * num_sde_steps))


def sample_train_steps(
    sde_steps: torch.Tensor, fraction: float, generator: torch.Generator
) -> list[int]:
    """A random subset (num_train_steps of them) of the trainable SDE step indices, in
    increasing order. The same subset serves the whole batch so that each chosen step
    costs one batched transformer pass."""
    candidates = torch.nonzero(sde_steps, as_tuple=False).flatten()
    if candidates.numel() == 0:
        raise ValueError("no SDE steps to train: noise_level is 0 or sde_window is empty")
    count = num_train_steps(candidates.numel(), fraction)
    chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]
    return sorted(int(i) for i in chosen)
