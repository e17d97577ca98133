"""Curriculum pair sets: shapes-world tasks simpler than the full pairs, for a small backbone
to learn first (`spatialrl data shapes --task ...`).

A tiny random SpatialScore trained on the full shapes pairs from scratch stays at chance; the
same model trained on colour, then one relation, then every relation, then the full pairs
gets there (bench/README.md, the learnability ladder).

Tasks, each with two objects and one change between the preferred and the rejected image:
- colour: no relation to judge, only words bound to pixels: the rejected image is the same
  layout with one object recoloured to a colour the prompt does not name.
- left-right, above-below, front-behind, on-under: the rejected image is drawn with the
  relation reversed (its converse).
- relation: as left-right, over every predicate that has a converse (all but "next to").
- objects: a full shapes scene (2-3 objects, 1-3 relations); the rejected image is the same
  layout with one named object left out or recoloured to a colour the prompt lacks. Half the
  pairs are blurred, both images alike, as a small generator's images are: a reward that
  ignores a missing object lets RL lose objects (bench/README.md, the mission in miniature).
Test scenes contain an unseen (colour, shape) combination, as in the full shapes pairs.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import ImageFilter
from tqdm import tqdm

from spatialrl.data.grammar import COLOURS, CONVERSE, Predicate, Relation, Scene, scene_to_prompt
from spatialrl.data.pairs import PreferencePair, png_bytes
from spatialrl.data.render import Layout, LayoutError, draw, render, render_layout
from spatialrl.data.shapes import sample_split_scene

# One-relation tasks: a predicate and its converse, or every predicate that has one.
RELATION_TASKS = {
    "left-right": frozenset({Predicate.LEFT_OF, Predicate.RIGHT_OF}),
    "above-below": frozenset({Predicate.ABOVE, Predicate.BELOW}),
    "front-behind": frozenset({Predicate.IN_FRONT_OF, Predicate.BEHIND}),
    "on-under": frozenset({Predicate.ON, Predicate.UNDER}),
    # "next to" is its own converse: reversing it changes nothing to prefer.
    "relation": frozenset(p for p, converse in CONVERSE.items() if converse != p),
}
CURRICULUM_TASKS = ("colour", *RELATION_TASKS, "objects")
MAX_BLUR_RADIUS = 1.5  # pixels at 64 px; the shipped generator's edges are about this soft


def curriculum_pairs(
    task: str, n: int, split: str, seed: int = 0, size: int = 64
) -> list[PreferencePair]:
    """The first n pairs of `task` in `split`; a larger n extends the same sequence."""
    if task == "colour":
        return colour_pairs(n, split, seed, size)
    if task in RELATION_TASKS:
        return one_relation_pairs(n, split, seed, task, size)
    if task == "objects":
        return object_pairs(n, split, seed, size)
    raise ValueError(f"task must be one of {', '.join(CURRICULUM_TASKS)}, got {task!r}")


def sample_two_object_scene(rng: np.random.Generator, split: str) -> Scene:
    return sample_split_scene(rng, split, num_relations=1, num_objects=2)


def collect_pairs(n: int, desc: str, rng: np.random.Generator, draw_pair) -> list[PreferencePair]:
    """n pairs from draw_pair(rng, index), which returns None to draw again (a scene the task
    does not use, or one with no layout)."""
    pairs: list[PreferencePair] = []
    with tqdm(total=n, desc=desc, unit="pair") as progress:
        while len(pairs) < n:
            pair = draw_pair(rng, len(pairs))
            if pair is not None:
                pairs.append(pair)
                progress.update()
    return pairs


def one_relation_pairs(n: int, split: str, seed: int, task: str, size: int = 64
                       ) -> list[PreferencePair]:
    """Two objects and one relation among the task's predicates; the rejected image is drawn
    with the converse relation (the same objects, the relation reversed)."""
    def draw_pair(rng: np.random.Generator, index: int) -> PreferencePair | None:
        scene = sample_two_object_scene(rng, split)
        relation = scene.relations[0]
        if relation.predicate not in RELATION_TASKS[task]:
            return None
        reversed_ = Relation(relation.subject_index, CONVERSE[relation.predicate],
                             relation.object_index)
        changed = Scene(scene.objects, (reversed_,))
        try:
            correct, wrong = render(scene, size, rng), render(changed, size, rng)
        except LayoutError:
            return None
        return _one_change_pair(scene, changed, correct, wrong, task, split, index)

    return collect_pairs(n, f"{task} {split}", np.random.default_rng([seed, split == "test"]),
                         draw_pair)


def colour_pairs(n: int, split: str, seed: int, size: int = 64) -> list[PreferencePair]:
    """Two objects; the rejected image recolours the first to a colour the prompt lacks."""
    def draw_pair(rng: np.random.Generator, index: int) -> PreferencePair | None:
        scene = sample_two_object_scene(rng, split)
        first, *rest = scene.objects
        unnamed = rng.choice(sorted(set(COLOURS) - {o.colour for o in scene.objects}))
        recoloured = Scene((replace(first, colour=str(unnamed)), *rest), scene.relations)
        layout_seed = int(rng.integers(2**31))  # the same layout for both images
        try:
            correct = render(scene, size, np.random.default_rng(layout_seed))
            wrong = render(recoloured, size, np.random.default_rng(layout_seed))
        except LayoutError:
            return None
        return _one_change_pair(scene, recoloured, correct, wrong, "colour", split, index)

    return collect_pairs(n, f"colour {split}", np.random.default_rng([seed, split == "test", 1]),
                         draw_pair)


def object_pairs(n: int, split: str, seed: int, size: int = 64) -> list[PreferencePair]:
    """A full scene, preferred over the same layout with one object left out or recoloured."""
    def draw_pair(rng: np.random.Generator, index: int) -> PreferencePair | None:
        scene = sample_split_scene(rng, split)
        try:
            layout, correct = render_layout(scene, size, rng)
        except LayoutError:
            return None
        wrong = draw(without_one_object(layout, scene, rng), size)
        if rng.random() < 0.5:
            blur = ImageFilter.GaussianBlur(rng.uniform(0.5, MAX_BLUR_RADIUS))
            correct, wrong = correct.filter(blur), wrong.filter(blur)
        return _one_change_pair(scene, scene, correct, wrong, "objects", split, index)

    return collect_pairs(n, f"objects {split}",
                         np.random.default_rng([seed, split == "test", 2]), draw_pair)


def without_one_object(layout: Layout, scene: Scene, rng: np.random.Generator) -> Layout:
    """The layout with one object, at random, left out (half the time) or recoloured to a
    colour no object of the scene has."""
    victim = int(rng.integers(len(layout.objects)))
    if rng.random() < 0.5:
        kept = tuple(o for i, o in enumerate(layout.objects) if i != victim)
        return Layout(kept, layout.background)
    unnamed = rng.choice(sorted(set(COLOURS) - {o.colour for o in scene.objects}))
    recoloured = tuple(replace(o, fill=COLOURS[str(unnamed)]) if i == victim else o
                       for i, o in enumerate(layout.objects))
    return Layout(recoloured, layout.background)


def _one_change_pair(scene: Scene, changed: Scene, correct, wrong, source: str, split: str,
                     index: int) -> PreferencePair:
    """The scene's prompt with its correct render preferred over the render of `changed`."""
    return PreferencePair(
        prompt=scene_to_prompt(scene), perturbed_prompt=scene_to_prompt(changed),
        image_preferred=png_bytes(correct),
        image_rejected=png_bytes(wrong), num_perturbed=1, source=source, split=split,
        pair_id=f"{source}-{split}-{index}",
    )
