"""Restoring the loop, outside its main path: lost samples, a lost learner group, a resumed
run.

Trajectories lost before the learners read them (their node died) fail the learners' staging
call alone: the iteration is sampled again, counted as faults/resampled_iterations and
faults/redone_groups.

A learner rank that dies (its process or its node) loses the group's optimiser state: the
backend builds a new group, which loads the newest complete checkpoint (or keeps the initial
weights if there is none yet); the loop goes back to that checkpoint's next_iteration,
discards the rollouts in flight (sampled by weights the rollback discards) and loads the
restored weights into every rollout worker. Counted as faults/learner_restarts and
faults/redone_iterations.

Metrics are logged as each iteration ends, so the MLflow history of a redone iteration's step
holds two points, the abandoned attempt and later the redo (MLflow's latest value of a step is
the redo). A redone iteration's ledger file is overwritten, so it lists what the surviving line
of updates trained on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TYPE_CHECKING

from spatialrl import storage
from spatialrl.config import ConfigError
from spatialrl.run_state import RunState, latest_checkpoint

if TYPE_CHECKING:
    from spatialrl.loop import TrainingLoop
    from spatialrl.loop_roles import IterationRollouts

log = logging.getLogger(__name__)


class LearnerLost(Exception):
    """A learner rank died during a learner call."""


class SamplesLost(Exception):
    """Trajectories went missing before the learners read them (on Ray: the node that held
    them died). Nothing was trained; the loop samples the iteration again."""


def describe(error: BaseException) -> str:
    """An error as text for a log line. A handler that keeps records (pytest's, a memory
    handler) would keep the exception, and through its traceback the frames holding the
    iteration's ObjectRefs: their objects would stay pinned and their node never idle."""
    return f"{type(error).__name__}: {error}"


async def learn_or_resample(loop: TrainingLoop, data: IterationRollouts
                            ) -> tuple[dict[str, float], list[dict]]:
    """Stage 2, with the iteration sampled again as long as its samples are lost."""
    while True:
        try:
            return await loop.backend.on_learners(loop.learn, data)
        except SamplesLost as lost:
            log.warning("iteration %d: %s; sampling it again", data.iteration, describe(lost))
            loop.counters["faults/resampled_iterations"] += 1
            loop.counters["faults/redone_groups"] += len(data.groups)
            per_iteration = loop.cfg.prompts.prompts_per_iteration
            prompts = loop.prompts.slice(data.iteration * per_iteration, per_iteration)
            data = await loop.backend.rollouts.produce(data.iteration, prompts)


async def roll_back_to_checkpoint(loop: TrainingLoop, in_flight: dict[int, asyncio.Task],
                                  failed_iteration: int, lost: LearnerLost) -> int:
    """A new learner group from the newest complete checkpoint; returns the iteration to go
    on from."""
    cfg = loop.cfg
    restarts = loop.counters["faults/learner_restarts"] + 1
    if restarts > cfg.cluster.max_learner_restarts:
        raise RuntimeError(f"learner group lost {restarts:g} times (cluster."
                           f"max_learner_restarts={cfg.cluster.max_learner_restarts})") from lost
    log.warning("learner lost at iteration %d (%s): restarting the learner group",
                failed_iteration, describe(lost))
    for task in in_flight.values():
        task.cancel()
    in_flight.clear()
    await loop.backend.rebuild_learners()
    try:
        folder, state = latest_checkpoint(loop.output_dir)
    except FileNotFoundError:
        folder, state = None, None
    if folder:
        await asyncio.to_thread(load_checkpoint, loop, folder, state)
    next_iteration = state.next_iteration if state else 0
    restore_counters(loop.counters, state.counters if state else {})
    loop.counters["faults/learner_restarts"] = restarts
    loop.counters["faults/redone_iterations"] += failed_iteration - next_iteration
    await loop.sync_weights()
    log.warning("learner group restarted from %s at iteration %d, version %d",
                folder or "the initial weights", next_iteration, loop.backend.learners.version)
    return next_iteration


def resume(loop: TrainingLoop, folder: str, state: RunState) -> None:
    """A run continued from a checkpoint (`spatialrl train --resume`)."""
    load_checkpoint(loop, folder, state)
    loop.start_iteration = state.next_iteration
    loop.counters.update(state.counters)
    log.info("resumed from %s at iteration %d, version %d", folder, state.next_iteration,
             state.version)


def load_checkpoint(loop: TrainingLoop, folder: str, state: RunState) -> None:
    """A checkpoint (its files verified by latest_checkpoint) into the learners, after
    checking that it belongs to this run."""
    per_iteration = loop.cfg.prompts.prompts_per_iteration
    if state.prompt_cursor != state.next_iteration * per_iteration:
        raise ConfigError(
            f"prompts.prompts_per_iteration: {per_iteration} does not match the checkpoint "
            f"{folder} (cursor {state.prompt_cursor} at iteration {state.next_iteration})")
    if state.mlflow_run_id != loop.tracker.run_id:
        raise ValueError(
            f"{folder} belongs to MLflow run {state.mlflow_run_id}, not {loop.tracker.run_id}")
    learners = loop.backend.learners
    learners.load_checkpoint(storage.join(folder, "learner"))
    if learners.version != state.version:
        raise RuntimeError(
            f"{folder}: learner at version {learners.version}, run state at {state.version}")


def restore_counters(counters: Counter, saved: dict[str, float]) -> None:
    """Data counters go back to the checkpoint with the data; fault counters keep counting.
    In place: the backend shares the counters."""
    for name in counters:
        if not name.startswith("faults/"):
            counters[name] = saved.get(name, 0.0)
