"""Object geometry read from masks, and the rules that decide whether a relation holds.

The renderer's layout check and the evaluator both go through `read_object` and
`relation_holds`, so a layout the renderer accepts is one the evaluator reads the same way.
The renderer uses stricter thresholds so that its images keep a safety margin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from spatialrl.data.grammar import Predicate

# Images are analysed at most this many pixels on a side: plenty for relations, and it keeps
# the cost of reading a 1024 px model sample close to that of a 64 px render.
WORK_SIZE = 128


@dataclass(frozen=True)
class Thresholds:
    # Centroids must differ by this fraction of the image side for left/right/above/below,
    direction_margin: float
    # ... and by at most this many times as much across that direction (a cone around it).
    max_cross_ratio: float
    # "A on B": |gap between A's bottom and B's top| at most this fraction of the image side,
    contact_tolerance: float
    # ... and their horizontal extents overlap by at least this fraction of the narrower one.
    min_support_overlap: float
    # "next to": the gap between bounding boxes, in units of the objects' mean extent, lies
    # in [min_near_gap, max_near_gap] (negative: the boxes may overlap a little).
    min_near_gap: float
    max_near_gap: float
    # "A in front of B": A covers at least this fraction of the smaller object's area (and
    # min_occlusion_pixels) inside B's convex hull, and at least occlusion_ratio times what B
    # covers inside A's hull.
    min_occlusion: float
    min_occlusion_pixels: int
    occlusion_ratio: float
    # A convex object in front of a star must be whole: the star covers less than this
    # fraction of the smaller area inside its hull.
    max_cover_of_whole: float


EVALUATOR_THRESHOLDS = Thresholds(
    direction_margin=0.03,
    max_cross_ratio=3.0,
    contact_tolerance=0.05,
    min_support_overlap=0.3,
    min_near_gap=-0.15,
    max_near_gap=0.75,
    min_occlusion=0.02,
    min_occlusion_pixels=2,
    occlusion_ratio=1.5,
    max_cover_of_whole=0.05,
)
RENDER_THRESHOLDS = Thresholds(
    direction_margin=0.06,
    max_cross_ratio=3.0,
    contact_tolerance=0.02,
    min_support_overlap=0.5,
    min_near_gap=0.0,
    max_near_gap=0.45,
    min_occlusion=0.1,
    min_occlusion_pixels=5,
    occlusion_ratio=3.0,
    max_cover_of_whole=0.01,
)
# Speckle filtering, as fractions of the analysed image's area.
_MIN_CORE_AREA = 0.0004
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # diagonal neighbours join a component
_MIN_OBJECT_AREA = 0.001
# Fewer pixels than this never count as a dent (antialiasing, blur).
_MIN_DENT_PIXELS = 2


def work_shape(width: int, height: int) -> tuple[int, int]:
    """(width, height) at which an image of this size is analysed."""
    scale = min(1.0, WORK_SIZE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True, eq=False)
class ObjectFeatures:
    """One object's visible pixels; coordinates are fractions of the image, y pointing down."""

    mask: np.ndarray
    # Whether the object's shape is convex: only then does a dent in its visible pixels show
    # that something covers it (a star has dents of its own).
    convex: bool
    centroid: tuple[float, float]
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1

    @property
    def pixel_count(self) -> int:
        return int(self.mask.sum())

    @property
    def width(self) -> float:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> float:
        return self.bbox[3] - self.bbox[1]

    @cached_property
    def hull(self) -> np.ndarray:
        """Convex hull of the visible pixels: where an occluder cuts into the object."""
        rows = np.flatnonzero(self.mask.any(axis=1))
        cols = [np.flatnonzero(self.mask[r]) for r in rows]
        points = [(int(c[0]), int(r)) for r, c in zip(rows, cols, strict=True)]
        points += [(int(c[-1]), int(r)) for r, c in zip(rows, cols, strict=True)]
        vertices = _convex_hull(points)
        if len(vertices) < 3:
            return self.mask
        canvas = Image.new("1", (self.mask.shape[1], self.mask.shape[0]), 0)
        ImageDraw.Draw(canvas).polygon(vertices, fill=1, outline=1)
        return np.asarray(canvas, dtype=bool) | self.mask


def _convex_hull(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Andrew's monotone chain."""
    points = sorted(set(points))
    if len(points) < 3:
        return points

    def half(sequence: list[tuple[int, int]]) -> list[tuple[int, int]]:
        chain: list[tuple[int, int]] = []
        for p in sequence:
            while len(chain) >= 2 and _cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    return half(points) + half(points[::-1])


def _cross(o: tuple[int, int], a: tuple[int, int], b: tuple[int, int]) -> int:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def read_object(mask: np.ndarray, convex: bool = True) -> ObjectFeatures | None:
    """Features of the object whose candidate pixels are `mask`, or None if too little is left
    once speckles and thin fringes (blurred boundaries between two colours) are removed."""
    clean = _remove_speckles(mask)
    count = int(clean.sum())
    if count < max(4, _MIN_OBJECT_AREA * clean.size):
        return None
    height, width = clean.shape
    rows, cols = np.nonzero(clean)
    return ObjectFeatures(
        mask=clean,
        convex=convex,
        centroid=((cols.mean() + 0.5) / width, (rows.mean() + 0.5) / height),
        bbox=(cols.min() / width, rows.min() / height,
              (cols.max() + 1) / width, (rows.max() + 1) / height),
    )


def _remove_speckles(mask: np.ndarray) -> np.ndarray:
    """Keep the parts of the mask within two pixels of a sizeable eroded core."""
    core = _erode(mask)
    labels, count = ndimage.label(core, structure=_EIGHT_CONNECTED)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    keep = areas >= max(2, _MIN_CORE_AREA * mask.size)
    keep[0] = False
    return mask & _dilate(_dilate(keep[labels]))


def _shifted(mask: np.ndarray, fill: bool) -> list[np.ndarray]:
    padded = np.pad(mask, 1, constant_values=fill)
    h, w = mask.shape
    return [padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]


def _erode(mask: np.ndarray) -> np.ndarray:
    return np.logical_and.reduce(_shifted(mask, True))


def _dilate(mask: np.ndarray) -> np.ndarray:
    return np.logical_or.reduce(_shifted(mask, False))


def relation_holds(
    predicate: Predicate,
    subject: ObjectFeatures | None,
    obj: ObjectFeatures | None,
    thresholds: Thresholds = EVALUATOR_THRESHOLDS,
) -> bool:
    """Whether "subject <predicate> object" holds; false when either object is missing."""
    if subject is None or obj is None:
        return False
    return bool(_RULES[predicate](subject, obj, thresholds))


def _left_of(a: ObjectFeatures, b: ObjectFeatures, t: Thresholds) -> bool:
    return _ahead(b.centroid[0] - a.centroid[0], b.centroid[1] - a.centroid[1], t)


def _above(a: ObjectFeatures, b: ObjectFeatures, t: Thresholds) -> bool:
    return _ahead(b.centroid[1] - a.centroid[1], b.centroid[0] - a.centroid[0], t)


def _ahead(along: float, across: float, t: Thresholds) -> bool:
    return along > t.direction_margin and abs(across) <= t.max_cross_ratio * along


def _rests_on(top: ObjectFeatures, bottom: ObjectFeatures, t: Thresholds) -> bool:
    gap = bottom.bbox[1] - top.bbox[3]
    overlap = min(top.bbox[2], bottom.bbox[2]) - max(top.bbox[0], bottom.bbox[0])
    return (
        abs(gap) <= t.contact_tolerance
        and overlap >= t.min_support_overlap * min(top.width, bottom.width)
        and top.centroid[1] < bottom.centroid[1]
    )


def _occludes(front: ObjectFeatures, back: ObjectFeatures, t: Thresholds) -> bool:
    """The front object fills a dent in the back one's outline, and not the other way round.

    Dents are read off convex shapes only (a star has dents of its own). With one star, the
    convex partner decides alone: dented by the star means behind it; whole while touching
    it means in front.
    """
    smaller = min(front.pixel_count, back.pixel_count)
    enough = max(t.min_occlusion_pixels, t.min_occlusion * smaller)
    front_in_back_hull = int((front.mask & back.hull).sum())
    back_in_front_hull = int((back.mask & front.hull).sum())
    if front.convex == back.convex:
        return (
            front_in_back_hull >= enough
            and front_in_back_hull >= t.occlusion_ratio * back_in_front_hull
        )
    dented = max(_MIN_DENT_PIXELS, t.max_cover_of_whole * smaller)
    if back.convex:
        return front_in_back_hull >= max(enough, dented)
    return front_in_back_hull >= enough and back_in_front_hull < dented


def _next_to(a: ObjectFeatures, b: ObjectFeatures, t: Thresholds) -> bool:
    gap = max(b.bbox[0] - a.bbox[2], a.bbox[0] - b.bbox[2],
              b.bbox[1] - a.bbox[3], a.bbox[1] - b.bbox[3])
    extent = (max(a.width, a.height) + max(b.width, b.height)) / 2
    return t.min_near_gap * extent <= gap <= t.max_near_gap * extent


def _swap(rule: Callable[[ObjectFeatures, ObjectFeatures, Thresholds], bool]):
    return lambda a, b, t: rule(b, a, t)


_RULES = {
    Predicate.LEFT_OF: _left_of,
    Predicate.RIGHT_OF: _swap(_left_of),
    Predicate.ABOVE: _above,
    Predicate.BELOW: _swap(_above),
    Predicate.ON: _rests_on,
    Predicate.UNDER: _swap(_rests_on),
    Predicate.IN_FRONT_OF: _occludes,
    Predicate.BEHIND: _swap(_occludes),
    Predicate.NEXT_TO: _next_to,
}
