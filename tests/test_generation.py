"""Best-of-N in the core (no Ray): the FLUX (+ LoRA) candidate sampler is FluxPipeline with one
seed per candidate, the shapes-world stand-in draws reproducible candidates, ranking picks the
highest score, and `spatialrl generate` writes the best image with every score."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from spatialrl.cli import main
from spatialrl.config import PolicyModelConfig, RewardConfig
from spatialrl.data.rule_evaluator import evaluate
from spatialrl.data.shapes import sample_prompts
from spatialrl.errors import InputError
from spatialrl.flux.loading import load_flux_pipeline
from spatialrl.generation import (
    LORA_WEIGHTS_FILE,
    FluxCandidates,
    ShapesCandidates,
    best_index,
    best_of_n,
)
from spatialrl.model_checksum import files_checksum
from spatialrl.reward_functions import build_reward, reward_version, shapes_rule
from spatialrl.service.config import FluxGeneratorConfig, ShapesGeneratorConfig

PROMPT = "a red circle to the left of a blue square"


def flux_config(tiny_flux_path, **fields) -> FluxGeneratorConfig:
    model = PolicyModelConfig(pretrained=str(tiny_flux_path), dtype="float32",
                              gradient_checkpointing=False)
    return FluxGeneratorConfig(model=model, height=64, width=64, num_steps=3,
                               max_sequence_length=32, **fields)


def test_best_index_takes_the_first_highest_and_refuses_non_finite_scores():
    assert best_index([0.1, 0.7, 0.7, -2.0]) == 1
    with pytest.raises(ValueError, match=r"candidates \[2\] have non-finite scores"):
        best_index([0.1, 0.7, float("nan")])


def test_flux_candidates_are_the_pipeline_run_with_each_seed(tiny_flux_path):
    cfg = flux_config(tiny_flux_path, batch_size=2)
    images = FluxCandidates(cfg)(PROMPT, [5, 6, 7])  # batches of 2 and 1
    pipeline = load_flux_pipeline(cfg.model)
    for seed, image in zip([5, 6, 7], images, strict=True):
        alone = pipeline(
            prompt=PROMPT, generator=torch.Generator().manual_seed(seed), height=64, width=64,
            num_inference_steps=3, guidance_scale=cfg.guidance_scale, max_sequence_length=32,
        ).images[0]
        # Same noise per seed; batched kernels may round differently by one grey level.
        difference = np.abs(np.asarray(image, np.int16) - np.asarray(alone, np.int16))
        assert difference.max() <= 1, "a candidate should not depend on its batch"
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_a_lora_changes_the_candidates_and_its_checksum_names_them(
        tiny_flux_path, tiny_flux_lora_path, tmp_path):
    base = FluxCandidates(flux_config(tiny_flux_path))
    tuned = FluxCandidates(flux_config(tiny_flux_path, lora_path=str(tiny_flux_lora_path)))
    assert base.name == f"flux:{tiny_flux_path}"
    checksum = files_checksum([tiny_flux_lora_path / LORA_WEIGHTS_FILE])
    assert tuned.name == f"{base.name}+lora@{checksum}"
    assert not np.array_equal(np.asarray(base(PROMPT, [0])[0]), np.asarray(tuned(PROMPT, [0])[0]))

    pickled = tmp_path / "pickled-lora"
    pickled.mkdir()
    (pickled / "pytorch_lora_weights.bin").write_bytes(b"cbuiltins\nint\n(Vx\ntR.")
    with pytest.raises(FileNotFoundError, match="generator.lora_path: no .*safetensors"):
        FluxCandidates(flux_config(tiny_flux_path, lora_path=str(pickled)))


def test_shapes_candidates_depend_only_on_their_seed():
    sampler = ShapesCandidates(ShapesGeneratorConfig())
    together = sampler(PROMPT, [3, 4, 5])
    assert np.array_equal(np.asarray(together[1]), np.asarray(sampler(PROMPT, [4])[0]))
    assert together[0].size == (64, 64)
    with pytest.raises(InputError, match="not a shapes-world prompt"):
        sampler("a cat on a sofa", [0])


def test_shapes_candidates_without_errors_draw_every_relation_right():
    sampler = ShapesCandidates(ShapesGeneratorConfig(relation_error_rate=0.0))
    for prompt in sample_prompts(5, seed=3):
        assert all(evaluate(image, prompt).all_correct for image in sampler(prompt, [0, 1]))


def test_best_of_8_ranked_by_the_rule_evaluator_beats_a_single_sample():
    """The mechanics of best-of-N: with a ranker that knows the answer, the best of 8 is
    judged correct far more often than one sample. (bench/best_of_n.py measures learned
    rankers.)"""
    sampler = ShapesCandidates(ShapesGeneratorConfig(relation_error_rate=0.5))
    single, best = [], []
    for index, prompt in enumerate(sample_prompts(10, seed=4, split="test")):
        result = best_of_n(sampler, shapes_rule, prompt, n=8, seed=100 * index)
        correct = [evaluate(image, prompt).all_correct for image in result.images]
        single.append(np.mean(correct))
        best.append(correct[result.best])
    assert 0.2 < np.mean(single) < 0.8
    assert np.mean(best) >= np.mean(single) + 0.3


def test_generate_writes_the_best_candidate_and_every_score(
        tiny_flux_path, tiny_flux_lora_path, tiny_spatialscore_path, tmp_path, capsys):
    config = tmp_path / "generate.yaml"
    config.write_text(yaml.safe_dump({"generator": {
        "kind": "flux", "height": 64, "width": 64, "num_steps": 3, "max_sequence_length": 32,
        "model": {"pretrained": str(tiny_flux_path), "dtype": "float32"}}}))
    out = tmp_path / "out"
    code = main(["generate", "--config", str(config), "--model", str(tiny_spatialscore_path),
                 "--lora", str(tiny_flux_lora_path), "--prompt", PROMPT, "--best-of", "3",
                 "--seed", "11", "--out", str(out), "--device", "cpu"])
    assert code == 0
    summary = json.loads((out / "best_of_n.json").read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert [c["seed"] for c in summary["candidates"]] == [11, 12, 13]
    mu = [c["mu"] for c in summary["candidates"]]
    assert summary["best_index"] == int(np.argmax(mu))
    reward = RewardConfig(kind="spatialscore", spatialscore_path=str(tiny_spatialscore_path))
    assert summary["model_version"] == reward_version(reward)
    assert "+lora@" in summary["generator"]

    candidates = [Image.open(out / f"candidate-{i:02d}-seed{11 + i}.png") for i in range(3)]
    assert mu == build_reward(reward)(candidates, [PROMPT] * 3).mu.tolist()
    best = candidates[summary["best_index"]]
    assert np.array_equal(np.asarray(Image.open(out / "best.png")), np.asarray(best))


@pytest.mark.parametrize("arguments, message", [
    ([], "give --pipeline, or a config with a generator section"),
    (["--pipeline", "x/y", "--prompt", " "], "--prompt: empty prompt"),
    (["--set", "generator.kind=shapes", "--lora", "some/dir"], "--lora needs a FLUX generator"),
])
def test_generate_refuses_incomplete_requests(arguments, message, tmp_path, capsys):
    base = ["generate", "--prompt", PROMPT, "--best-of", "2", "--out", str(tmp_path)]
    assert main([*base, *arguments]) == 2
    assert message in capsys.readouterr().err


def test_generate_with_the_shapes_world_and_the_rule_reward(tmp_path):
    out = Path(tmp_path)
    code = main(["generate", "--set", "generator.kind=shapes", "--set", "reward.kind=shapes_rule",
                 "--prompt", PROMPT, "--best-of", "4", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "best_of_n.json").read_text())
    assert summary["generator"] == "shapes-world(relation_error_rate=0.5)"
    assert summary["model_version"] == "shapes_rule"
    assert evaluate(Image.open(out / "best.png"), PROMPT).accuracy == max(
        c["mu"] for c in summary["candidates"])
