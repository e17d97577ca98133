"""Position benchmarks: GenEval's position prompt files, real-object test prompts judged by a
detector, and shapes-world prompts judged by the rule evaluator, whose figures through
`spatialrl eval-policy` equal the rule evaluator's own reading of the same images."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spatialrl.cli import main
from spatialrl.config import PolicyModelConfig, SamplingConfig
from spatialrl.data.grammar import Predicate, Relation, SceneObject
from spatialrl.data.judge import geneval_relation_holds
from spatialrl.data.pairs import decode_image
from spatialrl.data.rule_evaluator import evaluate
from spatialrl.data.shapes import build_shapes_pairs, sample_prompts
from spatialrl.errors import InputError
from spatialrl.flux.loading import load_flux_pipeline
from spatialrl.policy_evaluation import reversed_prompt, rule_figures, sample_eval_images
from spatialrl.position_benchmark import read_benchmark, read_geneval_positions
from spatialrl.reward_functions import spatialscore

GENERATOR = Path(__file__).resolve().parents[1] / "models" / "shapes-flux"
SPATIALSCORE = GENERATOR.parent / "spatialscore-shapes"
GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}],
     "prompt": "a photo of a bench"},
    {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                    {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a teddy bear"},
    {"tag": "position", "include": [{"class": "cup", "count": 1},
                                    {"class": "computer mouse", "count": 1,
                                     "position": ["above", 0]}],
     "prompt": "a photo of a computer mouse above a cup"},
]


def _write_lines(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_geneval_position_lines_become_scenes(tmp_path):
    path = _write_lines(tmp_path / "evaluation_metadata.jsonl", GENEVAL_LINES)
    prompts, scenes = read_geneval_positions(path)
    assert prompts == ["a photo of a dog right of a teddy bear",
                       "a photo of a computer mouse above a cup"]
    assert scenes[0].objects == (SceneObject(None, "teddy bear"), SceneObject(None, "dog"))
    assert scenes[0].relations == (Relation(1, Predicate.RIGHT_OF, 0),)
    benchmark = read_benchmark(path, "shapes", count=1)
    assert benchmark.name == "geneval" and benchmark.prompts == prompts[:1]
    assert benchmark.rule is geneval_relation_holds and benchmark.needs_detector


@pytest.mark.parametrize("bad, message", [
    ("{not json", "line 2: not a GenEval position line"),
    (json.dumps({"tag": "position", "include": [{"class": "unicorn", "count": 1}],
                 "prompt": "a unicorn"}), "unknown class 'unicorn'"),
    (json.dumps({"tag": "position", "prompt": "a dog"}), "KeyError"),
    (json.dumps({"tag": "position", "include": [
        {"class": "cup", "count": 1},
        {"class": "dog", "count": 1, "position": ["inside", 0]}], "prompt": "p"}),
     "unknown position 'inside'"),
])
def test_bad_geneval_lines_are_named(tmp_path, bad, message):
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps(GENEVAL_LINES[0]) + "\n" + bad + "\n")
    with pytest.raises(InputError, match=message):
        read_geneval_positions(path)


def test_a_file_without_position_lines_is_refused(tmp_path):
    path = _write_lines(tmp_path / "meta.jsonl", GENEVAL_LINES[:1])
    with pytest.raises(InputError, match="no GenEval line tagged 'position'"):
        read_geneval_positions(path)


def test_shapes_figures_are_the_rule_evaluators_reading():
    pairs = build_shapes_pairs(9, seed=2, test_fraction=0.0).train
    images = [decode_image(p.image_rejected) for p in pairs]  # 1-3 relations wrong each
    prompts = [p.prompt for p in pairs]
    _assert_rule_evaluator_figures(rule_figures(images, prompts), images, prompts)


def _assert_rule_evaluator_figures(figures, images, prompts):
    results = [evaluate(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
    reversed_ = [evaluate(image, reversed_prompt(prompt))
                 for image, prompt in zip(images, prompts, strict=True)]
    assert figures["readable_objects"] == pytest.approx(
        np.mean([all(r.objects_found) for r in results]))
    assert figures["all_relations_correct"] == pytest.approx(
        np.mean([r.all_correct for r in results]))
    assert figures["relation_accuracy"] == pytest.approx(np.mean([r.accuracy for r in results]))
    assert figures["all_reversed_relations_hold"] == pytest.approx(
        np.mean([r.all_correct for r in reversed_]))
    assert figures["checkable_relations"] == 1.0


def _tracking(tmp_path) -> list[str]:
    return ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]


def test_eval_policy_on_the_shipped_generator_before_and_after_a_lora(
    shapes_flux_lora_path, tmp_path
):
    """eval-policy's shapes figures for models/shapes-flux and for it with a LoRA are the rule
    evaluator's reading of the same ODE samples, and its SpatialScore figures the shipped
    SpatialScore's mean score of them."""
    lora = shapes_flux_lora_path
    out = tmp_path / "figures.json"
    assert main(["eval-policy", "--model", str(GENERATOR), "--lora", str(lora), "--prompts",
                 "12", "--num-steps", "8", "--batch-size", "12", "--spatialscore",
                 str(SPATIALSCORE), "--out", str(out), *_tracking(tmp_path)]) == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == "shapes" and record["prompts"] == 12

    prompts = sample_prompts(12, seed=0, split="test")
    sampling = SamplingConfig(height=64, width=64, eval_num_steps=8, num_steps=8,
                              batch_size=12, max_sequence_length=40)
    base = load_flux_pipeline(PolicyModelConfig(pretrained=str(GENERATOR), dtype="float32"))
    with torch.no_grad():
        base_images = sample_eval_images(base, prompts, sampling, seed=0)
        base.transformer.load_lora_adapter(lora, use_safetensors=True)
        lora_images = sample_eval_images(base, prompts, sampling, seed=0)
    score = spatialscore(str(SPATIALSCORE))
    for side, images in (("base", base_images), ("lora", lora_images)):
        figures = record["figures"][side]
        _assert_rule_evaluator_figures(figures, images, prompts)
        scores = score(images, prompts)
        assert figures["spatialscore_mu"] == pytest.approx(float(scores.mu.mean()), abs=1e-5)
        assert figures["spatialscore_sigma"] == pytest.approx(float(scores.sigma.mean()),
                                                              abs=1e-5)
    assert record["figures"]["base"] != record["figures"]["lora"]


def test_eval_policy_judges_real_prompts_with_the_detector(
    tiny_flux_path, tiny_owlv2_path, tmp_path
):
    files = {}
    assert main(["data", "prompts", "--world", "real", "--split", "test", "--n", "3",
                 "--out", str(tmp_path / "real.parquet")]) == 0
    files["real"] = tmp_path / "real.parquet"
    files["geneval"] = _write_lines(tmp_path / "meta.jsonl", GENEVAL_LINES)
    common = ["eval-policy", "--model", str(tiny_flux_path), "--num-steps", "2",
              "--max-sequence-length", "32", "--detector", str(tiny_owlv2_path),
              *_tracking(tmp_path)]
    for name, path in files.items():
        out = tmp_path / f"{name}.json"
        assert main([*common, "--world", "real", "--prompt-file", str(path),
                     "--detector-threshold", "0", "--out", str(out)]) == 0
        record = json.loads(out.read_text())
        figures = record["figures"]["base"]
        assert record["benchmark"] == name
        assert figures["readable_objects"] == 1.0  # threshold 0: every object has a box
        assert not {k for k in figures if k.startswith("relation/")} - {
            "relation/left of", "relation/right of", "relation/above", "relation/below",
            "relation/next to"}
    assert record["prompts"] == 2
    assert 0 < json.loads((tmp_path / "real.json").read_text())["figures"]["base"][
        "checkable_relations"] <= 1


def test_eval_policy_refuses_a_prompt_file_of_another_world(tmp_path, tiny_owlv2_path, capsys):
    path = tmp_path / "shapes.parquet"
    assert main(["data", "prompts", "--n", "2", "--out", str(path)]) == 0
    assert main(["eval-policy", "--model", "m", "--world", "real", "--prompt-file", str(path),
                 "--detector", str(tiny_owlv2_path), *_tracking(tmp_path)]) == 2
    assert "not a prompt file of the real world" in capsys.readouterr().err
