"""The training loop's roles in one process, without Ray (spatialrl.loop is the loop).

The policy samples and learns on the same weights, so there is nothing to broadcast and every
rollout is on-policy (max_staleness 0). It trains on a single GPU machine where Ray is not
installed. output_dir may be a local path or a URI, as for the Ray backend; there is no
resume (the optimiser state is not checkpointed here).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from spatialrl import storage
from spatialrl.config import ConfigError, TrainConfig
from spatialrl.flux.loading import load_flux_pipeline, resolve_device
from spatialrl.flux.lora import add_initial_adapter, save_lora
from spatialrl.grpo.update import TorchOptimization, grpo_update
from spatialrl.loop import IterationRollouts, TrainingLoop
from spatialrl.policy_evaluation import sample_eval_images
from spatialrl.prompts import PromptSource, eval_tasks
from spatialrl.reward_functions import RewardFn, apply_reward, build_reward
from spatialrl.rollout import sample_groups
from spatialrl.run_state import prepare_output_dir
from spatialrl.tracking import Tracker
from spatialrl.train_batch import TrainBatch, gather_trajectory, score_groups


class LocalLearner:
    """The pipeline's own transformer (with its adapter) and a torch optimiser."""

    min_update_samples = 1

    def __init__(self, cfg: TrainConfig, pipeline, device: str):
        if not cfg.lora.enabled:
            raise ConfigError("lora.enabled: false (full fine-tuning) needs --backend ray; the "
                              "in-process loop trains and checkpoints a LoRA")
        self.cfg, self.pipeline, self.device = cfg, pipeline, device
        self.transformer = pipeline.transformer
        add_initial_adapter(self.transformer, cfg)
        trainable = [p for p in self.transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                      weight_decay=cfg.optim.weight_decay)
        self.optimization = TorchOptimization(optimizer, cfg.optim.max_grad_norm)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.version = 0

    def update(self, batch: TrainBatch) -> dict[str, float]:
        trajectory = gather_trajectory(batch.samples, resolve=lambda source: source)
        self.transformer.train()
        try:
            learned = grpo_update(self.transformer, trajectory.to(self.device), batch.advantages,
                                  self.cfg.grpo, self.cfg.optim, self.optimization, self.generator)
        finally:
            self.transformer.eval()
        self.version += 1
        return learned

    def save_checkpoint(self, location: str) -> None:
        """The adapter in diffusers' format under location/lora."""
        with storage.staged_upload(storage.join(location, "lora")) as local:
            save_lora(self.pipeline, local)


class LocalRollouts:
    """Samples with the learner's own weights and scores with the reward in this process."""

    def __init__(self, cfg: TrainConfig, learner: LocalLearner, reward: RewardFn):
        self.cfg, self.learner, self.reward = cfg, learner, reward
        self.tasks = PromptSource.for_training(cfg.prompts, cfg.seed)
        self.eval_sources = eval_tasks(cfg.prompts, cfg.seed).condition_images

    async def produce(self, iteration: int, prompts: list[tuple[int, str]]) -> IterationRollouts:
        cfg = self.cfg
        start = time.perf_counter()
        groups = sample_groups(
            self.learner.pipeline, [p for _, p in prompts], [i for i, _ in prompts], iteration,
            self.learner.version, cfg.seed, cfg.grpo.group_size, cfg.sampling,
            sources=self.tasks.condition_images([i for i, _ in prompts]))
        sampled = time.perf_counter()
        scored = score_groups(self.reward, groups)
        rollout_s = sampled - start
        return IterationRollouts(iteration, scored, rollout_s=rollout_s,
                                 rollout_compute_s=rollout_s,
                                 reward_s=time.perf_counter() - sampled, metrics={})

    async def evaluate(self, prompts: list[str]):
        images = sample_eval_images(self.learner.pipeline, prompts, self.cfg.sampling,
                                    self.cfg.seed, self.eval_sources)
        return images, apply_reward(self.reward, images, prompts, self.eval_sources)


class SharedWeights:
    """Rollouts and learner are one model: a published version is already in use."""

    def publish(self) -> None:
        pass

    async def start(self) -> float:
        return 0.0


class InProcessBackend:
    max_staleness = 0  # sample, then learn, on the same weights

    def __init__(self, cfg: TrainConfig):
        self.device = resolve_device(cfg.device)
        self.learners = LocalLearner(cfg, load_flux_pipeline(cfg.model, self.device),
                                     self.device)
        self.rollouts = LocalRollouts(cfg, self.learners, build_reward(cfg.reward, self.device))
        self.weights = SharedWeights()
        self.counters: Counter = Counter()

    async def on_learners(self, call, *args):
        return call(*args)

    def progress(self, total: int, done: int) -> tqdm:
        return tqdm(desc="train", total=total, initial=done, unit="iteration")


class InProcessTrainer:
    """spatialrl.loop on the in-process backend: `InProcessTrainer(cfg).fit(tracker)`."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.output_dir = prepare_output_dir(cfg.output_dir)
        self.backend = InProcessBackend(cfg)
        self.pipeline = self.backend.learners.pipeline
        self.device = self.backend.device

    def fit(self, tracker: Tracker) -> list[dict[str, float]]:
        self.loop = TrainingLoop(self.cfg, self.backend, tracker, self.output_dir)
        with logging_redirect_tqdm():  # log lines above the progress bar, not through it
            return asyncio.run(self.loop.fit())
