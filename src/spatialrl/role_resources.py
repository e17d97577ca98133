"""Resource bundles of the trainer's three roles, and the check that a cluster can hold them.

Each role asks for CPUs, GPUs and the custom resources its config names (e.g. rollout_node),
so that an autoscaler adds nodes of the matching type and nothing else lands there.
"""

from __future__ import annotations

from collections import Counter

from spatialrl.config import ConfigError, TrainConfig

Bundle = dict[str, float]


def bundle(cpus: float, gpus: float, custom: dict[str, float]) -> Bundle:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **custom}


def role_bundles(cfg: TrainConfig) -> dict[str, list[Bundle]]:
    """One bundle per rollout actor, reward replica (at its minimum count) and learner rank."""
    rollout, serving, learner = cfg.rollout, cfg.reward.serving, cfg.learner
    replicas = serving.autoscaling.min_replicas if serving.autoscaling else serving.replicas
    return {
        "rollout": [bundle(rollout.cpus_per_actor, rollout.gpus_per_actor,
                           rollout.custom_resources)] * rollout.num_actors,
        "reward": [bundle(serving.cpus_per_replica, serving.gpus_per_replica,
                          serving.custom_resources)] * replicas,
        "learner": [bundle(learner.cpus_per_worker, learner.gpus_per_worker,
                           learner.custom_resources)] * learner.num_workers,
    }


def total_demand(bundles: dict[str, list[Bundle]]) -> Counter:
    demand: Counter = Counter()
    for role_bundles_ in bundles.values():
        for one in role_bundles_:
            demand.update(one)
    return demand


def check_cluster_fits(cfg: TrainConfig, cluster_resources: dict[str, float]) -> None:
    """Raise a ConfigError naming every resource the roles need more of than the cluster has
    in total. (Fragmentation across nodes is left to the placement groups' own wait.)"""
    bundles = role_bundles(cfg)
    short = []
    for name, needed in sorted(total_demand(bundles).items()):
        have = cluster_resources.get(name, 0.0)
        if needed > have + 1e-9:
            users = [role for role, bs in bundles.items() if any(b.get(name) for b in bs)]
            short.append(f"{name}: {needed:g} needed by {'+'.join(users)}, cluster has {have:g}")
    if short:
        raise ConfigError(
            "the cluster is too small for this config (set cluster.wait_for_autoscaler: true to "
            "wait for an autoscaler instead): " + "; ".join(short)
        )
