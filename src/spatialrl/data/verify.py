"""Verified preference pairs: a pair is kept only when its preferred image satisfies the prompt
and its rejected image, every object in view, breaks at least one of the prompt's relations
that the judge can check.

The judge is an `ObjectLocator` (spatialrl.data.judge) plus the shapes evaluator's relation
rules: the rule evaluator's colour reading for shapes-world images, a zero-shot detector for
real objects (2-D relations only). Every pair gets a verdict, the reason and a sentence for
each one dropped, so a pair set can be audited (`write_verdicts`).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from spatialrl.data.grammar import Scene, Vocabulary, parse_prompt, relations_to_text
from spatialrl.data.judge import Judgement, ObjectLocator, judge
from spatialrl.data.pairs import PreferencePair, decode_image

VERDICT_SCHEMA = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("perturbed_prompt", pa.string(), nullable=False),
    pa.field("kept", pa.bool_(), nullable=False),
    pa.field("reason", pa.string()),  # null when kept
    pa.field("detail", pa.string()),
])


@dataclass(frozen=True)
class PairVerdict:
    pair_id: str
    split: str
    prompt: str
    perturbed_prompt: str
    kept: bool
    reason: str | None  # why it was dropped, one of a few names; None when kept
    detail: str | None  # the object or clause at fault, in words


def drop_reason(scene: Scene, preferred: Judgement, rejected: Judgement
                ) -> tuple[str, str] | None:
    """(reason, detail) for a pair to drop, or None to keep it."""
    missing = [o.noun_phrase(first_mention=False)
               for o, found in zip(scene.objects, preferred.objects_found, strict=True)
               if not found]
    if missing:
        return "preferred_object_missing", f"not in the preferred image: {'; '.join(missing)}"
    if not preferred.checked:
        return "nothing_checkable", "the judge can check none of the prompt's relations"
    failing = [relations_to_text(scene.objects, [relation])
               for relation, holds in zip(scene.relations, preferred.per_relation, strict=True)
               if holds is False]
    if failing:
        return "preferred_relation_fails", f"not so in the preferred image: {'; '.join(failing)}"
    if not all(rejected.objects_found):
        return "rejected_object_missing", "the rejected image lacks an object of the prompt"
    if all(rejected.checked):
        return ("rejected_satisfies_prompt",
                "every relation the judge can check holds in the rejected image too")
    return None


class PairVerifier:
    """Passes on the pairs that pass and records a verdict for every pair it sees."""

    def __init__(self, locator: ObjectLocator, vocabulary: Vocabulary, batch_size: int = 8):
        self.locator = locator
        self.vocabulary = vocabulary
        self.batch_size = batch_size
        self.verdicts: list[PairVerdict] = []

    def keep(self, pairs: Iterable[PreferencePair]) -> Iterator[PreferencePair]:
        iterator = iter(pairs)
        while batch := list(itertools.islice(iterator, self.batch_size)):
            yield from self._keep_batch(batch)

    def _keep_batch(self, batch: list[PreferencePair]) -> Iterator[PreferencePair]:
        scenes = [parse_prompt(p.prompt, self.vocabulary) for p in batch]
        images = ([decode_image(p.image_preferred) for p in batch]
                  + [decode_image(p.image_rejected) for p in batch])
        located = self.locator.locate(images, scenes + scenes)
        for pair, scene, preferred, rejected in zip(
            batch, scenes, located[:len(batch)], located[len(batch):], strict=True
        ):
            judged = [judge(objects, scene, self.locator.checkable)
                      for objects in (preferred, rejected)]
            reason, detail = drop_reason(scene, *judged) or (None, None)
            self.verdicts.append(PairVerdict(pair.pair_id, pair.split, pair.prompt,
                                             pair.perturbed_prompt, reason is None, reason,
                                             detail))
            if reason is None:
                yield pair


def dropped_by_reason(verdicts: Iterable[PairVerdict], split: str | None = None
                      ) -> dict[str, int]:
    """How many pairs each reason dropped (of `split`, or of all)."""
    return dict(Counter(v.reason for v in verdicts
                        if v.reason and split in (None, v.split)))


def write_verdicts(path: str | Path, verdicts: Iterable[PairVerdict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [asdict(v) for v in verdicts]
    pq.write_table(pa.Table.from_pylist(rows, schema=VERDICT_SCHEMA), path)


def read_verdicts(path: str | Path) -> list[PairVerdict]:
    return [PairVerdict(**row) for row in pq.read_table(path, schema=VERDICT_SCHEMA).to_pylist()]
