"""Shapes-world edits: the six kinds of SpatialReward's edit data, each a typed dataclass that
words itself, draws itself on a layout and says whether the rule evaluator reads it as made.

Edits change the renderer's layout itself (its polygons and fills), so nothing else in the
image moves and every changed pixel is known:
- move: put an object left of, right of, above, below, on or under another (the anchor);
- recolour: give an object another colour;
- remove: take an object out;
- add: put a new object in one of those relations to an anchor;
- swap: exchange two objects' positions (each ends nearer the other's old place than its own);
- resize: make an object larger or smaller (its read area at least 1.25x, or at most 1/1.25).
The examples built from them: spatialrl.spatialreward.edit_examples.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
from PIL import Image

from spatialrl.data.geometry import ObjectFeatures, Thresholds, relation_holds
from spatialrl.data.grammar import COLOURS, Predicate, SceneObject
from spatialrl.data.render import (
    Layout,
    PlacedObject,
    draw,
    jitter_colour,
    random_outline,
    relation_offset,
)
from spatialrl.data.rule_evaluator import find_objects

EDIT_KINDS = ("move", "recolour", "remove", "add", "swap", "resize")
# Relations a move or an add asks for: each has a converse that never reads true with it
# ("next to" has none; depth relations need an overlap, which edits avoid).
EDIT_PREDICATES = (Predicate.LEFT_OF, Predicate.RIGHT_OF, Predicate.ABOVE, Predicate.BELOW,
                   Predicate.ON, Predicate.UNDER)
RESIZE_AREA_RATIO = 1.25  # a resize must change the read area at least this much
_GROW, _SHRINK = (1.35, 1.6), (0.6, 0.72)  # linear scale factors of a resize

Reading = Mapping[str, ObjectFeatures | None]  # what the rule evaluator finds, by colour


@dataclass(frozen=True)
class ObjectChange:
    """One object's new state: what it is and how it is drawn (None: removed)."""

    index: int
    obj: SceneObject
    placed: PlacedObject | None


@dataclass(frozen=True)
class World:
    """What an image shows: every object it has had, by index, and the layout of those
    present (PlacedObject.index is the key)."""

    objects: Mapping[int, SceneObject]
    layout: Layout

    @property
    def present(self) -> list[int]:
        return [placed.index for placed in self.layout.objects]

    def placed(self, index: int) -> PlacedObject:
        return next(placed for placed in self.layout.objects if placed.index == index)

    def changed(self, changes: Iterable[ObjectChange]) -> World:
        """The world with `changes` made; a changed object keeps its place in the drawing
        order, a new one is drawn last."""
        objects, drawn = dict(self.objects), list(self.layout.objects)
        for change in changes:
            objects[change.index] = change.obj
            at = next((i for i, p in enumerate(drawn) if p.index == change.index), None)
            if change.placed is None:
                del drawn[at]
            elif at is None:
                drawn.append(change.placed)
            else:
                drawn[at] = change.placed
        return World(objects, Layout(tuple(drawn), self.layout.background))

    def image(self, size: int) -> Image.Image:
        return draw(self.layout, size)


@dataclass(frozen=True)
class Ref:
    """An object the instruction names: its index in the worlds and what it is."""

    index: int
    obj: SceneObject

    @property
    def name(self) -> str:
        return self.obj.noun_phrase(first_mention=False)  # "the red circle"

    @property
    def words(self) -> str:
        return f"{self.obj.colour} {self.obj.shape}"


def _centre(polygon: np.ndarray) -> np.ndarray:
    """The bounding-box centre, about which the renderer builds outlines."""
    return (polygon.max(axis=0) + polygon.min(axis=0)) / 2


def _moved(placed: PlacedObject, centre: np.ndarray) -> PlacedObject:
    return replace(placed, polygon=placed.polygon - _centre(placed.polygon) + centre)


def _beside(outline: np.ndarray, predicate: Predicate, anchor: PlacedObject,
            rng: np.random.Generator) -> np.ndarray:
    """`outline` placed where "it <predicate> anchor" tends to hold, as the renderer places
    related objects."""
    anchor_centre = _centre(anchor.polygon)
    offset = relation_offset(predicate, outline, anchor.polygon - anchor_centre, rng)
    return outline + anchor_centre + offset


def _nearer(point: ObjectFeatures, towards: ObjectFeatures, away: ObjectFeatures) -> bool:
    here = np.asarray(point.centroid)
    return bool(np.linalg.norm(here - towards.centroid) < np.linalg.norm(here - away.centroid))


def read_colours(image: Image.Image, objects: Iterable[SceneObject]) -> Reading:
    """The rule evaluator's reading of `image` for each colour of `objects`."""
    by_colour = {obj.colour: obj for obj in objects}
    return dict(zip(by_colour, find_objects(image, list(by_colour.values())), strict=True))


# An object the instruction does not name reads as changed when the rule evaluator no longer
# finds it, finds its centroid moved by more than UNCHANGED_SHIFT of the image side, or finds
# its visible area grown or shrunk by more than UNCHANGED_AREA_RATIO (a resize edit asks for
# RESIZE_AREA_RATIO).
UNCHANGED_SHIFT = 0.05
UNCHANGED_AREA_RATIO = 1.4


def changed(before: ObjectFeatures, after: ObjectFeatures | None) -> bool:
    """Whether an object the rule evaluator found `before` reads as changed `after`."""
    if after is None:
        return True
    shift = np.hypot(after.centroid[0] - before.centroid[0], after.centroid[1] - before.centroid[1])
    ratio = after.pixel_count / before.pixel_count
    resized = not 1 / UNCHANGED_AREA_RATIO <= ratio <= UNCHANGED_AREA_RATIO
    return bool(shift > UNCHANGED_SHIFT or resized)


# ----------------------------------------------------------------------------------- edits


class Edit(ABC):
    """One edit of an instruction: its words, how it is drawn and how it is checked."""

    kind: ClassVar[str]

    @abstractmethod
    def clause(self) -> str:
        """The instruction's words for it: "remove the red circle"."""

    @abstractmethod
    def result(self) -> str:
        """What an image shows once it is made, for the reasoning."""

    @abstractmethod
    def label(self) -> str:
        """The edit region's label."""

    @abstractmethod
    def named(self) -> frozenset[int]:
        """The existing objects the clause names."""

    def reshaped(self) -> frozenset[int]:
        """Objects it moves, resizes or adds: they must overlap nothing."""
        return frozenset()

    def colours_brought(self) -> frozenset[str]:
        """Colours the edited image may show that the source does not."""
        return frozenset()

    @abstractmethod
    def propose(self, base: World, rng: np.random.Generator) -> tuple[ObjectChange, ...]:
        """One random way of making it on `base`."""

    @abstractmethod
    def holds(self, before: Reading, after: Reading, thresholds: Thresholds) -> bool:
        """Whether the rule evaluator's readings show it made."""

    @abstractmethod
    def on_object(self, other: Ref) -> Edit:
        """The same edit applied to `other` instead (for add: adding `other`)."""


@dataclass(frozen=True)
class Move(Edit):
    kind: ClassVar[str] = "move"
    target: Ref
    predicate: Predicate
    anchor: Ref

    def clause(self) -> str:
        verb = "put" if self.predicate in (Predicate.ON, Predicate.UNDER) else "move"
        return f"{verb} {self.target.name} {self.predicate.phrase} {self.anchor.name}"

    def result(self) -> str:
        return f"{self.target.name} is now {self.predicate.phrase} {self.anchor.name}"

    def label(self) -> str:
        return f"{self.target.words} moved"

    def named(self) -> frozenset[int]:
        return frozenset({self.target.index, self.anchor.index})

    def reshaped(self) -> frozenset[int]:
        return frozenset({self.target.index})

    def propose(self, base: World, rng: np.random.Generator) -> tuple[ObjectChange, ...]:
        placed = base.placed(self.target.index)
        outline = placed.polygon - _centre(placed.polygon)
        polygon = _beside(outline, self.predicate, base.placed(self.anchor.index), rng)
        return (ObjectChange(self.target.index, self.target.obj, replace(placed, polygon=polygon)),)

    def holds(self, before: Reading, after: Reading, thresholds: Thresholds) -> bool:
        return relation_holds(self.predicate, after.get(self.target.obj.colour),
                              after.get(self.anchor.obj.colour), thresholds)

    def on_object(self, other: Ref) -> Edit:
        return replace(self, target=other)


@dataclass(frozen=True)
class Recolour(Edit):
    kind: ClassVar[str] = "recolour"
    target: Ref
    colour: str

    def clause(self) -> str:
        return f"make {self.target.name} {self.colour}"

    def result(self) -> str:
        return f"{self.target.name} is now {self.colour}"

    def label(self) -> str:
        return f"{self.target.words} recoloured {self.colour}"

    def named(self) -> frozenset[int]:
        return frozenset({self.target.index})

    def colours_brought(self) -> frozenset[str]:
        return frozenset({self.colour})

    def propose(self, base: World, rng: np.random.Generator) -> tuple[ObjectChange, ...]:
        placed = base.placed(self.target.index)
        fill = jitter_colour(COLOURS[self.colour], rng)
        recoloured = replace(self.target.obj, colour=self.colour)
        return (ObjectChange(self.target.index, recoloured, replace(placed, fill=fill)),)

    def holds(self, before: Reading, after: Reading, thresholds: Thresholds) -> bool:
        return after.get(self.colour) is not None and after.get(self.target.obj.colour) is None

    def on_object(self, other: Ref) -> Edit:
        return replace(self, target=other)


@dataclass(frozen=True)
class Remove(Edit):
    kind: ClassVar[str] = "remove"
    target: Ref

    def clause(self) -> str:
        return f"remove {self.target.name}"

    def result(self) -> str:
        return f"{self.target.name} is gone"

    def label(self) -> str:
        return f"{self.target.words} removed"

    def named(self) -> frozenset[int]:
        return frozenset({self.target.index})

    def propose(self, base: World, rng: np.random.Generator) -> tuple[ObjectChange, ...]:
        return (ObjectChange(self.target.index, self.target.obj, None),)

    def holds(self, before: Reading, after: Reading, thresholds: Thresholds) -> bool:
        return after.get(self.target.obj.colour) is None

    def on_object(self, other: Ref) -> Edit:
        return replace(self, target=other)


@dataclass(frozen=True)
class Add(Edit):
    kind: ClassVar[str] = "add"
    new: Ref  # an index no object of the source has
    predicate: Predicate
    anchor: Ref

    def clause(self) -> str:
        return f"add {self.new.obj.noun_phrase(first_mention=True)} " \
               f"{self.predicate.phrase} {self.anchor.name}"

    def result(self) -> str:
        return f"{self.new.obj.noun_phrase(first_mention=True)} has been added " \
               f"{self.predicate.phrase} {self.anchor.name}"

    def label(self) -> str:
        return f"{self.new.words} added"

    def named(self) -> frozenset[int]:
        return frozenset({self.anchor.index})

    def reshaped(self) -> frozenset[int]:
        return frozenset({self.new.index})

    def colours_brought(self) -> frozenset[str]:
        return frozenset({self.new.obj.colour})

    def propose(self, base: World, rng: np.random.Generator) -> tuple[ObjectChange, ...]:
        outline = random_outline(self.new.obj.shape, self.new.obj.size, 1.0, rng)
        polygon = _beside(outline, self.predicate, base.placed(self.anchor.index), rng)
        fill = jitter_colour(COLOURS[self.new.obj.colour], rng)
        return (ObjectChange(self.new.index, self.new.obj,
                             PlacedObject(self.new.index, polygon, fill)),)

    def holds(self, before: Reading, after: Reading, thresholds: Thresholds) -> bool:
        return relation_holds(self.predicate, after.get(self.new.obj.colour),
                              after.get(self.anchor.obj.colour), thresholds)

    def on_object(self, other: Ref) -> Edit:
        return replace(self, new=other)


@dataclass(frozen=True)
class Swap(Edit):
    kind: ClassVar[str] = "swap"
    first: Ref
    second: Ref

    def clause(self) -> str:
        return f"swap the positions of {self.first.name} and {self.second.name}"

    def result(self) -> str:
        return f"{self.first.name} and {self.second.name} have swapped places"

    def label(self) -> str:
        return f"{self.first.words} and {self.second.words} swapped"

    def named(self) -> frozenset[int]:
        return frozenset({self.first.index, self.second.index})

    def reshaped(self) -> frozenset[int]:
        return self.named()

    def propose(self, base: World, rng: np.random.Generator) -> tuple[ObjectChange, ...]:
        first, second = base.placed(self.first.index), base.placed(self.second.index)
        return (
            ObjectChange(self.first.index, self.first.obj,
                         _moved(first, _centre(second.polygon))),
            ObjectChange(self.second.index, self.second.obj,
                         _moved(second, _centre(first.polygon))),
        )

    def holds(self, before: Reading, after: Reading, thresholds: Thresholds) -> bool:
        """Each object is now nearer where the other was than where it was."""
        first, second = self.first.obj.colour, self.second.obj.colour
        found = (before.get(first), before.get(second), after.get(first), after.get(second))
        if any(features is None for features in found):
            return False
        first_before, second_before, first_after, second_after = found
        return (_nearer(first_after, second_before, first_before)
                and _nearer(second_after, first_before, second_before))

    def on_object(self, other: Ref) -> Edit:
        return replace(self, second=other)


@dataclass(frozen=True)
class Resize(Edit):
    kind: ClassVar[str] = "resize"
    target: Ref
    larger: bool

    @property
    def _comparative(self) -> str:
        return "larger" if self.larger else "smaller"

    def clause(self) -> str:
        return f"make {self.target.name} {self._comparative}"

    def result(self) -> str:
        return f"{self.target.name} is {self._comparative}"

    def label(self) -> str:
        return f"{self.target.words} {'enlarged' if self.larger else 'shrunk'}"

    def named(self) -> frozenset[int]:
        return frozenset({self.target.index})

    def reshaped(self) -> frozenset[int]:
        return self.named()

    def propose(self, base: World, rng: np.random.Generator) -> tuple[ObjectChange, ...]:
        placed = base.placed(self.target.index)
        centre = _centre(placed.polygon)
        factor = rng.uniform(*(_GROW if self.larger else _SHRINK))
        polygon = (placed.polygon - centre) * factor + centre
        return (ObjectChange(self.target.index, self.target.obj,
                             replace(placed, polygon=polygon)),)

    def holds(self, before: Reading, after: Reading, thresholds: Thresholds) -> bool:
        old, new = before.get(self.target.obj.colour), after.get(self.target.obj.colour)
        if old is None or new is None:
            return False
        ratio = new.pixel_count / old.pixel_count
        return ratio >= RESIZE_AREA_RATIO if self.larger else ratio <= 1 / RESIZE_AREA_RATIO

    def on_object(self, other: Ref) -> Edit:
        return replace(self, target=other)


def instruction_text(edits: Sequence[Edit]) -> str:
    """"Move the red circle above the blue square, remove the green star and make ..."."""
    clauses = [edit.clause() for edit in edits]
    text = clauses[0] if len(clauses) == 1 else f"{', '.join(clauses[:-1])} and {clauses[-1]}"
    return capitalised(text) + "."


def capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


