"""`spatialrl serve`: SpatialScore (or, with `kind: spatialreward` in the config, SpatialReward)
as an HTTP service; `spatialrl generate`: best-of-N."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="SpatialScore, or SpatialReward with a `kind: spatialreward` config, as "
        "an HTTP JSON service on Ray Serve (127.0.0.1 unless --host says otherwise)",
    )
    _config_arguments(serve)
    serve.add_argument("--host", help="address to bind (default: the config's, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="default: the config's, 8000")
    serve.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a "
                       "new local instance)")
    serve.set_defaults(func=run_serve)

    generate = subparsers.add_parser(
        "generate", help="best-of-N: sample N candidates, rank them by the reward, keep the best"
    )
    _config_arguments(generate)
    generate.add_argument("--prompt", required=True,
                          help="the text to draw, e.g. 'a red circle left of a blue square'")
    generate.add_argument("--best-of", type=_positive_int, required=True, metavar="N",
                          help="candidates to sample; the reward ranks them and keeps the best")
    generate.add_argument("--seed", type=_seed, default=0, help="candidate i uses seed + i")
    generate.add_argument("--pipeline", metavar="FLUX_ID_OR_PATH",
                          help="the FLUX pipeline to sample (sets generator.model.pretrained)")
    generate.add_argument("--lora", metavar="DIR", help="a save_lora folder for the pipeline")
    generate.add_argument("--out", type=Path, default=Path("runs/best-of-n"), metavar="DIR",
                          help="best.png, every candidate and best_of_n.json")
    generate.add_argument("--device", help="default: cuda if available, else cpu")
    generate.set_defaults(func=run_generate)


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="service YAML (see configs/serve/); default: defaults")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set limits.max_items=16 (repeatable)",
    )
    parser.add_argument("--model", metavar="CKPT",
                        help="SpatialScore checkpoint folder or hub repo (sets reward.kind="
                        "spatialscore and reward.spatialscore_path); with kind: spatialreward, "
                        "the judge's folder or hub id (sets model.model)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    from spatialrl.service.api import MAX_SEED

    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63 - 1], got {value}")
    return value


def load_service_config(args: argparse.Namespace):
    """The config of the service kind the YAML (or --set kind=...) names."""
    from spatialrl.config import load_config
    from spatialrl.service.config import ServiceConfig, ServiceKindOnly, resolve_local_paths

    if load_config(args.config, args.overrides, model=ServiceKindOnly).kind == "spatialreward":
        return _load_spatialreward_config(args)
    cfg = load_config(args.config, args.overrides, model=ServiceConfig)
    if args.model:
        cfg.reward.kind, cfg.reward.spatialscore_path = "spatialscore", args.model
    resolve_local_paths(cfg)
    return cfg


def _load_spatialreward_config(args: argparse.Namespace):
    from spatialrl.config import load_config
    from spatialrl.service.spatialreward_config import (
        SpatialRewardServiceConfig,
        resolve_model_path,
    )

    values = {"model.model": args.model} if args.model else None
    cfg = load_config(args.config, args.overrides, model=SpatialRewardServiceConfig,
                      values=values)
    resolve_model_path(cfg)
    return cfg


def run_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from spatialrl.actors.ingress import auth_token
    from spatialrl.service.config import LOOPBACK_HOSTS

    cfg = load_service_config(args)
    service, title = _service_module(cfg, args)
    cfg.host = args.host or cfg.host
    cfg.port = args.port or cfg.port
    if auth_token(cfg) is None and cfg.host not in LOOPBACK_HOSTS:
        log.warning("serving on %s without authentication (auth_token_env is unset)", cfg.host)
    # Set before start-up: a Ctrl-C while Serve is still deploying stops it cleanly once the
    # deploy returns, instead of interrupting it halfway.
    stop = _stop_on_signals()
    ray.init(address=args.address)
    try:
        url = service.start_service(cfg)
        print(f"{title} service at {url} (OpenAPI: {url}/docs); Ctrl-C stops it", flush=True)
        stop.wait()
        serve.delete(service.APP_NAME)
    finally:
        ray.shutdown()
    return 0


def _service_module(cfg, args: argparse.Namespace):
    """(the actors module that runs the service, its title), once what it needs is checked:
    before Ray starts, so that a missing model or engine fails in one line."""
    if cfg.kind == "spatialscore":
        from spatialrl.actors import service

        cfg.reward.check_ready()
        return service, "SpatialScore"
    from spatialrl.actors import spatialreward
    from spatialrl.config import ConfigError
    from spatialrl.spatialreward.engines import EngineUnavailable, import_vllm

    # A new local instance runs the replicas in this environment: vllm must be here.
    if cfg.serving.engine == "vllm" and not (args.address or os.environ.get("RAY_ADDRESS")):
        try:
            import_vllm()
        except EngineUnavailable as err:
            raise ConfigError(f"serving.engine: {err}") from None
    return spatialreward, "SpatialReward"


def _stop_on_signals():
    """An event that Ctrl-C or SIGTERM sets."""
    import signal
    import threading

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from spatialrl.config import PolicyModelConfig
    from spatialrl.errors import InputError
    from spatialrl.generation import best_of_n, build_sampler
    from spatialrl.prompts import check_prompt
    from spatialrl.reward_functions import build_reward, reward_version
    from spatialrl.service.config import FluxGeneratorConfig

    cfg = load_service_config(args)
    if cfg.kind != "spatialscore":
        raise InputError("generate ranks candidates with SpatialScore: give a spatialscore config")
    if args.pipeline:
        flux = cfg.generator if isinstance(cfg.generator, FluxGeneratorConfig) else None
        cfg.generator = flux or FluxGeneratorConfig(model=PolicyModelConfig())
        cfg.generator.model.pretrained = args.pipeline
    if args.lora:
        if not isinstance(cfg.generator, FluxGeneratorConfig):
            raise InputError("--lora needs a FLUX generator (--pipeline or generator.kind=flux)")
        cfg.generator.lora_path = args.lora
    if cfg.generator is None:
        raise InputError("give --pipeline, or a config with a generator section")
    check_prompt(args.prompt, "--prompt")
    cfg.reward.check_ready()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    sampler = build_sampler(cfg.generator, device)
    result = best_of_n(sampler, build_reward(cfg.reward, device), args.prompt, args.best_of,
                       args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for index, (seed, image) in enumerate(zip(result.seeds, result.images, strict=True)):
        image.save(args.out / f"candidate-{index:02d}-seed{seed}.png")
    result.images[result.best].save(args.out / "best.png")
    summary = {
        "prompt": args.prompt,
        "best_index": result.best,
        "model_version": reward_version(cfg.reward),
        "generator": sampler.name,
        "candidates": [{"seed": s, "mu": m, "sigma": g} for s, m, g in
                       zip(result.seeds, result.mu, result.sigma, strict=True)],
    }
    (args.out / "best_of_n.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0
