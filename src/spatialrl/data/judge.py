"""Judging an image against a scene: find the scene's objects, then decide each relation with
a geometric rule.

Finding objects is an `ObjectLocator`'s job, with two implementations: `ColourLocator` (the
shapes world's rule evaluator, objects by colour, their visible masks) and a zero-shot
detector (spatialrl.detection, objects by class, their boxes). A locator also says which
relations it can check: from boxes only the 2-D ones (left/right, above/below, next to); depth
and support need the masks that tell what covers or touches what. The rules are the shapes
evaluator's (`geometry.relation_holds`) or GenEval's published position rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from spatialrl.data.geometry import ObjectFeatures, relation_holds
from spatialrl.data.grammar import Predicate, Scene
from spatialrl.data.rule_evaluator import ImageLike, read_objects

# The relations a box tells: ordering along x or y, and closeness.
BOX_PREDICATES = frozenset(
    {Predicate.LEFT_OF, Predicate.RIGHT_OF, Predicate.ABOVE, Predicate.BELOW, Predicate.NEXT_TO}
)
GENEVAL_PREDICATES = BOX_PREDICATES - {Predicate.NEXT_TO}
# GenEval's POSITION_THRESHOLD: each centre offset shrinks by this times the boxes' extents.
GENEVAL_MARGIN = 0.1

RelationRule = Callable[[Predicate, ObjectFeatures | None, ObjectFeatures | None], bool]


class ObjectLocator(Protocol):
    """Finds each scene object in an image, None where it is not found."""

    checkable: frozenset[Predicate]  # the relations its findings can decide

    def locate(
        self, images: Sequence[ImageLike], scenes: Sequence[Scene]
    ) -> list[list[ObjectFeatures | None]]: ...


class ColourLocator:
    """The rule evaluator's reading of shapes-world images: objects by colour."""

    checkable = frozenset(Predicate)

    def locate(
        self, images: Sequence[ImageLike], scenes: Sequence[Scene]
    ) -> list[list[ObjectFeatures | None]]:
        return [read_objects(image, scene) for image, scene in zip(images, scenes, strict=True)]


@dataclass(frozen=True)
class Judgement:
    objects_found: tuple[bool, ...]  # one per scene object
    per_relation: tuple[bool | None, ...]  # one per relation; None: the locator cannot tell

    @property
    def checked(self) -> list[bool]:
        return [holds for holds in self.per_relation if holds is not None]

    @property
    def satisfied(self) -> bool:
        """Every object found and every relation that can be checked holds (at least one)."""
        return all(self.objects_found) and bool(self.checked) and all(self.checked)


def judge(
    objects: Sequence[ObjectFeatures | None],
    scene: Scene,
    checkable: frozenset[Predicate],
    rule: RelationRule = relation_holds,
) -> Judgement:
    """Which of the scene's relations hold among the located objects."""
    return Judgement(
        objects_found=tuple(o is not None for o in objects),
        per_relation=tuple(
            rule(r.predicate, objects[r.subject_index], objects[r.object_index])
            if r.predicate in checkable else None
            for r in scene.relations
        ),
    )


def geneval_relation_holds(
    predicate: Predicate, subject: ObjectFeatures | None, obj: ObjectFeatures | None
) -> bool:
    """GenEval's position rule (its evaluate_images.py `relative_position`): the offset between
    box centres, each axis shrunk by GENEVAL_MARGIN times both boxes' extents, divided by the
    unshrunk offset's length, must exceed 0.5 in the relation's direction. Coordinates are
    fractions of the image (GenEval's pixels, scaled: the same on square images)."""
    if subject is None or obj is None:
        return False
    offset = _box_centre(subject) - _box_centre(obj)
    extents = np.array([subject.width + obj.width, subject.height + obj.height])
    shrunk = np.maximum(np.abs(offset) - GENEVAL_MARGIN * extents, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return False
    dx, dy = shrunk / np.linalg.norm(offset)
    return {Predicate.LEFT_OF: dx < -0.5, Predicate.RIGHT_OF: dx > 0.5,
            Predicate.ABOVE: dy < -0.5, Predicate.BELOW: dy > 0.5}[predicate]


def _box_centre(features: ObjectFeatures) -> np.ndarray:
    x0, y0, x1, y1 = features.bbox
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2])
