"""Rollouts: G samples per prompt with reproducible seeds, sampled in fixed-size batches.

A sample's seed depends only on (run seed, iteration, prompt, sample index), never on which
actor or batch draws it, so a redone rollout reproduces the lost one exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from PIL import Image

from spatialrl.config import SamplingConfig
from spatialrl.flux.encoding import PromptEmbeddingCache
from spatialrl.flux.sampler import Trajectory, sample

GROUP_START = -1  # rollout_seed's sample index for a group's shared initial noise


def rollout_seed(run_seed: int, iteration: int, prompt: str, sample_index: int,
                 group_id: int | None = None) -> int:
    """The seed of one sample. A group's id (its prompt's position in the run's prompt stream)
    keeps two groups of one prompt in an iteration apart (a prompt file with repeats); a group
    redone after a fault keeps its id, so it is drawn again alike."""
    key = f"{run_seed}|{iteration}|{prompt}|{sample_index}".encode()
    if group_id is not None:
        key += f"|{group_id}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


@dataclass
class RolloutGroup:
    """G samples of one prompt (or G edits of one source), tagged with the policy version
    that made them."""

    prompt: str
    group_id: int
    iteration: int
    version: int
    trajectory: Trajectory
    images: list[Image.Image]
    source: Image.Image | None = None  # the image the group edits; None: text-to-image


def sample_groups(
    pipeline,
    prompts: list[str],
    group_ids: list[int],
    iteration: int,
    version: int,
    run_seed: int,
    group_size: int,
    cfg: SamplingConfig,
    prompt_cache: PromptEmbeddingCache | None = None,
    sources: list[Image.Image] | None = None,
) -> list[RolloutGroup]:
    """Sample `group_size` trajectories for each prompt, `cfg.batch_size` images at a time;
    with `sources` (one per prompt), `group_size` edits of each source.

    Each prompt is encoded once, however many batches its group spans; a caller that keeps
    `prompt_cache` across iterations encodes a recurring prompt only once in all."""
    prompt_cache = PromptEmbeddingCache() if prompt_cache is None else prompt_cache
    flat_prompts = [p for p in prompts for _ in range(group_size)]
    flat_sources = None if sources is None else [s for s in sources for _ in range(group_size)]
    seeds = [rollout_seed(run_seed, iteration, p, i, g)
             for p, g in zip(prompts, group_ids, strict=True) for i in range(group_size)]
    initial_seeds = None if cfg.group_initial_noise == "independent" else [
        rollout_seed(run_seed, iteration, p, GROUP_START, g)
        for p, g in zip(prompts, group_ids, strict=True) for _ in range(group_size)]
    parts, images = [], []
    for start in range(0, len(flat_prompts), cfg.batch_size):
        end = start + cfg.batch_size
        trajectory, batch_images = sample(
            pipeline, flat_prompts[start:end], seeds[start:end], cfg, prompt_cache=prompt_cache,
            condition_images=None if flat_sources is None else flat_sources[start:end],
            kontext_resolution=cfg.kontext_resolution,
            initial_seeds=None if initial_seeds is None else initial_seeds[start:end],
        )
        parts.append(trajectory)
        images.extend(batch_images)
    everything = Trajectory.concat(parts)
    groups = []
    for n, (prompt, gid) in enumerate(zip(prompts, group_ids, strict=True)):
        members = torch.arange(n * group_size, (n + 1) * group_size)
        groups.append(
            RolloutGroup(
                prompt=prompt,
                group_id=gid,
                iteration=iteration,
                version=version,
                trajectory=everything.select(members),
                images=images[n * group_size : (n + 1) * group_size],
                source=None if sources is None else sources[n],
            )
        )
    return groups
