"""`spatialrl train`: filtered GRPO on a FLUX policy."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a FLUX policy with filtered GRPO")
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set grpo.top_k=4 (repeatable)",
    )
    parser.add_argument(
        "--backend", choices=["inprocess"], default="inprocess",
        help="inprocess: synchronous, one process, no Ray",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spatialrl.config import load_config
    from spatialrl.inprocess import InProcessTrainer
    from spatialrl.tracking import Tracker

    cfg = load_config(args.config, args.overrides)
    tracker = Tracker(cfg.mlflow, tags={"backend": args.backend})
    try:
        InProcessTrainer(cfg).fit(tracker)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    print(f"mlflow run {tracker.run_id} finished; outputs in {cfg.output_dir}")
    return 0
