import numpy as np
import pytest

from spatialrl.data.grammar import (
    Predicate,
    Relation,
    Scene,
    SceneObject,
    canonicalize,
    is_satisfiable,
    parse_prompt,
    sample_scene,
    scene_to_prompt,
    why_unsatisfiable,
)


@pytest.mark.parametrize("seed", range(300))
def test_prompt_round_trip(seed):
    scene = sample_scene(np.random.default_rng(seed))
    prompt = scene_to_prompt(scene)
    assert parse_prompt(prompt) == scene
    assert scene_to_prompt(parse_prompt(prompt)) == prompt


def test_example_prompt_parses():
    scene = parse_prompt(
        "a red circle to the left of a large blue square, a green triangle above the blue square"
    )
    assert scene.objects == (
        SceneObject("red", "circle"),
        SceneObject("blue", "square", "large"),
        SceneObject("green", "triangle"),
    )
    assert scene.relations == (
        Relation(0, Predicate.LEFT_OF, 1),
        Relation(2, Predicate.ABOVE, 1),
    )


def test_round_trip_of_a_scene_numbered_out_of_mention_order():
    scene = Scene(
        objects=(SceneObject("green", "star"), SceneObject("orange", "circle", "small")),
        relations=(Relation(1, Predicate.ON, 0),),
    )
    assert scene_to_prompt(scene) == "a small orange circle on a green star"
    assert parse_prompt(scene_to_prompt(scene)) == canonicalize(scene)


def test_parser_tolerates_case_spacing_full_stop_and_and():
    loose = "A red circle  behind a blue square and the red circle above an orange star."
    canonical = "a red circle behind a blue square, the red circle above an orange star"
    assert parse_prompt(loose) == parse_prompt(canonical)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("a red blob to the left of a blue square", "'blob'"),
        ("a magenta circle above a blue square", "'magenta'"),
        ("a red circle beside a blue square", "'beside'"),
        ("the red circle above a blue square", "the red circle"),
        ("a red circle above a blue square, a red circle below a green star", "introduced twice"),
        ("a red circle above a red square", "unique"),
        ("a red circle above", "a red circle above"),
        ("a red circle above a blue square,", "empty clause"),
        ("", "empty"),
    ],
)
def test_parse_errors_name_the_bad_fragment(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_prompt(text)


@pytest.mark.parametrize(
    "prompt, reason",
    [
        ("a red circle to the left of a blue square, the blue square to the left of a green star, "
         "the green star to the left of the red circle", "x order"),
        ("a red circle above a blue square, the blue square on a green star, "
         "the green star above the red circle", "y order"),
        ("a red circle in front of a blue square, the blue square in front of a green star",
         None),
        ("a red circle on a blue square, a green star on the blue square", "carries"),
        ("a red circle on a blue square, a green star to the left of the red circle, "
         "the green star to the right of the blue square", "between two touching"),
        ("a red star behind a blue star", "two stars"),
        ("a red circle behind a blue square, the red circle behind a green star", "behind more"),
        ("a red circle next to a blue square, the blue square next to a green star, "
         "the red circle next to the green star", None),
        ("a red circle on a blue square, the blue square next to a green star, "
         "the red circle to the left of the green star", "touching relations"),
    ],
)
def test_satisfiability_rules(prompt, reason):
    scene = parse_prompt(prompt)
    found = why_unsatisfiable(scene)
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found


def test_sampled_scenes_respect_ranges_combos_and_rules():
    allowed = {("red", "circle"), ("blue", "square"), ("green", "star"), ("red", "star")}
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng, num_objects=(2, 3), num_relations=(1, 3), allowed_combos=allowed)
        assert 2 <= len(scene.objects) <= 3
        assert len(scene.objects) - 1 <= len(scene.relations) <= 3
        assert {o.identity for o in scene.objects} <= allowed
        assert is_satisfiable(scene)


def test_sample_scene_covers_every_predicate_and_shape():
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng) for _ in range(400)]
    assert {r.predicate for s in scenes for r in s.relations} == set(Predicate)
    assert len({o.shape for s in scenes for o in s.objects}) >= 5
    assert len({o.colour for s in scenes for o in s.objects}) >= 6


def test_impossible_request_is_a_clear_error():
    with pytest.raises(ValueError, match="no satisfiable scene"):
        sample_scene(np.random.default_rng(0), num_objects=2, num_relations=3)
