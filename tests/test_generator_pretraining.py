"""`spatialrl pretrain generator`: the pipeline's own classes trained on shapes renders,
resumable bit for bit, loadable by FluxPipeline and the project's loader."""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from spatialrl.cli import main
from spatialrl.config import GeneratorPretraining, PolicyModelConfig
from spatialrl.data.shapes import HELD_OUT_COMBOS
from spatialrl.flux.loading import load_flux_pipeline
from spatialrl.flux.pretraining import PROMPTS_FILE, lr_factor, pretrain_generator

SMALL = dict(num_renders=32, vae_steps=2, vae_batch_size=4, batch_size=4, lr_decay_steps=0,
             checkpoint_every=2, log_every=2)


def state_of(pipeline):
    return {f"{name}.{key}": value
            for name in ("transformer", "text_encoder", "text_encoder_2", "vae")
            for key, value in getattr(pipeline, name).state_dict().items()}


@pytest.fixture(scope="module")
def straight_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    return pretrain_generator(root / "out", root / "work", GeneratorPretraining(steps=4, **SMALL))


def test_build_loads_through_flux_pipeline_and_the_project_loader(straight_build):
    pipeline = FluxPipeline.from_pretrained(straight_build, use_safetensors=True)
    loaded = load_flux_pipeline(PolicyModelConfig(pretrained=str(straight_build),
                                                  dtype="float32"))
    assert pipeline.vae_scale_factor == 4  # 64 px images, 16 x 16 latents, 64 tokens
    saved = load_file(next((straight_build / "transformer").glob("*.safetensors")))
    assert {tensor.dtype for tensor in saved.values()} == {torch.float16}  # half the size
    assert loaded.transformer.dtype == torch.float32
    # The VAE's normalisation was measured on the renders, not left at FLUX.1-dev's values.
    assert loaded.vae.config.shift_factor != 0.1159
    assert loaded.vae.config.scaling_factor != 0.3611
    image = loaded("a red circle to the left of a blue square", height=64, width=64,
                   num_inference_steps=2, max_sequence_length=40,
                   generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_training_changes_every_trained_part(straight_build, tmp_path):
    untrained = pretrain_generator(tmp_path / "out", tmp_path / "work",
                                   GeneratorPretraining(steps=0, **SMALL))
    before = state_of(FluxPipeline.from_pretrained(untrained))
    after = state_of(FluxPipeline.from_pretrained(straight_build))
    for part in ("transformer", "text_encoder.", "text_encoder_2"):
        names = [name for name in after if name.startswith(part)]
        assert any(not torch.equal(before[n], after[n]) for n in names), part


def test_an_interrupted_build_resumes_to_the_same_weights(straight_build, tmp_path):
    pretrain_generator(tmp_path / "out", tmp_path / "work", GeneratorPretraining(steps=2, **SMALL))
    resumed = pretrain_generator(tmp_path / "out", tmp_path / "work",
                                 GeneratorPretraining(steps=4, **SMALL))
    expected = state_of(FluxPipeline.from_pretrained(straight_build))
    got = state_of(FluxPipeline.from_pretrained(resumed))
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    losses = [json.loads(line)["step"]
              for line in (tmp_path / "work" / "loss.jsonl").read_text().splitlines()]
    assert losses == [2, 4]  # steps 1-2 were not trained twice


def test_renders_are_train_split_only(straight_build):
    prompts = json.loads((straight_build.parent / "work" / PROMPTS_FILE).read_text())
    assert len(prompts) == SMALL["num_renders"]
    for colour, shape in HELD_OUT_COMBOS:
        assert not any(f"{colour} {shape}" in prompt for prompt in prompts)


def test_a_work_folder_refuses_settings_that_change_what_was_trained(tmp_path):
    pretrain_generator(tmp_path / "out", tmp_path / "work", GeneratorPretraining(steps=0, **SMALL))
    with pytest.raises(ValueError, match="lr"):
        pretrain_generator(tmp_path / "out", tmp_path / "work",
                           GeneratorPretraining(steps=0, **SMALL | {"lr": 0.5}))
    # More steps, or another saved dtype, go on with the same build.
    pretrain_generator(tmp_path / "out", tmp_path / "work",
                       GeneratorPretraining(steps=1, save_dtype="float32", **SMALL))
    saved = load_file(next((tmp_path / "out" / "transformer").glob("*.safetensors")))
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}


def test_cli_builds_with_its_flags(tmp_path):
    code = main(["pretrain", "generator", "--out", str(tmp_path / "out"), "--work",
                 str(tmp_path / "work"), "--steps", "1", "--num-renders", "8", "--vae-steps",
                 "1", "--vae-batch-size", "2", "--batch-size", "2", "--threads", "1"])
    assert code == 0
    settings = json.loads((tmp_path / "work" / "settings.json").read_text())
    assert (settings["steps"], settings["num_renders"]) == (1, 8)
    assert np.isclose(settings["lr"], GeneratorPretraining().lr)


def test_the_schedule_warms_up_holds_then_decays_to_zero():
    settings = GeneratorPretraining(steps=1000, warmup_steps=100, lr_decay_steps=400)
    factors = [lr_factor(step, settings) for step in (0, 99, 300, 599, 800, 999)]
    assert factors == pytest.approx([0.01, 1.0, 1.0, 1.0, 0.5, 1 / 400])
    assert lr_factor(999, GeneratorPretraining(steps=1000, lr_decay_steps=0)) == 1.0


def test_the_text_encoders_size_is_a_build_setting(tmp_path):
    built = pretrain_generator(tmp_path / "out", tmp_path / "work", GeneratorPretraining(
        steps=0, text_hidden_size=48, text_layers=3, **SMALL))
    pipeline = FluxPipeline.from_pretrained(built)
    assert pipeline.text_encoder.config.hidden_size == 48
    assert pipeline.text_encoder.config.num_hidden_layers == 3
    assert (pipeline.text_encoder_2.config.d_model, pipeline.text_encoder_2.config.num_layers) == (
        48, 3)
    assert pipeline.transformer.config.joint_attention_dim == 48
    assert pipeline.transformer.config.pooled_projection_dim == 48
