"""Real-world spatial prompts: the shapes grammar and perturber over COCO's object classes, with
a split by held-out class pairs, written as the prompt file `spatialrl train` reads."""

import itertools

import numpy as np
import pyarrow.parquet as pq
import pytest

from spatialrl.cli import main
from spatialrl.data.grammar import (
    CONVERSE,
    Predicate,
    Relation,
    SceneObject,
    parse_prompt,
    scene_to_prompt,
    why_unsatisfiable,
)
from spatialrl.data.real_world import (
    ANY_COLOUR,
    HELD_OUT_PAIRS,
    OBJECT_CLASSES,
    REAL_VOCABULARY,
    REAL_WORLD,
    held_out_pairs_in,
)
from spatialrl.data.shapes import sample_perturbed_scene, sample_prompts
from spatialrl.prompts import PromptSource, eval_prompts


def _parse(prompt):
    return parse_prompt(prompt, REAL_VOCABULARY)


def test_vocabulary_is_cocos_80_classes_with_sizes_and_plausible_colours():
    assert len(OBJECT_CLASSES) == 80
    assert {"person", "traffic light", "computer mouse", "hair drier", "toothbrush"} <= set(
        OBJECT_CLASSES)
    for size_class, colours in OBJECT_CLASSES.values():
        assert size_class in range(5) and set(colours) <= set(ANY_COLOUR)
    assert OBJECT_CLASSES["banana"][1] == ("yellow", "green") and OBJECT_CLASSES["person"][1] == ()


def test_multi_word_classes_and_a_colour_that_is_also_a_class_parse():
    scene = _parse("a small orange orange on a brown dining table, "
                   "a hot dog to the left of the orange orange")
    assert scene.objects == (SceneObject("orange", "orange", "small"),
                             SceneObject("brown", "dining table"), SceneObject(None, "hot dog"))
    assert scene.relations == (Relation(0, Predicate.ON, 1), Relation(2, Predicate.LEFT_OF, 0))
    assert _parse("an orange above a cup").objects == (SceneObject(None, "orange"),
                                                        SceneObject(None, "cup"))


@pytest.mark.parametrize("seed", range(60))
def test_sampled_prompts_round_trip_through_the_shared_parser(seed):
    rng = np.random.default_rng(seed)
    scene = REAL_WORLD.sample(rng, "train")
    assert 2 <= len(scene.relations) <= 3 and len(scene.objects) == 3
    assert _parse(scene_to_prompt(scene)) == scene
    scene, perturbed = sample_perturbed_scene(rng, "train", 1 + seed % 3, world=REAL_WORLD)
    assert perturbed.vocabulary is REAL_VOCABULARY
    assert _parse(scene_to_prompt(perturbed)) == perturbed


@pytest.mark.parametrize("text, fragment", [
    ("a dog to the left of a spaceship", "unknown object 'spaceship'"),
    ("a dog to the left of a black dog", "classes must be unique"),
    ("a dog beside a cat", "unknown relation 'beside'"),
    ("a red circle above a cup", "unknown object 'circle'"),  # shapes are not real objects
])
def test_parse_errors_name_the_problem(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        _parse(text)


def test_nothing_rests_on_a_smaller_kind_of_thing():
    assert "smaller kind" in why_unsatisfiable(_parse("a bus on a cup"))
    assert "smaller kind" in why_unsatisfiable(_parse("a cup under a bus"))
    assert why_unsatisfiable(_parse("a cup on a dining table")) is None


def test_prompts_cover_classes_and_relations_and_split_by_held_out_class_pairs():
    all_pairs = list(itertools.combinations(OBJECT_CLASSES, 2))
    assert 0.07 < len(HELD_OUT_PAIRS) / len(all_pairs) < 0.13
    train = [_parse(p) for p in sample_prompts(600, seed=0, split="train", world=REAL_WORLD)]
    test = [_parse(p) for p in sample_prompts(200, seed=0, split="test", world=REAL_WORLD)]
    assert not any(held_out_pairs_in(s) for s in train)
    assert all(held_out_pairs_in(s) for s in test)
    assert {o.shape for s in train for o in s.objects} == set(OBJECT_CLASSES)
    assert {r.predicate for s in train for r in s.relations} == set(Predicate)
    coloured = np.mean([o.colour is not None for s in train for o in s.objects])
    assert 0.3 < coloured < 0.6  # half the objects, less the classes that have no colour
    for scene in train:
        for obj in scene.objects:
            assert obj.colour is None or obj.colour in OBJECT_CLASSES[obj.shape][1]


def test_perturbed_real_scenes_keep_the_split_and_change_n_relations():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3):
        scene, perturbed = sample_perturbed_scene(rng, "test", n, world=REAL_WORLD)
        assert held_out_pairs_in(scene) and set(perturbed.objects) == set(scene.objects)
        assert len(_facts(scene) - _facts(perturbed)) == n


def _facts(scene):
    """Each relation by class names, worded one way ("A left of B" == "B right of A")."""
    facts = set()
    for r in scene.relations:
        subject, obj = scene.objects[r.subject_index].shape, scene.objects[r.object_index].shape
        facts.add(min((subject, r.predicate.value, obj),
                      (obj, CONVERSE[r.predicate].value, subject)))
    return facts


def test_real_prompt_file_is_written_and_read_back_by_the_training_prompt_source(
    tmp_path, capsys
):
    files = {}
    for split, count in (("train", 40), ("test", 12)):
        files[split] = tmp_path / f"{split}.parquet"
        assert main(["data", "prompts", "--world", "real", "--split", split, "--n", str(count),
                     "--seed", "3", "--out", str(files[split])]) == 0
        assert f"real {split}: {count} prompts" in capsys.readouterr().out
        assert pq.read_table(files[split]).column("split").to_pylist() == [split] * count

    source = PromptSource(str(files["train"]), seed=7)
    taken = [prompt for _, prompt in source.take(40)]
    assert sorted(taken) == sorted(sample_prompts(40, seed=3, split="train", world=REAL_WORLD))
    assert not any(held_out_pairs_in(_parse(p)) for p in taken)
    held_out = eval_prompts(str(files["test"]), 12, seed=0)
    assert len(held_out) == 12 and all(held_out_pairs_in(_parse(p)) for p in held_out)
    assert not set(taken) & set(held_out)
