"""Kontext (image-conditioned) sampling on the tiny FLUX: FluxKontextPipeline built from its
components is the reference."""

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image
from safetensors.torch import save_file

from spatialrl.config import LoraConfig, PolicyModelConfig, SamplingConfig
from spatialrl.flux.conditioning import encode_condition_images
from spatialrl.flux.loading import load_flux_pipeline
from spatialrl.flux.lora import add_lora, load_lora_state_dict, lora_state_dict, save_lora
from spatialrl.flux.sampler import Trajectory, recompute_log_probs, sample

PROMPTS = ["move the red circle to the left of the blue square", "make the green triangle blue"]


def sampling(**overrides) -> SamplingConfig:
    base = dict(height=64, width=64, num_steps=5, max_sequence_length=32, noise_level=0.7,
                guidance_scale=4.0)
    base.update(overrides)
    return SamplingConfig(**base)


def source_image(seed: int, height: int = 48, width: int = 80) -> Image.Image:
    """A random source image, not square, so rows and columns of the ids are told apart."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


SOURCES = [source_image(0), source_image(1)]


def load(tiny_flux_path):
    return load_flux_pipeline(PolicyModelConfig(pretrained=str(tiny_flux_path), dtype="float32"))


@pytest.fixture(scope="module")
def pipeline(tiny_flux_path):
    return load(tiny_flux_path)


def kontext_reference(pipeline, seeds, cfg: SamplingConfig, output_type: str):
    """FluxKontextPipeline on the same components, at cfg's resolution, the sources kept at
    their own size."""
    kontext = FluxKontextPipeline(**pipeline.components)
    return kontext(
        image=SOURCES,
        prompt=PROMPTS,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        num_inference_steps=cfg.num_steps,
        guidance_scale=cfg.guidance_scale,
        height=cfg.height,
        width=cfg.width,
        max_area=cfg.height * cfg.width,
        max_sequence_length=cfg.max_sequence_length,
        output_type=output_type,
        _auto_resize=False,
    ).images


def sample_edits(pipeline, cfg, seeds, output_type="pt", **kwargs):
    prompts = [PROMPTS[i % 2] for i in range(len(seeds))]
    sources = [SOURCES[i % 2] for i in range(len(seeds))]
    return sample(pipeline, prompts, seeds, cfg, output_type=output_type,
                  condition_images=sources, kontext_resolution=False, **kwargs)


def test_noise_level_zero_reproduces_flux_kontext_pipeline(pipeline):
    cfg = sampling()
    seeds = [7, 8]
    trajectory, images = sample_edits(pipeline, cfg, seeds, output_type="np", noise_level=0.0)
    reference = kontext_reference(pipeline, seeds, cfg, "np")
    assert np.abs(images - reference).max() < 1e-5
    reference_latents = kontext_reference(pipeline, seeds, cfg, "latent")
    assert (trajectory.states[:, -1] - reference_latents).abs().max() < 1e-5
    # 48x80 sources: 24x40 latents, 12x20 tokens, marked by a first id coordinate of 1.
    assert trajectory.condition_latents.shape == (2, 12 * 20, 16)
    assert trajectory.condition_image_ids[:, 0].eq(1).all()
    assert trajectory.condition_image_ids[:, 1:].amax(0).tolist() == [11, 19]
    unconditioned, _ = sample(pipeline, PROMPTS, seeds, cfg, noise_level=0.0)
    assert (unconditioned.states[:, -1] - trajectory.states[:, -1]).abs().max() > 1e-2


class Captured(Exception):
    pass


def pixels_sent_to_the_vae(pipeline, monkeypatch, encode) -> torch.Tensor:
    """What `encode` feeds the VAE; encoding an 800x1328 image with the tiny VAE (whose mid
    block attends over all its pixels) takes minutes on a CPU, so the call is stopped there."""
    seen = []

    def capture(pixels):
        seen.append(pixels)
        raise Captured

    monkeypatch.setattr(pipeline.vae, "encode", capture)
    with pytest.raises(Captured):
        encode()
    monkeypatch.undo()
    return seen[0]


def test_kontext_resolution_is_the_pipelines_auto_resize(pipeline, monkeypatch):
    kontext = FluxKontextPipeline(**pipeline.components)
    theirs = pixels_sent_to_the_vae(pipeline, monkeypatch, lambda: kontext(
        image=SOURCES[0], prompt=PROMPTS[0], height=64, width=64, max_area=64 * 64,
        max_sequence_length=32, num_inference_steps=1))
    ours = pixels_sent_to_the_vae(
        pipeline, monkeypatch, lambda: encode_condition_images(pipeline, SOURCES[:1]))
    assert ours.shape == (1, 3, 800, 1328)  # the preferred resolution nearest 80:48
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("sde_type", ["flow_grpo", "cps"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_recomputed_log_probs_give_ratio_one(pipeline, batch_size, sde_type):
    cfg = sampling(sde_type=sde_type, noise_level=0.7 if sde_type == "flow_grpo" else 0.5)
    trajectory, _ = sample_edits(pipeline, cfg, list(range(batch_size)))
    steps = torch.nonzero(trajectory.sde_mask).flatten().tolist()
    new = recompute_log_probs(pipeline.transformer, trajectory, steps)
    assert (torch.exp(new - trajectory.log_probs[:, steps]) - 1).abs().max() < 1e-5


def test_conditioning_survives_select_concat_and_save(pipeline, tmp_path):
    trajectory, _ = sample_edits(pipeline, sampling(), [3, 4, 5])
    regrouped = Trajectory.concat([trajectory.select([2]), trajectory.select([0, 1])])
    assert torch.equal(regrouped.condition_latents, trajectory.condition_latents[[2, 0, 1]])
    trajectory.save(tmp_path / "trajectory.safetensors")
    loaded = Trajectory.load(tmp_path / "trajectory.safetensors")
    assert torch.equal(loaded.condition_latents, trajectory.condition_latents)
    assert torch.equal(loaded.condition_image_ids, trajectory.condition_image_ids)
    steps = list(range(trajectory.num_steps))
    new = recompute_log_probs(pipeline.transformer, loaded.select([1, 0]), steps)
    assert (torch.exp(new - trajectory.log_probs[[1, 0]]) - 1).abs().max() < 1e-5
    text_to_image, _ = sample(pipeline, PROMPTS, [3, 4], sampling())
    with pytest.raises(ValueError, match="differ in condition_image_ids"):
        Trajectory.concat([trajectory, text_to_image])


def test_a_text_to_image_file_saved_without_conditioning_fields_still_loads(pipeline, tmp_path):
    """Trajectory files written before edits existed have no condition_* tensors."""
    trajectory, _ = sample(pipeline, PROMPTS, [3, 4], sampling())
    tensors, metadata = trajectory.to_tensors()
    del tensors["condition_latents"], tensors["condition_image_ids"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=metadata)
    loaded = Trajectory.load(tmp_path / "old.safetensors")
    assert loaded.condition_latents.shape == (2, 0, trajectory.states.shape[-1])
    steps = list(range(trajectory.num_steps))
    new = recompute_log_probs(pipeline.transformer, loaded, steps)
    assert (torch.exp(new - trajectory.log_probs) - 1).abs().max() < 1e-5
    assert len(Trajectory.concat([loaded, trajectory]).prompts) == 4


def test_lora_loads_into_flux_kontext_pipeline(tiny_flux_path, tmp_path):
    trained = load(tiny_flux_path)
    add_lora(trained.transformer, LoraConfig(rank=4, alpha=12.0))
    generator = torch.Generator().manual_seed(0)
    state = {name: 0.2 * torch.randn(tensor.shape, generator=generator)
             for name, tensor in lora_state_dict(trained.transformer).items()}
    load_lora_state_dict(trained.transformer, state)
    save_lora(trained, tmp_path / "lora")

    base = load(tiny_flux_path)
    cfg, seeds = sampling(), [1, 2]
    before = kontext_reference(base, seeds, cfg, "np")
    FluxKontextPipeline(**base.components).load_lora_weights(tmp_path / "lora")
    theirs = kontext_reference(base, seeds, cfg, "np")
    _, ours = sample_edits(trained, cfg, seeds, output_type="np", noise_level=0.0)
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.abs(theirs - before).max() > 1e-2  # the adapter acts
