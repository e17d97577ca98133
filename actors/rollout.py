"""Rollout actors: a policy copy that samples GRPO groups with the core's sample_groups.

Results cross process boundaries as plain tensors, strings and uint8 image arrays (no pickled
classes); unpack_group turns one back into the core's RolloutGroup on the driver.
"""

from __future__ import annotations

import numpy as np
import ray
import torch
from PIL import Image

from spatialrl.config import TrainConfig
from spatialrl.flux.loading import load_flux_pipeline
from spatialrl.flux.lora import add_lora, load_lora_state_dict, lora_checksum, lora_state_dict
from spatialrl.flux.sampler import Trajectory
from spatialrl.inprocess import resolve_device
from spatialrl.rollout import RolloutGroup, sample_groups


def pack_group(group: RolloutGroup) -> dict:
    tensors, metadata = group.trajectory.to("cpu").to_tensors()
    return {
        "prompt": group.prompt,
        "group_id": group.group_id,
        "iteration": group.iteration,
        "version": group.version,
        "tensors": tensors,
        "metadata": metadata,
        "images": np.stack([np.asarray(image.convert("RGB")) for image in group.images]),
    }


def unpack_group(packed: dict) -> RolloutGroup:
    return RolloutGroup(
        prompt=packed["prompt"],
        group_id=packed["group_id"],
        iteration=packed["iteration"],
        version=packed["version"],
        trajectory=Trajectory.from_tensors(packed["tensors"], packed["metadata"]),
        images=[Image.fromarray(image) for image in packed["images"]],
    )


@ray.remote
class RolloutActor:
    """One policy copy (full pipeline + adapter) at a known policy version."""

    def __init__(self, cfg: TrainConfig):
        if not cfg.lora.enabled:
            raise NotImplementedError(
                "rollout actors take LoRA weights; full-weight broadcast is not built yet"
            )
        self.cfg = cfg
        self.pipeline = load_flux_pipeline(cfg.model, resolve_device(cfg.device))
        torch.manual_seed(cfg.seed)  # the same initial adapter as the learners
        add_lora(self.pipeline.transformer, cfg.lora)
        self._version = 0

    def rollout(self, prompts: list[str], group_ids: list[int], iteration: int) -> list[dict]:
        """group_size samples per prompt, seeded by (run seed, iteration, prompt, index) only;
        packed with pack_group and tagged with the version that sampled them."""
        cfg = self.cfg
        groups = sample_groups(
            self.pipeline, prompts, group_ids, iteration, self._version, cfg.seed,
            cfg.grpo.group_size, cfg.sampling,
        )
        return [pack_group(group) for group in groups]

    def load_weights(self, version: int, state: dict[str, torch.Tensor]) -> str:
        """Sample with `state` from now on; returns the checksum of the adapter now in use, for
        the caller to compare with the published one. A state that does not fit the adapter
        raises and leaves the previous weights and version in place."""
        transformer = self.pipeline.transformer
        previous = lora_state_dict(transformer)
        try:
            load_lora_state_dict(transformer, state)
        except Exception:
            load_lora_state_dict(transformer, previous)  # a failed load may have copied some
            raise
        self._version = version
        return lora_checksum(lora_state_dict(transformer))

    def version(self) -> int:
        return self._version
