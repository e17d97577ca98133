"""Placement groups for the trainer's roles, reserved before any actor starts."""

from __future__ import annotations

import time
from collections import Counter

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from spatialrl.role_resources import Bundle


def reserve(role: str, bundles: list[Bundle], timeout_s: float, strategy: str = "PACK"
            ) -> PlacementGroup:
    """A ready placement group; waits up to timeout_s (for an autoscaler to add nodes)."""
    group = placement_group(bundles, strategy=strategy, name=f"spatialrl-{role}")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise TimeoutError(
            f"{role}: no room for {len(bundles)} x {bundles[0]} after {timeout_s:g} s "
            f"(cluster has {ray.cluster_resources()})"
        )
    return group


def release(group: PlacementGroup, settle_s: float = 10.0) -> None:
    """Remove a placement group and wait (at most settle_s) until the cluster's available
    resources show its bundles on live nodes freed, so that a group reserved for the same role
    next lands there instead of looking like demand to the autoscaler. Bundles on a lost node
    are not waited for: their resources never come back."""
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    placed = placement_group_table(group).get("bundles_to_node_id", {})
    freed = Counter()
    for index, bundle in enumerate(group.bundle_specs):
        if placed.get(index) in alive:
            freed.update(bundle)
    before = ray.available_resources()
    remove_placement_group(group)
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        available = ray.available_resources()
        if all(available.get(k, 0) >= before.get(k, 0) + v for k, v in freed.items()):
            return
        time.sleep(0.1)


def in_bundle(group: PlacementGroup, index: int, one: Bundle) -> dict:
    """Actor options that pin an actor to bundle `index` with that bundle's resources."""
    custom = {k: v for k, v in one.items() if k not in ("CPU", "GPU")}
    return {
        "num_cpus": one["CPU"],
        "num_gpus": one.get("GPU", 0),
        "resources": custom,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=index),
    }
