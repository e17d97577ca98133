import argparse
import hashlib

import pytest
import torch
from diffusers import FluxPipeline

from spatialrl.commands import tiny_models
from spatialrl.tiny.flux import VOCABULARY_WORDS, write_tiny_flux


def folder_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_command(argv) -> int:
    parser = argparse.ArgumentParser()
    tiny_models.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def tiny_flux(tiny_flux_path):
    return FluxPipeline.from_pretrained(tiny_flux_path)


def test_tiny_flux_is_a_flux_dev_shaped_pipeline(tiny_flux):
    transformer = tiny_flux.transformer.config
    assert transformer.guidance_embeds
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert transformer.joint_attention_dim == tiny_flux.text_encoder_2.config.d_model
    assert transformer.pooled_projection_dim == tiny_flux.text_encoder.config.hidden_size
    assert transformer.in_channels == 4 * tiny_flux.vae.config.latent_channels
    scheduler = tiny_flux.scheduler.config
    assert scheduler.use_dynamic_shifting and scheduler.shift == 3.0
    assert (scheduler.base_shift, scheduler.max_shift) == (0.5, 1.15)
    assert tiny_flux.vae.config.shift_factor == 0.1159


def test_same_seed_writes_identical_files_and_another_seed_does_not(tiny_flux_path, tmp_path):
    again = write_tiny_flux(tmp_path / "again", seed=0)
    other = write_tiny_flux(tmp_path / "other", seed=1)
    assert folder_digest(again) == folder_digest(tiny_flux_path)
    assert folder_digest(other) != folder_digest(tiny_flux_path)


def test_tokenizers_know_the_shapes_world_words_and_survive_unknown_text(tiny_flux):
    clip, t5 = tiny_flux.tokenizer, tiny_flux.tokenizer_2
    for word in VOCABULARY_WORDS:
        assert len(clip(word, add_special_tokens=False).input_ids) == 1, word
        assert len(t5(word, add_special_tokens=False).input_ids) == 1, word
    prompt = "A Red circle to the left of a blue square above the mug"
    assert clip.decode(clip(prompt, add_special_tokens=False).input_ids) == prompt.lower()
    unknown = "a zebra \u00e9clair"
    assert clip.unk_token_id not in clip(unknown).input_ids[1:-1]  # byte-level pieces instead
    t5_ids = t5(unknown).input_ids
    assert t5.unk_token_id in t5_ids and t5_ids[-1] == t5.eos_token_id
    assert clip.model_max_length == 77 and t5.model_max_length == 512


def test_64px_sampling_is_seeded_and_follows_the_prompt(tiny_flux):
    # Speed lives in bench/perf.py --scale tiny: a timed test fails whenever cores are shared.
    def sample(prompt: str, seed: int):
        return tiny_flux(
            [prompt] * 2,
            generator=torch.Generator().manual_seed(seed),
            height=64,
            width=64,
            num_inference_steps=4,
            max_sequence_length=32,
            output_type="np",
        ).images

    images = sample("a red circle to the left of a blue square", seed=0)
    assert images.shape == (2, 64, 64, 3) and images.std() > 0.01
    assert (images == sample("a red circle to the left of a blue square", seed=0)).all()
    assert not (images == sample("a red circle to the left of a blue square", seed=1)).all()
    assert not (images == sample("a green star above a pink diamond", seed=0)).all()


def test_command_writes_then_skips_unless_forced(tmp_path):
    assert run_command(["tiny-models", str(tmp_path)]) == 0
    index = tmp_path / "flux" / "model_index.json"
    written = index.stat().st_mtime_ns
    assert FluxPipeline.from_pretrained(tmp_path / "flux").transformer is not None
    assert run_command(["tiny-models", str(tmp_path)]) == 0
    assert index.stat().st_mtime_ns == written
    assert run_command(["tiny-models", str(tmp_path), "--force"]) == 0
    assert index.stat().st_mtime_ns != written


def test_incomplete_folder_is_rebuilt(tmp_path):
    folder = write_tiny_flux(tmp_path / "flux")
    for path in (folder / "vae").iterdir():
        path.unlink()
    (folder / "vae").rmdir()
    assert not tiny_models.is_complete(folder)
    tiny_models.write_tiny_models(tmp_path)
    assert tiny_models.is_complete(folder) and (folder / "vae" / "config.json").is_file()
