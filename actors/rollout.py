"""Rollout actors: a policy copy that samples GRPO groups with the core's sample_groups.

Results cross process boundaries as plain tensors, strings and uint8 image arrays (no pickled
classes); unpack_group turns one back into the core's RolloutGroup on the driver.
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch
from PIL import Image

from spatialrl.config import TrainConfig
from spatialrl.evaluation import sample_eval_images
from spatialrl.flux.loading import load_flux_pipeline, resolve_device
from spatialrl.flux.lora import add_lora, load_lora_state_dict, lora_checksum, lora_state_dict
from spatialrl.flux.sampler import Trajectory
from spatialrl.rollout import RolloutGroup, sample_groups
from spatialrl.weight_sync import broadcast_tensors, open_group, weights_fingerprint


def images_to_array(images: list[Image.Image]) -> np.ndarray:
    """[N, H, W, 3] uint8: how images cross process boundaries."""
    return np.stack([np.asarray(image.convert("RGB")) for image in images])


def pack_group(group: RolloutGroup, rollout_seconds: float = 0.0) -> dict:
    """`rollout_seconds`: this group's share of the actor time spent sampling it."""
    tensors, metadata = group.trajectory.to("cpu").to_tensors()
    return {
        "prompt": group.prompt,
        "group_id": group.group_id,
        "iteration": group.iteration,
        "version": group.version,
        "tensors": tensors,
        "metadata": metadata,
        "images": images_to_array(group.images),
        "rollout_seconds": rollout_seconds,
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
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.pipeline = load_flux_pipeline(cfg.model, self.device)
        if cfg.lora.enabled:
            torch.manual_seed(cfg.seed)  # the same initial adapter as the learners
            add_lora(self.pipeline.transformer, cfg.lora)
        self._version = 0
        self.weight_group = None

    def rollout(self, prompts: list[str], group_ids: list[int], iteration: int) -> list[dict]:
        """group_size samples per prompt, seeded by (run seed, iteration, prompt, index) only;
        packed with pack_group and tagged with the version that sampled them."""
        cfg = self.cfg
        start = time.perf_counter()
        groups = sample_groups(
            self.pipeline, prompts, group_ids, iteration, self._version, cfg.seed,
            cfg.grpo.group_size, cfg.sampling,
        )
        share = (time.perf_counter() - start) / len(groups)
        return [pack_group(group, share) for group in groups]

    def evaluate(self, prompts: list[str]) -> dict:
        """Deterministic ODE samples of the evaluation prompts as a uint8 array, with the
        version that made them (calls run in order: weights sent before this call are in
        place)."""
        images = sample_eval_images(self.pipeline, prompts, self.cfg.sampling, self.cfg.seed)
        return {"version": self._version, "images": images_to_array(images)}

    def load_weights(self, version: int, state: dict[str, torch.Tensor]) -> dict:
        """Sample with `state` from now on. Returns the checksum of the adapter now in use, for
        the caller to compare with the published one, and the seconds the load took. A state
        that does not fit the adapter raises and leaves the previous weights and version."""
        start = time.perf_counter()
        transformer = self.pipeline.transformer
        previous = lora_state_dict(transformer)
        try:
            load_lora_state_dict(transformer, state)
        except Exception:
            load_lora_state_dict(transformer, previous)  # a failed load may have copied some
            raise
        self._version = version
        checksum = lora_checksum(lora_state_dict(transformer))
        return {"checksum": checksum, "seconds": time.perf_counter() - start}

    def join_weight_group(self, address: str, port: int, rank: int, world_size: int) -> None:
        """Join learner rank 0's full-weight broadcast group (full fine-tuning only)."""
        self.weight_group = open_group(address, port, rank, world_size, self.device,
                                       self.cfg.cluster.weight_sync_timeout_s)

    def receive_full_weights(self, version: int) -> dict:
        """Take part in learner rank 0's broadcast of version `version`; answers like
        load_weights, with the fingerprint of the weights now in use."""
        start = time.perf_counter()
        named = list(self.pipeline.transformer.named_parameters())
        broadcast_tensors(self.weight_group, [p.data for _, p in named], is_source=False)
        self._version = version
        return {"checksum": weights_fingerprint(iter(named)),
                "seconds": time.perf_counter() - start}

    def version(self) -> int:
        return self._version
