"""`spatialrl pretrain guidance`: caption dropout teaches the generator the unconditional
velocity, and guidance distillation puts classifier-free guidance into FLUX's guidance
embedding, as FLUX.1-dev was made."""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from spatialrl.cli import main
from spatialrl.config import GeneratorPretraining, GuidanceDistillation, PolicyModelConfig
from spatialrl.flux.loading import load_flux_pipeline
from spatialrl.flux.pretraining import (
    TEACHER_DIR,
    _dropped_captions,
    _noised,
    _velocity,
    distil_guidance,
    guidance_distillation_loss,
    pretrain_generator,
)

SMALL = dict(num_renders=16, batch_size=4, lr_decay_steps=0, warmup_steps=1,
             checkpoint_every=1, log_every=1)
PROMPTS = ["a red circle to the left of a blue square", "a green triangle above a red square"]


def transformer_state(folder):
    pipeline = FluxPipeline.from_pretrained(folder, use_safetensors=True)
    return pipeline.transformer.state_dict()


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    root = tmp_path_factory.mktemp("generator")
    return pretrain_generator(root / "out", root / "work", GeneratorPretraining(
        steps=1, vae_steps=1, vae_batch_size=4, **SMALL))


@pytest.fixture(scope="module")
def straight_distillation(generator, tmp_path_factory):
    root = tmp_path_factory.mktemp("distilled")
    settings = GuidanceDistillation(teacher_steps=2, steps=2, save_dtype="float32", **SMALL)
    return distil_guidance(generator, root / "out", root / "work", settings)


def test_caption_dropout_empties_a_fraction_of_prompts_and_without_it_draws_nothing():
    rng = np.random.default_rng(0)
    prompts = [f"prompt {i}" for i in range(2000)]
    dropped = _dropped_captions(prompts, GuidanceDistillation(caption_dropout=0.1), rng)
    empty = sum(prompt == "" for prompt in dropped)
    assert 140 < empty < 260  # 10% of 2000, binomial sd 13
    assert all(kept in ("", original) for kept, original in zip(dropped, prompts, strict=True))
    before = rng.bit_generator.state
    assert _dropped_captions(prompts, GuidanceDistillation(caption_dropout=0.0), rng) == prompts
    assert rng.bit_generator.state == before  # builds without dropout stay bit for bit


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_the_student_learns_the_teachers_guided_velocity(generator, guidance):
    """With the student equal to the teacher, the loss is |v_c - (v_u + g (v_c - v_u))|^2
    = (g - 1)^2 |v_c - v_u|^2: zero at g = 1, and the teacher's guided velocity otherwise."""
    pipeline = FluxPipeline.from_pretrained(generator, torch_dtype=torch.float32)
    settings = GuidanceDistillation(guidance_range=(guidance, guidance))
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    loss = guidance_distillation_loss(pipeline, latents, PROMPTS, settings,
                                      torch.Generator().manual_seed(2), teacher=pipeline)
    sigmas, _, noisy = _noised(latents, torch.Generator().manual_seed(2))
    g = torch.full((2,), guidance)
    with torch.no_grad():
        conditional = _velocity(pipeline, noisy, sigmas, g, PROMPTS, settings, None)
        unconditional = _velocity(pipeline, noisy, sigmas, g, ["", ""], settings, None)
    expected = (guidance - 1) ** 2 * (conditional - unconditional).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
    if guidance > 1:
        assert loss.item() > 0


def test_distillation_saves_a_cfg_teacher_and_a_one_pass_student(generator,
                                                                  straight_distillation):
    teacher_dir = straight_distillation.parent / "work" / TEACHER_DIR
    base, teacher = transformer_state(generator), transformer_state(teacher_dir)
    student = transformer_state(straight_distillation)
    assert any(not torch.equal(base[n].float(), teacher[n]) for n in base)
    assert any(not torch.equal(teacher[n], student[n]) for n in teacher)
    # The teacher samples with true classifier-free guidance, the student with the project's
    # loader and the guidance embedding alone.
    cfg_image = FluxPipeline.from_pretrained(teacher_dir)(
        PROMPTS[0], negative_prompt="", true_cfg_scale=3.0, height=64, width=64,
        num_inference_steps=2, max_sequence_length=40,
        generator=torch.Generator().manual_seed(0)).images[0]
    student_pipeline = load_flux_pipeline(PolicyModelConfig(
        pretrained=str(straight_distillation), dtype="float32"))
    image = student_pipeline(PROMPTS[0], height=64, width=64, num_inference_steps=2,
                             guidance_scale=3.5, max_sequence_length=40,
                             generator=torch.Generator().manual_seed(0)).images[0]
    assert cfg_image.size == image.size == (64, 64)


def test_an_interrupted_distillation_resumes_to_the_same_weights(generator,
                                                                 straight_distillation,
                                                                 tmp_path):
    stopped = GuidanceDistillation(teacher_steps=2, steps=1, save_dtype="float32", **SMALL)
    distil_guidance(generator, tmp_path / "out", tmp_path / "work", stopped)
    resumed = distil_guidance(generator, tmp_path / "out", tmp_path / "work",
                              GuidanceDistillation(teacher_steps=2, steps=2,
                                                   save_dtype="float32", **SMALL))
    expected, got = transformer_state(straight_distillation), transformer_state(resumed)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    with pytest.raises(ValueError, match="caption_dropout"):
        distil_guidance(generator, tmp_path / "out", tmp_path / "work", GuidanceDistillation(
            teacher_steps=2, steps=2, caption_dropout=0.5, **SMALL))


def test_cli_distils_with_its_flags(generator, tmp_path):
    code = main(["pretrain", "guidance", "--generator", str(generator), "--out",
                 str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--teacher-steps", "1",
                 "--steps", "1", "--num-renders", "8", "--batch-size", "2", "--threads", "1"])
    assert code == 0
    settings = json.loads((tmp_path / "work" / "settings.json").read_text())
    assert (settings["teacher_steps"], settings["steps"]) == (1, 1)
    assert settings["caption_dropout"] == GuidanceDistillation().caption_dropout
    assert (tmp_path / "out" / "model_index.json").is_file()
