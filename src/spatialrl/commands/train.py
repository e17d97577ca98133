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
        "--backend", choices=["ray", "inprocess"], default="ray",
        help="ray: the asynchronous actor-learner loop on the Ray cluster in reach (a local "
        "instance if none); inprocess: synchronous, one process, no Ray",
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="continue from the newest checkpoint in output_dir, in the same MLflow run (ray)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spatialrl.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.backend == "ray":
        from spatialrl.learners.ray_backend import train_on_ray

        run_id = train_on_ray(cfg, resume=args.resume)
    else:
        if args.resume:
            raise SystemExit("--resume needs --backend ray")
        run_id = _train_in_process(cfg)
    print(f"mlflow run {run_id} finished; outputs in {cfg.output_dir}")
    return 0


def _train_in_process(cfg) -> str:
    from spatialrl.inprocess import InProcessTrainer
    from spatialrl.run_state import prepare_output_dir
    from spatialrl.tracking import Tracker, run_name

    prepare_output_dir(cfg.output_dir)  # a bad output_dir fails before an MLflow run opens
    with Tracker(cfg.mlflow, tags={"backend": "inprocess"},
                 name=run_name("grpo", cfg.model.pretrained)) as tracker:
        InProcessTrainer(cfg).fit(tracker)
    return tracker.run_id
