"""Group-relative advantages with the paper's top-k / bottom-k filtering.

Rewards arrive flat with a group id per sample (one group = the G images of one prompt).
A group containing a non-finite reward is dropped whole: training on the rest of it would
bias the group statistics, and a NaN would poison the update.

With `group_reward: win_probability` a sample's group reward is its expected win rate against
the others of its group, given the reward model's uncertainty (see win_probability).
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


def win_probability(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """[G] -> [G]: mean over j != i of P(r_i > r_j) = Phi((mu_i - mu_j) / sqrt(s_i^2 + s_j^2)),
    the reward of Pref-GRPO's pairwise win rate made aware of the reward model's uncertainty.
    Where both sigmas are 0 the comparison is exact: 1 for a win, 1/2 for a tie, 0 for a loss."""
    size = mu.numel()
    if size < 2:
        return torch.full_like(mu, 0.5)
    diff = mu[:, None] - mu[None, :]
    scale = torch.sqrt(sigma[:, None] ** 2 + sigma[None, :] ** 2)
    exact = 0.5 * (torch.sign(diff) + 1)
    soft = torch.special.ndtr(diff / scale.clamp_min(torch.finfo(mu.dtype).tiny))
    wins = torch.where(scale > 0, soft, exact)
    wins.fill_diagonal_(0.0)
    return wins.sum(dim=1) / (size - 1)


def group_rewards_for_advantages(
    mu: torch.Tensor, sigma: torch.Tensor | None, group_ids: torch.Tensor, cfg: GRPOConfig
) -> torch.Tensor:
    """The per-sample reward the advantages are formed from: mu itself, or each sample's win
    probability within its group (non-finite groups keep their mu, to be dropped)."""
    if cfg.group_reward == "mu":
        return mu
    if sigma is None or sigma.shape != mu.shape:
        raise ValueError("group_reward win_probability needs a sigma for every reward")
    rewards = mu.clone()
    for gid in torch.unique(group_ids):
        members = group_ids == gid
        if torch.isfinite(mu[members]).all() and torch.isfinite(sigma[members]).all():
            rewards[members] = win_probability(mu[members], sigma[members])
        else:
            rewards[members] = float("nan")
    return rewards


def compute_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, cfg: GRPOConfig,
    sigmas: torch.Tensor | None = None,
) -> GroupAdvantages:
    """rewards are the reward model's mu; sigmas its uncertainty (needed by win_probability)."""
    rewards = rewards.detach().to(torch.float32).cpu()
    group_ids = group_ids.cpu()
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids "
                         f"{tuple(group_ids.shape)} must be equal 1-D shapes")
    if sigmas is not None:
        sigmas = sigmas.detach().to(torch.float32).cpu()
    rewards = group_rewards_for_advantages(rewards, sigmas, group_ids, cfg)
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
