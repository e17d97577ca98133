"""Cluster operator commands: `spatialrl capacity` and `spatialrl cluster-check`."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import yaml

from spatialrl.config import ConfigError

DEFAULT_GPUS = {"rollout": "l40s", "reward": "l4", "learner": "a100"}  # cluster/aws.yaml


def register(subparsers: argparse._SubParsersAction) -> None:
    from spatialrl.throughput_model import GPU_PEAK_BF16

    capacity = subparsers.add_parser(
        "capacity", help="how many rollout and reward workers keep the learner busy",
        description="Seconds per iteration of each role, the bottleneck, and the rollout and "
        "reward workers that keep the learner busy, from measured seconds or from FLOPs on "
        f"the GPU types named (known: {', '.join(GPU_PEAK_BF16)}).")
    _add_config_arguments(capacity)
    capacity.add_argument(
        "--measured", type=Path, metavar="JSON",
        help="measured seconds per item (bench/stage_seconds.py output); FLOPs fill the rest")
    for role, gpu in DEFAULT_GPUS.items():
        capacity.add_argument(f"--{role}-gpu", default=gpu, choices=list(GPU_PEAK_BF16),
                              help=f"GPU type of {role} nodes")
    capacity.add_argument("--mfu", type=float, default=0.4,
                          help="assumed model FLOP utilisation for FLOP estimates")
    capacity.set_defaults(func=run_capacity)

    check = subparsers.add_parser(
        "cluster-check",
        help="check that cluster files (Ray autoscaler YAML, KubeRay RayCluster) hold a config")
    _add_config_arguments(check)
    check.add_argument("clusters", nargs="+", type=Path, metavar="CLUSTER_FILE")
    check.set_defaults(func=run_cluster_check)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value (repeatable)")


def autoscaling_config(path: Path) -> dict[str, Any]:
    """The autoscaler's view of a cluster file, made and validated by Ray's own code: a
    `ray up` config through prepare_config + validate_config (as `ray up` does, without
    the cloud-provider bootstrap), a RayCluster through the KubeRay autoscaler's
    translation (which validates the result)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )
    from ray.autoscaler._private.util import prepare_config, validate_config

    if not path.is_file():
        raise FileNotFoundError(f"cluster file not found: {path}")
    document = yaml.safe_load(path.read_text())
    if not isinstance(document, dict):
        raise ConfigError(f"cluster file {path}: top level must be a mapping")
    if document.get("kind") == "RayCluster":
        ray_cr = copy.deepcopy(document)
        ray_cr["metadata"].setdefault("namespace", "default")  # kubectl's default
        return _derive_autoscaling_config_from_ray_cr(ray_cr)
    if "kind" in document:
        raise ConfigError(f"cluster file {path}: kind {document['kind']!r} is not a RayCluster "
                          "(a RayJob with clusterSelector runs on that RayCluster: check it)")
    if "provider" not in document:
        raise ConfigError(f"cluster file {path}: neither a `ray up` config (no 'provider') nor "
                          "a KubeRay RayCluster; a training config goes with --config")
    config = prepare_config(document)
    validate_config(config)
    return config


def run_cluster_check(args: argparse.Namespace) -> int:
    from spatialrl.cluster_fit import check_placement, node_types
    from spatialrl.config import load_config

    cfg = load_config(args.config, args.overrides)
    for path in args.clusters:
        types = node_types(autoscaling_config(path))
        try:
            check_placement(cfg, types)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        offered = ", ".join(f"{t.name} (<= {t.max_nodes} x {t.resources})" for t in types)
        print(f"{path}: holds {args.config}: {offered}")
    return 0


def run_capacity(args: argparse.Namespace) -> int:
    from spatialrl.config import load_config
    from spatialrl.throughput_model import (
        ROLES,
        Workload,
        load_measured,
        plan_capacity,
        stage_seconds,
        workers_from_config,
    )

    cfg = load_config(args.config, args.overrides)
    measured = load_measured(args.measured) if args.measured else None
    gpus = {role: getattr(args, f"{role}_gpu") for role in ROLES}
    estimates = stage_seconds(cfg, gpus, args.mfu, measured)
    workload = Workload.from_config(cfg)
    workers = workers_from_config(cfg)
    mode = "async" if cfg.rollout.max_staleness >= 1 else "sync"
    plan = plan_capacity({r: e.seconds for r, e in estimates.items()}, workload, workers, mode)

    units = {"rollout": "image", "reward": "image", "learner": "trained sample"}
    print(f"per iteration: {workload.images} images sampled and scored, "
          f"{workload.samples} samples trained")
    for role in ROLES:
        print(f"  {role:8s} {estimates[role].seconds:9.4g} s per {units[role]} per worker "
              f"({estimates[role].source}); {workers[role]} workers -> "
              f"{plan.stage_seconds[role]:.4g} s")
    print(f"iteration: {plan.iteration_seconds:.4g} s ({mode}), bottleneck: {plan.bottleneck}, "
          f"learner busy {plan.learner_busy:.0%}, {plan.images_per_second:.3g} images/s")
    need = plan.workers_for_busy_learner
    print(f"workers that keep the learner busy: rollout {need['rollout']}, "
          f"reward {need['reward']}")
    return 0
