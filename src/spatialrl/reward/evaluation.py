"""SpatialScore evaluation on preference pairs, as the paper's table reports it: pairwise
accuracy overall and split by the number of perturbed relations (1 vs 2-3, and each of 1, 2
and 3), with counts. A pairwise judge (spatialrl.reward.judge) is evaluated on the same pairs
the same way, for comparison.

An output folder holds
    summary.json               the accuracies, the pairs file, its split and its skipped rows
    spatialscore_pairs.parquet one row per pair (ScoredPair)
    judge_pairs.parquet        one row per pair (JudgedPair), when a judge ran
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from spatialrl.data.pairs import PreferencePair, decode_image, read_pairs
from spatialrl.errors import InputError
from spatialrl.reward.judge import PairwiseJudge
from spatialrl.reward.loss import pair_wins
from spatialrl.reward.model import SpatialScore

SUMMARY_FILE = "summary.json"
SCORES_FILE = "spatialscore_pairs.parquet"
JUDGE_FILE = "judge_pairs.parquet"

# Group name -> numbers of perturbed relations it holds.
NUM_PERTURBED_GROUPS = {"1": (1,), "2-3": (2, 3), "2": (2,), "3": (3,)}


@dataclass(frozen=True)
class ScoredPair:
    pair_id: str
    num_perturbed: int
    source: str
    mu_preferred: float
    sigma_preferred: float
    mu_rejected: float
    sigma_rejected: float
    correct: float  # 1: mu_preferred > mu_rejected, 0: below, 0.5: a tie


@dataclass(frozen=True)
class JudgedPair:
    pair_id: str
    num_perturbed: int
    source: str
    # P(the judge picks the preferred image), with it shown as image 1, as image 2, averaged.
    p_preferred_shown_first: float
    p_preferred_shown_second: float
    p_preferred: float
    correct: float  # 1: p_preferred > 0.5, 0: below, 0.5: exactly 0.5


class RankedRecord(Protocol):
    """A pair ranked by a scorer or a judge."""

    num_perturbed: int
    correct: float


Record = TypeVar("Record")


def score_pairs(
    model: SpatialScore, pairs: Sequence[PreferencePair], batch_size: int,
    progress: bool = False,
) -> list[ScoredPair]:
    """Both images of each pair scored against its clean prompt, batch_size pairs (2 x
    batch_size images) per forward; `progress` shows a progress bar."""
    records = []
    for batch in _batches(pairs, batch_size, "spatialscore" if progress else None):
        preferred, rejected = _decoded_images(batch)
        output = model.score(preferred + rejected, [p.prompt for p in batch] * 2)
        mu_w, mu_l = output.mu.float().cpu().chunk(2)
        sigma_w, sigma_l = output.sigma.float().cpu().chunk(2)
        _check_finite(batch, mu_w, mu_l, sigma_w, sigma_l)
        for pair, *values in zip(
            batch, mu_w.tolist(), sigma_w.tolist(), mu_l.tolist(), sigma_l.tolist(),
            pair_wins(mu_w, mu_l).tolist(), strict=True,
        ):
            records.append(ScoredPair(pair.pair_id, pair.num_perturbed, pair.source, *values))
    return records


def judge_pairs(
    judge: PairwiseJudge, pairs: Sequence[PreferencePair], batch_size: int,
    progress: bool = False,
) -> list[JudgedPair]:
    """Each pair judged in both image orders, batch_size pairs (2 x batch_size chats) per
    forward; `progress` shows a progress bar."""
    records = []
    for batch in _batches(pairs, batch_size, "judge" if progress else None):
        preferred, rejected = _decoded_images(batch)
        verdict = judge.compare(preferred, rejected, [p.prompt for p in batch])
        first, second = verdict.a_shown_first.cpu(), verdict.a_shown_second.cpu()
        p_preferred = verdict.p_a.cpu()
        _check_finite(batch, first, second)
        for pair, *values in zip(
            batch, first.tolist(), second.tolist(), p_preferred.tolist(),
            pair_wins(p_preferred, 1 - p_preferred).tolist(), strict=True,
        ):
            records.append(JudgedPair(pair.pair_id, pair.num_perturbed, pair.source, *values))
    return records


def accuracy_summary(records: Sequence[RankedRecord]) -> dict:
    """{"pairs", "accuracy", "by_num_perturbed": {group: {"pairs", "accuracy"}}}; the
    accuracy of an empty group is None."""

    def group(members: Sequence[RankedRecord]) -> dict:
        accuracy = sum(r.correct for r in members) / len(members) if members else None
        return {"pairs": len(members), "accuracy": accuracy}

    by_group = {
        name: group([r for r in records if r.num_perturbed in counts])
        for name, counts in NUM_PERTURBED_GROUPS.items()
    }
    return {**group(records), "by_num_perturbed": by_group}


def write_records(path: Path, records: Sequence[Record]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([asdict(r) for r in records]), path)
    return path


def evaluate_pairs(
    pairs_path: str | Path,
    split: str | None,
    out_dir: str | Path,
    model: SpatialScore,
    model_name: str,
    judge: PairwiseJudge | None = None,
    batch_size: int = 8,
) -> dict:
    """Evaluate `model` (and `judge`) on the valid pairs of `split` (None: all) and write
    the output folder; returns the summary."""
    result = read_pairs(pairs_path, split=split)
    if not result.pairs:
        raise InputError(
            f"{pairs_path}: no valid pairs in split {split!r} (skipped rows: {result.skipped})"
        )
    out_dir = Path(out_dir)
    summary = {
        "pairs_file": str(pairs_path),
        "split": split or "all",
        "skipped_rows": sum(result.skipped.values()),
        "skipped_by_reason": result.skipped,
    }
    scored = score_pairs(model, result.pairs, batch_size, progress=True)
    write_records(out_dir / SCORES_FILE, scored)
    summary["spatialscore"] = {"model": model_name, **accuracy_summary(scored)}
    if judge is not None:
        judged = judge_pairs(judge, result.pairs, batch_size, progress=True)
        write_records(out_dir / JUDGE_FILE, judged)
        summary["judge"] = {"model": judge.config.model, **accuracy_summary(judged)}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _batches(items: Sequence[Record], size: int, progress: str | None = None
             ) -> Iterator[Sequence[Record]]:
    """Consecutive batches; with `progress`, a progress bar of that name counting items."""
    if size < 1:
        raise ValueError(f"batch_size: must be at least 1, got {size}")
    with tqdm(total=len(items), desc=progress, unit="pair", disable=progress is None) as bar:
        for start in range(0, len(items), size):
            yield items[start : start + size]
            bar.update(len(items[start : start + size]))


def _decoded_images(
    pairs: Sequence[PreferencePair],
) -> tuple[list[Image.Image], list[Image.Image]]:
    return (
        [decode_image(p.image_preferred) for p in pairs],
        [decode_image(p.image_rejected) for p in pairs],
    )


def _check_finite(pairs: Sequence[PreferencePair], *values: torch.Tensor) -> None:
    """A NaN or infinite score would count as a silent loss; it means a broken model."""
    bad = ~torch.stack([torch.isfinite(v) for v in values]).all(0)
    if bad.any():
        ids = [p.pair_id for p, b in zip(pairs, bad.tolist(), strict=True) if b]
        raise ValueError(f"non-finite scores for pairs {ids[:5]} ({len(ids)} in the batch)")
