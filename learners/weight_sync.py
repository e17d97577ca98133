"""Weight sync, learner group -> rollout actors: one object, two variants, picked once by
`weight_sync_for`.

- LoraWeightSync: rank 0's adapter state goes into the object store once per version; every
  actor loads that one ObjectRef. A restarted actor gets it again.
- FullWeightSync: the whole transformer (24 GB for FLUX.1-dev in bf16) goes through learner
  rank 0's torch.distributed broadcast group (spatialrl.broadcast). A restarted actor or a
  rebuilt learner group cannot rejoin that group: the run stops and resumes from a checkpoint.

Both verify: every actor answers with the checksum of the weights it now holds, and it must be
the published one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import ray

from spatialrl.actors.rollout_fleet import RolloutFleet
from spatialrl.config import TrainConfig
from spatialrl.learners.policy_learner import LearnerGroup


@dataclass
class Published:
    version: int
    state: ray.ObjectRef | None  # the LoRA state; None for full weights (sent by collective)
    checksum: str | None  # full weights: known once rank 0 has sent them


def verify_load(index: int, published: Published, answer: dict) -> float:
    """An actor's weights after a sync must be exactly the published ones; returns the
    actor-side load seconds."""
    if answer["checksum"] != published.checksum:
        raise RuntimeError(
            f"rollout actor {index} holds weights {answer['checksum']} after loading version "
            f"{published.version} ({published.checksum})")
    return answer["seconds"]


class LoraWeightSync:
    survives_restarts = True

    def __init__(self, learners: Callable[[], LearnerGroup], fleet: RolloutFleet):
        self.learners, self.fleet = learners, fleet
        self.published: Published | None = None

    def publish(self) -> None:
        self.published = Published(*self.learners().publish())

    def send(self, index: int) -> ray.ObjectRef:
        published = self.published
        return self.fleet.send_weights(index, published.version, lambda actor: (
            actor.load_weights.remote(published.version, published.state)))

    def start(self):
        loads = [(self.send(i), self.fleet.deaths_handled[i]) for i in range(self.fleet.size)]
        return self.fleet.verify_loads(loads, self.published, verify_load)

    async def reload(self, index: int) -> float:
        """A restarted actor (on its initial weights) gets the current ones, once it is up."""
        return verify_load(index, self.published,
                           await self.fleet.when_available(lambda: self.send(index)))


class FullWeightSync:
    survives_restarts = False

    def __init__(self, learners: Callable[[], LearnerGroup], fleet: RolloutFleet):
        self.learners, self.fleet = learners, fleet
        self.published: Published | None = None
        learners().open_weight_group(fleet.actors)

    def publish(self) -> None:
        self.published = Published(self.learners().version, None, None)

    def start(self):
        """Rank 0 broadcasts (every rank takes part under ZeRO-3); its fingerprint of what it
        sent is the checksum every actor must answer."""
        published = self.published
        sends = self.learners().send_full_weights()
        loads = [(self.fleet.send_weights(i, published.version, lambda actor: (
            actor.receive_full_weights.remote(published.version))), self.fleet.deaths_handled[i])
            for i in range(self.fleet.size)]

        async def verified() -> float:
            published.checksum = (await asyncio.gather(*sends))[0]
            return await self.fleet.verify_loads(loads, published, verify_load)

        return verified()

    async def reload(self, index: int) -> float:
        raise RuntimeError(
            f"rollout actor {index} restarted during full fine-tuning; the full-weight "
            "broadcast group cannot take it back in. Resume with --resume.")


def weight_sync_for(cfg: TrainConfig, learners: Callable[[], LearnerGroup], fleet: RolloutFleet
                    ) -> LoraWeightSync | FullWeightSync:
    return (LoraWeightSync if cfg.lora.enabled else FullWeightSync)(learners, fleet)
