"""One filtered-GRPO update over a batch of scored trajectories.

The loop is shared by the in-process learner (plain torch optimiser) and the DeepSpeed
learner group: each supplies an `Optimization` that knows how to backpropagate and step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

import torch

from spatialrl.config import GRPOConfig, OptimConfig
from spatialrl.flux.lora import reference_policy
from spatialrl.flux.sampler import Trajectory, recompute_log_probs, step_distribution
from spatialrl.flux.sde import gaussian_kl, gaussian_log_prob
from spatialrl.grpo.loss import SurrogateTerms, clipped_surrogate, sample_train_steps


class Optimization(Protocol):
    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float:
        """Apply accumulated gradients; return the pre-clip gradient norm."""

    def lr(self) -> float: ...


@dataclass
class TorchOptimization:
    """A plain torch optimiser with gradient clipping, for the single-process learner."""

    optimizer: torch.optim.Optimizer
    max_grad_norm: float

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def step_terms(
    transformer: torch.nn.Module,
    batch: Trajectory,
    advantages: torch.Tensor,
    step_index: int,
    grpo: GRPOConfig,
) -> SurrogateTerms:
    """Surrogate loss of one denoising step, for every trajectory in `batch`."""
    # The record carries the noise level and SDE type it was sampled with.
    new = step_distribution(transformer, batch, step_index)
    log_prob = gaussian_log_prob(batch.states[:, step_index + 1], new.mean, new.std)
    kl = None
    if grpo.kl_beta > 0:
        with torch.no_grad(), reference_policy(transformer):
            ref = step_distribution(transformer, batch, step_index)
        kl = gaussian_kl(new.mean, ref.mean, new.std)
    return clipped_surrogate(
        log_prob, batch.log_probs[:, step_index], advantages, grpo.clip_range, kl, grpo.kl_beta
    )


def grpo_update(
    transformer: torch.nn.Module,
    trajectories: Trajectory,
    advantages: torch.Tensor,
    grpo: GRPOConfig,
    optim: OptimConfig,
    optimization: Optimization,
    generator: torch.Generator,
) -> dict[str, float]:
    """`updates_per_iteration` shuffled passes; one optimiser step per micro-batch, with the
    gradients of its sampled timesteps accumulated. Only kept samples should be passed in."""
    sums: dict[str, float] = defaultdict(float)
    count = 0
    num_samples = len(trajectories)
    drift = old_log_prob_drift(transformer, trajectories) if grpo.check_old_log_probs else None
    for _ in range(optim.updates_per_iteration):
        order = torch.randperm(num_samples, generator=generator)
        for chunk in order.split(optim.micro_batch_size):
            batch = trajectories.select(chunk)
            chunk_adv = advantages[chunk]
            steps = sample_train_steps(batch.sde_mask, grpo.timestep_fraction, generator)
            for step_index in steps:
                terms = step_terms(transformer, batch, chunk_adv, step_index, grpo)
                optimization.backward(terms.loss / len(steps))
                for name in ("policy_loss", "kl", "clip_fraction", "approx_kl", "ratio_mean"):
                    sums[name] += float(getattr(terms, name))
                count += 1
            sums["grad_norm"] += optimization.step() * len(steps)
    metrics = {name: total / max(count, 1) for name, total in sums.items()}
    metrics["lr"] = optimization.lr()
    metrics["optimizer_steps"] = float(
        optim.updates_per_iteration * len(order.split(optim.micro_batch_size))
    )
    if drift is not None:
        metrics["old_log_prob_max_abs_diff"] = drift
    return metrics


@torch.no_grad()
def old_log_prob_drift(transformer: torch.nn.Module, trajectories: Trajectory) -> float:
    """Largest |log-prob under the current weights - the rollout's stored log-prob| over the
    SDE steps: float error for data sampled with these weights, larger for stale data. A
    check only; the update always uses the stored log-probs as pi_old."""
    steps = torch.nonzero(trajectories.sde_mask).flatten().tolist()
    recomputed = recompute_log_probs(transformer, trajectories, steps)
    return float((recomputed - trajectories.log_probs[:, steps].to(recomputed)).abs().max())
