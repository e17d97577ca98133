"""Layout captions: what a rendered shapes-world image shows, read back from its pixels.

A layout caption takes the pairs of objects in left-to-right order and names, for each, every
relation the rule evaluator finds holding, with one of the two objects (picked at random) as
subject ("a red circle to the left of a blue star, the red circle below the blue star"). Unlike
a prompt, which mentions some relations in any order, every word of it but the subject's choice
follows from the image. They are the data of spatialrl.tiny.pretraining: grounding
pretraining for a tiny random VLM, which gets no gradient to start from on preference pairs
(their one bit depends on prompt and image jointly) but does on a caption's next word.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
from PIL import Image

from spatialrl.data.evaluate import read_objects
from spatialrl.data.geometry import relation_holds
from spatialrl.data.grammar import Predicate, Relation, Scene, relations_to_text
from spatialrl.data.render import LayoutError, render
from spatialrl.data.shapes import sample_split_scene


def layout_caption(image: Image.Image, scene: Scene, rng: np.random.Generator) -> str | None:
    """The caption of `image`, a render of `scene`; None when an object cannot be found in
    the pixels or no relation holds between any two objects."""
    features = read_objects(image, scene)
    if any(found is None for found in features):
        return None
    order = sorted(range(len(features)), key=lambda i: features[i].centroid[0])
    objects = [scene.objects[i] for i in order]
    features = [features[i] for i in order]
    relations = [
        Relation(subject, predicate, obj)
        for pair in combinations(range(len(objects)), 2)
        for subject, obj in [pair if rng.random() < 0.5 else pair[::-1]]
        for predicate in Predicate
        if relation_holds(predicate, features[subject], features[obj])
    ]
    return relations_to_text(objects, relations) if relations else None


def sample_layout_captions(
    n: int, rng: np.random.Generator, split: str = "train", size: int = 64
) -> list[tuple[Image.Image, str]]:
    """n (render, caption) pairs of random scenes of `split`: the train split's scenes never
    hold a held-out (colour, shape) combination, so held-out pairs stay unseen."""
    captioned = []
    while len(captioned) < n:
        scene = sample_split_scene(rng, split)
        try:
            image = render(scene, size, rng)
        except LayoutError:
            continue
        if caption := layout_caption(image, scene, rng):
            captioned.append((image, caption))
    return captioned
