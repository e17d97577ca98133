"""Preference pairs from any text-to-image generator: a shapes-world or real-object prompt, the
same prompt with 1-3 relations reversed (the perturber), and an image of each from a diffusers
pipeline (FLUX, Qwen-Image, ...; anything `DiffusionPipeline.from_pretrained` loads).

Both images of a pair start from the same seed, so the same initial noise: they differ by
what their prompts say. Pairs use the spatialrl.data.pairs schema, with source = the model
id and the split by the world's held-out combinations (colour/shape pairs as `data shapes`,
or class pairs among real objects).
A generator's images may not show what their prompts say: `spatialrl data pairs` passes them
through a verifier (spatialrl.data.verify) that keeps the pairs whose images do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from spatialrl.data.grammar import scene_to_prompt
from spatialrl.data.pairs import PreferencePair, png_bytes
from spatialrl.data.shapes import (
    SHAPES_WORLD,
    PromptWorld,
    pair_num_perturbed,
    pair_rng,
    sample_perturbed_scene,
    split_sizes,
)
from spatialrl.flux.loading import DTYPES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptPair:
    prompt: str
    perturbed_prompt: str
    num_perturbed: int
    split: str
    pair_id: str
    image_seed: int  # both images of the pair


def load_generator(model: str, dtype: str = "float32", device: str = "cpu") -> DiffusionPipeline:
    """`DiffusionPipeline.from_pretrained(model)`, quiet, on `device`."""
    try:
        pipeline = DiffusionPipeline.from_pretrained(model, dtype=DTYPES[dtype])
    except (OSError, ValueError) as err:  # no such folder, or a hub id that cannot be loaded
        raise _no_pipeline(model, err) from err
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def check_generator(model: str) -> None:
    """The error load_generator would raise for a missing pipeline, from its config alone."""
    try:
        DiffusionPipeline.load_config(model)
    except (OSError, ValueError) as err:
        raise _no_pipeline(model, err) from err


def _no_pipeline(model: str, err: Exception) -> FileNotFoundError:
    return FileNotFoundError(f"--model {model!r}: no diffusers pipeline there ({err})")


def sample_prompt_pairs(
    n: int, source: str, seed: int = 0, test_fraction: float = 0.2,
    world: PromptWorld = SHAPES_WORLD,
) -> list[PromptPair]:
    """n (prompt, perturbed prompt) pairs of `world`, 1, 2 and 3 relations perturbed in equal
    shares, train pairs first; pair ids are "<model name>-<seed>-<split>-<index>"."""
    name = Path(source).name
    pairs = []
    for split, count in split_sizes(n, test_fraction).items():
        for index in range(count):
            rng = pair_rng(seed, split, index)
            num_perturbed = pair_num_perturbed(index)
            scene, perturbed = sample_perturbed_scene(rng, split, num_perturbed, world)
            pairs.append(
                PromptPair(
                    prompt=scene_to_prompt(scene),
                    perturbed_prompt=scene_to_prompt(perturbed),
                    num_perturbed=num_perturbed,
                    split=split,
                    pair_id=f"{name}-{seed}-{split}-{index:07d}",
                    image_seed=int(rng.integers(2**31)),
                )
            )
    return pairs


def generate_pairs(
    pipeline: DiffusionPipeline,
    prompt_pairs: Sequence[PromptPair],
    source: str,
    size: int,
    steps: int,
    batch_size: int = 4,
    max_sequence_length: int = 512,
) -> Iterator[PreferencePair]:
    """One pipeline call per batch_size pairs (2 x batch_size images); prompts are encoded
    with `max_sequence_length` text tokens (FLUX.1-dev's 512; a generator trained with fewer
    draws worse with more)."""
    for start in range(0, len(prompt_pairs), batch_size):
        batch = prompt_pairs[start : start + batch_size]
        images = pipeline(
            prompt=[text for p in batch for text in (p.prompt, p.perturbed_prompt)],
            height=size,
            width=size,
            num_inference_steps=steps,
            max_sequence_length=max_sequence_length,
            # One CPU generator per image, the pair's two seeded alike: the same initial
            # noise for both sides on any device.
            generator=[
                torch.Generator().manual_seed(p.image_seed) for p in batch for _ in range(2)
            ],
        ).images
        for pair, preferred, rejected in zip(batch, images[::2], images[1::2], strict=True):
            yield PreferencePair(
                prompt=pair.prompt,
                perturbed_prompt=pair.perturbed_prompt,
                image_preferred=png_bytes(preferred),
                image_rejected=png_bytes(rejected),
                num_perturbed=pair.num_perturbed,
                source=source,
                split=pair.split,
                pair_id=pair.pair_id,
            )
        log.info("generated %d/%d pairs", start + len(batch), len(prompt_pairs))
