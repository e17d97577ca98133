"""Synchronous filtered GRPO in one process, without Ray.

This is the reference loop: the Ray trainer distributes exactly these stages. It also
trains on a single GPU machine where Ray is not installed. output_dir may be a local path or
a URI, as for the Ray trainer (the LoRA is staged locally and uploaded); there is no resume.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from spatialrl import storage
from spatialrl.config import TrainConfig
from spatialrl.evaluation import (
    RewardHackingWatch,
    eval_metrics,
    sample_eval_images,
    summary_line,
)
from spatialrl.flux.loading import load_flux_pipeline, resolve_device
from spatialrl.flux.lora import add_lora, save_lora
from spatialrl.grpo.update import TorchOptimization, grpo_update
from spatialrl.prompts import PromptSource, eval_prompts
from spatialrl.rewards import build_reward
from spatialrl.rollout import sample_groups
from spatialrl.run_state import checkpoint_dir, checkpoint_name, prepare_output_dir
from spatialrl.tracking import Tracker
from spatialrl.train_batch import build_train_batch, score_groups, write_ledger

log = logging.getLogger(__name__)


class InProcessTrainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.output_dir = prepare_output_dir(cfg.output_dir)
        self.pipeline = load_flux_pipeline(cfg.model, self.device)
        self.transformer = self.pipeline.transformer
        torch.manual_seed(cfg.seed)  # LoRA's initialisation draws from the global generator
        add_lora(self.transformer, cfg.lora)
        trainable = [p for p in self.transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=cfg.optim.lr, betas=cfg.optim.betas,
            weight_decay=cfg.optim.weight_decay,
        )
        self.optimization = TorchOptimization(optimizer, cfg.optim.max_grad_norm)
        self.reward = build_reward(cfg.reward, self.device)
        self.prompts = PromptSource(cfg.prompts.source, cfg.seed)
        self.eval_prompts = eval_prompts(
            cfg.prompts.eval_source, cfg.prompts.num_eval_prompts, cfg.seed
        )
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.version = 0  # one published weight update = one version
        self.hacking_watch = RewardHackingWatch()

    def train_iteration(self, iteration: int) -> tuple[dict[str, float], list[dict]]:
        cfg = self.cfg
        timings = {}
        start = time.perf_counter()
        taken = self.prompts.take(cfg.prompts.prompts_per_iteration)
        groups = sample_groups(
            self.pipeline, [p for _, p in taken], [i for i, _ in taken], iteration,
            self.version, cfg.seed, cfg.grpo.group_size, cfg.sampling,
        )
        timings["time/rollout_s"] = time.perf_counter() - start

        start = time.perf_counter()
        batch = build_train_batch(score_groups(self.reward, groups), cfg.grpo)
        timings["time/reward_s"] = time.perf_counter() - start

        start = time.perf_counter()
        metrics = dict(batch.metrics)
        if len(batch.trajectory) > 0:
            self.transformer.train()
            learn = grpo_update(
                self.transformer, batch.trajectory.to(self.device), batch.advantages,
                cfg.grpo, cfg.optim, self.optimization, self.generator,
            )
            self.transformer.eval()
            metrics.update({f"learn/{k}": v for k, v in learn.items()})
            self.version += 1
        timings["time/learn_s"] = time.perf_counter() - start
        images = cfg.prompts.prompts_per_iteration * cfg.grpo.group_size
        metrics.update(timings)
        metrics["throughput/images_per_s"] = images / sum(timings.values())
        metrics["policy/version"] = float(self.version)
        return metrics, batch.ledger

    def evaluate(self) -> tuple[dict[str, float], list, list[float]]:
        """Eval metrics, the images and their rewards."""
        cfg = self.cfg
        images = sample_eval_images(self.pipeline, self.eval_prompts, cfg.sampling, cfg.seed)
        scores = self.reward(images, self.eval_prompts)
        metrics = eval_metrics(images, self.eval_prompts, scores,
                               shapes_world=cfg.prompts.eval_source == "shapes")
        return metrics, images, scores.mu.tolist()

    def save_checkpoint(self, iteration: int, tracker: Tracker | None = None) -> str:
        """The LoRA in diffusers' format under checkpoints/iteration-NNNNNN/lora, also logged to
        the tracker's run; returns its location."""
        location = storage.join(checkpoint_dir(self.output_dir, iteration), "lora")
        with storage.staged_upload(location) as local:
            save_lora(self.pipeline, local)
            if tracker:
                tracker.log_artifacts(local, f"checkpoints/{checkpoint_name(iteration)}/lora")
        return location

    def fit(self, tracker: Tracker | None = None) -> list[dict[str, float]]:
        cfg = self.cfg
        if tracker:
            tracker.log_config(cfg)
        history = []
        with logging_redirect_tqdm():  # log lines above the progress bar, not through it
            for iteration in tqdm(range(cfg.iterations), desc="train", unit="iteration"):
                history.append(self._iteration(iteration, tracker))
        summary = self.hacking_watch.summary()
        log.info(summary)
        if tracker:
            tracker.set_summary(summary, self.hacking_watch.tags())
        return history

    def _iteration(self, iteration: int, tracker: Tracker | None) -> dict[str, float]:
        """Train, evaluate, checkpoint and log one iteration."""
        cfg = self.cfg
        metrics, ledger = self.train_iteration(iteration)
        write_ledger(self.output_dir, iteration, ledger)
        last = iteration == cfg.iterations - 1
        if cfg.eval_every and (iteration % cfg.eval_every == 0 or last):
            evaluated, images, rewards = self.evaluate()
            metrics.update(evaluated)
            metrics.update(self.hacking_watch.update(evaluated, iteration))
            if tracker:
                tracker.log_eval_images(images, self.eval_prompts, rewards, iteration)
        if (cfg.checkpoint_every and (iteration + 1) % cfg.checkpoint_every == 0) or last:
            self.save_checkpoint(iteration, tracker)
        log.info("iteration %d/%d: %s", iteration + 1, cfg.iterations, summary_line(metrics))
        if tracker:
            tracker.log_metrics(metrics, step=iteration)
        return metrics

