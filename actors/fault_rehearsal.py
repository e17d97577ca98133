"""Fault rehearsals of the Ray trainer on a local autoscaling cluster (Ray's fake multi-node
provider, spatialrl.actors.local_cluster): one node type per role advertising the trainer's
custom resources, as in cluster/aws.yaml, sized for a 2-core machine.

Three scenarios of the real trainer (tiny FLUX, 2 rollout actors, the reward on Ray Serve, 2
DeepSpeed learner ranks), each on a cluster that starts with the head node alone:
- rollout_node_lost: once the first update is applied, the node holding both rollout actors
  is killed (SIGKILL of its raylet and workers, as when a spot instance goes). The
  autoscaler replaces it, Ray restarts the actors there, and their groups are redone.
- learner_rank_lost: after iteration 2 is logged, learner rank 1 is killed. The trainer
  rebuilds the learner group from the checkpoint of iteration 1 and redoes iteration 2.
- learner_node_lost: the same moment, but the node holding both learner ranks is killed
  (SIGKILL of its raylet and workers). The rebuilt group waits for the autoscaler's
  replacement node.
Each records what was killed, what the run lost (spatialrl.train_batch.audit_ledger: groups
trained on twice, in part or not at all), the fault counters logged to MLflow, the node types
the autoscaler launched and how long recovery took. bench/fault_tolerance.py writes the
records to a result file; tests/test_autoscaling_cluster.py asserts them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from contextlib import AbstractContextManager
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient

from spatialrl import storage
from spatialrl.actors.local_cluster import LocalAutoscalingCluster, connected
from spatialrl.config import TrainConfig, load_config
from spatialrl.learners.ray_backend import RayTrainer
from spatialrl.tracking import Tracker
from spatialrl.train_batch import audit_ledger, ledger_file

STORE = 200 * 2**20  # object store bytes per node
# One node per role is enough for the trainer; rollout and learner may have a second so that a
# lost node's replacement can start before the autoscaler has dropped the dead one.
NODE_TYPES = {
    "rollout": {"resources": {"CPU": 1, "rollout_node": 2, "object_store_memory": STORE},
                "max_workers": 2},
    "reward": {"resources": {"CPU": 1, "reward_node": 1, "object_store_memory": STORE},
               "max_workers": 1},
    "learner": {"resources": {"CPU": 1, "learner_node": 2, "object_store_memory": STORE},
                "max_workers": 2},
}
GROUP_SIZE, TOP_K, PROMPTS_PER_ITERATION = 4, 1, 2


def trainer_config(tiny_flux: Path, workdir: Path, *extra: str) -> TrainConfig:
    """configs/tiny.yaml at the smallest settings, each role asking for its node type."""
    return load_config("configs/tiny.yaml", [
        f"model.pretrained={tiny_flux}", f"output_dir={workdir / 'run'}",
        f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        "eval_every=0", f"prompts.prompts_per_iteration={PROMPTS_PER_ITERATION}",
        f"grpo.group_size={GROUP_SIZE}", f"grpo.top_k={TOP_K}", "sampling.num_steps=4",
        "optim.micro_batch_size=2", "optim.updates_per_iteration=1",
        "cluster.wait_for_autoscaler=true", "cluster.placement_timeout_s=600",
        "rollout.custom_resources={rollout_node: 1}",
        "reward.serving.custom_resources={reward_node: 1}",
        "learner.custom_resources={learner_node: 1}", *extra,
    ])


def autoscaling_cluster() -> AbstractContextManager[LocalAutoscalingCluster]:
    """The head node alone, connected; the autoscaler adds the role nodes on demand."""
    return connected(LocalAutoscalingCluster(NODE_TYPES))


def run_with_fault(cluster: LocalAutoscalingCluster, cfg: TrainConfig, fault) -> dict:
    """Run the trainer to the end while `fault(trainer)` (a coroutine) injects a failure and
    returns what it did; records the worker node types the autoscaler launched meanwhile."""
    start_workers = dict(cluster.worker_counts())
    tracker = Tracker(cfg.mlflow)
    launched: dict[str, str] = {}  # node id -> node type, every worker node seen alive
    started = time.monotonic()

    async def watch_nodes(stop: asyncio.Event) -> None:
        while not stop.is_set():
            for node in await asyncio.to_thread(cluster.alive_nodes):
                kind = cluster.node_type(node)
                if kind in NODE_TYPES:
                    launched[node["NodeID"]] = kind
            await asyncio.sleep(0.5)

    async def run(trainer: RayTrainer):
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_nodes(stop))
        injected = asyncio.create_task(fault(trainer))
        try:
            history = await trainer.fit()
            return history, await injected
        finally:
            injected.cancel()
            stop.set()
            await watcher

    status = "FAILED"
    try:
        trainer = RayTrainer(cfg, tracker)
        try:
            history, injected = asyncio.run(run(trainer))
            status = "FINISHED"
        finally:
            trainer.shutdown()
    finally:
        tracker.finish(status)
    logged = MlflowClient(cfg.mlflow.tracking_uri).get_run(tracker.run_id).data.metrics
    return {
        "run_id": tracker.run_id,
        "worker_nodes_at_start": start_workers,
        "node_types_launched": dict(Counter(launched.values())),
        "killed": injected,
        "iterations": len(history),
        "final_version": history[-1]["policy/version"],
        "faults_logged": {k: v for k, v in logged.items() if k.startswith("faults/")},
        "lost": audit_ledger(cfg),
        "wall_s": round(time.monotonic() - started, 1),
    }


def first_update_applied(trainer: RayTrainer) -> bool:
    return trainer.backend.learners.version >= 1


def iteration_written(iteration: int):
    """Whether `iteration` is in the ledger: trained on and published."""
    return lambda trainer: storage.exists(ledger_file(trainer.loop.output_dir, iteration))


def kill_role_node(cluster: LocalAutoscalingCluster, role: str, ready):
    """A fault: once `ready(trainer)` holds, SIGKILL the raylet of the node holding `role`'s
    workers (as when a spot instance or a machine goes); wait for its replacement."""

    async def fault(trainer: RayTrainer) -> dict:
        while not ready(trainer):
            await asyncio.sleep(0.05)
        (node,) = cluster.nodes_of_type(role)
        version = trainer.backend.learners.version
        killed_at = time.monotonic()
        pid = cluster.kill_node(node["NodeID"])

        def replaced() -> bool:
            return any(n["NodeID"] != node["NodeID"] for n in cluster.nodes_of_type(role))

        replaced_after = await asyncio.to_thread(cluster.wait_for, replaced, 300,
                                                 f"a replacement {role} node")
        return {"what": f"{role} node: SIGKILL of its raylet and workers",
                "node_id": node["NodeID"], "raylet_pid": pid, "at_learner_version": version,
                "replacement_node_alive_after_s": round(replaced_after, 1),
                "since_kill_s": round(time.monotonic() - killed_at, 1)}

    return fault


def kill_rollout_node_before_learning(cluster: LocalAutoscalingCluster):
    """A fault: the rollout node dies after the first iteration was sampled and scored, just
    before the learner ranks fetch its trajectories (which live in that node's object
    store). The iteration's samples are lost with it; the loop samples it again."""

    async def fault(trainer: RayTrainer) -> dict:
        learners, record = trainer.backend.learners, {}
        update = learners.update

        def update_after_losing_the_node(batch):
            if not record:
                (node,) = cluster.nodes_of_type("rollout")
                record.update(
                    what="rollout node: SIGKILL of its raylet and workers, before learning",
                    node_id=node["NodeID"], at_learner_version=learners.version,
                    raylet_pid=cluster.kill_node(node["NodeID"]))
            return update(batch)

        learners.update = update_after_losing_the_node
        while not record:
            await asyncio.sleep(0.05)
        return record

    return fault


def kill_learner_rank(rank: int, after_iteration: int):
    """A fault: once `after_iteration` is in the ledger, kill one learner rank; the next
    learner call finds it gone."""

    async def fault(trainer: RayTrainer) -> dict:
        while not iteration_written(after_iteration)(trainer):
            await asyncio.sleep(0.05)
        version = trainer.backend.learners.version
        ray.kill(trainer.backend.learners.workers[rank], no_restart=True)
        return {"what": f"learner rank {rank}: ray.kill (the process ends)",
                "after_iteration": after_iteration, "at_learner_version": version}

    return fault


def rollout_node_lost(cluster, tiny_flux: Path, workdir: Path) -> dict:
    cfg = trainer_config(tiny_flux, workdir, "iterations=3", "checkpoint_every=0")
    return run_with_fault(cluster, cfg, kill_role_node(cluster, "rollout", first_update_applied))


def samples_lost(cluster, tiny_flux: Path, workdir: Path) -> dict:
    cfg = trainer_config(tiny_flux, workdir, "iterations=3", "checkpoint_every=0")
    return run_with_fault(cluster, cfg, kill_rollout_node_before_learning(cluster))


def learner_lost(cluster, tiny_flux: Path, workdir: Path, fault) -> dict:
    """4 iterations, checkpoints after iterations 1 and 3, with `fault` after iteration 2."""
    cfg = trainer_config(tiny_flux, workdir, "iterations=4", "checkpoint_every=2")
    record = run_with_fault(cluster, cfg, fault)
    history = MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(
        record["run_id"], "policy/version")
    record["policy_version_history"] = [(m.step, m.value) for m in history]
    return record


def learner_rank_lost(cluster, tiny_flux: Path, workdir: Path) -> dict:
    return learner_lost(cluster, tiny_flux, workdir,
                        kill_learner_rank(rank=1, after_iteration=2))


def learner_node_lost(cluster, tiny_flux: Path, workdir: Path) -> dict:
    return learner_lost(cluster, tiny_flux, workdir,
                        kill_role_node(cluster, "learner", iteration_written(2)))
