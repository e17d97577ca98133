"""The training loop, written once. Every iteration runs these stages; each stage's name is
also its timer key (time/<stage>_s):

    1. rollout     G SDE samples per prompt, each group tagged with the policy version that
                   sampled it, scored by the reward (time/rollout_s, time/reward_s)
    2. learn       groups older than max_staleness dropped; advantages; top-k/bottom-k; one
                   filtered GRPO update on the learner group: version v -> v + 1
    3. broadcast   version v + 1 published and loaded into every rollout worker, verified
    4. evaluate    every eval_every: held-out prompts, the rule evaluator, the hacking watch
    5. log         metrics to the tracker, one summary line
    6. checkpoint  every checkpoint_every: the learner state, then run_state.json (the marker)

Rollouts for iterations up to i + max_staleness are in flight while iteration i learns
(spatialrl.staleness defines versions and staleness once). The loop runs against the roles of
spatialrl.loop_roles: spatialrl.inprocess implements them in one process,
spatialrl.learners.ray_backend on Ray. Fault handling is elsewhere: the Ray rollout fleet
redoes a dead actor's groups itself, and spatialrl.recovery samples an iteration whose
trajectories were lost again, rebuilds a lost learner group from the last checkpoint and
restores a resumed run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import numpy as np

from spatialrl import storage
from spatialrl.config import TrainConfig
from spatialrl.loop_roles import Backend, IterationRollouts
from spatialrl.policy_evaluation import (
    RULE_FIGURE,
    RewardHackingWatch,
    summary_line,
    task_eval_metrics,
)
from spatialrl.prompts import PromptSource, eval_tasks
from spatialrl.recovery import LearnerLost, learn_or_resample, roll_back_to_checkpoint
from spatialrl.run_state import RunState, checkpoint_name, new_checkpoint_dir, save_run_state
from spatialrl.staleness import dispatch_horizon, split_by_staleness, staleness
from spatialrl.tracking import Tracker
from spatialrl.train_batch import build_train_batch, ledger_row, write_ledger

log = logging.getLogger(__name__)

# Logged from iteration 0, so that their charts exist before the first fault or drop.
COUNTERS = ("faults/rollout_actor_failures", "faults/redone_groups", "faults/reward_retries",
            "faults/resampled_iterations", "faults/learner_restarts", "faults/redone_iterations",
            "staleness/dropped_groups", "filter/dropped_nonfinite_groups",
            "filter/skipped_updates")


class TrainingLoop:
    def __init__(self, cfg: TrainConfig, backend: Backend, tracker: Tracker, output_dir: str):
        self.cfg, self.backend, self.tracker, self.output_dir = cfg, backend, tracker, output_dir
        self.counters = backend.counters
        self.counters.update(dict.fromkeys(COUNTERS, 0.0))
        self.prompts = PromptSource.for_training(cfg.prompts, cfg.seed)
        self.eval_tasks = eval_tasks(cfg.prompts, cfg.seed)
        self.hacking_watch = RewardHackingWatch(RULE_FIGURE[cfg.prompts.task])
        self.start_iteration = 0

    async def fit(self) -> list[dict[str, float]]:
        cfg = self.cfg
        self.tracker.log_config(cfg)
        await self.sync_weights()  # version 0 (or the resumed one), verified
        in_flight: dict[int, asyncio.Task] = {}
        history: list[dict[str, float]] = []
        self.last_done = time.perf_counter()
        iteration = self.start_iteration
        progress = self.backend.progress(cfg.iterations, iteration)
        try:
            while iteration < cfg.iterations:
                try:
                    history.append(await self.iteration(iteration, in_flight))
                    iteration += 1
                except LearnerLost as lost:
                    iteration = await roll_back_to_checkpoint(self, in_flight, iteration, lost)
                    del history[iteration - self.start_iteration:]
                progress.n = iteration
                progress.refresh()
        finally:
            progress.close()
            for task in in_flight.values():
                task.cancel()
        summary = self.hacking_watch.summary()
        log.info(summary)
        self.tracker.set_summary(summary, self.hacking_watch.tags())
        return history

    async def iteration(self, iteration: int, in_flight: dict[int, asyncio.Task]
                        ) -> dict[str, float]:
        cfg, backend = self.cfg, self.backend
        # 1. rollout (started earlier, up to max_staleness iterations ahead)
        self.dispatch(in_flight, iteration)
        wait_start = time.perf_counter()
        data = await in_flight.pop(iteration)
        metrics = {"time/wait_s": time.perf_counter() - wait_start,
                   "time/rollout_s": data.rollout_s,
                   "time/rollout_compute_s": data.rollout_compute_s,
                   "time/reward_s": data.reward_s, **data.metrics}
        # 2. learn (off the event loop, so that later rollouts keep being scored)
        learned, ledger = await learn_or_resample(self, data)
        metrics.update(learned)
        # 3. broadcast
        if "time/learn_s" in learned:
            start = time.perf_counter()
            await backend.on_learners(backend.weights.publish)
            loads = backend.weights.start()
            self.dispatch(in_flight, iteration + 1)  # after the loads: sampled by v + 1
            metrics["time/broadcast_s"] = time.perf_counter() - start + await loads
        await asyncio.to_thread(write_ledger, self.output_dir, iteration, ledger)
        last = iteration == cfg.iterations - 1
        # 4. evaluate
        if cfg.eval_every and (iteration % cfg.eval_every == 0 or last):
            metrics.update(await self.evaluate(iteration))
        # 5. log (before the checkpoint: a run killed in between redoes this iteration and
        # logs it twice, rather than resuming after it with its metrics lost)
        now = time.perf_counter()
        metrics.update({
            "time/iteration_s": now - self.last_done,
            "throughput/images_per_s": sum(len(g.mu) for g in data.groups) / (now - self.last_done),
            "policy/version": float(backend.learners.version),
            **{name: float(value) for name, value in self.counters.items()},
        })
        self.last_done = now
        self.tracker.log_metrics(metrics, step=iteration)
        log.info("iteration %d/%d: %s", iteration + 1, cfg.iterations, summary_line(metrics))
        # 6. checkpoint
        if (cfg.checkpoint_every and (iteration + 1) % cfg.checkpoint_every == 0) or last:
            await backend.on_learners(self.checkpoint, iteration)
        return metrics

    def dispatch(self, in_flight: dict[int, asyncio.Task], next_to_train: int) -> None:
        per_iteration = self.cfg.prompts.prompts_per_iteration
        horizon = dispatch_horizon(next_to_train, self.backend.max_staleness, self.cfg.iterations)
        for iteration in range(next_to_train, horizon):
            if iteration not in in_flight:
                prompts = self.prompts.slice(iteration * per_iteration, per_iteration)
                in_flight[iteration] = asyncio.create_task(
                    self.backend.rollouts.produce(iteration, prompts))

    def learn(self, data: IterationRollouts) -> tuple[dict[str, float], list[dict]]:
        """Stage 2: metrics (time/learn_s only when an update was applied) and ledger rows.
        Counters change only once the update went through."""
        learners = self.backend.learners
        version = learners.version
        fresh, stale = split_by_staleness(data.groups, version, self.backend.max_staleness)
        counted = Counter({"staleness/dropped_groups": len(stale)})
        metrics: dict[str, float] = {}
        ledger = [ledger_row(g, i, float("nan"), False) for g in stale for i in range(len(g.mu))]
        if fresh:
            batch = build_train_batch(fresh, self.cfg.grpo)
            metrics.update(batch.metrics)
            ledger += batch.ledger
            counted["filter/dropped_nonfinite_groups"] += batch.metrics[
                "filter/dropped_nonfinite_groups"]
            ages = [staleness(version, g.version) for g in fresh]
            metrics.update({"staleness/mean": float(np.mean(ages)),
                            "staleness/max": float(max(ages))})
            if len(batch.samples) >= learners.min_update_samples:
                start = time.perf_counter()
                learned = learners.update(batch)
                metrics["time/learn_s"] = time.perf_counter() - start
                metrics.update({f"learn/{k}": v for k, v in learned.items()})
            else:
                counted["filter/skipped_updates"] += 1
        self.counters.update(counted)
        for row in ledger:
            row["staleness"] = version - row["version"]
        return metrics, ledger

    async def evaluate(self, iteration: int) -> dict[str, float]:
        """Stage 4: the held-out prompts (or edits) at the just-broadcast version."""
        tasks, shapes_world = self.eval_tasks, self.cfg.prompts.eval_source == "shapes"
        images, scores = await self.backend.rollouts.evaluate(tasks.prompts)
        self.tracker.log_eval_images(images, tasks.prompts, scores.mu.tolist(), iteration,
                                     tasks.condition_images)
        metrics = task_eval_metrics(self.cfg.prompts.task, images, tasks, scores, shapes_world)
        return metrics | self.hacking_watch.update(metrics, iteration)

    def checkpoint(self, iteration: int) -> str:
        """Stage 6: every learner rank's files, then the run state that marks them complete."""
        learners = self.backend.learners
        folder = new_checkpoint_dir(self.output_dir, iteration)
        learners.save_checkpoint(storage.join(folder, "learner"))
        save_run_state(folder, RunState(
            next_iteration=iteration + 1, version=learners.version,
            prompt_cursor=(iteration + 1) * self.cfg.prompts.prompts_per_iteration,
            mlflow_run_id=self.tracker.run_id, counters=dict(self.counters),
        ))
        if self.cfg.lora.enabled:  # the adapter in diffusers' format, also in the MLflow run
            with storage.staged_download(storage.join(folder, "learner", "lora")) as lora:
                self.tracker.log_artifacts(lora, f"checkpoints/{checkpoint_name(iteration)}/lora")
        return folder

    async def sync_weights(self) -> None:
        """Publish the learners' weights and load them into every rollout worker, verified."""
        await self.backend.on_learners(self.backend.weights.publish)
        await self.backend.weights.start()
