"""Spatial prompt grammar: typed scenes, sampling, prompt text and its parser.

A prompt is a comma-separated list of clauses "<object> <relation> <object>". An object is
introduced with "a"/"an" (and an optional size) and referred to later with "the":

    a red circle to the left of a large blue square, a green triangle above the blue square

The words come from a `Vocabulary`: the shapes world's coloured shapes (the default) or real
objects (spatialrl.data.real_world: "a small brown dog on a red couch"). A vocabulary also says
which attribute tells a scene's objects apart in an image: in the shapes world colours are
unique within a scene (the evaluator finds objects by colour), among real objects classes are
(a detector finds objects by class).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Literal

import numpy as np

# Hues are spread around the colour wheel so that colour segmentation can tell them apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 125, 20),
    "yellow": (240, 215, 30),
    "green": (40, 165, 60),
    "cyan": (20, 185, 210),
    "blue": (40, 75, 220),
    "purple": (135, 50, 185),
    "pink": (235, 95, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon")
CONVEX_SHAPES = frozenset(SHAPES) - {"star"}
SIZES: tuple[str, ...] = ("small", "large")
ARTICLES = ("a", "an", "the")


class Predicate(str, Enum):
    LEFT_OF = "left of"
    RIGHT_OF = "right of"
    ABOVE = "above"
    BELOW = "below"
    IN_FRONT_OF = "in front of"
    BEHIND = "behind"
    NEXT_TO = "next to"
    ON = "on"
    UNDER = "under"

    @property
    def phrase(self) -> str:
        """The words used in a prompt."""
        return _PHRASES.get(self, self.value)


_PHRASES = {Predicate.LEFT_OF: "to the left of", Predicate.RIGHT_OF: "to the right of"}
_PREDICATE_BY_PHRASE = {p.phrase: p for p in Predicate} | {p.value: p for p in Predicate}

# Relations that need the two objects to touch or overlap (rather than an ordering).
CONTACT_PREDICATES = frozenset(
    {Predicate.ON, Predicate.UNDER, Predicate.IN_FRONT_OF, Predicate.BEHIND, Predicate.NEXT_TO}
)
# The same fact with subject and object exchanged ("A left of B" == "B right of A").
CONVERSE = {
    Predicate.LEFT_OF: Predicate.RIGHT_OF,
    Predicate.RIGHT_OF: Predicate.LEFT_OF,
    Predicate.ABOVE: Predicate.BELOW,
    Predicate.BELOW: Predicate.ABOVE,
    Predicate.IN_FRONT_OF: Predicate.BEHIND,
    Predicate.BEHIND: Predicate.IN_FRONT_OF,
    Predicate.ON: Predicate.UNDER,
    Predicate.UNDER: Predicate.ON,
    Predicate.NEXT_TO: Predicate.NEXT_TO,
}
# (axis, sign): +1 means subject < object along the axis (x grows right, y grows down,
# depth grows towards the viewer; "A in front of B" puts B before A in depth).
ORDERING = {
    Predicate.LEFT_OF: ("x", +1),
    Predicate.RIGHT_OF: ("x", -1),
    Predicate.ABOVE: ("y", +1),
    Predicate.BELOW: ("y", -1),
    Predicate.ON: ("y", +1),
    Predicate.UNDER: ("y", -1),
    Predicate.IN_FRONT_OF: ("depth", -1),
    Predicate.BEHIND: ("depth", +1),
}


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """The words a world's prompts are made of. One object per world: compared by identity."""

    name: str
    colours: tuple[str, ...]
    nouns: tuple[str, ...]  # shapes, or object classes (may be several words: "hot dog")
    noun_kind: str  # what a noun is called in error messages: "shape", "object"
    # The (colour, noun) pairs objects are drawn from; colour None names the noun alone.
    combos: tuple[tuple[str | None, str], ...]
    # The attribute that tells a scene's objects apart in an image: unique within a scene.
    distinct_by: Literal["colour", "noun"]
    # Nouns whose outline has no dents of its own (see `why_unsatisfiable`).
    convex_nouns: frozenset[str]
    # A noun's physical size class: "A on B" needs A's class at most B's. Empty: no check.
    size_class: Mapping[str, int] = field(default_factory=dict)
    # A sampled object's size word is drawn uniformly from these (None: no size word).
    size_choices: tuple[str | None, ...] = (None, None, "small", "large")

    @property
    def colour_optional(self) -> bool:
        return any(colour is None for colour, _ in self.combos)


SHAPES_VOCABULARY = Vocabulary(
    name="shapes",
    colours=tuple(COLOURS),
    nouns=SHAPES,
    noun_kind="shape",
    combos=tuple(itertools.product(COLOURS, SHAPES)),
    distinct_by="colour",
    convex_nouns=CONVEX_SHAPES,
)


@dataclass(frozen=True)
class SceneObject:
    colour: str | None  # None: named by its noun alone (real objects only)
    shape: str  # the noun: a shape, or a real object's class
    size: str | None = None  # "small", "large" or None (medium)

    @property
    def identity(self) -> tuple[str | None, str]:
        return (self.colour, self.shape)

    def noun_phrase(self, first_mention: bool) -> str:
        if not first_mention:
            return " ".join(w for w in ("the", self.colour, self.shape) if w)
        words = " ".join(w for w in (self.size, self.colour, self.shape) if w)
        return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


@dataclass(frozen=True)
class Relation:
    subject_index: int
    predicate: Predicate
    object_index: int


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    relations: tuple[Relation, ...]
    vocabulary: Vocabulary = field(default=SHAPES_VOCABULARY, repr=False)

    def __post_init__(self) -> None:
        problem = _structural_problem(self)
        if problem:
            raise ValueError(f"invalid scene: {problem}")


def _structural_problem(scene: Scene) -> str | None:
    """Well-formedness that every scene needs, satisfiable or not."""
    if not scene.relations:
        return "a scene needs at least one relation"
    vocabulary = scene.vocabulary
    for obj in scene.objects:
        colour_known = obj.colour in vocabulary.colours or (
            obj.colour is None and vocabulary.colour_optional)
        if not colour_known or obj.shape not in vocabulary.nouns:
            return f"unknown object {obj.colour} {obj.shape}"
        if obj.size is not None and obj.size not in SIZES:
            return f"unknown size {obj.size!r}"
    distinct = [o.colour if vocabulary.distinct_by == "colour" else o.shape
                for o in scene.objects]
    if len(set(distinct)) != len(distinct):
        plural = "colours" if vocabulary.distinct_by == "colour" else "objects' classes"
        return f"{plural} must be unique within a scene, got {distinct}"
    pairs = set()
    for rel in scene.relations:
        ends = (rel.subject_index, rel.object_index)
        if not all(0 <= i < len(scene.objects) for i in ends) or ends[0] == ends[1]:
            return f"bad object indices in {rel}"
        if frozenset(ends) in pairs:
            return f"two relations between the same objects {sorted(ends)}"
        pairs.add(frozenset(ends))
    mentioned = {i for rel in scene.relations for i in (rel.subject_index, rel.object_index)}
    if mentioned != set(range(len(scene.objects))):
        return "every object must take part in a relation"
    return None


def why_unsatisfiable(scene: Scene) -> str | None:
    """Why the scene cannot be drawn so that its relations read back from pixels, or None.

    Beyond plain contradictions (cycles such as A left of B left of A), a few rules keep every
    accepted scene drawable by the renderer:
    - an object rests on at most one object, carries at most one and is behind at most one;
    - once two touching relations (on, under, in front of, behind, next to) join three
      objects, a further relation is allowed only if all of them are "next to" (a chain of
      contacts pins the objects down too tightly for most extra constraints);
    - no object lies strictly between two touching objects along an axis;
    - two stars are never depth-ordered (their own dents hide the dent that tells which one
      covers the other);
    - among real objects, nothing rests on a smaller kind of thing (no bus on a cup).
    """
    resting_on: set[int] = set()
    carrying: set[int] = set()
    covered: set[int] = set()
    size_class = scene.vocabulary.size_class
    for rel in scene.relations:
        if rel.predicate in (Predicate.ON, Predicate.UNDER):
            top, bottom = _top_bottom(rel)
            if top in resting_on or bottom in carrying:
                return "an object rests on, or carries, more than one object"
            resting_on.add(top)
            carrying.add(bottom)
            nouns = (scene.objects[top].shape, scene.objects[bottom].shape)
            if size_class and size_class[nouns[0]] > size_class[nouns[1]]:
                return f"a {nouns[0]} cannot rest on a smaller kind of thing ({nouns[1]})"
        if rel.predicate in (Predicate.IN_FRONT_OF, Predicate.BEHIND):
            ends = (scene.objects[rel.subject_index], scene.objects[rel.object_index])
            if not any(o.shape in scene.vocabulary.convex_nouns for o in ends):
                return "two stars in a depth relation"
            back = rel.object_index if rel.predicate is Predicate.IN_FRONT_OF else rel.subject_index
            if back in covered:
                return "an object is behind more than one object"
            covered.add(back)
    contact = [r for r in scene.relations if r.predicate in CONTACT_PREDICATES]
    if len(contact) >= 2 and len(scene.relations) >= 3:
        if any(r.predicate is not Predicate.NEXT_TO for r in contact):
            return "two touching relations (other than 'next to') plus a third relation"
    cluster = _contact_clusters(scene, contact)
    for axis in ("x", "y", "depth"):
        edges = _axis_edges(scene, axis)
        if _has_cycle(edges):
            return f"contradictory {axis} order"
        between = {(cluster[a], cluster[b]) for a, b in edges if cluster[a] != cluster[b]}
        if axis != "depth" and _has_cycle(between):
            return f"an object lies between two touching objects along {axis}"
    return None


def is_satisfiable(scene: Scene) -> bool:
    return why_unsatisfiable(scene) is None


def _top_bottom(rel: Relation) -> tuple[int, int]:
    if rel.predicate is Predicate.ON:
        return rel.subject_index, rel.object_index
    return rel.object_index, rel.subject_index


def _axis_edges(scene: Scene, axis: str) -> list[tuple[int, int]]:
    """Directed edges (a, b) meaning a < b along the axis."""
    edges = []
    for rel in scene.relations:
        rel_axis, sign = ORDERING.get(rel.predicate, (None, 0))
        if rel_axis == axis:
            ends = (rel.subject_index, rel.object_index)
            edges.append(ends if sign > 0 else ends[::-1])
    return edges


def _contact_clusters(scene: Scene, contact: Sequence[Relation]) -> list[int]:
    """Cluster id per object: objects joined by touching relations share one."""
    cluster = list(range(len(scene.objects)))
    for _ in contact:  # enough passes to propagate along any chain
        for rel in contact:
            low = min(cluster[rel.subject_index], cluster[rel.object_index])
            cluster[rel.subject_index] = cluster[rel.object_index] = low
    return cluster


def _has_cycle(edges: Collection[tuple[int, int]]) -> bool:
    remaining = set(edges)
    while remaining:
        sources = {a for a, _ in remaining} - {b for _, b in remaining}
        if not sources:
            return True
        remaining = {(a, b) for a, b in remaining if a not in sources}
    return False


def canonicalize(scene: Scene) -> Scene:
    """Number objects in order of first mention, the order a parsed prompt gives them."""
    order: list[int] = []
    for rel in scene.relations:
        for i in (rel.subject_index, rel.object_index):
            if i not in order:
                order.append(i)
    new_index = {old: new for new, old in enumerate(order)}
    return replace(
        scene,
        objects=tuple(scene.objects[i] for i in order),
        relations=tuple(
            Relation(new_index[r.subject_index], r.predicate, new_index[r.object_index])
            for r in scene.relations
        ),
    )


def scene_to_prompt(scene: Scene) -> str:
    return relations_to_text(scene.objects, scene.relations)


def relations_to_text(objects: Sequence[SceneObject], relations: Sequence[Relation]) -> str:
    """One clause per relation, an object named in full at its first mention. Unlike a
    Scene, the relations may be any subset (as the verifier names the failing ones)."""
    mentioned: set[int] = set()
    clauses = []
    for rel in relations:
        words = []
        for i, gap in ((rel.subject_index, rel.predicate.phrase), (rel.object_index, None)):
            words.append(objects[i].noun_phrase(first_mention=i not in mentioned))
            mentioned.add(i)
            if gap:
                words.append(gap)
        clauses.append(" ".join(words))
    return ", ".join(clauses)


def parse_prompt(text: str, vocabulary: Vocabulary = SHAPES_VOCABULARY) -> Scene:
    """The scene a prompt describes; ValueError naming the fragment that does not parse.

    Accepts the generated form plus harmless variations: any case, extra spaces, a final
    full stop, "and" between clauses, "a"/"an" either way, a size on a later mention.
    """
    body = text.strip().lower().rstrip(".").strip()
    clauses = [c.strip() for part in body.split(",") for c in re.split(r"\band\b", part)]
    if not body or not all(clauses):
        raise ValueError(f"empty clause in prompt {text!r}")
    objects: list[SceneObject] = []
    relations = []
    for clause in clauses:
        subject, rest = _parse_noun_phrase(clause.split(), clause, vocabulary)
        predicate, rest = _parse_predicate(rest, clause)
        if not rest:
            raise ValueError(f"clause {clause!r} needs '<object> <relation> <object>'")
        obj, extra = _parse_noun_phrase(rest, clause, vocabulary)
        if extra:
            raise ValueError(f"unexpected {' '.join(extra)!r} at the end of clause {clause!r}")
        indices = [_resolve(noun, objects, clause) for noun in (subject, obj)]
        relations.append(Relation(indices[0], predicate, indices[1]))
    try:
        return Scene(tuple(objects), tuple(relations), vocabulary)
    except ValueError as err:
        raise ValueError(f"prompt {text!r}: {err}") from None


@dataclass(frozen=True)
class _NounPhrase:
    definite: bool
    size: str | None
    colour: str | None
    shape: str


# Longest phrase first, so "to the left of" is tried before a shorter phrase it starts with.
_PREDICATE_WORDS = sorted(((tuple(phrase.split()), p) for phrase, p in
                           _PREDICATE_BY_PHRASE.items()), key=lambda item: -len(item[0]))


def _parse_predicate(tokens: list[str], clause: str) -> tuple[Predicate, list[str]]:
    for words, predicate in _PREDICATE_WORDS:
        if tuple(tokens[:len(words)]) == words:
            return predicate, tokens[len(words):]
    unknown = list(itertools.takewhile(lambda t: t not in ARTICLES, tokens))
    if not tokens:
        raise ValueError(f"clause {clause!r} needs '<object> <relation> <object>'")
    raise ValueError(f"unknown relation {' '.join(unknown)!r} in clause {clause!r}")


def _parse_noun_phrase(
    tokens: list[str], clause: str, vocabulary: Vocabulary
) -> tuple[_NounPhrase, list[str]]:
    """The noun phrase at the start of `tokens` and the tokens after it."""
    if not tokens or tokens[0] not in ARTICLES:
        got = tokens[0] if tokens else "nothing"
        raise ValueError(f"expected 'a', 'an' or 'the', got {got!r} in clause {clause!r}")
    rest = tokens[1:]
    size = rest.pop(0) if rest and rest[0] in SIZES else None
    if not rest:
        raise ValueError(f"incomplete object in clause {clause!r}")
    colour = rest[0] if rest[0] in vocabulary.colours else None
    if colour is None and not vocabulary.colour_optional:
        raise ValueError(f"unknown colour {rest[0]!r} in clause {clause!r}")
    noun_words = rest[1:] if colour else rest
    noun = _noun_at(noun_words, vocabulary)
    if noun is None and colour and vocabulary.colour_optional:
        # A colour word may itself be a noun ("an orange above a cup").
        colour, noun_words, noun = None, rest, _noun_at(rest, vocabulary)
        if noun is None:
            noun_words = rest[1:]
    if noun is None:
        unknown = noun_words[0] if noun_words else "nothing"
        raise ValueError(f"unknown {vocabulary.noun_kind} {unknown!r} in clause {clause!r}")
    return (_NounPhrase(tokens[0] == "the", size, colour, noun),
            noun_words[len(noun.split()):])


def _noun_at(tokens: list[str], vocabulary: Vocabulary) -> str | None:
    """The longest noun of the vocabulary that `tokens` start with, or None."""
    matches = [n for n in vocabulary.nouns if tokens[:len(n.split())] == n.split()]
    return max(matches, key=len, default=None)


def _resolve(noun: _NounPhrase, objects: list[SceneObject], clause: str) -> int:
    """Index of the object a noun phrase names, adding it on its first mention."""
    known = [i for i, o in enumerate(objects) if o.identity == (noun.colour, noun.shape)]
    name = " ".join(w for w in (noun.colour, noun.shape) if w)
    if noun.definite:
        if not known:
            raise ValueError(f"'the {name}' in clause {clause!r} was not introduced before")
        if noun.size not in (None, objects[known[0]].size):
            raise ValueError(f"'the {noun.size} {name}' in clause {clause!r} changes its size")
        return known[0]
    if known:
        raise ValueError(f"'{name}' is introduced twice (use 'the' in clause {clause!r})")
    objects.append(SceneObject(noun.colour, noun.shape, noun.size))
    return len(objects) - 1


def _as_range(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else value


def sample_scene(
    rng: np.random.Generator,
    num_objects: int | tuple[int, int] = (2, 3),
    num_relations: int | tuple[int, int] = (1, 3),
    allowed_combos: Collection[tuple[str | None, str]] | None = None,
    max_tries: int = 1000,
    vocabulary: Vocabulary = SHAPES_VOCABULARY,
) -> Scene:
    """A random satisfiable scene in canonical order (ranges are inclusive), its objects
    drawn from `allowed_combos` (default: all of the vocabulary's).

    Every object takes part in a relation and each pair of objects has at most one, so
    k objects carry between k - 1 and k (k - 1) / 2 relations.
    """
    combos = sorted(allowed_combos or vocabulary.combos, key=lambda c: (c[0] or "", c[1]))
    object_range, relation_range = _as_range(num_objects), _as_range(num_relations)
    for _ in range(max_tries):
        count = int(rng.integers(object_range[0], object_range[1] + 1))
        low = max(relation_range[0], count - 1)
        high = min(relation_range[1], count * (count - 1) // 2)
        if low > high:
            continue
        objects = _sample_objects(rng, combos, count, vocabulary)
        if objects is None:
            continue
        pairs = list(itertools.combinations(range(count), 2))
        chosen = rng.choice(len(pairs), size=int(rng.integers(low, high + 1)), replace=False)
        relations = []
        for p in chosen:
            a, b = pairs[p] if rng.random() < 0.5 else pairs[p][::-1]
            relations.append(Relation(a, list(Predicate)[rng.integers(len(Predicate))], b))
        try:
            scene = canonicalize(Scene(objects, tuple(relations), vocabulary))
        except ValueError:  # two relations left an object out
            continue
        if is_satisfiable(scene):
            return scene
    raise ValueError(
        f"no satisfiable scene with {num_objects} objects and {num_relations} relations "
        f"from {len(combos)} allowed combos"
    )


def _sample_objects(
    rng: np.random.Generator,
    combos: Sequence[tuple[str | None, str]],
    count: int,
    vocabulary: Vocabulary,
) -> tuple[SceneObject, ...] | None:
    picked = [combos[i] for i in rng.permutation(len(combos))]
    objects: list[SceneObject] = []
    for colour, shape in picked:
        if vocabulary.distinct_by == "colour":
            fresh = all(o.colour != colour for o in objects)
        else:
            fresh = all(o.shape != shape for o in objects)
        if fresh:
            size = vocabulary.size_choices[rng.integers(len(vocabulary.size_choices))]
            objects.append(SceneObject(colour, shape, size))
        if len(objects) == count:
            return tuple(objects)
    return None
