"""SpatialReward evaluation on held-out edit examples (`spatialrl spatialreward eval`).

Every candidate row is judged (edit and quality answers, spatialrl.spatialreward.model) and
summarised as:
- valid-JSON rate: the share of the answers (two per candidate) that parse, and the invalid
  ones counted by judgement and reason ("edit:truncated", "quality:not_json", ...);
- edit-region IoU against the ground-truth regions of the row's target answer, over the
  valid edit answers: predicted and true boxes matched greedily, best IoU first, each box
  at most once; the matched IoUs are summed and divided by the larger number of boxes, so
  an unmatched box on either side counts 0. Two empty lists (a no-op seen as one) score 1;
  one empty list scores 0;
- pairwise accuracy: in each example, the correct candidate's reward against each negative
  candidate's (CANDIDATES: wrong_object, wrong_relation, over_editing, no_op, partial), 1
  when higher, 0.5 for a tie, 0 below; overall and by negative type, for single-edit and
  multi-edit (2-3) instructions. A pair with an invalid answer on either side has no
  reward to compare: it is counted as invalid, never scored, and `strict_accuracy` counts
  it as lost;
- the attention-collapse probe: correct against over_editing, which differ only outside
  the edit region (an object the instruction does not name is changed). A judge that reads
  the edit region alone cannot tell them apart. Reported: the reward's pairwise accuracy and
  the over_editing score's.

A benchmark file in the MER-Bench / EditReward-Bench shape (`read_bench_pairs`) is scored as
pairwise accuracy the same way.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from spatialrl.data.pairs import decode_image
from spatialrl.errors import InputError
from spatialrl.spatialreward.answers import EditAnswer, EditRegion, parse_answer
from spatialrl.spatialreward.edit_examples import CANDIDATES, SCORE_RANGE, EditRow
from spatialrl.spatialreward.model import SpatialReward
from spatialrl.spatialreward.reward import SpatialRewardResult

NEGATIVES = CANDIDATES[1:]
COLLAPSE_PROBE = "over_editing"  # the negative that differs from correct only outside


@dataclass(frozen=True)
class JudgedCandidate:
    example_id: str
    num_edits: int
    candidate: str  # one of CANDIDATES
    truth: EditAnswer  # the row's target answer: its regions are the ground truth
    result: SpatialRewardResult


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    intersection = max(width, 0.0) * max(height, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def region_iou(predicted: Sequence[EditRegion], truth: Sequence[EditRegion]) -> float:
    """Greedy best-IoU matching (module docstring); 1 when both lists are empty."""
    if not predicted and not truth:
        return 1.0
    scored = sorted(((box_iou(p.bbox_2d, t.bbox_2d), i, j) for i, p in enumerate(predicted)
                     for j, t in enumerate(truth)), reverse=True)
    used_predicted, used_truth, total = set(), set(), 0.0
    for iou, i, j in scored:
        if iou > 0 and i not in used_predicted and j not in used_truth:
            used_predicted.add(i)
            used_truth.add(j)
            total += iou
    return total / max(len(predicted), len(truth))


def judge_rows(judge: SpatialReward, rows: Sequence[EditRow], batch_size: int,
               progress: bool = False) -> list[JudgedCandidate]:
    """Both judgements of every row, batch_size rows per generate call."""
    judged = []
    batches = range(0, len(rows), batch_size)
    for start in tqdm(batches, desc="spatialreward", unit="batch", disable=not progress):
        batch = rows[start:start + batch_size]
        results = judge.score([decode_image(r.image_source) for r in batch],
                              [decode_image(r.image_edited) for r in batch],
                              [r.instruction for r in batch])
        judged += [judged_candidate(row, result)
                   for row, result in zip(batch, results, strict=True)]
    return judged


def judged_candidate(row: EditRow, result: SpatialRewardResult) -> JudgedCandidate:
    truth = parse_answer(row.edit_answer, EditAnswer, SCORE_RANGE).answer
    return JudgedCandidate(row.example_id, len(row.edit_kinds.split("+")), row.candidate,
                           truth, result)


def summarise(judged: Sequence[JudgedCandidate]) -> dict:
    """The module docstring's figures as a JSON-ready dict."""
    return {
        "candidates": len(judged),
        "examples": len({j.example_id for j in judged}),
        **answer_validity(judged),
        "region_iou": region_summary(judged),
        "pairwise": {
            "all": pairwise_summary(judged),
            "single_edit": pairwise_summary([j for j in judged if j.num_edits == 1]),
            "multi_edit": pairwise_summary([j for j in judged if j.num_edits > 1]),
        },
        "attention_collapse_probe": collapse_probe(judged),
    }


def answer_validity(judged: Sequence[JudgedCandidate]) -> dict:
    """Valid-JSON rate over every answer, and the invalid ones by judgement and reason."""
    parsed = [(name, answer) for j in judged for name, answer in
              (("edit", j.result.edit_answer), ("quality", j.result.quality_answer))]
    invalid = Counter(f"{name}:{answer.reason}" for name, answer in parsed if not answer.valid)
    valid = len(parsed) - sum(invalid.values())
    return {"answers": len(parsed), "valid_answers": valid,
            "valid_json_rate": valid / len(parsed) if parsed else None,
            "invalid_by_reason": dict(sorted(invalid.items()))}


def region_summary(judged: Sequence[JudgedCandidate]) -> dict:
    """Mean region IoU over the valid edit answers, overall and by candidate."""
    scored = [(j.candidate, region_iou(j.result.edit_answer.answer.edit_region,
                                       j.truth.edit_region))
              for j in judged if j.result.edit_answer.valid]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {"answers": len(scored), "mean": mean([iou for _, iou in scored]),
            "by_candidate": {label: mean([iou for c, iou in scored if c == label])
                             for label in CANDIDATES}}


@dataclass(frozen=True)
class RankedPair:
    negative: str
    outcome: float | None  # 1 won, 0.5 tie, 0 lost; None: an answer on a side is invalid


def ranked_pairs(judged: Iterable[JudgedCandidate], score=None) -> list[RankedPair]:
    """Correct against each negative of its example, by reward (or by `score(result)`)."""
    score = score or (lambda result: result.reward)
    by_example: dict[str, dict[str, SpatialRewardResult]] = {}
    for j in judged:
        by_example.setdefault(j.example_id, {})[j.candidate] = j.result
    pairs = []
    for results in by_example.values():
        if "correct" not in results:
            continue
        for negative in NEGATIVES:
            if negative in results:
                pairs.append(RankedPair(negative, _outcome(score, results["correct"],
                                                           results[negative])))
    return pairs


def _outcome(score, preferred: SpatialRewardResult, rejected: SpatialRewardResult) -> float | None:
    if not (preferred.valid and rejected.valid):
        return None
    won, lost = score(preferred), score(rejected)
    return 1.0 if won > lost else 0.5 if won == lost else 0.0


def pair_accuracy(pairs: Sequence[RankedPair]) -> dict:
    """Counts and accuracy over the valid pairs; strict_accuracy counts invalid ones as 0."""
    scored = [p.outcome for p in pairs if p.outcome is not None]
    return {"pairs": len(pairs), "valid_pairs": len(scored),
            "invalid_pairs": len(pairs) - len(scored),
            "accuracy": sum(scored) / len(scored) if scored else None,
            "strict_accuracy": sum(scored) / len(pairs) if pairs else None}


def pairwise_summary(judged: Sequence[JudgedCandidate]) -> dict:
    pairs = ranked_pairs(judged)
    return {**pair_accuracy(pairs),
            "by_negative": {negative: pair_accuracy([p for p in pairs if p.negative == negative])
                            for negative in NEGATIVES}}


def collapse_probe(judged: Sequence[JudgedCandidate]) -> dict:
    """Correct against over_editing: by reward, and by the over_editing score alone."""
    probe = [j for j in judged if j.candidate in ("correct", COLLAPSE_PROBE)]
    over_editing_score = ranked_pairs(probe, lambda r: r.edit_answer.answer.over_editing)
    return {"reward": pair_accuracy(ranked_pairs(probe)),
            "over_editing_score": pair_accuracy(over_editing_score)}


# ------------------------------------------------------------------ benchmark files


@dataclass(frozen=True)
class BenchPair:
    """One line of a MER-Bench / EditReward-Bench style file, after conversion to JSONL:
        {"id": "...", "instruction": "...", "source": "src.png", "image_a": "a.png",
         "image_b": "b.png", "preferred": "a" or "b", "num_edits": 2}
    image paths are relative to the file; num_edits (optional, default 1) splits single
    from multi-edit instructions. Human ties are left out of such files."""

    pair_id: str
    instruction: str
    source: Path
    image_a: Path
    image_b: Path
    preferred: str
    num_edits: int


BENCH_KEYS = ("id", "instruction", "source", "image_a", "image_b", "preferred")


def read_bench_pairs(path: Path) -> list[BenchPair]:
    """Every line of a benchmark file; a bad line is an InputError naming its number."""
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            pairs.append(_bench_pair(line, path, number))
    if not pairs:
        raise InputError(f"{path}: no benchmark pairs")
    return pairs


def _bench_pair(line: str, path: Path, number: int) -> BenchPair:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not JSON ({err})") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: not a JSON object")
    if missing := [key for key in BENCH_KEYS if key not in record]:
        raise InputError(f"{where}: missing keys {missing}")
    if record["preferred"] not in ("a", "b"):
        raise InputError(f"{where}: preferred must be 'a' or 'b', got {record['preferred']!r}")
    images = {key: path.parent / str(record[key]) for key in ("source", "image_a", "image_b")}
    for key, image in images.items():
        if not image.is_file():
            raise FileNotFoundError(f"{where}: {key} image not found: {image}")
    return BenchPair(str(record["id"]), str(record["instruction"]), preferred=record["preferred"],
                     num_edits=int(record.get("num_edits", 1)), **images)


def score_bench(judge: SpatialReward, pairs: Sequence[BenchPair], batch_size: int) -> dict:
    """Pairwise accuracy of the reward on a benchmark file, overall, single and multi-edit."""
    outcomes = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        sources = [_image(p.source) for p in batch] * 2
        edited = [_image(p.image_a) for p in batch] + [_image(p.image_b) for p in batch]
        results = judge.score(sources, edited, [p.instruction for p in batch] * 2)
        for pair, a, b in zip(batch, results[:len(batch)], results[len(batch):], strict=True):
            preferred, rejected = (a, b) if pair.preferred == "a" else (b, a)
            outcome = _outcome(lambda r: r.reward, preferred, rejected)
            outcomes.append((pair.num_edits, RankedPair("bench", outcome)))
    return {"all": pair_accuracy([p for _, p in outcomes]),
            "single_edit": pair_accuracy([p for n, p in outcomes if n == 1]),
            "multi_edit": pair_accuracy([p for n, p in outcomes if n > 1])}


def _image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
