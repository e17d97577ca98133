import numpy as np
import pytest

from spatialrl.data.grammar import (
    Predicate,
    Relation,
    is_satisfiable,
    parse_prompt,
    sample_scene,
    scene_to_prompt,
)
from spatialrl.data.perturb import PerturbError, perturb
from spatialrl.data.render import render
from spatialrl.data.rule_evaluator import evaluate


def _perturbable_scene(rng, n):
    while True:
        scene = sample_scene(rng, num_relations=(n, 3))
        try:
            return scene, perturb(scene, n, rng)
        except PerturbError:
            continue


@pytest.mark.parametrize("n", [1, 2, 3])
def test_perturbed_render_breaks_exactly_n_relations_of_the_original(n):
    rng = np.random.default_rng(n)
    for _ in range(25):
        scene, (perturbed, changed) = _perturbable_scene(rng, n)
        assert changed == n and is_satisfiable(perturbed)
        assert scene_to_prompt(perturbed) != scene_to_prompt(scene)
        result = evaluate(render(perturbed, 64, rng), scene)
        assert result.per_relation.count(False) == n, scene_to_prompt(perturbed)
        assert all(result.objects_found)


def test_perturbation_reverses_only_reversible_relations():
    scene = parse_prompt("a red circle next to a blue square, the blue square above a green star")
    next_to, above = scene.relations
    for seed in range(10):
        perturbed, _ = perturb(scene, 1, np.random.default_rng(seed))
        assert perturbed.objects == scene.objects
        assert perturbed.relations[0] == next_to
        assert perturbed.relations[1] in {
            Relation(above.subject_index, Predicate.BELOW, above.object_index),
            Relation(above.object_index, Predicate.ABOVE, above.subject_index),
        }


def test_both_wordings_of_a_reversal_are_used():
    scene = parse_prompt("a red circle to the left of a blue square")
    prompts = {scene_to_prompt(perturb(scene, 1, np.random.default_rng(s))[0]) for s in range(20)}
    assert prompts == {"a red circle to the right of a blue square",
                       "a blue square to the left of a red circle"}


def test_too_few_reversible_relations_is_an_error():
    scene = parse_prompt("a red circle next to a blue square, the blue square above a green star")
    with pytest.raises(PerturbError, match="1 reversible"):
        perturb(scene, 2, np.random.default_rng(0))


def test_no_satisfiable_perturbation_is_an_error():
    # Reversing either "on" of a stack makes one object rest on, or carry, two others;
    # reversing both gives the upside-down stack.
    scene = parse_prompt("a red circle on a blue square, the blue square on a green star")
    with pytest.raises(PerturbError, match="no satisfiable"):
        perturb(scene, 1, np.random.default_rng(0))
    perturbed, _ = perturb(scene, 2, np.random.default_rng(0))
    assert is_satisfiable(perturbed)
