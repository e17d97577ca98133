"""The pair verifier: keeps a pair only when its preferred image satisfies the prompt and its
rejected image breaks it, and says why it dropped the others. Judged by the rule evaluator's
colour reading on shapes renders, and wired to a tiny random OWLv2 for real objects."""

import shutil
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spatialrl.cli import main
from spatialrl.data.geometry import ObjectFeatures
from spatialrl.data.grammar import SHAPES_VOCABULARY, Predicate, parse_prompt
from spatialrl.data.judge import ColourLocator, geneval_relation_holds, judge
from spatialrl.data.pairs import png_bytes, read_pairs
from spatialrl.data.real_world import REAL_VOCABULARY
from spatialrl.data.shapes import build_shapes_pairs
from spatialrl.data.verify import VERDICT_SCHEMA, PairVerifier, drop_reason
from spatialrl.detection import OwlDetector

BLANK = png_bytes(Image.new("RGB", (64, 64), (255, 255, 255)))
REASONS = {"preferred_object_missing", "preferred_relation_fails", "nothing_checkable",
           "rejected_object_missing", "rejected_satisfies_prompt"}


@pytest.fixture(scope="module")
def shapes_pairs():
    return build_shapes_pairs(12, seed=0, size=64, test_fraction=0.25)


def _verify(pairs):
    verifier = PairVerifier(ColourLocator(), SHAPES_VOCABULARY, batch_size=5)
    kept = list(verifier.keep(pairs))
    return kept, verifier.verdicts


def test_correct_renders_are_kept(shapes_pairs):
    pairs = shapes_pairs.train + shapes_pairs.test
    kept, verdicts = _verify(pairs)
    assert kept == pairs
    assert [v.pair_id for v in verdicts] == [p.pair_id for p in pairs]
    assert all(v.kept and v.reason is None for v in verdicts)


def test_swapped_images_are_dropped_naming_the_failing_clause(shapes_pairs):
    swapped = [replace(p, image_preferred=p.image_rejected, image_rejected=p.image_preferred)
               for p in shapes_pairs.train]
    kept, verdicts = _verify(swapped)
    assert kept == []
    assert {v.reason for v in verdicts} == {"preferred_relation_fails"}
    for pair, verdict in zip(swapped, verdicts, strict=True):
        clauses = verdict.detail.removeprefix("not so in the preferred image: ").split("; ")
        assert 1 <= len(clauses) <= pair.num_perturbed
        assert all(parse_prompt(c).relations for c in clauses)


@pytest.mark.parametrize("change, reason", [
    ({"image_preferred": BLANK}, "preferred_object_missing"),
    ({"image_rejected": BLANK}, "rejected_object_missing"),
    ("rejected_is_preferred", "rejected_satisfies_prompt"),
])
def test_each_failure_has_its_reason(shapes_pairs, change, reason):
    pair = shapes_pairs.train[0]
    if change == "rejected_is_preferred":
        change = {"image_rejected": pair.image_preferred}
    kept, [verdict] = _verify([replace(pair, **change)])
    assert kept == [] and verdict.reason == reason and not verdict.kept
    if reason == "preferred_object_missing":
        named = verdict.detail.removeprefix("not in the preferred image: ").split("; ")
        assert named == [o.noun_phrase(first_mention=False)
                         for o in parse_prompt(pair.prompt).objects]


def _box(x0, y0, x1, y1):
    return ObjectFeatures(mask=np.ones((1, 1), bool), convex=True,
                          centroid=((x0 + x1) / 2, (y0 + y1) / 2), bbox=(x0, y0, x1, y1))


def test_a_judge_that_cannot_check_a_relation_leaves_it_open():
    scene = parse_prompt("a dog in front of a cat, the dog to the left of a cup", REAL_VOCABULARY)
    objects = [_box(0.0, 0.4, 0.2, 0.6), _box(0.1, 0.4, 0.3, 0.6), _box(0.6, 0.4, 0.8, 0.6)]
    judged = judge(objects, scene, OwlDetector.checkable)
    assert judged.per_relation == (None, True) and judged.satisfied
    depth_only = parse_prompt("a dog in front of a cat", REAL_VOCABULARY)
    judged = judge(objects[:2], depth_only, OwlDetector.checkable)
    assert drop_reason(depth_only, judged, judged)[0] == "nothing_checkable"


def test_geneval_rule_shrinks_the_offset_by_a_tenth_of_the_extents():
    left, right = _box(0.1, 0.4, 0.3, 0.6), _box(0.6, 0.4, 0.8, 0.6)
    assert geneval_relation_holds(Predicate.LEFT_OF, left, right)
    assert geneval_relation_holds(Predicate.RIGHT_OF, right, left)
    assert not geneval_relation_holds(Predicate.ABOVE, left, right)
    # Centres 0.05 apart with 0.2-wide boxes: within the 0.1 x 0.4 margin, no relation.
    assert not geneval_relation_holds(Predicate.LEFT_OF, left, _box(0.15, 0.4, 0.35, 0.6))
    # A diagonal offset is both left of and above, as in GenEval.
    top_left, bottom_right = _box(0.1, 0.1, 0.3, 0.3), _box(0.6, 0.6, 0.8, 0.8)
    assert geneval_relation_holds(Predicate.LEFT_OF, top_left, bottom_right)
    assert geneval_relation_holds(Predicate.ABOVE, top_left, bottom_right)
    corner = bottom_right
    assert not geneval_relation_holds(Predicate.LEFT_OF, None, corner)


def test_tiny_owlv2_locates_every_object_as_a_box_or_none(tiny_owlv2_path):
    scenes = [parse_prompt(p, REAL_VOCABULARY) for p in
              ("a dog to the left of a hot dog, the dog above a red car", "an apple on a bed")]
    images = [Image.new("RGB", (64, 64), (90, 120, 200)), Image.new("RGB", (96, 48), "white")]
    found = OwlDetector.from_pretrained(str(tiny_owlv2_path), threshold=0.0).locate(images,
                                                                                   scenes)
    assert [len(f) for f in found] == [3, 2]
    for features in (f for image in found for f in image):
        x0, y0, x1, y1 = features.bbox
        assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1 and features.pixel_count >= 1
    nothing = OwlDetector.from_pretrained(str(tiny_owlv2_path), threshold=1.0)
    assert nothing.locate(images, scenes) == [[None] * 3, [None] * 2]


def test_data_pairs_verifies_real_object_pairs_with_a_detector(
    tiny_flux_path, tiny_owlv2_path, tmp_path, capsys
):
    out = tmp_path / "pairs"
    argv = ["data", "pairs", "--world", "real", "--model", str(tiny_flux_path), "--out",
            str(out), "--n", "4", "--size", "32", "--steps", "2", "--test-fraction", "0.25",
            "--device", "cpu", "--detector", str(tiny_owlv2_path),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main([*argv, "--detector-threshold", "1.0"]) == 0  # nothing is ever found
    verdicts = pq.read_table(out / "verification.parquet")
    assert verdicts.schema.equals(VERDICT_SCHEMA)
    rows = verdicts.to_pylist()
    assert [r["split"] for r in rows] == ["train"] * 3 + ["test"]
    assert {r["reason"] for r in rows} == {"preferred_object_missing"}
    assert read_pairs(out / "train.parquet").pairs == []
    assert "train: verification dropped {'preferred_object_missing': 3}" in capsys.readouterr().out

    shutil.rmtree(out)  # its shards were made with the other threshold
    assert main([*argv, "--detector-threshold", "0.0"]) == 0  # everything is found
    rows = pq.read_table(out / "verification.parquet").to_pylist()
    assert {r["reason"] for r in rows} <= REASONS - {"preferred_object_missing"} | {None}
    written = read_pairs(out / "train.parquet").pairs + read_pairs(out / "test.parquet").pairs
    assert [p.pair_id for p in written] == [r["pair_id"] for r in rows if r["kept"]]
    for pair in written:
        parse_prompt(pair.prompt, REAL_VOCABULARY)


def test_data_pairs_refuses_a_missing_detector_and_rules_for_real_objects(tmp_path, capsys):
    base = ["data", "pairs", "--model", "m", "--out", str(tmp_path / "out"), "--n", "2"]
    assert main([*base, "--world", "real", "--detector", str(tmp_path / "none")]) == 2
    assert "no OWLv2 model there" in capsys.readouterr().err
    assert main([*base, "--world", "real", "--verifier", "rules"]) == 2
    assert "--verifier rules reads shapes by colour" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
