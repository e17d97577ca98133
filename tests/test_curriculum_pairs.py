"""Curriculum pair sets (`spatialrl data shapes --task ...`): two objects, one change, the
compositional split, images that match their prompts, and extension by n."""

import pytest

from spatialrl.cli import main
from spatialrl.data.curriculum import CURRICULUM_TASKS, RELATION_TASKS, curriculum_pairs
from spatialrl.data.grammar import parse_prompt
from spatialrl.data.pairs import decode_image, read_pairs
from spatialrl.data.rule_evaluator import evaluate
from spatialrl.data.shapes import HELD_OUT_COMBOS


def combos(prompt):
    return {o.identity for o in parse_prompt(prompt).objects}


@pytest.mark.parametrize("task", RELATION_TASKS)
def test_relation_pairs_reverse_one_relation_of_the_task(task):
    for split in ("train", "test"):
        for pair in curriculum_pairs(task, 6, split, seed=1):
            scene, changed = parse_prompt(pair.prompt), parse_prompt(pair.perturbed_prompt)
            assert len(scene.objects) == 2 and len(scene.relations) == 1
            assert scene.relations[0].predicate in RELATION_TASKS[task]
            assert changed.objects == scene.objects
            assert changed.relations[0].predicate != scene.relations[0].predicate  # not "next to"
            assert (pair.num_perturbed, pair.source, pair.split) == (1, task, split)
            unseen = combos(pair.prompt) & HELD_OUT_COMBOS
            assert bool(unseen) == (split == "test"), pair.prompt


def test_relation_pair_images_match_their_prompts():
    for pair in curriculum_pairs("left-right", 8, "train", seed=2):
        preferred, rejected = decode_image(pair.image_preferred), decode_image(pair.image_rejected)
        assert evaluate(preferred, pair.prompt).all_correct
        assert not evaluate(rejected, pair.prompt).all_correct
        assert evaluate(rejected, pair.perturbed_prompt).all_correct


def test_colour_pairs_recolour_one_object_to_an_unnamed_colour():
    for pair in curriculum_pairs("colour", 8, "train", seed=0):
        scene, changed = parse_prompt(pair.prompt), parse_prompt(pair.perturbed_prompt)
        assert changed.relations == scene.relations
        first, second = scene.objects
        assert changed.objects[1] == second
        assert changed.objects[0].shape == first.shape
        assert changed.objects[0].colour not in {first.colour, second.colour}
        preferred, rejected = decode_image(pair.image_preferred), decode_image(pair.image_rejected)
        assert preferred != rejected
        assert evaluate(preferred, pair.prompt).all_correct
        assert evaluate(rejected, pair.perturbed_prompt).all_correct


def test_object_pairs_leave_out_or_recolour_one_object_of_the_same_layout():
    """The rejected image lacks one named object (left out, or in a colour the prompt does
    not name); the rest of the layout is the same, blurred or not alike."""
    missing_counts = []
    for split in ("train", "test"):
        for pair in curriculum_pairs("objects", 16, split, seed=0):
            assert (pair.source, pair.split, pair.perturbed_prompt) == ("objects", split,
                                                                        pair.prompt)
            found = evaluate(decode_image(pair.image_preferred), pair.prompt).objects_found
            lost = evaluate(decode_image(pair.image_rejected), pair.prompt).objects_found
            assert all(found), pair.prompt  # the full scene, readable even when blurred
            missing_counts.append(sum(found) - sum(lost))
            unseen = combos(pair.prompt) & HELD_OUT_COMBOS
            assert bool(unseen) == (split == "test"), pair.prompt
    assert set(missing_counts) == {1}


def test_a_larger_n_extends_the_same_sequence():
    assert curriculum_pairs("relation", 7, "test", seed=3)[:4] == curriculum_pairs(
        "relation", 4, "test", seed=3)
    assert curriculum_pairs("colour", 3, "train", seed=3) != curriculum_pairs(
        "colour", 3, "train", seed=4)


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="task must be one of colour, left-right"):
        curriculum_pairs("diagonal", 1, "train")


def test_cli_writes_a_curriculum_task(tmp_path, capsys):
    assert main(["data", "shapes", "--task", "above-below", "--n", "10", "--seed", "5",
                 "--test-fraction", "0.3", "--out", str(tmp_path)]) == 0
    train = read_pairs(tmp_path / "train.parquet").pairs
    test = read_pairs(tmp_path / "test.parquet").pairs
    assert (len(train), len(test)) == (7, 3)
    assert train == curriculum_pairs("above-below", 7, "train", seed=5)
    assert "perturbed relations 1/2/3: 7/0/0" in capsys.readouterr().out
    assert set(CURRICULUM_TASKS) == {"colour", *RELATION_TASKS, "objects"}
