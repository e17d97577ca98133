import argparse
import itertools

import pyarrow.parquet as pq
import pytest

from spatialrl.commands import data as data_command
from spatialrl.data.grammar import COLOURS, SHAPES, parse_prompt
from spatialrl.data.pairs import decode_image, read_pairs
from spatialrl.data.rule_evaluator import evaluate
from spatialrl.data.shapes import (
    HELD_OUT_COMBOS,
    TRAIN_COMBOS,
    build_shapes_pairs,
    sample_prompts,
    write_prompts_parquet,
)


def _combos(prompt):
    return {o.identity for o in parse_prompt(prompt).objects}


def test_held_out_combos_leave_every_colour_and_shape_in_train():
    assert HELD_OUT_COMBOS.isdisjoint(TRAIN_COMBOS)
    assert HELD_OUT_COMBOS | TRAIN_COMBOS == set(itertools.product(COLOURS, SHAPES))
    assert {c for c, _ in TRAIN_COMBOS} == set(COLOURS)
    assert {s for _, s in TRAIN_COMBOS} == set(SHAPES)


def test_held_out_combos_never_appear_in_train_prompts():
    for prompt in sample_prompts(500, seed=0, split="train"):
        assert _combos(prompt).isdisjoint(HELD_OUT_COMBOS), prompt
    for prompt in sample_prompts(200, seed=0, split="test"):
        assert _combos(prompt) & HELD_OUT_COMBOS, prompt


def test_sample_prompts_is_reproducible_and_split_dependent():
    assert sample_prompts(20, seed=3) == sample_prompts(20, seed=3)
    assert sample_prompts(20, seed=3) != sample_prompts(20, seed=4)
    assert sample_prompts(20, seed=3, split="train") != sample_prompts(20, seed=3, split="test")
    with pytest.raises(ValueError, match="split"):
        sample_prompts(1, split="validation")


@pytest.fixture(scope="module")
def pairs():
    return build_shapes_pairs(30, seed=1, size=64, test_fraction=0.2)


def test_pairs_split_combos_and_perturbation_counts(pairs):
    assert len(pairs.train) == 24 and len(pairs.test) == 6
    for record in pairs.train:
        assert record.split == "train"
        assert _combos(record.prompt).isdisjoint(HELD_OUT_COMBOS)
    for record in pairs.test:
        assert record.split == "test" and _combos(record.prompt) & HELD_OUT_COMBOS
    counts = [sum(r.num_perturbed == k for r in pairs.train) for k in (1, 2, 3)]
    assert counts == [8, 8, 8]
    ids = [r.pair_id for r in pairs.train + pairs.test]
    assert len(set(ids)) == len(ids)


def test_pair_images_match_their_prompts(pairs):
    for record in pairs.train[:9]:
        preferred = evaluate(decode_image(record.image_preferred), record.prompt)
        rejected = evaluate(decode_image(record.image_rejected), record.prompt)
        assert preferred.all_correct
        assert rejected.per_relation.count(False) == record.num_perturbed
        assert evaluate(decode_image(record.image_rejected), record.perturbed_prompt).all_correct


def test_pairs_are_reproducible():
    first = build_shapes_pairs(3, seed=2, test_fraction=0.0)
    assert first == build_shapes_pairs(3, seed=2, test_fraction=0.0)
    assert first.test == []


def _run(argv):
    parser = argparse.ArgumentParser()
    data_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_shapes_writes_both_splits(tmp_path, capsys):
    assert _run(["data", "shapes", "--out", str(tmp_path), "--n", "6", "--seed", "4",
                 "--test-fraction", "0.5"]) == 0
    train, test = read_pairs(tmp_path / "train.parquet"), read_pairs(tmp_path / "test.parquet")
    assert len(train.pairs) == 3 and len(test.pairs) == 3
    assert decode_image(train.pairs[0].image_preferred).size == (64, 64)
    captured = capsys.readouterr()
    assert "train: 3 pairs" in captured.out and "test: 3 pairs" in captured.out
    # A progress bar per split, with its total (72000 pairs take minutes).
    assert "shapes train: 100%" in captured.err and "| 3/3 [" in captured.err


def test_cli_curriculum_shapes_show_progress(tmp_path, capsys):
    assert _run(["data", "shapes", "--out", str(tmp_path), "--n", "4", "--task", "colour",
                 "--test-fraction", "0.5"]) == 0
    assert "colour test: 100%" in capsys.readouterr().err


def test_cli_prompts_writes_prompt_file(tmp_path):
    path = tmp_path / "prompts" / "test.parquet"
    assert _run(["data", "prompts", "--out", str(path), "--n", "7", "--split", "test"]) == 0
    table = pq.read_table(path)
    assert table.column_names == ["prompt", "split"]
    assert table.column("split").to_pylist() == ["test"] * 7
    assert table.column("prompt").to_pylist() == sample_prompts(7, seed=0, split="test")


def test_cli_rejects_a_bad_test_fraction():
    with pytest.raises(SystemExit):
        _run(["data", "shapes", "--out", "x", "--n", "2", "--test-fraction", "1.5"])


def test_write_prompts_parquet_checks_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        write_prompts_parquet(tmp_path / "p.parquet", ["a red circle above a blue square"], "dev")
