"""Shapes-world edit examples with exact ground truth: SpatialReward's training and evaluation
data (`spatialrl data edits`).

An example is a rendered source scene, an instruction of 1-3 edits of distinct kinds
(spatialrl.spatialreward.edits; 2-3 is the MER-Bench multi-edit setting) and candidate edited
images of known quality. An object is edited at most once per instruction, anchors are never
edited, recoloured and new objects take a colour no object of the example has, and objects
that move, change size or are added overlap no other object, before or after, so the rule
evaluator reads them cleanly.

Candidates (CANDIDATES), each checked with the rule evaluator when made (`edits_done`):
- correct: every edit done (also at the renderer's stricter thresholds);
- wrong_object: one edit applied to an object the instruction does not name (for add: a
  different object added), the others done;
- wrong_relation: a move or an add done with the converse relation, the others done;
- over_editing: every edit done, and an unnamed object recoloured (or, with none left, an
  unnamed object added);
- no_op: the source itself;
- partial: some, not all, edits of a multi-edit instruction.
Candidates that a given example cannot have (wrong_relation without a move or an add,
partial with one edit, wrong_object without a spare object) are left out.

Each candidate's SFT target is an answer in the published JSON shape (answers.EditAnswer):
one edit region per change it shows (bbox_2d, 0-1000, the union of the changed objects'
visible pixels before and after), reasoning that cites the regions by id, and scores
    success      = 25 * edits done // edits asked
    over_editing = 25 - 13 per object changed that the instruction does not name (floor 0)
so correct [25, 25]; over_editing [25, 12]; wrong_object [25 (n-1) // n, 12]; wrong_relation
[25 (n-1) // n, 25]; partial [25 k // n, 25]; no_op [0, 25]. The quality target is
QUALITY_ANSWER for every image: renders are flat polygons on a plain background with no
artifacts, so both quality scores are the maximum.

Test examples hold an unseen (colour, shape) combination (spatialrl.data.shapes' split; train
images never show one) and, with 2-3 edits, one of HELD_OUT_EDIT_PAIRS of edit kinds, which
train instructions never combine.

On disk (EDIT_SCHEMA): one parquet row per candidate, images as PNG bytes; reading checks
every row and names the first bad one (EditFileError).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from spatialrl.data.geometry import (
    EVALUATOR_THRESHOLDS,
    RENDER_THRESHOLDS,
    Thresholds,
    relation_holds,
)
from spatialrl.data.grammar import COLOURS, CONVERSE, SHAPES_VOCABULARY, SceneObject
from spatialrl.data.pairs import SPLITS, decode_image, open_checked, png_bytes, write_records
from spatialrl.data.render import (
    FRAME_MARGIN,
    LayoutError,
    object_index_map,
    rasterise,
    render_layout,
)
from spatialrl.data.shapes import (
    TRAIN_COMBOS,
    pair_rng,
    sample_split_scene,
    split_code,
    split_sizes,
)
from spatialrl.errors import InputError
from spatialrl.prompts import prompt_problem
from spatialrl.spatialreward.answers import BOX_MAX, EditAnswer, QualityAnswer, parse_answer
from spatialrl.spatialreward.edits import (
    EDIT_KINDS,
    EDIT_PREDICATES,
    Add,
    Edit,
    Move,
    ObjectChange,
    Reading,
    Recolour,
    Ref,
    Remove,
    Resize,
    Swap,
    World,
    capitalised,
    changed,
    instruction_text,
    read_colours,
)
from spatialrl.spatialreward.prompts import DEFAULT_SCORE_RANGE, GLOBAL_MARKER, bbox_marker

CANDIDATES = ("correct", "wrong_object", "wrong_relation", "over_editing", "no_op", "partial")
# Each kind is held out with exactly one other, so train still sees every kind in pairs.
HELD_OUT_EDIT_PAIRS = frozenset(
    {frozenset({"move", "resize"}), frozenset({"recolour", "swap"}), frozenset({"add", "remove"})}
)
MAX_EDITS = 3
SCORE_RANGE = DEFAULT_SCORE_RANGE
UNASKED_PENALTY = 13  # over_editing lost per object changed unasked: about half the scale
MAX_OBJECTS = 5  # per source scene: enough for 3 edits, an anchor and a spare at 64 px
_PLACEMENT_TRIES = 60
_EXAMPLE_TRIES = 500
_EXISTING_TARGETS = {"move": 1, "recolour": 1, "remove": 1, "add": 0, "swap": 2, "resize": 1}


class EditFileError(InputError):
    """A row of an edits file that is not a valid example candidate; the message names it."""


def _checked_answer(document: dict, schema: type) -> str:
    """`document` as JSON text that parses as `schema` (else a bug here: ValueError)."""
    text = json.dumps(document)
    parsed = parse_answer(text, schema, SCORE_RANGE)
    if not parsed.valid:
        raise ValueError(f"built an invalid {schema.__name__}: {parsed.reason} ({parsed.detail})")
    return text


QUALITY_ANSWER = _checked_answer(
    {"reasoning": "A clean render: flat, evenly filled shapes with sharp edges on a plain "
                  "background; nothing is distorted, blurred, watermarked or badly blended.",
     "score": [SCORE_RANGE, SCORE_RANGE]},
    QualityAnswer,
)


class _Palette:
    """Colours for recoloured and new objects: each one no object of the example has had,
    in a (colour, shape) combination that the split allows."""

    def __init__(self, used: Iterable[str], split: str, rng: np.random.Generator):
        self.used = set(used)
        self.allowed = TRAIN_COMBOS if split == "train" else frozenset(SHAPES_VOCABULARY.combos)
        self.rng = rng

    def allows(self, obj: SceneObject) -> bool:
        return obj.identity in self.allowed

    def colour_for(self, shape: str) -> str | None:
        options = [c for c in COLOURS if c not in self.used and (c, shape) in self.allowed]
        if not options:
            return None
        colour = options[self.rng.integers(len(options))]
        self.used.add(colour)
        return colour

    def new_object(self, unlike: str | None = None) -> SceneObject | None:
        """A new object, of another shape than `unlike`."""
        options = sorted((c, s) for c, s in self.allowed if c not in self.used and s != unlike)
        if not options:
            return None
        colour, shape = options[self.rng.integers(len(options))]
        self.used.add(colour)
        return SceneObject(colour, shape)


class _Occupancy:
    """The pixels of every object in the source and in each edit made so far: an object an
    edit moves, resizes or adds must stay off all of them (its own aside), so that it
    overlaps nothing in any candidate."""

    def __init__(self, source: World, size: int):
        self.size = size
        self.claims: list[tuple[int, np.ndarray, Edit | None]] = [
            (placed.index, rasterise(placed.polygon, size), None)
            for placed in source.layout.objects
        ]

    def loose(self) -> set[int]:
        """Source objects that overlap no other source object."""
        source = [(index, mask) for index, mask, edit in self.claims if edit is None]
        return {index for index, mask in source
                if not any((mask & other).any() for j, other in source if j != index)}

    def fits(self, polygons: Mapping[int, np.ndarray], instead_of: Edit | None) -> bool:
        """Whether these new outlines lie in the frame and off every claim but their own
        objects' and those of `instead_of` (the edit they replace in a candidate)."""
        if any(p.min() < FRAME_MARGIN or p.max() > 1 - FRAME_MARGIN for p in polygons.values()):
            return False
        masks = {index: rasterise(polygon, self.size) for index, polygon in polygons.items()}
        for first, second in itertools.combinations(masks.values(), 2):
            if (first & second).any():
                return False
        return not any((mask & claimed).any() for mask in masks.values()
                       for index, claimed, edit in self.claims
                       if index not in masks and (edit is None or edit is not instead_of))

    def claim(self, edit: Edit, changes: Sequence[ObjectChange]) -> None:
        self.claims += [(c.index, rasterise(c.placed.polygon, self.size), edit)
                        for c in changes if c.placed is not None]


@dataclass(frozen=True)
class _Base:
    """What edits are made on: a world, its image's reading and the example's bookkeeping."""

    world: World
    reading: Reading
    occupancy: _Occupancy
    palette: _Palette
    size: int


def _realise(edit: Edit, base: _Base, rng: np.random.Generator,
             instead_of: Edit | None = None) -> tuple[ObjectChange, ...] | None:
    """Changes that make `edit` on the base world, fit the occupancy and read back as made
    at the renderer's thresholds; None when no try gives one."""
    for _ in range(_PLACEMENT_TRIES):
        changes = edit.propose(base.world, rng)
        if not all(base.palette.allows(change.obj) for change in changes):
            return None
        polygons = {c.index: c.placed.polygon for c in changes if c.index in edit.reshaped()}
        if not base.occupancy.fits(polygons, instead_of):
            continue
        world = base.world.changed(changes)
        after = read_colours(world.image(base.size),
                             [*base.world.objects.values(), *world.objects.values()])
        if edit.holds(base.reading, after, RENDER_THRESHOLDS):
            return changes
    return None


# ------------------------------------------------------------------------------ candidates


@dataclass(frozen=True)
class Applied:
    """An edit as a candidate shows it: what was made, and which edit of the instruction it
    stands for (role "asked": that edit itself; "wrong_relation", "wrong_object": a botched
    version of it; "unasked": none)."""

    edit: Edit
    changes: tuple[ObjectChange, ...]
    role: str
    asked: Edit | None

    def note(self) -> str:
        """What the reasoning says about its region."""
        result = capitalised(self.edit.result())
        if self.role == "asked":
            return f"{result}, as asked."
        if self.role == "unasked":
            return f"{result}, which the instruction does not ask for."
        return f"{result}, but the instruction asks to {self.asked.clause()}."


@dataclass(frozen=True)
class Region:
    """One edit region: its label, its box in pixels (x0, y0, x1, y1; x1 and y1 exclusive)
    and what the reasoning says about it."""

    label: str
    box: tuple[int, int, int, int]
    note: str

    def bbox_2d(self, size: int) -> list[int]:
        """The box in the answer's 0-1000 coordinates (exact for sizes up to 1000 px)."""
        return [round(value * BOX_MAX / size) for value in self.box]


@dataclass(frozen=True)
class Candidate:
    label: str  # one of CANDIDATES
    world: World
    image: Image.Image
    applied: tuple[Applied, ...]
    done: tuple[bool, ...]  # per edit of the instruction
    regions: tuple[Region, ...]
    answer: str  # the SFT target, EditAnswer JSON


def applied_unasked_changes(applied: Iterable[Applied]) -> int:
    """Objects changed that the instruction does not name."""
    return sum(item.role in ("wrong_object", "unasked") for item in applied)


def answer_score(done: Sequence[bool], unasked_changes: int) -> tuple[int, int]:
    """[success, over_editing] of a candidate (the module docstring's mapping)."""
    return (SCORE_RANGE * sum(done) // len(done),
            max(0, SCORE_RANGE - UNASKED_PENALTY * unasked_changes))


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    if not len(rows):
        raise ValueError("an edit region with no visible pixel before or after")
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def _regions(source_map: np.ndarray, world_map: np.ndarray,
             applied: Sequence[Applied]) -> tuple[Region, ...]:
    """One region per applied edit: its objects' visible pixels before and after."""
    regions = []
    for item in applied:
        indices = [change.index for change in item.changes]
        mask = np.isin(source_map, indices) | np.isin(world_map, indices)
        regions.append(Region(item.edit.label(), _box(mask), item.note()))
    return tuple(regions)


def _verdict(edits: Sequence[Edit], done: Sequence[bool], unasked_changes: int) -> str:
    if all(done):
        text = "The requested edit is done." if len(edits) == 1 else "Every requested edit is done."
    else:
        missing = "; ".join(edit.clause() for edit, made in zip(edits, done, strict=True)
                            if not made)
        text = f"{sum(done)} of {len(edits)} requested edits done; not done: {missing}."
    if unasked_changes:
        plural = "s" if unasked_changes > 1 else ""
        return f"{text} {unasked_changes} object{plural} changed that the instruction does " \
               "not name."
    return f"{text} Nothing else has changed."


def _edit_answer(regions: Sequence[Region], verdict: str, score: tuple[int, int],
                 size: int) -> str:
    cited = " ".join(f"{bbox_marker(i)} {region.note}" for i, region in enumerate(regions))
    reasoning = f"{cited} {GLOBAL_MARKER} {verdict}" if regions else \
        f"{GLOBAL_MARKER} The image is unchanged. {verdict}"
    document = {
        "edit_region": [{"id": i, "label": region.label, "bbox_2d": region.bbox_2d(size)}
                        for i, region in enumerate(regions)],
        "reasoning": reasoning,
        "score": list(score),
    }
    return _checked_answer(document, EditAnswer)


def _candidate(label: str, edits: Sequence[Edit], source: World, applied: Sequence[Applied],
               size: int) -> Candidate:
    world = source.changed(change for item in applied for change in item.changes)
    done = tuple(any(item.role == "asked" and item.edit is edit for item in applied)
                 for edit in edits)
    regions = _regions(object_index_map(source.layout, size),
                       object_index_map(world.layout, size), applied)
    unasked = applied_unasked_changes(applied)
    answer = _edit_answer(regions, _verdict(edits, done, unasked),
                          answer_score(done, unasked), size)
    return Candidate(label, world, world.image(size), tuple(applied), done, regions, answer)


def _wrong_relation(edits: Sequence[Edit], asked: Sequence[Applied], base: _Base,
                    rng: np.random.Generator) -> list[Applied] | None:
    """One move or add made with the converse relation."""
    relational = [i for i, edit in enumerate(edits) if isinstance(edit, (Move, Add))]
    if not relational:
        return None
    i = relational[rng.integers(len(relational))]
    wrong = replace(edits[i], predicate=CONVERSE[edits[i].predicate])
    changes = _realise(wrong, base, rng, instead_of=edits[i])
    if changes is None:
        return None
    return [*asked[:i], Applied(wrong, changes, "wrong_relation", edits[i]), *asked[i + 1:]]


def _stand_ins(edit: Edit, spares: Sequence[Ref], base: _Base) -> list[Ref]:
    """Objects that `edit` could wrongly be made on: a different new object for an add, else
    an unnamed one (that overlaps nothing, if the edit moves or resizes it)."""
    if isinstance(edit, Add):
        other = base.palette.new_object(unlike=edit.new.obj.shape)
        return [Ref(edit.new.index, other)] if other else []
    loose = base.occupancy.loose()
    return [ref for ref in spares if not edit.reshaped() or ref.index in loose]


def _wrong_object(edits: Sequence[Edit], asked: Sequence[Applied], spares: Sequence[Ref],
                  base: _Base, rng: np.random.Generator) -> list[Applied] | None:
    """One edit made on another object than the one the instruction names."""
    for i in rng.permutation(len(edits)):
        for other in _stand_ins(edits[i], spares, base):
            wrong = edits[i].on_object(other)
            changes = _realise(wrong, base, rng, instead_of=edits[i])
            if changes is not None:
                return [*asked[:i], Applied(wrong, changes, "wrong_object", edits[i]),
                        *asked[i + 1:]]
    return None


def _over_edit(asked: Sequence[Applied], spares: Sequence[Ref], base: _Base,
               rng: np.random.Generator) -> list[Applied] | None:
    """Every edit made, and an unnamed object recoloured (or, with none, one added)."""
    target = base.world.changed(change for item in asked for change in item.changes)
    spare = spares[rng.integers(len(spares))] if spares else None
    colour = base.palette.colour_for(spare.obj.shape) if spare else None
    if colour:
        extra: Edit = Recolour(spare, colour)
    else:
        new = base.palette.new_object()
        if new is None:
            return None
        anchor = target.present[rng.integers(len(target.present))]
        predicate = EDIT_PREDICATES[rng.integers(len(EDIT_PREDICATES))]
        extra = Add(Ref(max(target.objects) + 1, new), predicate,
                    Ref(anchor, target.objects[anchor]))
    on_target = replace(base, world=target,
                        reading=read_colours(target.image(base.size), target.objects.values()))
    changes = _realise(extra, on_target, rng)
    if changes is None:
        return None
    return [*asked, Applied(extra, changes, "unasked", None)]


def _partial(asked: Sequence[Applied], rng: np.random.Generator) -> list[Applied] | None:
    """Some edits of a multi-edit instruction: 1 to n - 1 of them."""
    if len(asked) < 2:
        return None
    kept = rng.choice(len(asked), size=int(rng.integers(1, len(asked))), replace=False)
    return [asked[i] for i in sorted(kept)]


# -------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class EditExample:
    example_id: str
    split: str
    size: int
    edits: tuple[Edit, ...]
    source: World
    source_image: Image.Image
    candidates: tuple[Candidate, ...]

    @property
    def instruction(self) -> str:
        return instruction_text(self.edits)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(edit.kind for edit in self.edits)

    def candidate(self, label: str) -> Candidate | None:
        return next((c for c in self.candidates if c.label == label), None)

    def objects(self) -> list[SceneObject]:
        """Every object any of the example's images shows."""
        worlds = [self.source, *(candidate.world for candidate in self.candidates)]
        return [obj for world in worlds for obj in world.objects.values()]

    def edits_done(self, image: Image.Image,
                   thresholds: Thresholds = EVALUATOR_THRESHOLDS) -> tuple[bool, ...]:
        """Which edits of the instruction the rule evaluator reads as made in `image`."""
        objects = self.objects()
        before, after = read_colours(self.source_image, objects), read_colours(image, objects)
        return tuple(edit.holds(before, after, thresholds) for edit in self.edits)

    def unasked_changes(self, image: Image.Image) -> int:
        """How many objects `image` changes that the instruction does not name, as the rule
        evaluator reads them: objects of the source that no edit names, moved or resized or
        gone, and objects of colours that neither the source nor an edit brings (an unnamed
        object recoloured reads as one gone and one new colour: one change)."""
        named = frozenset().union(*(edit.named() for edit in self.edits))
        brought = frozenset().union(*(edit.colours_brought() for edit in self.edits))
        index_of = {self.source.objects[i].colour: i for i in self.source.present}
        palette = [*(self.source.objects[i] for i in index_of.values()),
                   *(SceneObject(c, "circle") for c in COLOURS if c not in index_of)]
        before, after = read_colours(self.source_image, palette), read_colours(image, palette)
        unnamed = [c for c, i in index_of.items() if i not in named and before[c] is not None]
        gone = sum(after[colour] is None for colour in unnamed)
        altered = sum(changed(before[c], after[c]) for c in unnamed if after[c] is not None)
        new = sum(after[c] is not None for c in COLOURS if c not in index_of and c not in brought)
        return altered + max(gone, new)

    def verified(self) -> bool:
        """Every candidate reads as made exactly in the edits it claims, and the correct
        target also at the renderer's stricter thresholds."""
        if any(self.edits_done(c.image) != c.done for c in self.candidates):
            return False
        return all(self.edits_done(self.candidate("correct").image, RENDER_THRESHOLDS))


def sample_edit_kinds(rng: np.random.Generator, num_edits: int, split: str) -> tuple[str, ...]:
    """num_edits distinct kinds in instruction order. With 2-3 edits, test instructions hold
    one of HELD_OUT_EDIT_PAIRS and train ones none."""
    held_out = split_code(split) == split_code("test")
    while True:
        picked = rng.choice(len(EDIT_KINDS), size=num_edits, replace=False)
        kinds = tuple(EDIT_KINDS[i] for i in picked)
        if num_edits == 1 or has_held_out_pair(kinds) == held_out:
            return kinds


def has_held_out_pair(kinds: Iterable[str]) -> bool:
    return any(frozenset(pair) in HELD_OUT_EDIT_PAIRS
               for pair in itertools.combinations(set(kinds), 2))


def _scene_size(kinds: Sequence[str]) -> int:
    """Objects the source needs: the edited ones, an anchor and a spare (at most
    MAX_OBJECTS; the spare goes first)."""
    anchors = 1 if {"move", "add"} & set(kinds) else 0
    needed = sum(_EXISTING_TARGETS[kind] for kind in kinds) + anchors + 1
    return max(2, min(MAX_OBJECTS, needed))


def _take(refs: list[Ref], loose: set[int], must_be_loose: bool) -> Ref | None:
    """Take an object out of `refs`: a loose one if it must be, else preferably not one (so
    that loose ones are left for moves)."""
    pool = [r for r in refs if r.index in loose] if must_be_loose else \
        sorted(refs, key=lambda r: r.index in loose)
    if not pool:
        return None
    refs.remove(pool[0])
    return pool[0]


def _plan(kinds: Sequence[str], base: _Base,
          rng: np.random.Generator) -> tuple[tuple[Edit, ...], list[Ref]] | None:
    """Edits of `kinds` on distinct objects of the source, and the objects left unnamed."""
    source, loose = base.world, base.occupancy.loose()
    refs = [Ref(int(i), source.objects[int(i)]) for i in rng.permutation(source.present)]
    anchor = _take(refs, loose, False) if {"move", "add"} & set(kinds) else None
    new_index = max(source.objects) + 1
    edits = []
    for kind in kinds:
        edit = _plan_edit(kind, refs, loose, anchor, new_index, base, rng)
        if edit is None:
            return None
        edits.append(edit)
    return tuple(edits), refs


def _plan_edit(kind: str, refs: list[Ref], loose: set[int], anchor: Ref | None, new_index: int,
               base: _Base, rng: np.random.Generator) -> Edit | None:
    must_be_loose = kind in ("move", "swap", "resize")
    targets = [_take(refs, loose, must_be_loose) for _ in range(_EXISTING_TARGETS[kind])]
    if None in targets:
        return None
    if kind == "move":
        target = targets[0]
        open_ = [p for p in EDIT_PREDICATES if not relation_holds(
            p, base.reading.get(target.obj.colour), base.reading.get(anchor.obj.colour))]
        return Move(target, open_[rng.integers(len(open_))], anchor)
    if kind == "add":
        new = base.palette.new_object()
        predicate = EDIT_PREDICATES[rng.integers(len(EDIT_PREDICATES))]
        return Add(Ref(new_index, new), predicate, anchor) if new else None
    if kind == "recolour":
        colour = base.palette.colour_for(targets[0].obj.shape)
        return Recolour(targets[0], colour) if colour else None
    if kind == "swap":
        return Swap(*targets)
    if kind == "resize":
        return Resize(targets[0], bool(rng.random() < 0.5))
    return Remove(targets[0])


def _draw_source(kinds: Sequence[str], split: str, size: int,
                 rng: np.random.Generator) -> World | None:
    count = _scene_size(kinds)
    scene = sample_split_scene(rng, split, num_relations=count - 1, num_objects=count)
    try:
        layout, _ = render_layout(scene, size, rng, max_attempts=300)
    except LayoutError:
        return None
    return World(dict(enumerate(scene.objects)), layout)


def _try_example(example_id: str, split: str, num_edits: int, size: int,
                 rng: np.random.Generator) -> EditExample | None:
    """One attempt at an example; None when a step finds no way (the caller draws again)."""
    kinds = sample_edit_kinds(rng, num_edits, split)
    source = _draw_source(kinds, split, size, rng)
    if source is None:
        return None
    image = source.image(size)
    palette = _Palette((obj.colour for obj in source.objects.values()), split, rng)
    base = _Base(source, read_colours(image, source.objects.values()),
                 _Occupancy(source, size), palette, size)
    planned = _plan(kinds, base, rng)
    if planned is None:
        return None
    edits, spares = planned
    asked = []
    for edit in edits:
        changes = _realise(edit, base, rng)
        if changes is None:
            return None
        base.occupancy.claim(edit, changes)
        asked.append(Applied(edit, changes, "asked", edit))
    drafts = {
        "correct": asked,
        "wrong_object": _wrong_object(edits, asked, spares, base, rng),
        "wrong_relation": _wrong_relation(edits, asked, base, rng),
        "over_editing": _over_edit(asked, spares, base, rng),
        "no_op": [],
        "partial": _partial(asked, rng),
    }
    if drafts["over_editing"] is None:
        return None
    candidates = tuple(_candidate(label, edits, source, applied, size)
                       for label, applied in drafts.items() if applied is not None)
    example = EditExample(example_id, split, size, edits, source, image, candidates)
    return example if example.verified() else None


def build_example(seed: int, split: str, index: int, size: int = 64) -> EditExample:
    """Example `index` of `split`: 1, 2 and 3 edits in turn, each drawn from (seed, split,
    index) alone."""
    rng = pair_rng(seed, split, index)
    example_id = f"edits-{seed}-{split}-{index:07d}"
    for _ in range(_EXAMPLE_TRIES):
        example = _try_example(example_id, split, 1 + index % MAX_EDITS, size, rng)
        if example is not None:
            return example
    raise RuntimeError(f"{example_id}: no example in {_EXAMPLE_TRIES} tries")


def build_edit_examples(n: int, seed: int = 0, size: int = 64,
                        test_fraction: float = 0.2) -> dict[str, list[EditExample]]:
    """n examples, split into train and test as the shapes pairs are."""
    return {split: [build_example(seed, split, i, size)
                    for i in tqdm(range(count), desc=f"edits {split}", unit="example")]
            for split, count in split_sizes(n, test_fraction).items()}


# ------------------------------------------------------------------------------ on disk

EDIT_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("edit_kinds", pa.string(), nullable=False),  # "move+recolour", in order
        pa.field("candidate", pa.string(), nullable=False),  # one of CANDIDATES
        pa.field("image_source", pa.binary(), nullable=False),  # PNG
        pa.field("image_edited", pa.binary(), nullable=False),  # PNG
        pa.field("edit_answer", pa.string(), nullable=False),  # EditAnswer JSON (SFT target)
        pa.field("quality_answer", pa.string(), nullable=False),  # QualityAnswer JSON
    ]
)


@dataclass(frozen=True)
class EditRow:
    """One candidate of an example, as stored."""

    example_id: str
    split: str
    instruction: str
    edit_kinds: str
    candidate: str
    image_source: bytes
    image_edited: bytes
    edit_answer: str
    quality_answer: str


def example_rows(example: EditExample) -> list[EditRow]:
    source = png_bytes(example.source_image)
    return [EditRow(example.example_id, example.split, example.instruction,
                    "+".join(example.kinds), candidate.label, source,
                    png_bytes(candidate.image), candidate.answer, QUALITY_ANSWER)
            for candidate in example.candidates]


def write_edit_examples(path: str | Path, examples: Iterable[EditExample]) -> int:
    """Every candidate of `examples` as a row of a parquet file; returns the rows written."""
    rows = (row for example in examples for row in example_rows(example))
    return write_records(path, rows, EDIT_SCHEMA)


def read_edit_rows(path: str | Path, split: str | None = None) -> list[EditRow]:
    """Every row of an edits file (of `split` only, if given). A bad row is an
    EditFileError naming it, never skipped: the set is built here and should have none."""
    file = open_checked(path, EDIT_SCHEMA, kind="edits")
    rows = []
    batches = file.iter_batches(columns=EDIT_SCHEMA.names)
    all_rows = (row for batch in batches for row in batch.to_pylist())
    for number, row in enumerate(all_rows):
        if problem := _row_problem(row):
            raise EditFileError(f"{path}: row {number} ({row['example_id']!r}, "
                                f"{row['candidate']!r}): {problem}")
        if split is None or row["split"] == split:
            rows.append(EditRow(**row))
    return rows


def _row_problem(row: dict) -> str | None:
    for column in ("example_id", "instruction", "edit_kinds", "candidate"):
        if not (row[column] or "").strip():
            return f"empty {column}"
    if problem := prompt_problem(row["instruction"]):
        return f"bad instruction: {problem}"
    if row["split"] not in SPLITS:
        return f"split {row['split']!r} is not one of {SPLITS}"
    if row["candidate"] not in CANDIDATES:
        return f"candidate {row['candidate']!r} is not one of {CANDIDATES}"
    kinds = row["edit_kinds"].split("+")
    if len(kinds) > MAX_EDITS or len(set(kinds)) != len(kinds) or set(kinds) - set(EDIT_KINDS):
        return f"edit_kinds {row['edit_kinds']!r} are not 1-{MAX_EDITS} distinct {EDIT_KINDS}"
    for column in ("image_source", "image_edited"):
        try:
            decode_image(row[column] or b"")
        except Exception as error:  # PIL raises many types for malformed files
            return f"corrupt {column} ({type(error).__name__}: {error})"
    for column, schema in (("edit_answer", EditAnswer), ("quality_answer", QualityAnswer)):
        parsed = parse_answer(row[column] or "", schema, SCORE_RANGE)
        if not parsed.valid:
            return f"bad {column}: {parsed.reason} ({parsed.detail})"
    return None
