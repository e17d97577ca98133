"""Scored rollout groups -> one filtered GRPO train batch, plus a per-sample ledger."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from spatialrl import storage
from spatialrl.config import GRPOConfig, TrainConfig
from spatialrl.flux.sampler import Trajectory
from spatialrl.grpo.advantages import compute_advantages
from spatialrl.reward_functions import RewardFn, apply_reward
from spatialrl.rollout import RolloutGroup
from spatialrl.run_state import LEDGER_FOLDER


@dataclass
class ScoredGroup:
    """One prompt's G scored samples, as the loop's learn stage sees them. Their trajectories
    are rows [first_row, first_row + G) of `source`: a Trajectory in this process, or on Ray
    a reference to the rollout actor's packed trajectories, which only the learners fetch."""

    prompt: str
    group_id: int
    iteration: int
    version: int  # the policy version that sampled it
    seeds: list[int]
    mu: torch.Tensor  # [G]
    sigma: torch.Tensor  # [G]
    source: Any
    first_row: int = 0

    @classmethod
    def of(cls, group: RolloutGroup, mu: torch.Tensor, sigma: torch.Tensor) -> ScoredGroup:
        return cls(group.prompt, group.group_id, group.iteration, group.version,
                   group.trajectory.seeds.tolist(), mu, sigma, group.trajectory)


@dataclass
class TrainBatch:
    samples: list[tuple[Any, int]]  # kept samples only: (source, row), see ScoredGroup
    advantages: torch.Tensor  # [kept]
    versions: torch.Tensor  # [kept] policy version that sampled each trajectory
    metrics: dict[str, float]
    ledger: list[dict]  # one row per sample, kept or not


def gather_trajectory(samples: list[tuple[Any, int]], resolve: Callable[[Any], Trajectory]
                      ) -> Trajectory:
    """The samples' trajectories in order; `resolve` turns a source into its Trajectory and
    is called once per distinct source."""
    resolved: dict[int, tuple[int, Trajectory]] = {}  # id(source) -> (offset, trajectory)
    offset, rows = 0, []
    for source, row in samples:
        if id(source) not in resolved:
            trajectory = resolve(source)
            resolved[id(source)] = (offset, trajectory)
            offset += len(trajectory)
        rows.append(resolved[id(source)][0] + row)
    everything = Trajectory.concat([trajectory for _, trajectory in resolved.values()])
    return everything.select(torch.tensor(rows, dtype=torch.long))


def score_groups(reward: RewardFn, groups: list[RolloutGroup]) -> list[ScoredGroup]:
    images = [im for g in groups for im in g.images]
    prompts = [g.prompt for g in groups for _ in g.images]
    edits = groups[0].source is not None
    sources = [g.source for g in groups for _ in g.images] if edits else None
    out = apply_reward(reward, images, prompts, sources)
    scored, start = [], 0
    for g in groups:
        end = start + len(g.images)
        scored.append(ScoredGroup.of(g, out.mu[start:end], out.sigma[start:end]))
        start = end
    return scored


def build_train_batch(scored: list[ScoredGroup], cfg: GRPOConfig) -> TrainBatch:
    mu = torch.cat([s.mu for s in scored]).float()
    sigma = torch.cat([s.sigma for s in scored]).float()
    group_ids = torch.cat([torch.full((len(s.mu),), s.group_id) for s in scored])
    versions = torch.cat([torch.full((len(s.mu),), s.version) for s in scored])
    adv = compute_advantages(mu, group_ids, cfg, sigma)
    kept_index = torch.nonzero(adv.kept).flatten()
    every_sample = [(s.source, s.first_row + i) for s in scored for i in range(len(s.mu))]

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
    return TrainBatch([every_sample[i] for i in kept_index.tolist()], adv.advantages[kept_index],
                      versions[kept_index], metrics, ledger)


def ledger_row(scored: ScoredGroup, index: int, advantage: float, kept: bool) -> dict:
    """One sample's line in the per-sample ledger."""
    return {
        "prompt": scored.prompt,
        "group_id": scored.group_id,
        "iteration": scored.iteration,
        "seed": scored.seeds[index],
        "version": scored.version,
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


def audit_ledger(cfg: TrainConfig) -> dict[str, int]:
    """What each iteration's ledger says was trained on, against its own prompts' groups:
    groups with more than G rows (trained twice), fewer (in part), none, or not as many kept
    as the filter keeps (2k with top-k, G without); and rows of other iterations' groups."""
    per_iteration, group_size = cfg.prompts.prompts_per_iteration, cfg.grpo.group_size
    kept = 2 * cfg.grpo.top_k if cfg.grpo.top_k else group_size
    counts = Counter(twice=0, partial=0, missing=0, wrong_kept=0, foreign_rows=0)
    for iteration in range(cfg.iterations):
        rows = pq.read_table(ledger_file(cfg.output_dir, iteration)).to_pylist()
        expected = range(iteration * per_iteration, (iteration + 1) * per_iteration)
        own = [r for r in rows if r["iteration"] == iteration and r["group_id"] in expected]
        counts["foreign_rows"] += len(rows) - len(own)
        for group in expected:
            mine = [r for r in own if r["group_id"] == group]
            counts["missing"] += not mine
            counts["partial"] += 0 < len(mine) < group_size
            counts["twice"] += len(mine) > group_size
            counts["wrong_kept"] += bool(mine) and sum(r["kept"] for r in mine) != kept
    return {f"groups_{k}" if k != "foreign_rows" else k: v for k, v in counts.items()}
