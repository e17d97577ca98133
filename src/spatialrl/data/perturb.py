"""Perturber: reverses exactly n relations of a scene and keeps the rest.

A reversed relation states the opposite ("A left of B" becomes "A right of B" or
"B left of A"), which the evaluator's geometry never reads as true together with the
original, so a render of the perturbed scene breaks exactly n relations of the original.
"next to" is symmetric and cannot be reversed.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np

from spatialrl.data.grammar import (
    CONVERSE,
    Predicate,
    Relation,
    Scene,
    canonicalize,
    is_satisfiable,
)


class PerturbError(ValueError):
    """The scene cannot be perturbed in the requested number of relations."""


def perturbable_indices(scene: Scene) -> list[int]:
    return [i for i, r in enumerate(scene.relations) if r.predicate is not Predicate.NEXT_TO]


def perturb(scene: Scene, n: int, rng: np.random.Generator) -> tuple[Scene, int]:
    """(perturbed scene in canonical order, number of relations changed == n).

    Tries the subsets of n reversible relations in random order and returns the first whose
    result is still satisfiable; raises PerturbError when there is none.
    """
    candidates = perturbable_indices(scene)
    if not 1 <= n <= len(candidates):
        raise PerturbError(
            f"cannot change {n} relations: the scene has {len(candidates)} reversible ones "
            "('next to' is symmetric)"
        )
    subsets = list(itertools.combinations(candidates, n))
    for pick in rng.permutation(len(subsets)):
        relations = list(scene.relations)
        for i in subsets[pick]:
            relations[i] = _reverse(relations[i], rng)
        perturbed = replace(scene, relations=tuple(relations))
        if is_satisfiable(perturbed):
            return canonicalize(perturbed), n
    raise PerturbError(f"no satisfiable scene changes {n} relations of {scene}")


def _reverse(relation: Relation, rng: np.random.Generator) -> Relation:
    """The opposite fact, worded either with the converse predicate or with the objects
    swapped."""
    if rng.random() < 0.5:
        return Relation(relation.subject_index, CONVERSE[relation.predicate], relation.object_index)
    return Relation(relation.object_index, relation.predicate, relation.subject_index)
