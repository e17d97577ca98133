import pytest
import torch

from spatialrl.config import LoraConfig, PolicyModelConfig, SamplingConfig
from spatialrl.flux.loading import load_flux_pipeline
from spatialrl.flux.lora import (
    add_lora,
    load_lora_state_dict,
    lora_checksum,
    lora_state_dict,
    reference_policy,
    save_lora,
)
from spatialrl.flux.sampler import sample, step_distribution
from spatialrl.flux.sde import gaussian_kl

PROMPTS = ["a red circle to the left of a blue square", "a green star below a white cube"]
CFG = SamplingConfig(height=64, width=64, num_steps=4, max_sequence_length=32, noise_level=0.7)
# alpha != rank, so a loader that lost alpha (scaling alpha / rank) would give other outputs.
LORA = LoraConfig(rank=4, alpha=12.0)


def load(tiny_flux_path):
    return load_flux_pipeline(PolicyModelConfig(pretrained=str(tiny_flux_path), dtype="float32"))


def perturbed(state, seed=0):
    """Random adapter weights, standing in for a trained adapter."""
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.2 * torch.randn(t.shape, generator=generator) for name, t in state.items()}


def test_lora_round_trips_through_diffusers_load_lora_weights(tiny_flux_path, tmp_path):
    trained = load(tiny_flux_path)
    add_lora(trained.transformer, LORA)
    load_lora_state_dict(trained.transformer, perturbed(lora_state_dict(trained.transformer)))
    save_lora(trained, tmp_path / "lora")

    fresh = load(tiny_flux_path)
    fresh.load_lora_weights(tmp_path / "lora")
    ours, ours_images = sample(trained, PROMPTS, [3, 4], CFG, output_type="pt")
    theirs, their_images = sample(fresh, PROMPTS, [3, 4], CFG, output_type="pt")
    assert (ours.states - theirs.states).abs().max() < 1e-6
    assert (ours_images - their_images).abs().max() < 1e-6
    base, _ = sample(load(tiny_flux_path), PROMPTS, [3, 4], CFG)
    assert (base.states[:, -1] - ours.states[:, -1]).abs().max() > 1e-2  # the adapter acts


def test_only_the_adapter_is_trainable_and_starts_as_a_no_op(tiny_flux_path):
    pipeline = load(tiny_flux_path)
    before, _ = sample(pipeline, PROMPTS, [0, 1], CFG)
    add_lora(pipeline.transformer, LORA)
    trainable = [n for n, p in pipeline.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    after, _ = sample(pipeline, PROMPTS, [0, 1], CFG)
    assert torch.equal(before.states, after.states)


def test_kl_to_reference_is_exactly_zero_at_init(tiny_flux_path):
    pipeline = load(tiny_flux_path)
    add_lora(pipeline.transformer, LORA)
    trajectory, _ = sample(pipeline, PROMPTS, [0, 1], CFG)
    for step_index in range(CFG.num_steps):
        policy = step_distribution(pipeline.transformer, trajectory, step_index)
        with torch.no_grad(), reference_policy(pipeline.transformer):
            reference = step_distribution(pipeline.transformer, trajectory, step_index)
        assert torch.equal(gaussian_kl(policy.mean, reference.mean, policy.std), torch.zeros(2))


def test_reference_policy_is_the_base_model_after_training(tiny_flux_path):
    base = load(tiny_flux_path)
    base_trajectory, _ = sample(base, PROMPTS, [5, 6], CFG)
    pipeline = load(tiny_flux_path)
    add_lora(pipeline.transformer, LORA)
    load_lora_state_dict(pipeline.transformer, perturbed(lora_state_dict(pipeline.transformer)))
    with reference_policy(pipeline.transformer):
        reference, _ = sample(pipeline, PROMPTS, [5, 6], CFG)
    adapted, _ = sample(pipeline, PROMPTS, [5, 6], CFG)
    assert torch.equal(reference.states, base_trajectory.states)
    assert (adapted.states - base_trajectory.states).abs().max() > 1e-2  # adapters back on
    step = 1
    policy = step_distribution(pipeline.transformer, base_trajectory, step)
    with torch.no_grad(), reference_policy(pipeline.transformer):
        ref = step_distribution(pipeline.transformer, base_trajectory, step)
    assert (gaussian_kl(policy.mean, ref.mean, policy.std) > 0).all()
    adapter = [p for n, p in pipeline.transformer.named_parameters() if "lora_" in n]
    assert all(p.requires_grad for p in adapter)  # the switch restored requires_grad


def test_state_dict_sync_and_checksum(tiny_flux_path):
    learner = load(tiny_flux_path)
    actor = load(tiny_flux_path)
    add_lora(learner.transformer, LORA)
    add_lora(actor.transformer, LORA)
    load_lora_state_dict(learner.transformer, perturbed(lora_state_dict(learner.transformer), 1))
    state = lora_state_dict(learner.transformer)
    assert lora_checksum(state) != lora_checksum(lora_state_dict(actor.transformer))
    load_lora_state_dict(actor.transformer, state)
    assert lora_checksum(lora_state_dict(actor.transformer)) == lora_checksum(state)
    ours, _ = sample(learner, PROMPTS, [1, 2], CFG)
    theirs, _ = sample(actor, PROMPTS, [1, 2], CFG)
    assert torch.equal(ours.states, theirs.states)
    nudged = dict(state)
    name = next(iter(nudged))
    nudged[name] = nudged[name].clone()
    nudged[name].view(-1)[0] += 1e-6
    assert lora_checksum(nudged) != lora_checksum(state)


def test_loading_a_mismatched_state_is_refused(tiny_flux_path):
    pipeline = load(tiny_flux_path)
    add_lora(pipeline.transformer, LORA)
    state = lora_state_dict(pipeline.transformer)
    first = next(iter(state))  # transformer_blocks.0.attn.to_q.lora_A.weight
    missing = {name: tensor for name, tensor in state.items() if name != first}
    with pytest.raises(ValueError, match=r"missing \['transformer_blocks\.0\.attn\.to_q\.lora_A"):
        load_lora_state_dict(pipeline.transformer, missing)
    extra = {**state, "transformer_blocks.9.attn.to_q.lora_A.weight": torch.zeros(4, 32)}
    with pytest.raises(ValueError, match=r"unexpected \['transformer_blocks\.9"):
        load_lora_state_dict(pipeline.transformer, extra)
