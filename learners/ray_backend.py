"""`spatialrl train` on Ray: the loop of spatialrl.loop with its roles played by Ray actors.

    rollouts   actors/rollout_fleet.py: rollout actors, each sampling its share of the prompts
               and having it scored by the reward deployment (actors/reward.py, Ray Serve)
    learners   learners/policy_learner.py: the DeepSpeed learner group
    weights    learners/weight_sync.py: LoRA through the object store, or full weights
               through a collective; verified by checksum

The driver is the single controller: it holds the loop's state and the actors' handles.

output_dir is a local path or a URI (s3://, gs://, file://). On a URI every learner rank
writes its checkpoint files into a local staging directory and uploads them; the driver writes
run_state.json (the completion marker, see spatialrl.run_state) after all ranks returned, and
the ledger directly. A resume downloads the checkpoint on each rank before loading it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.experimental import tqdm_ray
from tqdm.contrib.logging import logging_redirect_tqdm

from spatialrl.actors.reward import start_reward_deployment, stop_reward_deployment
from spatialrl.actors.rollout_fleet import RolloutFleet
from spatialrl.config import TrainConfig
from spatialrl.learners.policy_learner import LearnerGroup
from spatialrl.learners.weight_sync import weight_sync_for
from spatialrl.loop import TrainingLoop
from spatialrl.recovery import LearnerLost, describe, resume
from spatialrl.role_resources import check_cluster_fits
from spatialrl.run_state import RunState, latest_checkpoint, prepare_output_dir
from spatialrl.tracking import Tracker, check_tracking_uri, run_name

log = logging.getLogger(__name__)

# After a learner call failed: a rank that does not answer a no-op within this long is taken
# for lost (dead, or stuck in a collective with a dead peer).
LEARNER_PING_S = 10.0


class RayBackend:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.max_staleness = cfg.rollout.max_staleness
        self.counters: Counter = Counter()
        if not cfg.cluster.wait_for_autoscaler:
            check_cluster_fits(cfg, ray.cluster_resources())
        self.learners: LearnerGroup | None = None
        self.rollouts: RolloutFleet | None = None
        self.reward_started = False
        try:
            self.learners = LearnerGroup(cfg)
            self.rollouts = RolloutFleet(cfg, self.counters)
            self.weights = weight_sync_for(cfg, lambda: self.learners, self.rollouts)
            self.rollouts.reload = self.weights.reload
            start_reward_deployment(cfg)
            self.reward_started = True
        except BaseException:
            self.shutdown()
            raise

    async def on_learners(self, call, *args):
        """A blocking call into the learner group, in a thread; an error with a rank gone is
        LearnerLost, any other error (a bug, a NaN) is raised as it is."""
        try:
            return await asyncio.to_thread(call, *args)
        except RayError as error:
            if await asyncio.to_thread(self._learners_alive):
                raise
            failure = describe(error)
        # Raised outside the handler, so not chained to the RayError: the loop keeps the
        # LearnerLost while it rolls back, and through a chained traceback it would keep the
        # failed call's arguments, the iteration's ObjectRefs, pinning their objects.
        raise LearnerLost(failure)

    def _learners_alive(self) -> bool:
        # __ray_ready__ is the no-op method Ray gives every actor.
        pings = [worker.__ray_ready__.remote() for worker in self.learners.workers]
        try:
            ray.get(pings, timeout=LEARNER_PING_S)
        except (RayActorError, GetTimeoutError):
            return False
        return True

    async def rebuild_learners(self) -> None:
        if not self.weights.survives_restarts:
            raise RuntimeError("a learner rank died during full fine-tuning; the full-weight "
                               "broadcast group cannot be rebuilt in the run. Resume with "
                               "--resume.")
        await asyncio.to_thread(self.learners.shutdown)
        self.learners = None
        self.learners = await asyncio.to_thread(LearnerGroup, self.cfg)

    def progress(self, total: int, done: int):
        # Ray's progress bar: the driver draws it and hides it while printing actors' logs.
        bar = tqdm_ray.tqdm(desc="train", total=total, unit="iteration")
        bar.update(done)
        return bar

    def shutdown(self) -> None:
        if self.reward_started:
            stop_reward_deployment()
        if self.rollouts is not None:
            self.rollouts.shutdown()
        if self.learners is not None:
            self.learners.shutdown()


class RayTrainer:
    """The loop on a RayBackend; resume_from is (checkpoint folder, its run state)."""

    def __init__(self, cfg: TrainConfig, tracker: Tracker,
                 resume_from: tuple[str, RunState] | None = None):
        # A path or URI, before any actor; checked again here for callers other than train_on_ray.
        output_dir = prepare_output_dir(cfg.output_dir, resume=resume_from is not None)
        self.backend = RayBackend(cfg)
        try:
            self.loop = TrainingLoop(cfg, self.backend, tracker, output_dir)
            if resume_from is not None:
                resume(self.loop, *resume_from)
        except BaseException:
            self.backend.shutdown()
            raise

    async def fit(self) -> list[dict[str, float]]:
        # Learner calls, the ledger and checkpoints wait in threads; the default pool (cores
        # + 4) would cap the groups being scored at once.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=64))
        return await self.loop.fit()

    def run(self) -> list[dict[str, float]]:
        """fit() to the end, then release every actor, the reward app and placement group."""
        try:
            with logging_redirect_tqdm():  # log lines above the progress bar, not through it
                return asyncio.run(self.fit())
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.backend.shutdown()


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
