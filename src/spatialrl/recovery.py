"""A lost learner group, handled outside the loop's main path.

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

from spatialrl.run_state import latest_checkpoint

if TYPE_CHECKING:
    from spatialrl.loop import TrainingLoop

log = logging.getLogger(__name__)


class LearnerLost(Exception):
    """A learner rank died during a learner call."""


class SamplesLost(Exception):
    """Trajectories went missing before the learners read them (on Ray: the node that held
    them died). Nothing was trained; the loop samples the iteration again."""


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
                failed_iteration, lost)
    for task in in_flight.values():
        task.cancel()
    in_flight.clear()
    await loop.backend.rebuild_learners()
    try:
        folder, state = latest_checkpoint(loop.output_dir)
    except FileNotFoundError:
        folder, state = None, None
    if folder:
        await asyncio.to_thread(loop.load_checkpoint, folder, state)
    next_iteration = state.next_iteration if state else 0
    restore_counters(loop.counters, state.counters if state else {})
    loop.counters["faults/learner_restarts"] = restarts
    loop.counters["faults/redone_iterations"] += failed_iteration - next_iteration
    await loop.sync_weights()
    log.warning("learner group restarted from %s at iteration %d, version %d",
                folder or "the initial weights", next_iteration, loop.backend.learners.version)
    return next_iteration


def restore_counters(counters: Counter, saved: dict[str, float]) -> None:
    """Data counters go back to the checkpoint with the data; fault counters keep counting.
    In place: the backend shares the counters."""
    for name in counters:
        if not name.startswith("faults/"):
            counters[name] = saved.get(name, 0.0)
