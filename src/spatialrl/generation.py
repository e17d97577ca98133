"""Best-of-N: sample N candidates for a prompt, score them with a reward, keep the best.

Candidate i of a request with seed s is sampled with seed s + i, so any candidate can be drawn
again alone. Two candidate samplers:
- FluxCandidates: the policy, a FLUX pipeline with an optional LoRA (FluxPipeline's own ODE
  sampler, one CPU generator per candidate as FluxPipeline takes them).
- ShapesCandidates: a stand-in policy for the shapes world, where a tiny random FLUX draws
  nothing recognisable: each candidate renders the prompt's scene with every reversible
  relation reversed, independently, with probability relation_error_rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from spatialrl.errors import InputError
from spatialrl.reward_functions import RewardFn
from spatialrl.service.config import FluxGeneratorConfig, ShapesGeneratorConfig

# What FluxPipeline.save_lora_weights writes (spatialrl.flux.lora.save_lora).
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
# Draws of a shapes candidate before giving up on a scene the renderer cannot lay out.
MAX_SHAPES_DRAWS = 100


class CandidateSampler(Protocol):
    name: str  # what makes the images: model, LoRA checksum, settings

    def __call__(self, prompt: str, seeds: Sequence[int]) -> list[Image.Image]: ...


def candidate_seeds(seed: int, n: int) -> list[int]:
    return [seed + i for i in range(n)]


def best_index(mu: Sequence[float]) -> int:
    """The highest score, the first on ties; a non-finite score is an error, not a pick."""
    if bad := [i for i, value in enumerate(mu) if not math.isfinite(value)]:
        raise ValueError(f"candidates {bad} have non-finite scores")
    return max(range(len(mu)), key=mu.__getitem__)


@dataclass
class BestOfN:
    seeds: list[int]
    images: list[Image.Image]
    mu: list[float]
    sigma: list[float]
    best: int  # index into the lists above


def best_of_n(
    sampler: CandidateSampler, reward: RewardFn, prompt: str, n: int, seed: int = 0
) -> BestOfN:
    """Sample n candidates of `prompt`, score them all and mark the best."""
    seeds = candidate_seeds(seed, n)
    images = sampler(prompt, seeds)
    scores = reward(images, [prompt] * n)
    mu, sigma = scores.mu.tolist(), scores.sigma.tolist()
    return BestOfN(seeds, images, mu, sigma, best_index(mu))


class FluxCandidates:
    def __init__(self, cfg: FluxGeneratorConfig, device: str = "cpu"):
        from spatialrl.flux.loading import load_flux_pipeline
        from spatialrl.model_checksum import files_checksum

        self.cfg = cfg
        self.pipeline = load_flux_pipeline(cfg.model, device)
        self.name = f"flux:{cfg.model.pretrained}"
        if cfg.lora_path is not None:
            weights = Path(cfg.lora_path) / LORA_WEIGHTS_FILE
            if not weights.is_file():
                raise FileNotFoundError(f"generator.lora_path: no {weights}")
            # Into the transformer only (save_lora adapts nothing else; the pipeline-level
            # loader warns that the text encoder got no keys). use_safetensors without
            # fallback: a folder with only a pickle fails to load.
            self.pipeline.transformer.load_lora_adapter(cfg.lora_path, use_safetensors=True)
            self.name += f"+lora@{files_checksum([weights])}"

    @torch.no_grad()
    def __call__(self, prompt: str, seeds: Sequence[int]) -> list[Image.Image]:
        cfg, images = self.cfg, []
        for start in range(0, len(seeds), cfg.batch_size):
            chunk = seeds[start:start + cfg.batch_size]
            images.extend(self.pipeline(
                prompt=[prompt] * len(chunk),
                generator=[torch.Generator("cpu").manual_seed(int(s)) for s in chunk],
                height=cfg.height, width=cfg.width, num_inference_steps=cfg.num_steps,
                guidance_scale=cfg.guidance_scale, max_sequence_length=cfg.max_sequence_length,
            ).images)
        return images


class ShapesCandidates:
    def __init__(self, cfg: ShapesGeneratorConfig):
        self.cfg = cfg
        self.name = f"shapes-world(relation_error_rate={cfg.relation_error_rate:g})"

    def __call__(self, prompt: str, seeds: Sequence[int]) -> list[Image.Image]:
        from spatialrl.data.grammar import parse_prompt

        try:
            scene = parse_prompt(prompt)
        except ValueError as err:
            raise InputError(f"prompt: not a shapes-world prompt ({err})") from None
        return [self._candidate(scene, seed) for seed in seeds]

    def _candidate(self, scene, seed: int) -> Image.Image:
        from spatialrl.data.perturb import PerturbError, perturb, perturbable_indices
        from spatialrl.data.render import LayoutError, render

        rng = np.random.default_rng(seed)
        reversible = len(perturbable_indices(scene))
        for _ in range(MAX_SHAPES_DRAWS):
            wrong = int(rng.binomial(reversible, self.cfg.relation_error_rate))
            try:
                drawn = perturb(scene, wrong, rng)[0] if wrong else scene
                return render(drawn, self.cfg.size, rng)
            except (PerturbError, LayoutError):  # that many reversals, or that layout, fails
                continue
        raise InputError(f"prompt: no drawable candidate in {MAX_SHAPES_DRAWS} draws")


def build_sampler(
    cfg: FluxGeneratorConfig | ShapesGeneratorConfig, device: str = "cpu"
) -> CandidateSampler:
    if isinstance(cfg, FluxGeneratorConfig):
        return FluxCandidates(cfg, device)
    return ShapesCandidates(cfg)
