"""Policy versions and staleness, defined once for the whole trainer.

- A version is one published weight update. The initial policy is version 0; after n applied
  updates the learner's version is n. Every rollout group carries the version that sampled it.
- A sample's staleness is the learner's version when it is trained on minus the version that
  sampled it. Samples with staleness > max_staleness are dropped and counted, never trained on.
- Dispatch: while iteration i is the next one to train, rollouts for iterations up to
  i + max_staleness may be in flight. They are sampled at a version >= i - (updates skipped),
  so the rule above almost never drops anything; it guards the edge cases (a redone rollout,
  a slow actor). With max_staleness 0 only iteration i is ever in flight: the synchronous,
  on-policy loop.
"""

from __future__ import annotations

from typing import Protocol, TypeVar


class Versioned(Protocol):
    version: int


V = TypeVar("V", bound=Versioned)


def staleness(learner_version: int, sample_version: int) -> int:
    if sample_version > learner_version:
        raise ValueError(
            f"a sample from version {sample_version} is newer than the learner ({learner_version})"
        )
    return learner_version - sample_version


def split_by_staleness(
    items: list[V], learner_version: int, max_staleness: int
) -> tuple[list[V], list[V]]:
    """(fresh enough to train on, too stale)."""
    fresh, stale = [], []
    for item in items:
        too_old = staleness(learner_version, item.version) > max_staleness
        (stale if too_old else fresh).append(item)
    return fresh, stale


def dispatch_horizon(next_to_train: int, max_staleness: int, iterations: int) -> int:
    """One past the last iteration whose rollouts may be in flight."""
    return min(next_to_train + max_staleness + 1, iterations)
