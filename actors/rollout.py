"""Rollout actors: a policy copy that samples GRPO groups with the core's sample_groups and
has them scored by the reward deployment itself, so that images never pass through the driver.

Results cross process boundaries as plain tensors, strings and numbers (no pickled classes).
The driver gets a summary of each group (scores, seeds, version) and a reference to the
trajectories, which the learners fetch from here. Evaluation images do come back to the
driver (it logs them and runs the rule evaluator on them).
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch
from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle

from spatialrl.actors.reward import APP_NAME, GroupScore, score_on_deployment
from spatialrl.broadcast import broadcast_tensors, open_group, weights_fingerprint
from spatialrl.config import TrainConfig
from spatialrl.flux.loading import load_flux_pipeline, resolve_device
from spatialrl.flux.lora import (
    add_initial_adapter,
    load_lora_state_dict,
    lora_checksum,
    lora_state_dict,
)
from spatialrl.flux.sampler import Trajectory
from spatialrl.policy_evaluation import sample_eval_images
from spatialrl.prompts import PromptSource, eval_tasks
from spatialrl.rollout import RolloutGroup, sample_groups
from spatialrl.train_batch import ScoredGroup


def images_to_array(images: list[Image.Image]) -> np.ndarray:
    """[N, H, W, 3] uint8: how images cross process boundaries."""
    return np.stack([np.asarray(image.convert("RGB")) for image in images])


def reward_request(group: RolloutGroup) -> tuple:
    """A group as the reward deployment takes it: (prompts, images), and for edits the source
    images too."""
    prompts, images = [group.prompt] * len(group.images), images_to_array(group.images)
    if group.source is None:
        return prompts, images
    return prompts, images, images_to_array([group.source] * len(group.images))


def group_summary(group: RolloutGroup, score: GroupScore) -> dict:
    """What the driver needs of a group: no images, no trajectories."""
    return {
        "prompt": group.prompt,
        "group_id": group.group_id,
        "iteration": group.iteration,
        "version": group.version,
        "seeds": group.trajectory.seeds.tolist(),
        "mu": score.mu,
        "sigma": score.sigma,
        "reward_batch_sizes": score.batch_sizes,
        "reward_retries": score.retries,
    }


def packed(trajectory: Trajectory) -> dict:
    """A rollout call's trajectories as the object it leaves in this node's object store:
    plain tensors and string metadata, no pickled code (learners read it by reference)."""
    tensors, metadata = trajectory.to("cpu").to_tensors()
    return {"tensors": tensors, "metadata": metadata}


def unpack_group(summary: dict, source: ray.ObjectRef, first_row: int) -> ScoredGroup:
    """The driver's view of a group: its scores, and where its trajectories are (rows
    [first_row, first_row + G) of the packed trajectories behind `source`)."""
    return ScoredGroup(summary["prompt"], summary["group_id"], summary["iteration"],
                       summary["version"], summary["seeds"], summary["mu"], summary["sigma"],
                       source, first_row)


@ray.remote
class RolloutActor:
    """One policy copy (full pipeline + adapter) at a known policy version."""

    def __init__(self, cfg: TrainConfig, reward_app: str = APP_NAME):
        self.cfg = cfg
        self.reward_app = reward_app
        self.device = resolve_device(cfg.device)
        self.pipeline = load_flux_pipeline(cfg.model, self.device)
        add_initial_adapter(self.pipeline.transformer, cfg)
        # Edits: the source images, looked up by group id here (the driver sends ids only).
        self.tasks = PromptSource.for_training(cfg.prompts, cfg.seed)
        self.eval_sources = eval_tasks(cfg.prompts, cfg.seed).condition_images
        self._version = 0
        self.weight_group = None
        self.reward_handle: DeploymentHandle | None = None

    @ray.method(num_returns=2)
    def rollout(self, prompts: list[str], group_ids: list[int], iteration: int
                ) -> tuple[dict, dict]:
        """group_size samples per prompt, seeded by (run seed, iteration, prompt, index) only,
        tagged with the version that sampled them and scored by the reward deployment (all
        groups sent at once, so that they batch with each other and other actors' groups).

        Two objects: the summary for the driver (group_summary per group, the version, the
        sampling and scoring seconds) and the groups' trajectories, packed, in group order,
        which stay in this node's object store until the learners fetch them."""
        cfg = self.cfg
        start = time.perf_counter()
        groups = sample_groups(
            self.pipeline, prompts, group_ids, iteration, self._version, cfg.seed,
            cfg.grpo.group_size, cfg.sampling, sources=self.tasks.condition_images(group_ids),
        )
        sampled = time.perf_counter()
        scores = score_on_deployment(self._reward(), [reward_request(g) for g in groups])
        summary = {"version": self._version, "rollout_seconds": sampled - start,
                   "reward_seconds": time.perf_counter() - sampled,
                   "groups": [group_summary(g, s) for g, s in zip(groups, scores, strict=True)]}
        return summary, packed(Trajectory.concat([g.trajectory for g in groups]))

    def evaluate(self, prompts: list[str]) -> dict:
        """Deterministic ODE samples of the evaluation prompts as a uint8 array, scored, with
        the version that made them (calls run in order: weights sent before this call are in
        place)."""
        sources = self.eval_sources
        pixels = images_to_array(
            sample_eval_images(self.pipeline, prompts, self.cfg.sampling, self.cfg.seed, sources))
        # Sources one by one: held-out sources may differ in size.
        request = (prompts, pixels) if sources is None else (
            prompts, pixels, [np.asarray(s.convert("RGB")) for s in sources])
        (score,) = score_on_deployment(self._reward(), [request])
        return {"version": self._version, "images": pixels, "mu": score.mu, "sigma": score.sigma}

    def _reward(self) -> DeploymentHandle:
        """The reward application's handle, looked up once it is needed (the trainer starts
        the application after the actors)."""
        if self.reward_handle is None:
            self.reward_handle = serve.get_app_handle(self.reward_app)
        return self.reward_handle

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
