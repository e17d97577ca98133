"""Scored rollout groups -> one filtered GRPO train batch, plus a per-sample ledger."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from spatialrl import storage
from spatialrl.config import GRPOConfig
from spatialrl.flux.sampler import Trajectory
from spatialrl.grpo.advantages import compute_advantages
from spatialrl.rewards import RewardFn
from spatialrl.rollout import RolloutGroup
from spatialrl.run_state import LEDGER_FOLDER


@dataclass
class ScoredGroup:
    group: RolloutGroup
    mu: torch.Tensor  # [G]
    sigma: torch.Tensor  # [G]

    @property
    def version(self) -> int:
        return self.group.version


@dataclass
class TrainBatch:
    trajectory: Trajectory  # kept samples only
    advantages: torch.Tensor  # [kept]
    versions: torch.Tensor  # [kept] policy version that sampled each trajectory
    metrics: dict[str, float]
    ledger: list[dict]  # one row per sample, kept or not


def score_groups(reward: RewardFn, groups: list[RolloutGroup]) -> list[ScoredGroup]:
    images = [im for g in groups for im in g.images]
    prompts = [g.prompt for g in groups for _ in g.images]
    out = reward(images, prompts)
    scored, start = [], 0
    for g in groups:
        end = start + len(g.images)
        scored.append(ScoredGroup(g, out.mu[start:end], out.sigma[start:end]))
        start = end
    return scored


def build_train_batch(scored: list[ScoredGroup], cfg: GRPOConfig) -> TrainBatch:
    mu = torch.cat([s.mu for s in scored]).float()
    sigma = torch.cat([s.sigma for s in scored]).float()
    group_ids = torch.cat([torch.full((len(s.mu),), s.group.group_id) for s in scored])
    versions = torch.cat([torch.full((len(s.mu),), s.group.version) for s in scored])
    adv = compute_advantages(mu, group_ids, cfg, sigma)
    kept_index = torch.nonzero(adv.kept).flatten()
    trajectory = Trajectory.concat([s.group.trajectory for s in scored]).select(kept_index)

    finite = torch.isfinite(mu)
    kept_adv = adv.advantages[adv.kept]
    metrics = {
        "reward/mean": float(mu[finite].mean()) if finite.any() else float("nan"),
        "reward/std": float(mu[finite].std(unbiased=False)) if finite.any() else float("nan"),
        "reward/sigma_mean": float(sigma[finite].mean()) if finite.any() else float("nan"),
        "filter/kept_fraction": adv.kept_fraction,
        "filter/groups": float(adv.num_groups),
        "filter/dropped_nonfinite_groups": float(adv.dropped_nonfinite_groups),
        "filter/zero_std_groups": float(adv.zero_std_groups),
        "advantage/mean": float(kept_adv.mean()) if kept_adv.numel() else 0.0,
        "advantage/abs_mean": float(kept_adv.abs().mean()) if kept_adv.numel() else 0.0,
        "advantage/max": float(kept_adv.max()) if kept_adv.numel() else 0.0,
        "advantage/min": float(kept_adv.min()) if kept_adv.numel() else 0.0,
    }
    ledger = []
    n = 0
    for s in scored:
        for i in range(len(s.mu)):
            ledger.append(ledger_row(s, i, float(adv.advantages[n]), bool(adv.kept[n])))
            n += 1
    return TrainBatch(trajectory, adv.advantages[kept_index], versions[kept_index], metrics, ledger)


def ledger_row(scored: ScoredGroup, index: int, advantage: float, kept: bool) -> dict:
    """One sample's line in the per-sample ledger."""
    group = scored.group
    return {
        "prompt": group.prompt,
        "group_id": group.group_id,
        "iteration": group.iteration,
        "seed": int(group.trajectory.seeds[index]),
        "version": group.version,
        "mu": float(scored.mu[index]),
        "sigma": float(scored.sigma[index]),
        "advantage": advantage,
        "kept": kept,
    }


def ledger_file(output_dir: str | os.PathLike, iteration: int) -> str:
    """Where an iteration's ledger lives: output_dir/ledger/NNNNNN.parquet (path or URI)."""
    return storage.join(output_dir, LEDGER_FOLDER, f"{iteration:06d}.parquet")


def write_ledger(output_dir: str | os.PathLike, iteration: int, rows: list[dict]) -> None:
    """One iteration's ledger as one parquet file, replaced whole (a redone iteration's too)."""
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    storage.write_bytes(ledger_file(output_dir, iteration), buffer.getvalue().to_pybytes())
