"""`spatialrl train` on Ray: the single controller of the asynchronous actor-learner loop.

    prompts -> rollout actors (G SDE samples per prompt, tagged with their policy version)
            -> reward deployment (batched across all actors) -> scored groups
            -> staleness check -> advantages, top-k/bottom-k -> learner group (DeepSpeed)
            -> version v+1 -> every rollout actor, checksum verified

While the learner trains on iteration i, rollouts for iterations up to i + max_staleness are
in flight (see spatialrl.staleness for the one definition of version and staleness).
Rollout actor calls run in submission order, so weights published before a rollout call are
the weights it samples with, and every group reports the version that sampled it.

Faults: a rollout actor that dies (alone or with its node) is restarted by Ray, on another
node if its own is gone; its groups are redone from the same seeds after the current weights
are loaded into it again, and counted. A group is trained on only once its G samples are all
scored, so nothing is trained on twice or half.

A learner rank that dies (its process or its node) loses the DeepSpeed group's state: the
trainer tears the group down, builds a new one, loads the newest complete checkpoint (or the
initial weights if there is none yet), rolls the loop back to that checkpoint's
next_iteration, discards the rollouts in flight and resyncs the rollout actors; it counts
faults/learner_restarts and faults/redone_iterations. Metrics are logged as each iteration
ends, not held back until the next checkpoint, so that a long run stays observable: the MLflow
history of a redone iteration's step therefore holds two points, the abandoned attempt and,
later, the redo, and MLflow's latest value of each step is the redo. The ledger file of a
redone iteration is overwritten, so it lists what the surviving line of updates trained on.

Checkpoints fence versions: a checkpoint holds the learner after iteration i (version v) and
next_iteration = i + 1. Rollouts already in flight for later iterations are not part of it; a
resumed run samples them again from version v.

output_dir is a local path or a URI (s3://, gs://, file://). On a URI every learner rank
writes its checkpoint files into a local staging directory and uploads them; the driver writes
run_state.json (the completion marker, see spatialrl.run_state) after all ranks returned, and
the ledger directly. A resume downloads the checkpoint on each rank before loading it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import ray
from PIL import Image
from ray.exceptions import (
    ActorUnavailableError,
    GetTimeoutError,
    ObjectLostError,
    RayActorError,
    RayError,
)
from ray.experimental import tqdm_ray
from ray.serve.handle import DeploymentHandle
from ray.util.placement_group import remove_placement_group
from tqdm.contrib.logging import logging_redirect_tqdm

from spatialrl import storage
from spatialrl.actors.placement import in_bundle, reserve
from spatialrl.actors.reward import (
    score_on_deployment,
    start_reward_deployment,
    stop_reward_deployment,
)
from spatialrl.actors.rollout import RolloutActor, unpack_group
from spatialrl.config import ConfigError, TrainConfig
from spatialrl.evaluation import RewardHackingWatch, eval_metrics, summary_line
from spatialrl.learners.policy_learner import LearnerGroup
from spatialrl.placement import check_cluster_fits, role_bundles
from spatialrl.prompts import PromptSource, eval_prompts
from spatialrl.rewards import RewardOutput
from spatialrl.run_state import (
    RunState,
    checkpoint_name,
    latest_checkpoint,
    new_checkpoint_dir,
    prepare_output_dir,
    save_run_state,
)
from spatialrl.staleness import dispatch_horizon, split_by_staleness, staleness
from spatialrl.tracking import Tracker, check_tracking_uri, run_name
from spatialrl.train_batch import ScoredGroup, build_train_batch, ledger_row, write_ledger

log = logging.getLogger(__name__)

RESTART_POLL_MAX_S = 5.0  # longest wait between reload attempts while an actor restarts
# After a learner call failed: a rank that does not answer a no-op within this long is taken
# for lost (dead, or stuck in a collective with a dead peer).
LEARNER_PING_S = 10.0
# Logged from iteration 0, so that their charts exist before the first fault or drop.
COUNTERS = ("faults/rollout_actor_failures", "faults/redone_groups", "faults/reward_retries",
            "faults/learner_restarts", "faults/redone_iterations", "staleness/dropped_groups",
            "filter/dropped_nonfinite_groups", "filter/skipped_updates")


class LearnerLost(Exception):
    """A learner rank died during a learner call."""


@dataclass
class IterationRollouts:
    """One iteration's scored groups and how long producing them took."""

    iteration: int
    groups: list[ScoredGroup]
    rollout_s: float  # dispatch -> last group sampled (wall)
    rollout_compute_s: float  # sampling seconds summed over the actors (see time/rollout_compute_s)
    reward_s: float  # first scoring request -> last answer (wall)


@dataclass
class Published:
    version: int
    state: ray.ObjectRef | None  # the LoRA state; None for full weights (sent by collective)
    checksum: str | None  # full weights: known once rank 0 has sent them


@dataclass
class RolloutFleet:
    """The rollout actors in their placement group, and the weights they must hold."""

    cfg: TrainConfig
    actors: list = field(default_factory=list)
    # Per actor, the version of the last weights sent to it: what its next call must report.
    expected_versions: list[int] = field(default_factory=list)
    # Per actor, the deaths handled so far, and the lock that handles one at a time.
    deaths_handled: list[int] = field(default_factory=list)
    recovering: list[asyncio.Lock] = field(default_factory=list)

    def start(self) -> None:
        cfg = self.cfg
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
        self.expected_versions = [0] * len(self.actors)
        self.deaths_handled = [0] * len(self.actors)
        self.recovering = [asyncio.Lock() for _ in self.actors]

    def load(self, index: int, published: Published) -> ray.ObjectRef:
        self.expected_versions[index] = published.version
        if published.state is None:
            return self.actors[index].receive_full_weights.remote(published.version)
        return self.actors[index].load_weights.remote(published.version, published.state)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.actors:
            remove_placement_group(self.placement_group)


def verify_load(index: int, published: Published, answer: dict) -> float:
    """An actor's weights after a sync must be exactly the published ones."""
    if answer["checksum"] != published.checksum:
        raise RuntimeError(
            f"rollout actor {index} holds weights {answer['checksum']} after loading version "
            f"{published.version} ({published.checksum})"
        )
    return answer["seconds"]


class RayTrainer:
    def __init__(self, cfg: TrainConfig, tracker: Tracker,
                 resume_from: tuple[str, RunState] | None = None):
        self.cfg = cfg
        self.tracker = tracker
        # A path or URI, before any actor; checked again here for callers other than train_on_ray.
        self.output_dir = prepare_output_dir(cfg.output_dir, resume=resume_from is not None)
        self.prompts = PromptSource(cfg.prompts.source, cfg.seed)
        self.eval_prompts = eval_prompts(
            cfg.prompts.eval_source, cfg.prompts.num_eval_prompts, cfg.seed)
        self.counters = Counter(dict.fromkeys(COUNTERS, 0.0))
        self.start_iteration = 0
        if not cfg.cluster.wait_for_autoscaler:
            check_cluster_fits(cfg, ray.cluster_resources())
        self.fleet = RolloutFleet(cfg)
        self.learners: LearnerGroup | None = None
        self.reward: DeploymentHandle | None = None
        self.reward_batch_sizes: list[int] = []
        self.published: Published | None = None
        self.hacking_watch = RewardHackingWatch()
        self.full_weight_sends: list[ray.ObjectRef] = []
        try:
            self.learners = LearnerGroup(cfg)
            self.fleet.start()
            if not cfg.lora.enabled:
                self.learners.open_weight_group(self.fleet.actors)
            self.reward = start_reward_deployment(cfg)
            if resume_from is not None:
                self._restore(*resume_from)
        except BaseException:
            self.shutdown()
            raise

    def _restore(self, folder: str, state: RunState) -> None:
        self._load_checkpoint(folder, state)
        self.start_iteration = state.next_iteration
        self.counters.update(state.counters)
        log.info("resumed from %s at iteration %d, version %d", folder, state.next_iteration,
                 state.version)

    def _load_checkpoint(self, folder: str, state: RunState) -> None:
        """Load a checkpoint (its files verified by latest_checkpoint) into the learners after
        checking that it belongs to this run."""
        per_iteration = self.cfg.prompts.prompts_per_iteration
        if state.prompt_cursor != state.next_iteration * per_iteration:
            raise ConfigError(
                f"prompts.prompts_per_iteration: {per_iteration} does not match the checkpoint "
                f"{folder} (cursor {state.prompt_cursor} at iteration {state.next_iteration})"
            )
        if state.mlflow_run_id != self.tracker.run_id:
            raise ValueError(
                f"{folder} belongs to MLflow run {state.mlflow_run_id}, not {self.tracker.run_id}")
        self.learners.load_checkpoint(storage.join(folder, "learner"))
        if self.learners.version != state.version:
            raise RuntimeError(f"{folder}: learner at version {self.learners.version}, "
                               f"run state at {state.version}")

    # --- weights -------------------------------------------------------------------------

    def _publish(self) -> float:
        """LoRA: gather the adapter into the object store. Full weights: nothing yet, they
        are sent by the broadcast that _start_sync begins."""
        start = time.perf_counter()
        if self.cfg.lora.enabled:
            self.published = Published(*self.learners.publish())
        else:
            self.published = Published(self.learners.version, None, None)
        return time.perf_counter() - start

    def _start_sync(self) -> list[tuple[ray.ObjectRef, int]]:
        """Submit the published weights to every actor: calls after these sample with them.
        Each load comes with the deaths of its actor handled when it was sent."""
        if not self.cfg.lora.enabled:
            self.full_weight_sends = self.learners.send_full_weights()
        return [(self.fleet.load(i, self.published), self.fleet.deaths_handled[i])
                for i in range(len(self.fleet.actors))]

    async def _finish_sync(self, loads: list[tuple[ray.ObjectRef, int]]) -> float:
        """Verify every actor's checksum; the slowest actor-side load time."""
        if not self.cfg.lora.enabled:
            self.published.checksum = (await asyncio.gather(*self.full_weight_sends))[0]
        seconds = []
        for index, (load, seen) in enumerate(loads):
            try:
                seconds.append(verify_load(index, self.published, await load))
            except RayActorError:
                seconds.append(await self._recover(index, seen))
        return max(seconds)

    async def _recover(self, index: int, seen: int) -> float:
        """After a call failed that was sent when `seen` deaths of the actor were handled.
        Calls in flight together fail together: the first one to get here counts the death
        and reloads the actor, the others find it handled. Returns the reload seconds."""
        async with self.fleet.recovering[index]:
            if self.fleet.deaths_handled[index] != seen:
                return 0.0
            seconds = await self._reload(index)
            self.fleet.deaths_handled[index] += 1
            return seconds

    async def _reload(self, index: int) -> float:
        """After an actor died: Ray restarts it with the initial weights; load the current
        ones into it, waiting while it is still restarting."""
        self._count_failure(index)
        if not self.cfg.lora.enabled:
            # Its broadcast group lost a member: the run fails and resumes from a checkpoint.
            raise RuntimeError(
                f"rollout actor {index} restarted during full fine-tuning; the full-weight "
                "broadcast group cannot take it back in. Resume with --resume.")
        delay = 0.1
        while True:
            try:
                load = await self.fleet.load(index, self.published)
                return verify_load(index, self.published, load)
            except ActorUnavailableError:
                await asyncio.sleep(delay)
                delay = min(2 * delay, RESTART_POLL_MAX_S)

    def _count_failure(self, index: int) -> None:
        self.counters["faults/rollout_actor_failures"] += 1
        budget = self.cfg.cluster.max_actor_restarts * len(self.fleet.actors)
        if self.counters["faults/rollout_actor_failures"] > budget:
            raise RuntimeError(
                f"rollout actors failed {self.counters['faults/rollout_actor_failures']:g} "
                f"times (cluster.max_actor_restarts={self.cfg.cluster.max_actor_restarts} each); "
                f"last: actor {index}"
            )

    # --- producing one iteration's data --------------------------------------------------

    async def _on_current_weights(self, index: int, submit, version_of, redo_groups: int = 0):
        """An actor call that must run on the weights last sent to that actor. If the actor
        died, or came back from a restart on its initial weights (it then reports another
        version), it gets the current weights again and the call is redone from the same
        seeds."""
        while True:
            expected = self.fleet.expected_versions[index]
            seen = self.fleet.deaths_handled[index]
            try:
                result = await submit(self.fleet.actors[index])
                if version_of(result) == expected:
                    return result
                log.warning("rollout actor %d answered from version %d, expected %d: restarted",
                            index, version_of(result), expected)
            # A lost object: the answer was on a node that died before the driver fetched it.
            except (RayActorError, ObjectLostError) as err:
                log.warning("rollout actor %d died: %s", index, err)
            self.counters["faults/redone_groups"] += redo_groups
            await self._recover(index, seen)

    async def _rollout_share(self, index: int, share: list[tuple[int, str]], iteration: int
                             ) -> list[dict]:
        """One actor's groups of an iteration."""
        prompts, group_ids = [p for _, p in share], [i for i, _ in share]
        return await self._on_current_weights(
            index, lambda actor: actor.rollout.remote(prompts, group_ids, iteration),
            version_of=lambda groups: groups[0]["version"], redo_groups=len(share))

    async def _score(self, packed_groups: list[dict]) -> tuple[list[ScoredGroup], float, float]:
        """Score one rollout call's groups (sent together, so they batch with each other and
        with other actors' groups); returns them with the request and answer times."""
        start = time.perf_counter()
        scores = await asyncio.to_thread(
            score_on_deployment, self.reward,
            [([g["prompt"]] * len(g["images"]), list(g["images"])) for g in packed_groups])
        self.counters["faults/reward_retries"] += sum(s.retries for s in scores)
        self.reward_batch_sizes.extend(size for s in scores for size in s.batch_sizes)
        groups = [ScoredGroup(unpack_group(g), s.mu, s.sigma)
                  for g, s in zip(packed_groups, scores, strict=True)]
        return groups, start, time.perf_counter()

    async def _produce(self, iteration: int) -> IterationRollouts:
        cfg = self.cfg
        per_iteration = cfg.prompts.prompts_per_iteration
        taken = self.prompts.slice(iteration * per_iteration, per_iteration)
        actors = len(self.fleet.actors)
        shares = [taken[a::actors] for a in range(actors)]
        start = time.perf_counter()

        async def rollout_then_score(index: int, share: list[tuple[int, str]]):
            packed_groups = await self._rollout_share(index, share, iteration)
            sampled = time.perf_counter()
            compute_s = sum(g["rollout_seconds"] for g in packed_groups)
            return sampled, compute_s, await self._score(packed_groups)

        results = await asyncio.gather(
            *(rollout_then_score(a, share) for a, share in enumerate(shares) if share))
        groups = sorted((g for *_, (gs, _, _) in results for g in gs),
                        key=lambda g: g.group.group_id)
        return IterationRollouts(
            iteration, groups,
            rollout_s=max(sampled for sampled, _, _ in results) - start,
            rollout_compute_s=sum(compute for _, compute, _ in results),
            reward_s=max(end for *_, (_, _, end) in results)
            - min(begin for *_, (_, begin, _) in results),
        )

    # --- one training step ---------------------------------------------------------------

    def _train(self, data: IterationRollouts) -> tuple[dict[str, float], list[dict]]:
        cfg = self.cfg
        version = self.learners.version
        fresh, stale = split_by_staleness(data.groups, version, cfg.rollout.max_staleness)
        self.counters["staleness/dropped_groups"] += len(stale)
        metrics: dict[str, float] = {}
        ledger = [ledger_row(g, i, float("nan"), False) for g in stale for i in range(len(g.mu))]
        if fresh:
            batch = build_train_batch(fresh, cfg.grpo)
            metrics.update(batch.metrics)
            ledger += batch.ledger
            self.counters["filter/dropped_nonfinite_groups"] += batch.metrics[
                "filter/dropped_nonfinite_groups"]
            ages = [staleness(version, g.group.version) for g in fresh]
            metrics.update({"staleness/mean": float(np.mean(ages)),
                            "staleness/max": float(max(ages))})
            if len(batch.trajectory) >= len(self.learners.workers):
                start = time.perf_counter()
                learned = self.learners.update(batch)
                metrics["time/learn_s"] = time.perf_counter() - start
                metrics.update({f"learn/{k}": v for k, v in learned.items()})
            else:
                self.counters["filter/skipped_updates"] += 1
        for row in ledger:
            row["staleness"] = version - row["version"]
        return metrics, ledger

    # --- evaluation and checkpoints ------------------------------------------------------

    async def _evaluate(self, iteration: int) -> dict[str, float]:
        """ODE samples at the just-published version, from the first rollout actor (its
        queue runs the weight load before this call), scored by the reward and the rule
        evaluator."""
        answer = await self._on_current_weights(
            0, lambda actor: actor.evaluate.remote(self.eval_prompts),
            version_of=lambda answer: answer["version"])
        pixels = answer["images"]
        images = [Image.fromarray(p) for p in pixels]
        (scores,) = await asyncio.to_thread(
            score_on_deployment, self.reward, [(self.eval_prompts, list(pixels))])
        shapes = self.cfg.prompts.eval_source == "shapes"
        self.tracker.log_eval_images(images, self.eval_prompts, scores.mu.tolist(), iteration)
        metrics = eval_metrics(images, self.eval_prompts,
                               RewardOutput(scores.mu, scores.sigma), shapes)
        return metrics | self.hacking_watch.update(metrics, iteration)

    def _checkpoint(self, iteration: int) -> str:
        folder = new_checkpoint_dir(self.output_dir, iteration)
        self.learners.save_checkpoint(storage.join(folder, "learner"))  # every rank's files
        save_run_state(folder, RunState(  # last: the checkpoint is complete
            next_iteration=iteration + 1, version=self.learners.version,
            prompt_cursor=(iteration + 1) * self.cfg.prompts.prompts_per_iteration,
            mlflow_run_id=self.tracker.run_id, counters=dict(self.counters),
        ))
        if self.cfg.lora.enabled:
            with storage.staged_download(storage.join(folder, "learner", "lora")) as lora:
                self.tracker.log_artifacts(lora, f"checkpoints/{checkpoint_name(iteration)}/lora")
        return folder

    # --- the loop ------------------------------------------------------------------------

    async def fit(self) -> list[dict[str, float]]:
        cfg = self.cfg
        # Reward calls, the learner and checkpoints wait in threads; the default pool (cores
        # + 4) would cap the groups being scored at once.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=64))
        self.tracker.log_config(cfg)
        await self._sync_weights()  # version 0 (or the resumed one) verified
        in_flight: dict[int, asyncio.Task] = {}
        history = []
        self.last_done = time.perf_counter()
        iteration = self.start_iteration
        # Ray's progress bar: the driver draws it and hides it while printing actors' logs.
        progress = tqdm_ray.tqdm(desc="train", total=cfg.iterations, unit="iteration")
        progress.update(iteration)
        try:
            while iteration < cfg.iterations:
                try:
                    history.append(await self._iteration(iteration, in_flight))
                    iteration += 1
                except LearnerLost as lost:
                    iteration = await self._restart_learners(in_flight, iteration, lost)
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

    async def _iteration(self, iteration: int, in_flight: dict[int, asyncio.Task]
                         ) -> dict[str, float]:
        """Train on one iteration's rollouts, publish, evaluate, checkpoint, log."""
        cfg = self.cfg
        self._dispatch(in_flight, iteration)
        wait_start = time.perf_counter()
        data = await in_flight.pop(iteration)
        # time/rollout_s is wall time from dispatch to the last group sampled;
        # time/rollout_compute_s is actor-seconds summed over the actors sampling in parallel,
        # so it exceeds time/rollout_s; its ratio to it is the actors kept busy on average.
        timings = {"time/wait_s": time.perf_counter() - wait_start,
                   "time/rollout_s": data.rollout_s,
                   "time/rollout_compute_s": data.rollout_compute_s,
                   "time/reward_s": data.reward_s}
        # The learner runs in a thread so that in-flight rollouts keep being scored.
        metrics, ledger = await self._on_learners(self._train, data)
        if "time/learn_s" in metrics:
            publish_s = await self._on_learners(self._publish)
            loads = self._start_sync()
            self._dispatch(in_flight, iteration + 1)  # after the loads: new weights
            timings["time/broadcast_s"] = publish_s + await self._finish_sync(loads)
        metrics.update(timings)
        if self.reward_batch_sizes:
            metrics["reward/batch_size_mean"] = float(np.mean(self.reward_batch_sizes))
            self.reward_batch_sizes.clear()
        await asyncio.to_thread(write_ledger, self.output_dir, iteration, ledger)
        last = iteration == cfg.iterations - 1
        if cfg.eval_every and (iteration % cfg.eval_every == 0 or last):
            metrics.update(await self._evaluate(iteration))
        if (cfg.checkpoint_every and (iteration + 1) % cfg.checkpoint_every == 0) or last:
            await self._on_learners(self._checkpoint, iteration)
        now = time.perf_counter()
        images = sum(len(g.mu) for g in data.groups)
        metrics.update({
            "time/iteration_s": now - self.last_done,
            "throughput/images_per_s": images / (now - self.last_done),
            "policy/version": float(self.learners.version),
            **{name: float(value) for name, value in self.counters.items()},
        })
        self.last_done = now
        self.tracker.log_metrics(metrics, step=iteration)
        log.info("iteration %d/%d: %s", iteration + 1, cfg.iterations, summary_line(metrics))
        return metrics

    # --- learner faults ------------------------------------------------------------------

    async def _sync_weights(self) -> None:
        """Publish the learners' weights and load them into every rollout actor, verified."""
        await self._on_learners(self._publish)
        await self._finish_sync(self._start_sync())

    async def _on_learners(self, call, *args):
        """A blocking call into the learner group, in a thread; an error with a rank gone is
        LearnerLost, any other error (a bug, a NaN) is raised as it is."""
        try:
            return await asyncio.to_thread(call, *args)
        except RayError as error:
            if await asyncio.to_thread(self._learners_alive):
                raise
            raise LearnerLost(f"{type(error).__name__}: {error}") from error

    def _learners_alive(self) -> bool:
        # __ray_ready__ is the no-op method Ray gives every actor.
        pings = [worker.__ray_ready__.remote() for worker in self.learners.workers]
        try:
            ray.get(pings, timeout=LEARNER_PING_S)
        except (RayActorError, GetTimeoutError):
            return False
        return True

    async def _restart_learners(self, in_flight: dict[int, asyncio.Task], failed_iteration: int,
                                lost: LearnerLost) -> int:
        """A new learner group from the newest complete checkpoint (the initial weights when
        there is none yet); returns the iteration to go on from."""
        cfg = self.cfg
        restarts = self.counters["faults/learner_restarts"] + 1
        if restarts > cfg.cluster.max_learner_restarts:
            raise RuntimeError(f"learner group lost {restarts:g} times (cluster."
                               f"max_learner_restarts={cfg.cluster.max_learner_restarts})"
                               ) from lost
        if not cfg.lora.enabled:
            raise RuntimeError("a learner rank died during full fine-tuning; the full-weight "
                               "broadcast group cannot be rebuilt in the run. Resume with "
                               "--resume.") from lost
        log.warning("learner lost at iteration %d (%s): restarting the learner group",
                    failed_iteration, lost)
        for task in in_flight.values():  # sampled by weights that the rollback discards
            task.cancel()
        in_flight.clear()
        await asyncio.to_thread(self.learners.shutdown)
        self.learners = None
        self.learners = await asyncio.to_thread(LearnerGroup, cfg)
        try:
            folder, state = latest_checkpoint(self.output_dir)
        except FileNotFoundError:
            folder, state = None, None
        if folder:
            await asyncio.to_thread(self._load_checkpoint, folder, state)
        next_iteration = state.next_iteration if state else 0
        # Data counters go back to the checkpoint with the data; fault counters keep counting.
        faults = {k: v for k, v in self.counters.items() if k.startswith("faults/")}
        self.counters = Counter(dict.fromkeys(COUNTERS, 0.0))
        self.counters.update({k: v for k, v in (state.counters if state else {}).items()
                              if not k.startswith("faults/")})
        self.counters.update(faults)
        self.counters["faults/learner_restarts"] = restarts
        self.counters["faults/redone_iterations"] += failed_iteration - next_iteration
        self.reward_batch_sizes.clear()
        await self._sync_weights()
        log.warning("learner group restarted from %s at iteration %d, version %d",
                    folder or "the initial weights", next_iteration, self.learners.version)
        return next_iteration

    def run(self) -> list[dict[str, float]]:
        """fit() to the end, then release every actor, the reward app and placement group."""
        try:
            with logging_redirect_tqdm():  # log lines above the progress bar, not through it
                return asyncio.run(self.fit())
        finally:
            self.shutdown()

    def _dispatch(self, in_flight: dict[int, asyncio.Task], next_to_train: int) -> None:
        horizon = dispatch_horizon(next_to_train, self.cfg.rollout.max_staleness,
                                   self.cfg.iterations)
        for iteration in range(next_to_train, horizon):
            if iteration not in in_flight:
                in_flight[iteration] = asyncio.create_task(self._produce(iteration))

    def shutdown(self) -> None:
        if self.reward is not None:
            stop_reward_deployment()
        self.fleet.shutdown()
        if self.learners is not None:
            self.learners.shutdown()


def train_on_ray(cfg: TrainConfig, resume: bool = False) -> str:
    """Run (or resume) a training run on the Ray cluster in reach; returns the MLflow run id."""
    # A bad output_dir, reward or MLflow address fails before Ray starts.
    prepare_output_dir(cfg.output_dir, resume)
    cfg.reward.check_ready()
    check_tracking_uri(cfg.mlflow.tracking_uri)
    if not ray.is_initialized():
        ray.init(address=cfg.cluster.address, log_to_driver=True)
    resume_from = latest_checkpoint(cfg.output_dir) if resume else None
    run_id = resume_from[1].mlflow_run_id if resume_from else None
    with Tracker(cfg.mlflow, run_id=run_id, tags={"backend": "ray"},
                 name=run_name("grpo", cfg.model.pretrained)) as tracker:
        RayTrainer(cfg, tracker, resume_from).run()
    return tracker.run_id
