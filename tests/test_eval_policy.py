"""The rule evaluator's figures of a generator, and `spatialrl eval-policy`."""

import json

import numpy as np
import pytest

from spatialrl.cli import main
from spatialrl.data.grammar import parse_prompt
from spatialrl.data.render import render
from spatialrl.data.shapes import sample_prompts
from spatialrl.policy_evaluation import reversed_prompt, rule_figures


def test_reversed_prompt_states_the_opposite_of_every_relation():
    prompt = "a red circle to the left of a blue square, a green star next to the blue square"
    assert reversed_prompt(prompt) == (
        "a red circle to the right of a blue square, a green star next to the blue square")


def test_perfect_renders_are_readable_correct_and_rarely_fit_the_reversed_prompt():
    prompts = sample_prompts(40, seed=3, split="test")
    rng = np.random.default_rng(0)
    images = [render(parse_prompt(p), 64, rng) for p in prompts]
    figures = rule_figures(images, prompts)
    assert figures["readable_objects"] == 1.0
    assert figures["all_relations_correct"] == 1.0
    assert figures["relation/left of"] == 1.0
    # Only prompts whose every relation is "next to" also hold reversed.
    all_next_to = np.mean([all(r.predicate.value == "next to"
                               for r in parse_prompt(p).relations) for p in prompts])
    assert figures["all_reversed_relations_hold"] == pytest.approx(all_next_to)


def test_blank_images_read_nothing():
    prompts = sample_prompts(5, seed=0, split="test")
    blank = [np.full((64, 64, 3), 255, dtype=np.uint8)] * 5
    figures = rule_figures(blank, prompts)
    assert figures["readable_objects"] == 0.0 and figures["all_relations_correct"] == 0.0


def test_eval_policy_compares_a_base_pipeline_with_its_lora(
    tiny_flux_path, tiny_flux_lora_path, tmp_path
):
    out = tmp_path / "figures.json"
    code = main(["eval-policy", "--model", str(tiny_flux_path), "--lora",
                 str(tiny_flux_lora_path), "--prompts", "3", "--num-steps", "2",
                 "--max-sequence-length", "32", "--out", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    assert set(record["figures"]) == {"base", "lora"}
    assert record["settings"]["prompts"] == 3
    for figures in record["figures"].values():
        assert 0.0 <= figures["readable_objects"] <= 1.0
