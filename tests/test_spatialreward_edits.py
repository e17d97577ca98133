"""SpatialReward's shapes-world edit data (spatialrl.spatialreward.edits and edit_examples):
candidates of known quality read back as such by the rule evaluator, ground-truth boxes that
cover exactly the changed pixels, SFT answers that parse, held-out splits, determinism and
the parquet files."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from spatialrl.cli import main
from spatialrl.data.geometry import relation_holds
from spatialrl.data.grammar import CONVERSE
from spatialrl.data.pairs import PairFileError, decode_image, png_bytes
from spatialrl.data.shapes import HELD_OUT_COMBOS, TRAIN_COMBOS
from spatialrl.spatialreward.answers import EditAnswer, QualityAnswer, parse_answer
from spatialrl.spatialreward.edit_examples import (
    CANDIDATES,
    EDIT_SCHEMA,
    HELD_OUT_EDIT_PAIRS,
    EditFileError,
    applied_unasked_changes,
    build_example,
    example_rows,
    has_held_out_pair,
    read_edit_rows,
    write_edit_examples,
)
from spatialrl.spatialreward.edits import Add, Move, Recolour, read_colours
from spatialrl.spatialreward.reward import RewardWeights, combine

SIZE = 64
PER_SPLIT = 9  # 1, 2 and 3 edits three times each


@pytest.fixture(scope="module")
def examples():
    return [build_example(seed=3, split=split, index=i, size=SIZE)
            for split in ("train", "test") for i in range(PER_SPLIT)]


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def answer(candidate) -> EditAnswer:
    parsed = parse_answer(candidate.answer, EditAnswer)
    assert parsed.valid, (parsed.reason, parsed.detail)
    return parsed.answer


def pixel_box(bbox_2d):
    return [round(value * SIZE / 1000) for value in bbox_2d]


def test_every_candidate_kind_and_edit_count_is_made(examples):
    assert {c.label for e in examples for c in e.candidates} == set(CANDIDATES)
    assert sorted({len(e.edits) for e in examples}) == [1, 2, 3]
    for example in examples:
        labels = [c.label for c in example.candidates]
        assert {"correct", "no_op", "over_editing"} <= set(labels)
        assert ("partial" in labels) == (len(example.edits) > 1)
        relational = any(isinstance(edit, (Move, Add)) for edit in example.edits)
        assert "wrong_relation" not in labels or relational


def test_the_rule_evaluator_reads_each_candidate_as_labelled(examples):
    """Through PNG bytes: the correct target satisfies every edit, no-op none, partial some,
    wrong object and wrong relation all but one, over-editing all."""
    for example in examples:
        n = len(example.edits)
        for candidate in example.candidates:
            done = example.edits_done(decode_image(png_bytes(candidate.image)))
            assert done == candidate.done, (example.instruction, candidate.label)
            expected_count = {"correct": n, "over_editing": n, "no_op": 0,
                              "wrong_object": n - 1, "wrong_relation": n - 1}
            if candidate.label == "partial":
                assert 0 < sum(done) < n
            else:
                assert sum(done) == expected_count[candidate.label], candidate.label


def test_unasked_changes_are_read_as_the_candidates_make_them():
    """The over-editing reading of eval (objects changed that the instruction does not name)
    against the engine's ground truth, on every candidate of 60 examples: it tells candidates
    with unasked changes from those without in at least 98% (measured: 99.5% of 585 candidates
    of seed 0; the misses are an object uncovered by a removal reading as grown, and one
    wrong-object recolour not read)."""
    agree, total = 0, 0
    for example in [build_example(0, split, i) for split in ("train", "test") for i in range(30)]:
        for candidate in example.candidates:
            truth = applied_unasked_changes(candidate.applied)
            agree += (example.unasked_changes(candidate.image) > 0) == (truth > 0)
            total += 1
    assert agree / total >= 0.98, (agree, total)


def test_an_unnamed_object_recoloured_is_one_unasked_change(examples):
    for example in examples:
        over_editing = example.candidate("over_editing")
        assert example.unasked_changes(over_editing.image) >= 1, example.instruction
        assert example.unasked_changes(example.candidate("correct").image) == 0
        assert example.unasked_changes(example.source_image) == 0
        unasked = next(a.edit for a in over_editing.applied if a.role == "unasked")
        if isinstance(unasked, Recolour):
            assert example.unasked_changes(over_editing.image) == 1, example.instruction


def botched_edits(examples, label):
    """(example, candidate, the botched edit) of every example with a `label` candidate."""
    for example in examples:
        candidate = example.candidate(label)
        if candidate is not None:
            yield example, candidate, next(a for a in candidate.applied if a.role == label)


def test_wrong_relation_puts_the_object_in_the_converse_relation(examples):
    checked = 0
    for example, wrong, botched in botched_edits(examples, "wrong_relation"):
        asked = botched.asked
        subject = asked.target if isinstance(asked, Move) else asked.new
        objects = example.objects()
        for image, predicate, expected in (
            (example.candidate("correct").image, asked.predicate, True),
            (wrong.image, asked.predicate, False),
            (wrong.image, CONVERSE[asked.predicate], True),
        ):
            found = read_colours(image, objects)
            holds = relation_holds(predicate, found[subject.obj.colour],
                                   found[asked.anchor.obj.colour])
            assert holds == expected, (example.instruction, predicate)
        checked += 1
    assert checked >= 2


def test_edit_boxes_cover_exactly_the_changed_pixels(examples):
    """Every pixel that differs from the source lies in a region, and each region's box is
    the bounding box of the changed pixels inside it."""
    for example in examples:
        source = pixels(example.source_image)
        for candidate in example.candidates:
            changed = (pixels(candidate.image) != source).any(axis=-1)
            covered = np.zeros_like(changed)
            for region in answer(candidate).edit_region:
                x0, y0, x1, y1 = pixel_box(region.bbox_2d)
                covered[y0:y1, x0:x1] = True
                rows, cols = np.nonzero(changed[y0:y1, x0:x1])
                tight = (x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1,
                         y0 + rows.max() + 1)
                assert tight == (x0, y0, x1, y1), (candidate.label, region.label)
            assert not (changed & ~covered).any(), (example.instruction, candidate.label)


def test_over_editing_changes_an_object_the_instruction_does_not_name(examples):
    for example in examples:
        correct, over = example.candidate("correct"), example.candidate("over_editing")
        extra = over.applied[-1]
        (change,) = extra.changes
        named = set().union(*(edit.named() | edit.reshaped() for edit in example.edits))
        assert change.index not in named
        before = example.source.objects.get(change.index, change.obj)
        assert f"{before.colour} {before.shape}" not in example.instruction
        # Beyond the correct target, only the extra region changed.
        differs = (pixels(over.image) != pixels(correct.image)).any(axis=-1)
        x0, y0, x1, y1 = pixel_box(answer(over).edit_region[-1].bbox_2d)
        assert differs.any() and not differs[:y0].any() and not differs[y1:].any()
        assert not differs[:, :x0].any() and not differs[:, x1:].any()
        assert over.done == correct.done and answer(over).score == (25, 12)


def test_no_op_is_the_source_with_no_region(examples):
    for example in examples:
        no_op = example.candidate("no_op")
        assert np.array_equal(pixels(no_op.image), pixels(example.source_image))
        assert answer(no_op).edit_region == [] and answer(no_op).score == (0, 25)


def test_wrong_object_edits_an_unnamed_object_instead(examples):
    checked = 0
    for example, _, botched in botched_edits(examples, "wrong_object"):
        assert botched.edit.kind == botched.asked.kind
        if isinstance(botched.asked, Add):  # a different object added
            added = botched.edit.new.obj
            assert f"{added.colour} {added.shape}" not in example.instruction
        else:
            named = set().union(*(edit.named() for edit in example.edits))
            assert {change.index for change in botched.changes} - named
        checked += 1
    assert checked >= len(examples) // 2


def test_sft_targets_parse_and_scores_follow_the_candidate(examples):
    weights = RewardWeights()
    quality = parse_answer(example_rows(examples[0])[0].quality_answer, QualityAnswer)
    assert quality.valid and quality.answer.score == (25, 25)
    for example in examples:
        n = len(example.edits)
        rewards = {}
        for row, candidate in zip(example_rows(example), example.candidates, strict=True):
            parsed = answer(candidate)
            assert row.edit_answer == candidate.answer
            for region in parsed.edit_region:
                assert all(isinstance(v, int) and 0 <= v <= 1000
                           for v in json.loads(candidate.answer)["edit_region"][region.id]
                           ["bbox_2d"])
                assert f"<|bbox_{region.id}|>" in parsed.reasoning
            assert "<|global|>" in parsed.reasoning
            success, over = parsed.score
            done = sum(candidate.done)
            expected = {"correct": (25, 25), "over_editing": (25, 12), "no_op": (0, 25),
                        "wrong_object": (25 * (n - 1) // n, 12),
                        "wrong_relation": (25 * (n - 1) // n, 25),
                        "partial": (25 * done // n, 25)}[candidate.label]
            assert (success, over) == expected, candidate.label
            rewards[candidate.label] = combine(
                parse_answer(candidate.answer, EditAnswer), quality, weights, 25).reward
        assert all(rewards["correct"] > value for label, value in rewards.items()
                   if label != "correct")


def test_correct_regions_are_the_edits_in_instruction_order(examples):
    for example in examples:
        regions = answer(example.candidate("correct")).edit_region
        assert [region.label for region in regions] == [e.label() for e in example.edits]
        assert [region.id for region in regions] == list(range(len(example.edits)))


def test_held_out_splits(examples):
    """Train images never show a held-out colour/shape combination and train instructions
    never combine a held-out pair of edit kinds; every test example has both kinds of
    novelty (the pair only with 2-3 edits)."""
    for example in examples:
        worlds = [example.source, *(c.world for c in example.candidates)]
        shown = {obj.identity for world in worlds for obj in world.objects.values()}
        source = {obj.identity for obj in example.source.objects.values()}
        if example.split == "train":
            assert shown <= TRAIN_COMBOS
            assert not has_held_out_pair(example.kinds)
        else:
            assert source & HELD_OUT_COMBOS
            assert has_held_out_pair(example.kinds) == (len(example.kinds) > 1)
    test_pairs = {pair for e in examples if e.split == "test"
                  for pair in HELD_OUT_EDIT_PAIRS if pair <= set(e.kinds)}
    assert len(test_pairs) >= 2


def test_examples_are_deterministic_from_the_seed(examples):
    again = build_example(seed=3, split="train", index=4, size=SIZE)
    assert example_rows(again) == example_rows(examples[4])
    other = build_example(seed=4, split="train", index=4, size=SIZE)
    assert example_rows(other) != example_rows(again)


def test_parquet_round_trip(examples, tmp_path):
    path = tmp_path / "edits.parquet"
    rows = [row for example in examples for row in example_rows(example)]
    assert write_edit_examples(path, examples) == len(rows)
    assert read_edit_rows(path) == rows
    assert read_edit_rows(path, split="test") == [row for row in rows if row.split == "test"]
    first = read_edit_rows(path)[0]
    assert np.array_equal(pixels(decode_image(first.image_source)),
                          pixels(examples[0].source_image))


@pytest.mark.parametrize(("column", "bad", "message"), [
    ("image_edited", b"\x89PNG\r\n\x1a\n truncated", "corrupt image_edited"),
    ("edit_answer", '{"edit_region": [], "reasoning": "x", "score": [30, 0]}',
     "bad edit_answer: score_range"),
    ("candidate", "excellent", "candidate 'excellent' is not one of"),
])
def test_a_bad_row_is_an_error_naming_it(examples, tmp_path, column, bad, message):
    table = pq.read_table(_written(tmp_path / "good.parquet", examples[:1]))
    values = table[column].to_pylist()
    values[2] = bad
    index = EDIT_SCHEMA.get_field_index(column)
    pq.write_table(table.set_column(index, EDIT_SCHEMA.field(column), [values]),
                   tmp_path / "bad.parquet")
    example_id = table["example_id"][2].as_py()
    with pytest.raises(EditFileError, match=rf"row 2 \('{example_id}', .*{message}"):
        read_edit_rows(tmp_path / "bad.parquet")


def test_a_file_without_a_column_is_refused(examples, tmp_path):
    table = pq.read_table(_written(tmp_path / "good.parquet", examples[:1]))
    pq.write_table(table.drop_columns(["edit_answer"]), tmp_path / "bad.parquet")
    with pytest.raises(PairFileError, match="missing column 'edit_answer'"):
        read_edit_rows(tmp_path / "bad.parquet")


def _written(path, chosen):
    write_edit_examples(path, chosen)
    return path


def test_cli_writes_train_and_test(tmp_path, capsys):
    assert main(["data", "edits", "--n", "3", "--seed", "2", "--out", str(tmp_path)]) == 0
    train, test = read_edit_rows(tmp_path / "train.parquet"), read_edit_rows(tmp_path /
                                                                             "test.parquet")
    assert {row.split for row in train} == {"train"} and {row.split for row in test} == {"test"}
    assert len({row.example_id for row in train}) == 2
    assert len({row.example_id for row in test}) == 1
    assert "train: 2 examples" in capsys.readouterr().out
