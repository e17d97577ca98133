"""The rule evaluator's figures of a generator, and `spatialrl eval-policy`: its config, its
report of a base pipeline beside its LoRA, and the MLflow run it writes."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from spatialrl.cli import main
from spatialrl.config import load_config
from spatialrl.data.grammar import parse_prompt
from spatialrl.data.render import render
from spatialrl.data.shapes import sample_prompts
from spatialrl.eval_policy_config import EvalPolicyConfig
from spatialrl.policy_evaluation import reversed_prompt, rule_figures

ROOT = Path(__file__).resolve().parents[1]


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


def test_eval_policy_compares_a_base_pipeline_with_its_lora_in_mlflow(
    tiny_flux_path, tiny_flux_lora_path, tiny_spatialscore_path, tmp_path, capsys
):
    out = tmp_path / "figures.json"
    database = tmp_path / "mlflow.db"
    code = main(["eval-policy", "--model", str(tiny_flux_path), "--lora",
                 str(tiny_flux_lora_path), "--spatialscore", str(tiny_spatialscore_path),
                 "--prompts", "3", "--num-steps", "2", "--max-sequence-length", "32",
                 "--out", str(out), "--tracking-uri", f"sqlite:///{database}"])
    assert code == 0
    record = json.loads(out.read_text())
    base, lora = record["figures"]["base"], record["figures"]["lora"]
    assert set(record["figures"]) == {"base", "lora"}
    assert record["settings"]["benchmark"]["prompts"] == 3
    assert record["settings"]["model"]["dtype"] == "float32"  # --model keeps the command's
    assert record["settings"]["judge"]["spatialscore"] == str(tiny_spatialscore_path)
    assert base["spatialscore_sigma"] > 0 and base["spatialscore_mu"] != lora["spatialscore_mu"]
    assert record["lora_minus_base"] == pytest.approx(
        {key: lora[key] - value for key, value in base.items()}, nan_ok=True)

    table = capsys.readouterr().out
    assert "lora_minus_base" in table.splitlines()[1]
    row = next(line for line in table.splitlines() if line.startswith("spatialscore_mu "))
    assert row.split()[1:] == [f"{base['spatialscore_mu']:.4f}", f"{lora['spatialscore_mu']:.4f}",
                               f"{lora['spatialscore_mu'] - base['spatialscore_mu']:+.4f}"]

    client = MlflowClient(f"sqlite:///{database}")
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "spatialrl-eval"
    metrics = run.data.metrics
    for column, figures in [*record["figures"].items(), ("lora_minus_base",
                                                         record["lora_minus_base"])]:
        for name, value in figures.items():
            assert metrics[f"{column}/{name}"] == pytest.approx(value, nan_ok=True)
    assert run.data.params["benchmark.prompts"] == "3"
    assert run.data.params["lora"] == str(tiny_flux_lora_path)
    saved = client.download_artifacts(run.info.run_id, "report.json", str(tmp_path / "dl"))
    assert json.loads(Path(saved).read_text()) == json.loads(out.read_text())
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("eval-policy~samples" in path for path in images)


def test_the_grid_shows_each_prompt_from_both_sides_with_its_verdict_and_score():
    from PIL import Image

    from spatialrl.benchmark_report import JudgedSide, grid_cells
    from spatialrl.data.judge import Judgement
    from spatialrl.reward_functions import RewardOutput, deterministic

    def side(colour: str, holds: tuple, scores: RewardOutput | None) -> JudgedSide:
        images = [Image.new("RGB", (8, 8), colour)] * 2
        return JudgedSide(images, [Judgement((True, True), holds)] * 2, {}, scores)

    sides = {"base": side("red", (False,), None),
             "lora": side("blue", (True,), deterministic([0.5, 1.25]))}
    images, captions = grid_cells(sides, ["prompt one", "prompt two"])
    assert [image.getpixel((0, 0)) for image in images] == [(255, 0, 0), (0, 0, 255)] * 2
    assert captions == [
        "base: 0/1 relations hold\nprompt one",
        "lora: 1/1 relations hold, SpatialScore 0.50 (sigma 0.00)\nprompt one",
        "base: 0/1 relations hold\nprompt two",
        "lora: 1/1 relations hold, SpatialScore 1.25 (sigma 0.00)\nprompt two",
    ]


def test_a_config_file_sets_the_run_and_flags_override_it(tiny_flux_path, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(f"model:\n  pretrained: {tiny_flux_path}\nbenchmark:\n  prompts: 4\n"
                      "sampling:\n  num_steps: 2\n  max_sequence_length: 32\n"
                      f"out: {tmp_path / 'from-config.json'}\n")
    out = tmp_path / "figures.json"
    assert main(["eval-policy", "--config", str(config), "--prompts", "2", "--set",
                 "sampling.seed=7", "--out", str(out),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    record = json.loads(out.read_text())
    assert record["prompts"] == 2 and "lora" not in record["figures"]
    assert "lora_minus_base" not in record
    assert record["settings"]["sampling"]["num_steps"] == 2
    assert record["settings"]["sampling"]["seed"] == 7
    assert not (tmp_path / "from-config.json").exists()


@pytest.mark.parametrize("config, argv, message", [
    ("judge:\n  detectr: x\n", [], "judge.detectr: Extra inputs are not permitted"),
    ("sampling:\n  num_steps: '8'\n", [], "sampling.num_steps: Input should be a valid integer"),
    (None, ["--prompts", "0"], "benchmark.prompts: Input should be greater than or equal to 1"),
    (None, ["--lora", "/nonexistent/lora"], "lora: no LoRA folder at /nonexistent/lora"),
    (None, ["--spatialscore", "org/no-such-model"],
     "SpatialScore checkpoint 'org/no-such-model': not a local folder, nor a hub repo"),
    (None, None, "which policy? give --model PIPELINE or --config FILE"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, config, argv, message):
    args = ["eval-policy", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    if config is not None:
        (tmp_path / "eval.yaml").write_text(config)
        args += ["--config", str(tmp_path / "eval.yaml")]
    if argv is not None:
        args += ["--model", "models/shapes-flux", *argv]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "mlflow.db").exists()  # refused before a run opens


def test_the_gpu_config_is_flux_dev_on_geneval_and_the_local_one_uses_shipped_models():
    gpu = load_config(ROOT / "configs/eval/flux-dev-geneval.yaml", model=EvalPolicyConfig)
    assert (gpu.model.pretrained, gpu.model.dtype, gpu.device) == (
        "black-forest-labs/FLUX.1-dev", "bfloat16", "cuda")
    assert (gpu.sampling.size, gpu.sampling.num_steps, gpu.sampling.guidance_scale) == (
        512, 28, 3.5)
    assert gpu.judge.detector == "google/owlv2-base-patch16-ensemble"
    assert gpu.benchmark.prompt_file.endswith("evaluation_metadata.jsonl")
    local = load_config(ROOT / "configs/eval/shapes-local.yaml", model=EvalPolicyConfig)
    assert (ROOT / local.model.pretrained / "model_index.json").is_file()
    assert (ROOT / local.judge.spatialscore / "spatialscore.json").is_file()
    assert local.device == "cpu" and math.isclose(local.sampling.guidance_scale, 3.5)
