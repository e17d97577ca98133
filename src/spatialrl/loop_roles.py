"""The roles the training loop (spatialrl.loop) runs against, and what stage 1 hands on.

Two implementations: spatialrl.inprocess (one process) and spatialrl.learners.ray_backend.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from spatialrl.reward_functions import RewardOutput
from spatialrl.train_batch import ScoredGroup, TrainBatch


@dataclass
class IterationRollouts:
    """Stage 1's result: one iteration's scored groups and what producing them took."""

    iteration: int
    groups: list[ScoredGroup]
    rollout_s: float  # dispatch -> last group sampled (wall)
    # Sampling seconds summed over the rollout workers, which sample in parallel: it exceeds
    # rollout_s, and its ratio to it is how many workers were busy on average.
    rollout_compute_s: float
    reward_s: float  # first scoring request -> last answer (wall)
    metrics: dict[str, float]  # the backend's own, e.g. reward batch sizes


class Rollouts(Protocol):
    async def produce(self, iteration: int, prompts: list[tuple[int, str]]
                      ) -> IterationRollouts: ...

    async def evaluate(self, prompts: list[str]) -> tuple[list[Image.Image], RewardOutput]:
        """ODE samples of the held-out prompts at the latest broadcast version, scored."""


class Learners(Protocol):
    version: int  # updates applied
    min_update_samples: int  # fewer kept samples than this skip the update (one per rank)

    def update(self, batch: TrainBatch) -> dict[str, float]: ...

    def save_checkpoint(self, location: str) -> None: ...

    def load_checkpoint(self, location: str) -> None: ...


class WeightSync(Protocol):
    def publish(self) -> None:
        """Take the learners' current weights (blocking: a learner call)."""

    def start(self) -> Awaitable[float]:
        """Send the published weights to every rollout worker: calls made after this sample
        with them. Awaiting the result verifies every worker's copy; its value is the
        slowest load's seconds."""


class Backend(Protocol):
    rollouts: Rollouts
    learners: Learners
    weights: WeightSync
    counters: Counter  # the loop's counters, shared so that the backend counts its faults
    max_staleness: int

    async def on_learners(self, call: Callable, *args): ...

    async def rebuild_learners(self) -> None: ...

    def progress(self, total: int, done: int): ...
