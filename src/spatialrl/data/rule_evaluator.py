"""Rule-based evaluator: reads objects back from pixels and says which relations hold.

Objects are found by colour alone (hue among the scene's colours, enough chroma to differ
from a white or grey background); shapes and sizes are not checked. Relations are then
decided from each object's visible mask by `geometry.relation_holds`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from spatialrl.data.geometry import (
    EVALUATOR_THRESHOLDS,
    ObjectFeatures,
    Thresholds,
    read_object,
    relation_holds,
    work_shape,
)
from spatialrl.data.grammar import (
    COLOURS,
    CONVEX_SHAPES,
    ORDERING,
    Scene,
    SceneObject,
    parse_prompt,
)

# Soft relation score: a sigmoid of the centroid gap in units of this fraction of the image.
SOFT_MARGIN_SCALE = 0.05

# A pixel belongs to an object colour when its chroma (max - min channel) is at least this
# and its hue is within MAX_HUE_DISTANCE of that colour (the nearest of the scene's colours).
MIN_CHROMA = 60.0
MAX_HUE_DISTANCE = 30.0

ImageLike = Image.Image | np.ndarray


@dataclass(frozen=True)
class EvalResult:
    per_relation: list[bool]  # one per scene relation, in order
    objects_found: list[bool]  # one per scene object, in order
    accuracy: float  # fraction of relations that hold
    all_correct: bool


def evaluate(
    image: ImageLike,
    scene_or_prompt: Scene | str,
    thresholds: Thresholds = EVALUATOR_THRESHOLDS,
) -> EvalResult:
    scene = _parse_cached(scene_or_prompt) if isinstance(scene_or_prompt, str) else scene_or_prompt
    objects = read_objects(image, scene)
    holds = [
        relation_holds(r.predicate, objects[r.subject_index], objects[r.object_index], thresholds)
        for r in scene.relations
    ]
    return EvalResult(
        per_relation=holds,
        objects_found=[o is not None for o in objects],
        accuracy=sum(holds) / len(holds),
        all_correct=all(holds),
    )


def relation_accuracy(image: ImageLike, prompt: str | Scene) -> float:
    """Reward in [0, 1]: the fraction of the prompt's relations that hold in the image."""
    return evaluate(image, prompt).accuracy


def soft_relation_score(image: ImageLike, prompt: str | Scene) -> float:
    """A dense cousin of `relation_accuracy` for images with no readable objects yet (an
    untrained generator): each object is the colour-weighted centroid of pixels near its hue,
    and each left/right/above/below/on/under relation scores a sigmoid of how far the two
    centroids are in the prompt's order. Depth and next-to relations have no centroid order
    and are left out; a prompt with none of the others scores 0.5. In [0, 1]."""
    scene = _parse_cached(prompt) if isinstance(prompt, str) else prompt
    rgb = _work_pixels(image)
    hue, chroma = _hue_chroma(rgb)
    height, width = hue.shape
    ys, xs = np.mgrid[0:height, 0:width]
    centroids = []
    for obj in scene.objects:
        target = _hue_chroma(np.array(COLOURS[obj.colour], dtype=np.float32))[0]
        distance = np.abs(hue - target)
        distance = np.minimum(distance, 360.0 - distance)
        weight = (chroma / 255.0) * np.exp(-((distance / MAX_HUE_DISTANCE) ** 2))
        total = weight.sum() + 1e-8
        centroids.append({"x": (weight * xs).sum() / total / width,
                          "y": (weight * ys).sum() / total / height})
    scores = []
    for rel in scene.relations:
        axis, sign = ORDERING.get(rel.predicate, ("depth", 0))
        if axis == "depth":
            continue
        gap = sign * (centroids[rel.object_index][axis] - centroids[rel.subject_index][axis])
        scores.append(1.0 / (1.0 + np.exp(-gap / SOFT_MARGIN_SCALE)))
    return float(np.mean(scores)) if scores else 0.5


def read_objects(image: ImageLike, scene: Scene) -> list[ObjectFeatures | None]:
    """Each scene object's visible geometry, None where it is not found."""
    return find_objects(image, scene.objects)


def find_objects(image: ImageLike, objects: Sequence[SceneObject]) -> list[ObjectFeatures | None]:
    """read_objects() for any objects of distinct colours, not only a scene's."""
    masks = segment(image, [o.colour for o in objects])
    return [
        read_object(mask, o.shape in CONVEX_SHAPES)
        for mask, o in zip(masks, objects, strict=True)
    ]


def segment(image: ImageLike, colours: Sequence[str]) -> list[np.ndarray]:
    """Candidate pixels of each colour, at the analysis resolution (see `work_shape`)."""
    rgb = _work_pixels(image)
    hue, chroma = _hue_chroma(rgb)
    targets = np.array([_hue_chroma(np.array(COLOURS[c], dtype=np.float32))[0] for c in colours])
    distance = np.abs(hue[..., None] - targets)
    distance = np.minimum(distance, 360.0 - distance)
    nearest = distance.argmin(axis=-1)
    coloured = (chroma >= MIN_CHROMA) & (distance.min(axis=-1) <= MAX_HUE_DISTANCE)
    return [coloured & (nearest == i) for i in range(len(colours))]


@lru_cache(maxsize=4096)
def _parse_cached(prompt: str) -> Scene:
    return parse_prompt(prompt)


def _work_pixels(image: ImageLike) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert("RGB")
    size = work_shape(*image.size)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360) and chroma (0..255) of RGB values in the last axis."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = high - low
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        high == r, (g - b) / safe, np.where(high == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
    )
    return (hue * 60.0) % 360.0, chroma
