"""Preference pairs made shard by shard, so that one set can be made by many workers (a Ray
Data job: spatialrl.actors.pair_job) or by one process, and a killed job resumes where it
stopped.

The set is planned up front: `sample_prompt_pairs` draws every prompt pair and its image seed
from (seed, split, index), and the plan cuts them into shards of `shard_size` pairs. A shard's
images depend only on the spec and the shard's index (each shard is one sequence of pipeline
calls), never on which worker made it or when, so a resumed job ends with the same set as an
uninterrupted one.

Layout of DIR/shards: spec.json (the spec the shards were made with; a rerun with another
spec is refused), and per finished shard NAME.verdicts.parquet (with a verifier) then
NAME.pairs.parquet, each written under a temporary name and renamed into place. A shard whose
pairs file exists is done. Once all are done they are merged, in plan order, into
DIR/train.parquet, DIR/test.parquet and DIR/verification.parquet.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import pyarrow.compute as pc
import pyarrow.parquet as pq

from spatialrl.data.generated import (
    PromptPair,
    generate_pairs,
    load_generator,
    sample_prompt_pairs,
)
from spatialrl.data.judge import ColourLocator, ObjectLocator
from spatialrl.data.pairs import PAIR_SCHEMA, SPLITS, write_pairs
from spatialrl.data.verify import (
    PairVerdict,
    PairVerifier,
    dropped_by_reason,
    read_verdicts,
    write_verdicts,
)
from spatialrl.data.worlds import WORLDS
from spatialrl.detection import DEFAULT_DETECTOR, OwlDetector
from spatialrl.errors import InputError
from spatialrl.tracking import Tracker

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class PairSetSpec:
    """Everything that decides a pair set's content; where it is made (device, workers) does
    not belong here."""

    model: str
    n: int
    seed: int = 0
    test_fraction: float = 0.2
    world: str = "shapes"
    steps: int = 28
    size: int = 512
    batch_size: int = 4  # pairs per pipeline call
    max_sequence_length: int = 512
    verifier: str = "rules"  # rules, detector or none (resolve_verifier turns "auto" into one)
    detector: str = DEFAULT_DETECTOR
    detector_threshold: float = 0.2
    shard_size: int = 64

    @property
    def shard_count(self) -> int:
        return math.ceil(self.n / self.shard_size)


@dataclass(frozen=True)
class ShardReport:
    index: int
    generated: int
    kept: int
    dropped: dict[str, int]  # reason -> pairs
    seconds: float  # the worker's time on this shard


@dataclass(frozen=True)
class PairSetReport:
    """The merged set: the num_perturbed of each kept pair by split, and every verdict."""

    kept: dict[str, list[int]]
    verdicts: list[PairVerdict]

    def metrics(self) -> dict[str, float]:
        kept = sum(len(v) for v in self.kept.values())
        generated = len(self.verdicts) if self.verdicts else kept  # no verifier: all kept
        dropped = dropped_by_reason(self.verdicts)
        return {"set/pairs": generated, "set/pairs_kept": kept,
                "set/kept_fraction": kept / generated,
                **{f"set/dropped/{reason}": count for reason, count in dropped.items()}}


def resolve_verifier(kind: str, world: str) -> str:
    """`--verifier auto` as rules for shapes and the detector for real objects."""
    if kind == "auto":
        return "rules" if world == "shapes" else "detector"
    if kind == "rules" and world != "shapes":
        raise InputError("--verifier rules reads shapes by colour: use it with --world shapes")
    return kind


def build_locator(spec: PairSetSpec, device: str) -> ObjectLocator | None:
    """What the verifier judges with: the rule evaluator's colour reading or the detector."""
    if spec.verifier == "none":
        return None
    if spec.verifier == "rules":
        return ColourLocator()
    return OwlDetector.from_pretrained(spec.detector, device, spec.detector_threshold)


def plan_shards(spec: PairSetSpec) -> list[list[PromptPair]]:
    pairs = sample_prompt_pairs(spec.n, spec.model, spec.seed, spec.test_fraction,
                                WORLDS[spec.world])
    return [pairs[start : start + spec.shard_size]
            for start in range(0, len(pairs), spec.shard_size)]


def write_atomically(path: Path, write: Callable[[Path], T]) -> T:
    """`write` to a temporary name beside `path`, then rename: a killed writer leaves no
    half-written `path`."""
    partial = path.with_name(f"{path.name}.partial")
    result = write(partial)
    os.replace(partial, path)
    return result


class ShardFolder:
    """DIR/shards: the spec and the finished shards' files."""

    def __init__(self, out: Path):
        self.root = Path(out) / "shards"

    def pairs_path(self, index: int) -> Path:
        return self.root / f"shard-{index:06d}.pairs.parquet"

    def verdicts_path(self, index: int) -> Path:
        return self.root / f"shard-{index:06d}.verdicts.parquet"

    def missing(self, count: int) -> list[int]:
        return [index for index in range(count) if not self.pairs_path(index).exists()]

    def claim(self, spec: PairSetSpec) -> None:
        """Record `spec`, or check that the shards already here were made with it."""
        path = self.root / "spec.json"
        wanted = asdict(spec)
        if path.exists():
            found = json.loads(path.read_text())
            changed = [f"{key} {found.get(key)!r} -> {value!r}" for key, value in wanted.items()
                       if found.get(key) != value]
            if changed:
                raise InputError(f"{self.root} holds shards of another pair set "
                                 f"({', '.join(changed)}): use another --out or remove it")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda partial: partial.write_text(json.dumps(wanted, indent=1)))


class ShardMaker:
    """Makes the shards of one spec: holds the plan, the pipeline and the verifier's locator
    (one per worker, loaded once)."""

    def __init__(self, spec: PairSetSpec, out: Path, device: str | None = None,
                 dtype: str | None = None):
        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.spec = spec
        self.folder = ShardFolder(out)
        self.plan = plan_shards(spec)
        self.locator = build_locator(spec, device)  # before the pipeline: a bad detector fails fast
        self.pipeline = load_generator(
            spec.model, dtype or ("float32" if device == "cpu" else "bfloat16"), device)

    def make(self, index: int) -> ShardReport:
        started = time.perf_counter()
        spec, chosen = self.spec, self.plan[index]
        records = generate_pairs(self.pipeline, chosen, spec.model, spec.size, spec.steps,
                                 spec.batch_size, spec.max_sequence_length)
        verifier = (PairVerifier(self.locator, WORLDS[spec.world].vocabulary)
                    if self.locator else None)
        chosen_records = verifier.keep(records) if verifier else records

        def write_shard(partial: Path) -> int:
            kept = write_pairs(partial, chosen_records)
            if verifier:  # in place before the pairs file, which marks the shard done
                write_atomically(self.folder.verdicts_path(index),
                                 lambda path: write_verdicts(path, verifier.verdicts))
            return kept

        kept = write_atomically(self.folder.pairs_path(index), write_shard)
        dropped = dropped_by_reason(verifier.verdicts) if verifier else {}
        return ShardReport(index, len(chosen), kept, dropped, time.perf_counter() - started)


@dataclass
class JobProgress:
    """Throughput of the shards made by this run (shards done before it do not count)."""

    started: float = field(default_factory=time.perf_counter)
    shards: int = 0
    generated: int = 0
    kept: int = 0
    worker_seconds: float = 0.0
    dropped: Counter = field(default_factory=Counter)

    def add(self, report: ShardReport) -> None:
        self.shards += 1
        self.generated += report.generated
        self.kept += report.kept
        self.worker_seconds += report.seconds
        self.dropped.update(report.dropped)

    def metrics(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.started
        return {
            "job/shards_made": self.shards,
            "job/pairs_generated": self.generated,
            "job/pairs_kept": self.kept,
            "job/kept_fraction": self.kept / self.generated,
            # Wall clock, worker start-up included: what the job delivers.
            "job/pairs_per_s": self.generated / elapsed,
            "job/pairs_per_worker_s": self.generated / self.worker_seconds,
            **{f"job/dropped/{reason}": count for reason, count in self.dropped.items()},
        }


ShardRunner = Callable[[Sequence[int]], Iterable[ShardReport]]


def make_pair_set(spec: PairSetSpec, out: Path, run_shards: ShardRunner,
                  tracker: Tracker) -> PairSetReport:
    """Make the shards not yet done with `run_shards` (reports in any order), logging
    throughput to `tracker` as each finishes, then merge every shard into DIR's files."""
    folder = ShardFolder(out)
    folder.claim(spec)
    todo = folder.missing(spec.shard_count)
    tracker.log_params({**asdict(spec), "shards": spec.shard_count,
                        "shards_done_before": spec.shard_count - len(todo)})
    progress = JobProgress()
    for report in run_shards(todo):
        progress.add(report)
        tracker.log_metrics(progress.metrics(), step=progress.shards)
        log.info("shard %d: %d/%d pairs kept in %.1f s (%d/%d shards this run)", report.index,
                 report.kept, report.generated, report.seconds, progress.shards, len(todo))
    result = merge_shards(spec, out)
    tracker.log_metrics(result.metrics(), step=progress.shards)
    return result


def merge_shards(spec: PairSetSpec, out: Path) -> PairSetReport:
    """DIR/train.parquet and DIR/test.parquet (kept pairs, in plan order) and, with a
    verifier, DIR/verification.parquet from every shard's files."""
    folder = ShardFolder(out)
    count = spec.shard_count
    kept = {split: _merge_split(folder, count, split, Path(out) / f"{split}.parquet")
            for split in SPLITS}
    verdicts = []
    if spec.verifier != "none":
        verdicts = [v for index in range(count) for v in read_verdicts(folder.verdicts_path(index))]
        write_verdicts(Path(out) / "verification.parquet", verdicts)
    return PairSetReport(kept, verdicts)


def _merge_split(folder: ShardFolder, count: int, split: str, path: Path) -> list[int]:
    """Concatenate one split's rows of every shard (already validated when written); returns
    their num_perturbed."""
    num_perturbed = []
    with pq.ParquetWriter(path, PAIR_SCHEMA) as writer:
        for index in range(count):
            table = pq.read_table(folder.pairs_path(index), schema=PAIR_SCHEMA)
            rows = table.filter(pc.equal(table["split"], split))
            writer.write_table(rows)
            num_perturbed += rows["num_perturbed"].to_pylist()
    return num_perturbed
