"""The rollout fleet: the loop's Rollouts role on Ray (spatialrl.loop).

Rollout actors in one SPREAD placement group; an iteration's prompts are cut into one share
per actor. Every actor call must run on the weights last sent to that actor: calls to an actor
run in submission order, so weights sent before a call are the weights it samples with, and
every answer reports its version.

Faults: an actor that dies (alone or with its node) is restarted by Ray (on another node if
its own is gone) on its initial weights. The first call to notice counts the death, has the
weight sync load the current weights into it again, and the call is redone from the same
seeds (faults/redone_groups). A group is answered only once its G samples are all scored, so
nothing is trained on twice or half.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import ray
from PIL import Image
from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError
from ray.util.placement_group import remove_placement_group

from spatialrl.actors.placement_groups import in_bundle, reserve
from spatialrl.actors.rollout import RolloutActor, unpack_group
from spatialrl.config import TrainConfig
from spatialrl.loop import IterationRollouts
from spatialrl.recovery import describe
from spatialrl.reward_functions import RewardOutput
from spatialrl.role_resources import role_bundles

log = logging.getLogger(__name__)

RESTART_POLL_MAX_S = 5.0  # longest wait between reload attempts while an actor restarts


class RolloutFleet:
    def __init__(self, cfg: TrainConfig, counters: Counter):
        self.cfg, self.counters = cfg, counters
        bundles = role_bundles(cfg)["rollout"]
        self.placement_group = reserve(
            "rollout", bundles, cfg.cluster.placement_timeout_s, strategy="SPREAD")
        self.actors = [
            RolloutActor.options(
                max_restarts=cfg.cluster.max_actor_restarts, max_task_retries=0,
                **in_bundle(self.placement_group, index, one),
            ).remote(cfg)
            for index, one in enumerate(bundles)
        ]
        self.size = len(self.actors)
        # Per actor: the version of the last weights sent to it (what its next call must
        # report), the deaths handled so far, and the lock that handles one at a time.
        self.expected_versions = [0] * self.size
        self.deaths_handled = [0] * self.size
        self.recovering = [asyncio.Lock() for _ in self.actors]
        # Set by the weight sync: loads the current weights into a restarted actor.
        self.reload: Callable[[int], Awaitable[float]] | None = None

    # --- the Rollouts role ---------------------------------------------------------------

    async def produce(self, iteration: int, prompts: list[tuple[int, str]]) -> IterationRollouts:
        """Each actor samples and scores its share; the driver gets summaries and references
        (driver/rollout_bytes: what it received, which does not grow with image size or steps)."""
        shares = [prompts[a::self.size] for a in range(self.size)]
        start = time.perf_counter()
        answers = await asyncio.gather(*(
            self._rollout_share(a, share, iteration) for a, share in enumerate(shares) if share))
        groups = sorted((unpack_group(g, trajectories, row * self.cfg.grpo.group_size)
                         for summary, trajectories, _ in answers
                         for row, g in enumerate(summary["groups"])),
                        key=lambda g: g.group_id)
        # Driver clock: an answer arrives when its groups are scored; they were sampled
        # reward_seconds earlier.
        sampled = [done - summary["reward_seconds"] for summary, _, done in answers]
        summaries = [g for summary, _, _ in answers for g in summary["groups"]]
        self.counters["faults/reward_retries"] += sum(g["reward_retries"] for g in summaries)
        batch_sizes = [size for g in summaries for size in g["reward_batch_sizes"]]
        return IterationRollouts(
            iteration, groups,
            rollout_s=max(sampled) - start,
            rollout_compute_s=sum(summary["rollout_seconds"] for summary, _, _ in answers),
            reward_s=max(done for *_, done in answers) - min(sampled),
            metrics={"reward/batch_size_mean": sum(batch_sizes) / len(batch_sizes),
                     "driver/rollout_bytes": float(sum(
                         len(pickle.dumps(summary)) for summary, _, _ in answers))},
        )

    async def evaluate(self, prompts: list[str]) -> tuple[list[Image.Image], RewardOutput]:
        """From the first actor: its queue runs the latest weight load before this call."""
        answer, = await self.call(0, lambda actor: (actor.evaluate.remote(prompts),))
        return ([Image.fromarray(p) for p in answer["images"]],
                RewardOutput(answer["mu"], answer["sigma"]))

    async def _rollout_share(self, index: int, share: list[tuple[int, str]], iteration: int
                             ) -> tuple[dict, ray.ObjectRef, float]:
        """One actor's groups of an iteration: the summary, the reference to their
        trajectories, and when the summary arrived."""
        prompts, group_ids = [p for _, p in share], [i for i, _ in share]
        summary, trajectories = await self.call(
            index, lambda actor: actor.rollout.remote(prompts, group_ids, iteration),
            redo_groups=len(share))
        return summary, trajectories, time.perf_counter()

    # --- weights -------------------------------------------------------------------------

    def send_weights(self, index: int, version: int, submit) -> ray.ObjectRef:
        """Submit a weight load to actor `index`: its later calls must report `version`."""
        self.expected_versions[index] = version
        return submit(self.actors[index])

    async def verify_loads(self, loads: list[tuple[ray.ObjectRef, int]], published, verify
                           ) -> float:
        """Each load with the deaths of its actor handled when it was sent; the slowest
        actor-side load seconds."""
        seconds = []
        for index, (load, seen) in enumerate(loads):
            try:
                seconds.append(verify(index, published, await load))
            except RayActorError:
                seconds.append(await self._recover(index, seen))
        return max(seconds)

    async def when_available(self, submit) -> dict:
        """submit()'s answer, waiting while the actor is still restarting."""
        delay = 0.1
        while True:
            try:
                return await submit()
            except ActorUnavailableError:
                await asyncio.sleep(delay)
                delay = min(2 * delay, RESTART_POLL_MAX_S)

    # --- faults --------------------------------------------------------------------------

    async def call(self, index: int, submit, redo_groups: int = 0) -> tuple:
        """An actor call that must run on the weights last sent to that actor. `submit`
        returns the call's references, the first an answer with the version that made it;
        returns that answer and the other references. If the actor died, or came back from a
        restart on its initial weights (it then reports another version), it gets the current
        weights again and the call is redone."""
        while True:
            expected = self.expected_versions[index]
            seen = self.deaths_handled[index]
            try:
                first, *others = submit(self.actors[index])
                answer = await first
                if answer["version"] == expected:
                    return answer, *others
                log.warning("rollout actor %d answered from version %d, expected %d: restarted",
                            index, answer["version"], expected)
            # A lost object: the answer was on a node that died before the driver fetched it.
            except (RayActorError, ObjectLostError) as err:
                log.warning("rollout actor %d died: %s", index, describe(err))
            self.counters["faults/redone_groups"] += redo_groups
            await self._recover(index, seen)

    async def _recover(self, index: int, seen: int) -> float:
        """After a call failed that was sent when `seen` deaths of the actor were handled.
        Calls in flight together fail together: the first one here counts the death and
        reloads the actor, the others find it handled. Returns the reload seconds."""
        async with self.recovering[index]:
            if self.deaths_handled[index] != seen:
                return 0.0
            self._count_failure(index)
            seconds = await self.reload(index)
            self.deaths_handled[index] += 1
            return seconds

    def _count_failure(self, index: int) -> None:
        self.counters["faults/rollout_actor_failures"] += 1
        budget = self.cfg.cluster.max_actor_restarts * self.size
        if self.counters["faults/rollout_actor_failures"] > budget:
            raise RuntimeError(
                f"rollout actors failed {self.counters['faults/rollout_actor_failures']:g} "
                f"times (cluster.max_actor_restarts={self.cfg.cluster.max_actor_restarts} each); "
                f"last: actor {index}")

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.placement_group)
