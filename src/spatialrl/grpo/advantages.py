"""Group-relative advantages with the paper's top-k / bottom-k filtering.

Rewards arrive flat with a group id per sample (one group = the G images of one prompt).
A group containing a non-finite reward is dropped whole: training on the rest of it would
bias the group statistics, and a NaN would poison the update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spatialrl.config import GRPOConfig


@dataclass
class GroupAdvantages:
    advantages: torch.Tensor  # [N] float32; 0 where not kept
    kept: torch.Tensor  # [N] bool: the sample is in the update
    num_groups: int
    dropped_nonfinite_groups: int
    zero_std_groups: int  # groups whose kept rewards are all equal: no learning signal

    @property
    def kept_fraction(self) -> float:
        return float(self.kept.float().mean()) if self.kept.numel() else 0.0


def select_top_bottom(rewards: torch.Tensor, k: int | None) -> torch.Tensor:
    """Bool mask of the k highest and k lowest rewards of one group (all when k is None
    or the group has no more than 2k members). Ties break by position, deterministically."""
    size = rewards.numel()
    mask = torch.zeros(size, dtype=torch.bool)
    if k is None or size <= 2 * k:
        mask[:] = True
        return mask
    order = torch.sort(rewards, stable=True).indices
    mask[order[:k]] = True
    mask[order[-k:]] = True
    return mask


def compute_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, cfg: GRPOConfig
) -> GroupAdvantages:
    rewards = rewards.detach().to(torch.float32).cpu()
    group_ids = group_ids.cpu()
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids "
                         f"{tuple(group_ids.shape)} must be equal 1-D shapes")
    kept = torch.zeros_like(rewards, dtype=torch.bool)
    in_stats = torch.zeros_like(kept)  # samples whose rewards form the statistics
    groups = torch.unique(group_ids)
    dropped = 0
    for gid in groups:
        members = group_ids == gid
        group_rewards = rewards[members]
        if not torch.isfinite(group_rewards).all():
            dropped += 1
            continue
        selected = select_top_bottom(group_rewards, cfg.top_k)
        kept[members] = selected
        in_stats[members] = selected if cfg.filter_order == "select_then_normalize" else True

    mean = torch.zeros_like(rewards)
    std = torch.zeros_like(rewards)
    # A group whose rewards are all equal carries no signal. Its float32 mean can be one
    # rounding step off the common value, which the division by eps would blow up into
    # advantages of order 1e-3, so such groups get exactly zero.
    flat = torch.zeros_like(kept)
    for gid in groups:
        members = (group_ids == gid) & in_stats
        if not members.any():
            continue
        group_rewards = rewards[members]
        mean[group_ids == gid] = group_rewards.mean()
        std[group_ids == gid] = group_rewards.std(unbiased=False)
        flat[group_ids == gid] = bool(group_rewards.max() == group_rewards.min())
    if cfg.std_scope == "global" and in_stats.any():
        std[:] = rewards[in_stats].std(unbiased=False)

    advantages = (rewards - mean) / (std + cfg.adv_eps)
    if cfg.adv_clip is not None:
        advantages = advantages.clamp(-cfg.adv_clip, cfg.adv_clip)
    advantages = torch.where(kept & ~flat, advantages, torch.zeros_like(advantages))
    return GroupAdvantages(
        advantages=advantages,
        kept=kept,
        num_groups=len(groups),
        dropped_nonfinite_groups=dropped,
        zero_std_groups=len(torch.unique(group_ids[flat])),
    )
