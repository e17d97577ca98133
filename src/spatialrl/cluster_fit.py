"""Whether a cluster's node types can hold the trainer's roles.

A cluster is described the way the Ray autoscaler sees it: `available_node_types`, each with
the `resources` one node advertises (CPU, GPU and custom resources such as rollout_node) and
a `max_workers` bound, plus `head_node_type` and a global `max_workers`. That is the format
of a `ray up` config (cluster/aws.yaml) and what the KubeRay autoscaler derives from a
RayCluster (`spatialrl cluster-check` does that translation with Ray's own code).

Each role's bundle (spatialrl.role_resources.role_bundles: CPUs, GPUs and the role's custom
resources) must fit on one node of some type, and the types that fit must hold all of the
role's bundles at their largest count (reward replicas at autoscaling.max_replicas). Roles
are checked one at a time: the custom resources give each role node types of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from spatialrl.config import ConfigError, TrainConfig
from spatialrl.role_resources import Bundle, role_bundles


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]  # what one node advertises to Ray
    max_nodes: int


def node_types(autoscaling_config: dict[str, Any]) -> list[NodeType]:
    """The node types of an autoscaler config; the head type counts its one head node."""
    try:
        available = autoscaling_config["available_node_types"]
    except KeyError:
        raise ConfigError("cluster config: no available_node_types") from None
    global_max = autoscaling_config.get("max_workers", math.inf)
    head = autoscaling_config.get("head_node_type")
    types = []
    for name, spec in available.items():
        # Ray's defaults: a head type adds no workers, a worker type up to the global bound.
        workers = spec.get("max_workers", 0 if name == head else global_max)
        nodes = min(workers, global_max) + (1 if name == head else 0)
        types.append(NodeType(name, dict(spec.get("resources", {})), int(nodes)))
    return types


def bundles_per_node(node: NodeType, ask: Bundle) -> int:
    """How many copies of `ask` one node of this type holds."""
    return min(
        math.floor(node.resources.get(name, 0) / amount + 1e-9)
        for name, amount in ask.items() if amount > 0
    )


def peak_bundles(cfg: TrainConfig) -> dict[str, list[Bundle]]:
    """role_bundles with the reward deployment at its largest autoscaled size."""
    scaling = cfg.reward.serving.autoscaling
    if scaling is not None:
        cfg = cfg.model_copy(deep=True)
        cfg.reward.serving.autoscaling.min_replicas = scaling.max_replicas
    return role_bundles(cfg)


def _shortfall(role: str, ask: Bundle, count: int, types: list[NodeType]) -> str:
    unoffered = [name for name in ask if not any(t.resources.get(name) for t in types)]
    if unoffered:
        return f"{role}: no node type offers {', '.join(unoffered)} (each of {count} asks {ask})"
    hosts = [(t, bundles_per_node(t, ask)) for t in types]
    hosts = [(t, fit) for t, fit in hosts if fit > 0]
    if not hosts:
        offers = "; ".join(f"{t.name} {t.resources}" for t in types)
        return f"{role}: no node type has room for one bundle {ask} (node types: {offers})"
    held = ", ".join(f"{t.name}: {fit} per node x {t.max_nodes} nodes" for t, fit in hosts)
    return f"{role}: {count} bundles of {ask} do not fit ({held})"


def placement_problems(cfg: TrainConfig, types: list[NodeType]) -> list[str]:
    """One line per role the node types cannot hold; empty when every role fits."""
    problems = []
    for role, bundles in peak_bundles(cfg).items():
        if not bundles:
            continue
        capacity = sum(bundles_per_node(t, bundles[0]) * t.max_nodes for t in types)
        if capacity < len(bundles):
            problems.append(_shortfall(role, bundles[0], len(bundles), types))
    return problems


def check_placement(cfg: TrainConfig, types: list[NodeType]) -> None:
    problems = placement_problems(cfg, types)
    if problems:
        raise ConfigError("the cluster's node types cannot hold the trainer: "
                          + "; ".join(problems))
