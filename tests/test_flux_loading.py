import importlib.util

import pytest
import torch

from spatialrl.config import PolicyModelConfig, SamplingConfig
from spatialrl.flux.encoding import PromptEmbeddingCache, encode_prompts
from spatialrl.flux.loading import load_flux_pipeline
from spatialrl.flux.sampler import recompute_log_probs, sample


def config(path, **overrides) -> PolicyModelConfig:
    return PolicyModelConfig(pretrained=str(path), **overrides)


def test_loads_in_the_configured_dtype_with_frozen_encoders(tiny_flux_path):
    pipeline = load_flux_pipeline(config(tiny_flux_path, dtype="bfloat16"))
    encoders = (pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2)
    for module in (pipeline.transformer, *encoders):
        assert module.dtype == torch.bfloat16
        assert not module.training
    for frozen in encoders:
        assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in pipeline.transformer.parameters())  # full fine-tuning
    assert pipeline.transformer.is_gradient_checkpointing


def test_bfloat16_rollouts_keep_float32_states_and_log_probs(tiny_flux_path):
    pipeline = load_flux_pipeline(config(tiny_flux_path, dtype="bfloat16"))
    cfg = SamplingConfig(height=64, width=64, num_steps=3, max_sequence_length=16)
    trajectory, _ = sample(pipeline, ["a red circle above a blue square"] * 2, [0, 1], cfg)
    assert trajectory.states.dtype == trajectory.log_probs.dtype == torch.float32
    assert trajectory.prompt_embeds.dtype == torch.bfloat16
    new = recompute_log_probs(pipeline.transformer, trajectory, [0, 1, 2])
    assert torch.isfinite(new).all()
    assert (new - trajectory.log_probs).abs().max() < 1e-5  # same batch, same kernels


def test_missing_local_folder_is_a_file_not_found_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-flux"
    with pytest.raises(FileNotFoundError, match="no-such-flux"):
        load_flux_pipeline(config(missing))


def test_unreachable_hub_id_is_a_file_not_found_error_naming_it():
    with pytest.raises(FileNotFoundError, match="nobody/no-such-flux"):
        load_flux_pipeline(config("nobody/no-such-flux"))


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers installed")
def test_xformers_backend_without_xformers_is_a_clear_error(tiny_flux_path):
    with pytest.raises(ImportError, match="attention_backend='xformers'.*xformers"):
        load_flux_pipeline(config(tiny_flux_path, attention_backend="xformers"))


def test_native_attention_backend_is_selected(tiny_flux_path):
    pipeline = load_flux_pipeline(config(tiny_flux_path, dtype="float32"))
    processors = [m.processor for m in pipeline.transformer.modules() if hasattr(m, "processor")]
    assert processors and all(p._attention_backend.value == "native" for p in processors)


def test_prompt_embeddings_equal_the_pipelines_and_repeats_are_encoded_once(tiny_flux_path):
    pipeline = load_flux_pipeline(config(tiny_flux_path, dtype="float32"))
    t5_calls = []
    pipeline.text_encoder_2.register_forward_hook(lambda *args: t5_calls.append(1))
    prompts = ["a red circle to the left of a blue square", "a green star above a cube"]
    cache = PromptEmbeddingCache()
    grouped = encode_prompts(pipeline, [prompts[0]] * 3 + [prompts[1]] * 3, 24, cache)
    assert len(t5_calls) == 2 and len(cache) == 2
    encode_prompts(pipeline, prompts, 24, cache)
    assert len(t5_calls) == 2  # served from the cache

    prompt_embeds, pooled, text_ids = pipeline.encode_prompt(prompts, None, max_sequence_length=24)
    assert grouped.prompt_embeds.shape == (6, 24, prompt_embeds.shape[-1])
    assert torch.allclose(grouped.prompt_embeds[[0, 3]], prompt_embeds, atol=1e-6)
    assert torch.allclose(grouped.pooled_prompt_embeds[[2, 5]], pooled, atol=1e-6)
    assert torch.equal(grouped.text_ids, text_ids)
    assert not torch.allclose(grouped.prompt_embeds[0], grouped.prompt_embeds[3])


def test_cache_evicts_the_least_recently_used_prompt(tiny_flux_path):
    pipeline = load_flux_pipeline(config(tiny_flux_path, dtype="float32"))
    cache = PromptEmbeddingCache(max_entries=2)
    encode_prompts(pipeline, ["a red circle", "a blue square"], 8, cache)
    encode_prompts(pipeline, ["a red circle"], 8, cache)  # now the most recent
    encode_prompts(pipeline, ["a green star"], 8, cache)
    assert cache.get(("a blue square", 8)) is None
    assert cache.get(("a red circle", 8)) is not None
