"""Renderer: draws a random layout in which every relation of a scene holds.

A layout is built constructively (each object placed relative to one it is related to, with
random offsets, sizes, rotations and colour jitter), then checked with the evaluator's own
geometry at stricter thresholds and redrawn until it passes. Depth comes from drawing order
plus partial overlap; "on" from vertical contact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from spatialrl.data.geometry import RENDER_THRESHOLDS, read_object, relation_holds, work_shape
from spatialrl.data.grammar import (
    COLOURS,
    CONVERSE,
    CONVEX_SHAPES,
    Predicate,
    Relation,
    Scene,
)
from spatialrl.data.rule_evaluator import evaluate

# Half the bounding-box side, as a fraction of the image side, by size attribute.
_HALF_EXTENT = {"small": (0.085, 0.1), None: (0.115, 0.14), "large": (0.15, 0.175)}
_MAX_ROTATION_DEG = 15.0
FRAME_MARGIN = 0.01
# Fraction of the object behind that the object in front hides.
_HIDDEN_RANGE = (0.12, 0.55)
# Smallest visible area of an object, as a fraction of the image: enough to survive blur.
_MIN_VISIBLE_AREA = 0.005
_DEPTH = (Predicate.IN_FRONT_OF, Predicate.BEHIND)


class LayoutError(RuntimeError):
    """No layout satisfying the scene was found."""


@dataclass(frozen=True)
class PlacedObject:
    index: int  # into scene.objects
    polygon: np.ndarray  # (n, 2) vertices, fractions of the image side, y pointing down
    fill: tuple[int, int, int]


@dataclass(frozen=True)
class Layout:
    objects: tuple[PlacedObject, ...]  # in drawing order, back to front
    background: tuple[int, int, int]


def render(
    scene: Scene,
    size: int = 64,
    rng: np.random.Generator | None = None,
    max_attempts: int = 3000,
    verify: bool = True,
) -> Image.Image:
    """A size x size RGB image of the scene. With `verify`, the finished image is also read
    back by the evaluator and redrawn if any relation fails there."""
    return render_layout(scene, size, rng, max_attempts, verify)[1]


def render_layout(
    scene: Scene,
    size: int = 64,
    rng: np.random.Generator | None = None,
    max_attempts: int = 3000,
    verify: bool = True,
) -> tuple[Layout, Image.Image]:
    """render(), with the layout it drew (to draw the same layout changed)."""
    rng = rng if rng is not None else np.random.default_rng()
    for attempt in range(max_attempts):
        shrink = 1 - 0.35 * attempt / max_attempts  # crowded scenes fit once objects shrink
        layout = solve_layout(scene, rng, work_shape(size, size)[0], shrink)
        if layout is None:
            continue
        image = draw(layout, size)
        if not verify or evaluate(image, scene).all_correct:
            return layout, image
    raise LayoutError(f"no layout found in {max_attempts} attempts for {scene}")


def draw(layout: Layout, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), layout.background)
    painter = ImageDraw.Draw(image)
    for placed in layout.objects:
        painter.polygon(_pixel_vertices(placed.polygon, size), fill=placed.fill)
    return image


def object_index_map(layout: Layout, size: int) -> np.ndarray:
    """Which object each pixel of draw(layout, size) shows: its PlacedObject.index, or -1
    for the background (drawn the same way, so the masks match the image exactly)."""
    canvas = Image.new("I", (size, size), -1)
    painter = ImageDraw.Draw(canvas)
    for placed in layout.objects:
        painter.polygon(_pixel_vertices(placed.polygon, size), fill=placed.index)
    return np.asarray(canvas)


def solve_layout(
    scene: Scene, rng: np.random.Generator, work_size: int, scale: float = 1.0
) -> Layout | None:
    """One random layout attempt, checked at `work_size` pixels; None if it fails."""
    outlines = [random_outline(o.shape, o.size, scale, rng) for o in scene.objects]
    centres = _place(scene, outlines, rng)
    placed = [outline + centre for outline, centre in zip(outlines, centres, strict=True)]
    polygons = _fit_in_frame(placed, rng)
    if polygons is None:
        return None
    amodal = [rasterise(p, work_size) for p in polygons]
    if not _overlaps_as_related(scene, amodal):
        return None
    order = _drawing_order(scene, rng)
    visible = np.full((work_size, work_size), -1)
    for i in order:
        visible[amodal[i]] = i
    for i, mask in enumerate(amodal):
        shown = (visible == i).sum()
        if shown < (1 - _HIDDEN_RANGE[1]) * mask.sum() or shown < _MIN_VISIBLE_AREA * visible.size:
            return None
    objects = [
        read_object(visible == i, o.shape in CONVEX_SHAPES) for i, o in enumerate(scene.objects)
    ]
    for rel in scene.relations:
        subject, obj = objects[rel.subject_index], objects[rel.object_index]
        if not relation_holds(rel.predicate, subject, obj, RENDER_THRESHOLDS):
            return None
    return Layout(
        objects=tuple(
            PlacedObject(i, polygons[i], jitter_colour(COLOURS[scene.objects[i].colour], rng))
            for i in order
        ),
        background=_background(rng),
    )


def _template(shape: str) -> np.ndarray:
    """Unit outline of a shape, pointing up, before normalisation."""
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    if shape == "triangle":
        return np.array([[0, -1], [1, 0.73], [-1, 0.73]])
    if shape == "diamond":
        return np.array([[0, -1], [0.72, 0], [0, 1], [-0.72, 0]])
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if shape == "hexagon":
        angles = np.arange(6) * np.pi / 3
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    raise ValueError(f"unknown shape {shape!r}")


def random_outline(
    shape: str, size: str | None, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """Outline centred on its bounding box, whose larger half-side is the sampled extent."""
    points = _template(shape)
    if shape != "circle":
        angle = math.radians(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
        rotation = np.array([[math.cos(angle), -math.sin(angle)],
                             [math.sin(angle), math.cos(angle)]])
        points = points @ rotation.T
    points = points - (points.max(axis=0) + points.min(axis=0)) / 2
    half_extent = rng.uniform(*_HALF_EXTENT[size]) * scale
    return points * (half_extent / np.abs(points).max())


def _half_sides(outline: np.ndarray) -> np.ndarray:
    return outline.max(axis=0)


def _place(scene: Scene, outlines: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Centres relative to a random first object: each next object is offset from one it
    relates to (or placed anywhere near, if it relates to none placed so far)."""
    centres: dict[int, np.ndarray] = {int(rng.integers(len(outlines))): np.zeros(2)}
    while len(centres) < len(outlines):
        linking = [
            r for r in scene.relations
            if (r.subject_index in centres) != (r.object_index in centres)
        ]
        if not linking:  # a scene made of unconnected groups
            unplaced = [i for i in range(len(outlines)) if i not in centres]
            centres[unplaced[0]] = rng.uniform(-0.5, 0.5, size=2)
            continue
        rel = linking[rng.integers(len(linking))]
        if rel.subject_index in centres:  # express it as "new object <predicate> anchor"
            rel = Relation(rel.object_index, CONVERSE[rel.predicate], rel.subject_index)
        new, anchor = rel.subject_index, rel.object_index
        offset = relation_offset(rel.predicate, outlines[new], outlines[anchor], rng)
        centres[new] = centres[anchor] + offset
    return [centres[i] for i in range(len(outlines))]


def _fit_in_frame(polygons: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray] | None:
    """The whole group moved to a random position inside the frame, None if it is too big."""
    low = np.min([p.min(axis=0) for p in polygons], axis=0)
    high = np.max([p.max(axis=0) for p in polygons], axis=0)
    if np.any(high - low > 1 - 2 * FRAME_MARGIN):
        return None
    shift = rng.uniform(FRAME_MARGIN - low, 1 - FRAME_MARGIN - high)
    return [p + shift for p in polygons]


def relation_offset(
    predicate: Predicate, new_outline: np.ndarray, anchor_outline: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Random centre offset of a new object from its anchor that tends to make
    "new <predicate> anchor" true; the layout check has the final word."""
    if predicate in _DEPTH:
        return _depth_offset(new_outline, anchor_outline, predicate is Predicate.IN_FRONT_OF, rng)
    new, anchor = _half_sides(new_outline), _half_sides(anchor_outline)
    margin = RENDER_THRESHOLDS.direction_margin
    if predicate in (Predicate.LEFT_OF, Predicate.RIGHT_OF, Predicate.ABOVE, Predicate.BELOW):
        along = rng.uniform(margin + 0.02, 0.6)
        across = rng.uniform(-0.8, 0.8) * along
        sign = -1 if predicate in (Predicate.LEFT_OF, Predicate.ABOVE) else 1
        horizontal = predicate in (Predicate.LEFT_OF, Predicate.RIGHT_OF)
        return np.array([sign * along, across] if horizontal else [across, sign * along])
    if predicate in (Predicate.ON, Predicate.UNDER):
        touching = new[1] + anchor[1] + rng.uniform(-0.004, 0.008)
        slide = rng.uniform(-0.6, 0.6) * min(new[0], anchor[0])
        return np.array([slide, -touching if predicate is Predicate.ON else touching])
    # next to: beside (more often) or above/below, a small gap apart
    axis = 0 if rng.random() < 0.7 else 1
    extent = new.max() + anchor.max()  # the mean of the two objects' full extents
    gap = rng.uniform(0.005, RENDER_THRESHOLDS.max_near_gap * extent)
    offset = np.zeros(2)
    offset[axis] = (new[axis] + anchor[axis] + gap) * rng.choice([-1, 1])
    offset[1 - axis] = rng.uniform(-0.9, 0.9) * (new[1 - axis] + anchor[1 - axis])
    return offset


def _depth_offset(
    new: np.ndarray, anchor: np.ndarray, new_in_front: bool, rng: np.random.Generator
) -> np.ndarray:
    """Offset that pushes a corner of the front outline into the back object.

    A corner (or a curve) cutting in leaves a dent in what stays visible of the object behind,
    which is how occlusion is read from pixels; a straight edge cutting across would leave a
    shape that looks whole and the depth order could not be told.
    """
    front, back = (new, anchor) if new_in_front else (anchor, new)
    radii = np.linalg.norm(front, axis=1)
    corners = front[radii > 0.9 * radii.max()]  # outer corners: a star's tips, not its notches
    corner = corners[rng.integers(len(corners))]
    # Aim the corner at the back object's side rather than squarely at its centre, so that
    # it does not meet one of the back object's own corners head on.
    angle = math.atan2(corner[1], corner[0]) + rng.uniform(-0.9, 0.9)
    reach = np.abs(back).max() * rng.uniform(-0.3, 0.6)  # < 0: the corner passes the centre
    back_from_front = corner + reach * np.array([math.cos(angle), math.sin(angle)])
    return back_from_front if not new_in_front else -back_from_front


def _pixel_vertices(polygon: np.ndarray, size: int) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in polygon * size]


def rasterise(polygon: np.ndarray, size: int) -> np.ndarray:
    canvas = Image.new("1", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(_pixel_vertices(polygon, size), fill=1)
    return np.asarray(canvas, dtype=bool)


def _overlaps_as_related(scene: Scene, amodal: list[np.ndarray]) -> bool:
    """Objects in a depth relation overlap partially, objects "on" one another share at most
    a sliver, other related objects stay apart; unrelated ones may overlap."""
    kinds = {frozenset((r.subject_index, r.object_index)): r for r in scene.relations}
    for i in range(len(amodal)):
        for j in range(i + 1, len(amodal)):
            shared = int((amodal[i] & amodal[j]).sum())
            rel = kinds.get(frozenset((i, j)))
            if rel is not None and rel.predicate in _DEPTH:
                in_front = rel.predicate is Predicate.IN_FRONT_OF
                back = rel.object_index if in_front else rel.subject_index
                hidden = shared / max(1, int(amodal[back].sum()))
                if not _HIDDEN_RANGE[0] <= hidden <= _HIDDEN_RANGE[1]:
                    return False
            elif rel is not None and rel.predicate in (Predicate.ON, Predicate.UNDER):
                if shared > 0.03 * min(amodal[i].sum(), amodal[j].sum()):
                    return False
            elif rel is not None and shared:
                return False
    return True


def _drawing_order(scene: Scene, rng: np.random.Generator) -> list[int]:
    """Back to front, ties in random order (the scene's depth order is acyclic)."""
    behind = {i: set() for i in range(len(scene.objects))}  # i -> objects that must precede it
    for rel in scene.relations:
        if rel.predicate is Predicate.IN_FRONT_OF:
            behind[rel.subject_index].add(rel.object_index)
        elif rel.predicate is Predicate.BEHIND:
            behind[rel.object_index].add(rel.subject_index)
    order: list[int] = []
    while len(order) < len(behind):
        ready = [i for i in behind if i not in order and behind[i] <= set(order)]
        if not ready:
            raise ValueError(f"contradictory depth order in {scene}")
        order.append(ready[rng.integers(len(ready))])
    return order


def jitter_colour(colour: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in colour)


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    level = rng.integers(228, 256)
    return tuple(int(np.clip(level + rng.integers(-6, 7), 0, 255)) for _ in range(3))
