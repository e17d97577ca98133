"""sample_groups encodes each prompt once per call, however many batches its group spans, and
a cache kept across calls makes a recurring prompt cost no encoding at all; the trajectories
do not change."""

import torch

from spatialrl.config import PolicyModelConfig, SamplingConfig
from spatialrl.flux.encoding import PromptEmbeddingCache
from spatialrl.flux.loading import load_flux_pipeline
from spatialrl.rollout import sample_groups


def test_a_group_over_several_batches_encodes_its_prompt_once(tiny_flux_path):
    pipeline = load_flux_pipeline(PolicyModelConfig(
        pretrained=str(tiny_flux_path), dtype="float32", gradient_checkpointing=False))
    encoded = []
    encode_prompt = pipeline.encode_prompt

    def counting_encode_prompt(prompt, **kwargs):
        encoded.extend(prompt)
        return encode_prompt(prompt=prompt, **kwargs)

    pipeline.encode_prompt = counting_encode_prompt
    cfg = SamplingConfig(height=32, width=32, num_steps=2, batch_size=2, max_sequence_length=16)
    prompts = ["a red circle left of a blue square", "a mug"]

    def run(cache=None):
        return sample_groups(pipeline, prompts, [0, 1], iteration=0, version=0, run_seed=0,
                             group_size=4, cfg=cfg, prompt_cache=cache)

    first = run()  # 8 samples in 4 batches of 2
    assert sorted(encoded) == sorted(prompts)

    cache = PromptEmbeddingCache()
    run(cache)
    encoded.clear()
    again = run(cache)
    assert encoded == []
    for old, new in zip(first, again, strict=True):
        assert torch.equal(old.trajectory.states, new.trajectory.states)
        assert torch.equal(old.trajectory.log_probs.nan_to_num(),
                           new.trajectory.log_probs.nan_to_num())
