"""Shapes-world datasets: preference pairs and RL prompt sets, with a compositional split.

The test split tests generalisation to unseen (colour, shape) combinations: train scenes never
contain a held-out combination, and every test scene contains at least one.

Prompt sets and perturbed scenes are drawn the same way in every `PromptWorld`: the shapes
world here, real objects in spatialrl.data.real_world.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from spatialrl.data.grammar import (
    COLOURS,
    SHAPES,
    SHAPES_VOCABULARY,
    Scene,
    Vocabulary,
    sample_scene,
    scene_to_prompt,
)
from spatialrl.data.pairs import SPLITS, PreferencePair, png_bytes
from spatialrl.data.perturb import PerturbError, perturb
from spatialrl.data.render import LayoutError, render

# One shape held out per colour, each shape at least once: training still sees every colour
# and every shape, only never in these combinations.
HELD_OUT_COMBOS = frozenset(
    {
        ("red", "triangle"),
        ("orange", "star"),
        ("yellow", "circle"),
        ("green", "diamond"),
        ("cyan", "hexagon"),
        ("blue", "square"),
        ("purple", "triangle"),
        ("pink", "star"),
    }
)
TRAIN_COMBOS = frozenset(itertools.product(COLOURS, SHAPES)) - HELD_OUT_COMBOS


class ShapesPairs(NamedTuple):
    train: list[PreferencePair]
    test: list[PreferencePair]


def split_code(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def sample_split_scene(
    rng: np.random.Generator,
    split: str,
    num_relations: int | tuple[int, int] = (1, 3),
    num_objects: int | tuple[int, int] = (2, 3),
) -> Scene:
    """A random scene that belongs to `split` ("train" or "test")."""
    counts = {"num_objects": num_objects, "num_relations": num_relations}
    if split_code(split) == split_code("train"):
        return sample_scene(rng, **counts, allowed_combos=TRAIN_COMBOS)
    while True:
        scene = sample_scene(rng, **counts)
        if any(o.identity in HELD_OUT_COMBOS for o in scene.objects):
            return scene


@dataclass(frozen=True)
class PromptWorld:
    """What a prompt set is drawn from: a vocabulary, how a scene of a split is sampled and
    the world's ranges of relations and objects per prompt."""

    vocabulary: Vocabulary
    sample_split_scene: Callable[..., Scene]  # (rng, split, num_relations, num_objects)
    num_relations: tuple[int, int]
    num_objects: tuple[int, int]

    def sample(self, rng: np.random.Generator, split: str, min_relations: int = 1) -> Scene:
        """A scene of `split` with at least `min_relations` relations."""
        low, high = self.num_relations
        return self.sample_split_scene(rng, split, num_relations=(max(low, min_relations), high),
                                       num_objects=self.num_objects)


SHAPES_WORLD = PromptWorld(SHAPES_VOCABULARY, sample_split_scene, (1, 3), (2, 3))


def sample_prompts(
    n: int, seed: int = 0, split: str = "train", world: PromptWorld = SHAPES_WORLD
) -> list[str]:
    """n prompts for RL (rollout or evaluation), reproducible from the seed."""
    rng = np.random.default_rng([seed, split_code(split)])
    return [scene_to_prompt(world.sample(rng, split)) for _ in range(n)]


def write_prompts_parquet(path: str | Path, prompts: list[str], split: str) -> None:
    """A prompt file for RL: columns `prompt` and `split`."""
    split_code(split)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"prompt": prompts, "split": [split] * len(prompts)})
    pq.write_table(table, path)


def build_shapes_pairs(
    n: int, seed: int = 0, size: int = 64, test_fraction: float = 0.2
) -> ShapesPairs:
    """n preference pairs (a correct render of a prompt, and a render of the same prompt with
    1, 2 or 3 relations reversed, in equal shares), split into train and test."""
    sizes = split_sizes(n, test_fraction)
    return ShapesPairs(
        **{split: [_build_pair(seed, split, i, size)
                   for i in tqdm(range(count), desc=f"shapes {split}", unit="pair")]
           for split, count in sizes.items()}
    )


def split_sizes(n: int, test_fraction: float) -> dict[str, int]:
    """Pairs per split: round(n * test_fraction) test pairs, the rest train."""
    if not 0 <= test_fraction <= 1:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    num_test = round(n * test_fraction)
    return {"train": n - num_test, "test": num_test}


def pair_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """One generator per pair: a pair does not depend on how many others are built."""
    return np.random.default_rng([seed, split_code(split), index])


def pair_num_perturbed(index: int) -> int:
    """1, 2 and 3 perturbed relations in turn, so each comes in an equal share."""
    return 1 + index % 3


def sample_perturbed_scene(
    rng: np.random.Generator, split: str, num_perturbed: int, world: PromptWorld = SHAPES_WORLD
) -> tuple[Scene, Scene]:
    """(scene of `split`, the scene with num_perturbed relations reversed)."""
    while True:
        scene = world.sample(rng, split, min_relations=num_perturbed)
        try:
            return scene, perturb(scene, num_perturbed, rng)[0]
        except PerturbError:  # too few reversible relations
            continue


def _build_pair(seed: int, split: str, index: int, size: int) -> PreferencePair:
    rng = pair_rng(seed, split, index)
    num_perturbed = pair_num_perturbed(index)
    while True:
        scene, perturbed = sample_perturbed_scene(rng, split, num_perturbed)
        try:
            preferred, rejected = render(scene, size, rng), render(perturbed, size, rng)
        except LayoutError:  # undrawable
            continue
        return PreferencePair(
            prompt=scene_to_prompt(scene),
            perturbed_prompt=scene_to_prompt(perturbed),
            image_preferred=png_bytes(preferred),
            image_rejected=png_bytes(rejected),
            num_perturbed=num_perturbed,
            source="shapes",
            split=split,
            pair_id=f"shapes-{seed}-{split}-{index:07d}",
        )
