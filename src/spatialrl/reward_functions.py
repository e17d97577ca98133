"""Pluggable reward functions: images + prompts (+ the source images of edits) -> (mu, sigma).

Every reward answers with a mean and an uncertainty so that the trainer logs one record
shape. Deterministic rewards report sigma = 0. For edits the prompt is the instruction;
rewards of the image alone ignore the sources, SpatialReward judges the pair.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from spatialrl.config import RewardConfig


@dataclass
class RewardOutput:
    mu: torch.Tensor  # [N] float32
    sigma: torch.Tensor  # [N] float32


log = logging.getLogger(__name__)


class RewardFn(Protocol):
    def __call__(self, images: list[Image.Image], prompts: list[str],
                 sources: list[Image.Image] | None = None) -> RewardOutput: ...


def apply_reward(reward: RewardFn, images: list[Image.Image], prompts: list[str],
                 sources: list[Image.Image] | None = None) -> RewardOutput:
    """The reward of `images` (edits of `sources`, if given). Text-to-image images are scored
    as reward(images, prompts), so a reward function of two arguments still serves them."""
    return reward(images, prompts) if sources is None else reward(images, prompts, sources)


def deterministic(values: list[float]) -> RewardOutput:
    mu = torch.tensor(values, dtype=torch.float32)
    return RewardOutput(mu=mu, sigma=torch.zeros_like(mu))


def brightness_left(images: list[Image.Image], prompts: list[str],
                    sources: list[Image.Image] | None = None) -> RewardOutput:
    """Mean brightness of the left half, in [0, 1]: a pixel reward for checking that GRPO
    learns at all, independent of any prompt or learned model."""
    values = []
    for image in images:
        pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        values.append(float(pixels[:, : pixels.shape[1] // 2].mean()))
    return deterministic(values)


def shapes_rule(images: list[Image.Image], prompts: list[str],
                sources: list[Image.Image] | None = None) -> RewardOutput:
    """Fraction of the prompt's relations that the shapes-world evaluator reads back."""
    from spatialrl.data.rule_evaluator import relation_accuracy

    return deterministic([relation_accuracy(im, p) for im, p in zip(images, prompts, strict=True)])


def shapes_soft(images: list[Image.Image], prompts: list[str],
                sources: list[Image.Image] | None = None) -> RewardOutput:
    """The dense centroid-order score of the shapes world (see soft_relation_score)."""
    from spatialrl.data.rule_evaluator import soft_relation_score

    return deterministic(
        [soft_relation_score(im, p) for im, p in zip(images, prompts, strict=True)])


def spatialscore(path: str, device: str = "cpu") -> RewardFn:
    from spatialrl.reward.model import SpatialScore

    model = SpatialScore.from_pretrained(path).to(device).eval()

    def score(images: list[Image.Image], prompts: list[str],
              sources: list[Image.Image] | None = None) -> RewardOutput:
        out = model.score(images, prompts)
        return RewardOutput(mu=out.mu.float().cpu(), sigma=out.sigma.float().cpu())

    return score


def spatialreward(cfg: RewardConfig, device: str = "cpu") -> RewardFn:
    """SpatialReward's scalar reward of each (source, edit, instruction). An edit whose
    answers do not parse scores NaN, never a default: the loop drops its group and counts it
    (filter/dropped_nonfinite_groups); the reasons are logged here."""
    from spatialrl.spatialreward.model import SpatialReward
    from spatialrl.spatialreward.reward import invalid_counts

    judge = SpatialReward.from_config(cfg.spatialreward_config())
    judge.model.to(device)

    def score(images: list[Image.Image], prompts: list[str],
              sources: list[Image.Image] | None = None) -> RewardOutput:
        if sources is None:
            raise ValueError("the spatialreward reward judges edits: it needs source images")
        results = judge.score(sources, images, prompts)
        if invalid := invalid_counts(results):
            log.warning("spatialreward: %d of %d answers invalid (%s)", invalid.total(),
                        len(results), dict(invalid))
        return deterministic([r.reward if r.valid else float("nan") for r in results])

    return score


def weighted_sum(parts: dict[str, tuple[float, RewardFn]]) -> RewardFn:
    """sum_i w_i * r_i; sigmas combine as independent: sqrt(sum_i w_i^2 sigma_i^2)."""

    def score(images: list[Image.Image], prompts: list[str],
              sources: list[Image.Image] | None = None) -> RewardOutput:
        outputs = [(w, fn(images, prompts, sources)) for w, fn in parts.values()]
        mu = sum(w * out.mu for w, out in outputs)
        sigma = torch.sqrt(sum((w * out.sigma) ** 2 for w, out in outputs))
        return RewardOutput(mu=mu, sigma=sigma)

    return score


def build_reward(cfg: RewardConfig, device: str = "cpu") -> RewardFn:
    """`kind` names one reward, or "weighted" to combine `weights` ({kind: weight})."""
    cfg.check_ready()
    if cfg.kind == "weighted":
        return weighted_sum(
            {kind: (w, _single(kind, cfg, device)) for kind, w in cfg.weights.items()}
        )
    return _single(cfg.kind, cfg, device)


def reward_version(cfg: RewardConfig) -> str:
    """What scores mean: the reward's kind, and for SpatialScore a checksum of the checkpoint
    files it loads (so a retrained checkpoint at the same path is a new version)."""
    if cfg.kind == "weighted":
        parts = [f"{_single_version(kind, cfg)}*{w}" for kind, w in sorted(cfg.weights.items())]
        return "weighted(" + "+".join(parts) + ")"
    return _single_version(cfg.kind, cfg)


def reward_input_pixels(cfg: RewardConfig) -> int | None:
    """The most pixels of an image the reward reads: a larger image may be downscaled to this
    before it is sent, at no cost to its score but a second resampling. None: every pixel
    counts (the rule rewards, and any sum with one)."""
    if cfg.kind != "spatialscore":
        return None
    from spatialrl.reward.inputs import max_input_pixels
    from spatialrl.reward.model import checkpoint_folder, read_checkpoint_config

    return max_input_pixels(read_checkpoint_config(checkpoint_folder(cfg.spatialscore_path)))


def _single_version(kind: str, cfg: RewardConfig) -> str:
    if kind == "spatialreward":
        return _spatialreward_version(cfg)
    if kind != "spatialscore":
        return kind
    from spatialrl.model_checksum import files_checksum
    from spatialrl.reward.model import checkpoint_files, checkpoint_folder

    # The config among them names the base model and its revision.
    files = checkpoint_files(checkpoint_folder(cfg.spatialscore_path))
    return f"spatialscore@{files_checksum(files)}"


def _spatialreward_version(cfg: RewardConfig) -> str:
    """A local model by the checksum of its weights and configs, a hub model by its id; with
    the options that change answers."""
    from spatialrl.model_checksum import files_checksum

    folder = Path(cfg.spatialreward_path)
    if folder.is_dir():
        model = files_checksum(p for p in folder.iterdir() if p.suffix in (".safetensors", ".json"))
    else:
        model = cfg.spatialreward_path
    options = json.dumps(cfg.spatialreward_options, sort_keys=True)
    return f"spatialreward@{model}{options if cfg.spatialreward_options else ''}"


def _single(kind: str, cfg: RewardConfig, device: str) -> RewardFn:
    if kind == "brightness_left":
        return brightness_left
    if kind == "shapes_rule":
        return shapes_rule
    if kind == "shapes_soft":
        return shapes_soft
    if kind == "spatialreward":
        return spatialreward(cfg, device)
    return spatialscore(cfg.spatialscore_path, device)  # the config allows no other kind
