"""`spatialrl eval-policy`: a position benchmark of a policy, for a base pipeline and, side by
side, the same pipeline with a trained LoRA (the same prompts and seeds).

The prompts are held-out prompts of a world (`--world shapes`: unseen colour/shape
combinations, judged by the rule evaluator; `--world real`: unseen object-class pairs, judged
by a zero-shot detector and the same rules for the 2-D relations), or a prompt file
(`--prompt-file`): a parquet prompt file of the world, or GenEval's evaluation_metadata.jsonl,
whose "position" lines are judged by the detector and GenEval's position rule. With
`--spatialscore` a SpatialScore checkpoint scores every image too (mean mu and sigma).

Images come from the ODE sampler (noise 0), which equals FluxPipeline's own output, with one
fixed seed per prompt, so two runs of a model give the same figures. The figures are printed
as a table and logged to an MLflow run (metrics base/..., lora/..., lora_minus_base/..., the
settings as params, a captioned image grid and report.json).

Settings come from `--config FILE` (configs/eval/), then `--set KEY=VALUE`, then the flags
below; each flag's help names its config key and the default without a config.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spatialrl.errors import InputError

FLAG_PREFIX = "config:"  # argparse dest of a flag that sets a config key


def register(subparsers: argparse._SubParsersAction) -> None:
    from spatialrl.config import flatten
    from spatialrl.eval_policy_config import EvalPolicyConfig

    parser = subparsers.add_parser(
        "eval-policy", help="position benchmark of a FLUX policy, base and LoRA side by side",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML config (see configs/eval/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value (repeatable)")
    defaults = flatten(EvalPolicyConfig())

    def flag(name: str, key: str, text: str, **kwargs) -> None:
        if "choices" not in kwargs:
            kwargs["metavar"] = name.removeprefix("--").upper().replace("-", "_")
        parser.add_argument(name, dest=FLAG_PREFIX + key, default=None,
                            help=f"{text} [{key}, default {defaults[key]}]", **kwargs)

    flag("--model", "model.pretrained", "FluxPipeline folder or hub id (models/shapes-flux)")
    flag("--dtype", "model.dtype", "the pipeline's dtype",
         choices=["float32", "bfloat16", "float16"])
    flag("--lora", "lora", "LoRA folder (pytorch_lora_weights.safetensors) judged beside it")
    flag("--world", "benchmark.world", "whose held-out prompts (or --prompt-file's) to judge",
         choices=["shapes", "real"])
    flag("--prompt-file", "benchmark.prompt_file",
         "a parquet prompt file of --world, or GenEval metadata (.jsonl)")
    flag("--prompts", "benchmark.prompts", "held-out prompts (at most this many from a file)",
         type=int)
    flag("--prompt-seed", "benchmark.prompt_seed", "draws the prompts", type=int)
    flag("--seed", "sampling.seed", "draws each prompt's noise", type=int)
    flag("--num-steps", "sampling.num_steps", "ODE steps", type=int)
    flag("--guidance-scale", "sampling.guidance_scale", "FLUX guidance", type=float)
    flag("--max-sequence-length", "sampling.max_sequence_length", "T5 tokens", type=int)
    flag("--size", "sampling.size", "image side in pixels", type=int)
    flag("--batch-size", "sampling.batch_size", "images per batch", type=int)
    flag("--detector", "judge.detector", "OWLv2 hub id or folder that judges real objects")
    flag("--detector-threshold", "judge.detector_threshold",
         "lowest detector score that counts as finding an object", type=float)
    flag("--spatialscore", "judge.spatialscore",
         "SpatialScore checkpoint that scores every image (e.g. models/spatialscore-shapes)")
    flag("--device", "device", "where the policy, detector and SpatialScore run")
    flag("--out", "out", "also write the report here (JSON)")
    flag("--tracking-uri", "mlflow.tracking_uri", "MLflow store of the run")
    flag("--experiment", "mlflow.experiment", "MLflow experiment")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spatialrl import reward_functions
    from spatialrl.benchmark_report import figure_table, log_report, report_record
    from spatialrl.flux.loading import load_flux_pipeline
    from spatialrl.tracking import Tracker, check_tracking_uri, run_name

    cfg = _config(args)
    benchmark = _benchmark(cfg)
    check_tracking_uri(cfg.mlflow.tracking_uri)
    # Judges and the LoRA are checked before the policy loads, so bad input fails fast.
    locator = _locator(cfg, benchmark.needs_detector)
    spatialscore = (reward_functions.spatialscore(cfg.judge.spatialscore, cfg.device)
                    if cfg.judge.spatialscore else None)
    if cfg.lora is not None and not Path(cfg.lora).is_dir():
        raise FileNotFoundError(f"lora: no LoRA folder at {cfg.lora}")
    pipeline = load_flux_pipeline(cfg.model, device=cfg.device)
    with Tracker(cfg.mlflow, name=run_name("eval-policy", cfg.model.pretrained),
                 tags={"benchmark": benchmark.name}) as tracker:
        tracker.log_config(cfg)
        sides = _judged_sides(pipeline, cfg, benchmark, locator, spatialscore)
        record = report_record(cfg, benchmark, sides) | {"mlflow_run_id": tracker.run_id}
        log_report(tracker, record, sides, benchmark.prompts, cfg.judge.grid_prompts)
    if cfg.out is not None:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(record, indent=2) + "\n")
    print(figure_table(record))
    return 0


def _config(args: argparse.Namespace):
    from spatialrl.config import load_config
    from spatialrl.eval_policy_config import EvalPolicyConfig

    flags = {dest.removeprefix(FLAG_PREFIX): value for dest, value in vars(args).items()
             if dest.startswith(FLAG_PREFIX) and value is not None}
    if args.config is None and "model.pretrained" not in flags:
        raise InputError("which policy? give --model PIPELINE or --config FILE")
    return load_config(args.config, args.overrides, EvalPolicyConfig, flags)


def _benchmark(cfg):
    from spatialrl.position_benchmark import held_out_benchmark, read_benchmark

    spec = cfg.benchmark
    if spec.prompt_file is not None:
        return read_benchmark(Path(spec.prompt_file), spec.world, spec.prompts)
    return held_out_benchmark(spec.world, spec.prompts, spec.prompt_seed)


def _locator(cfg, needs_detector: bool):
    """The rule evaluator's colour reading for shapes, else the detector."""
    from spatialrl.data.judge import ColourLocator

    if not needs_detector:
        return ColourLocator()
    from spatialrl.detection import OwlDetector

    return OwlDetector.from_pretrained(cfg.judge.detector, cfg.device,
                                       cfg.judge.detector_threshold)


def _judged_sides(pipeline, cfg, benchmark, locator, spatialscore) -> dict:
    """The base pipeline's samples judged, then with the LoRA loaded the same prompts and
    seeds again."""
    from spatialrl.benchmark_report import judge_side
    from spatialrl.policy_evaluation import sample_eval_images

    def judged():
        images = sample_eval_images(pipeline, benchmark.prompts, cfg.sampling.sampling(),
                                    cfg.sampling.seed)
        return judge_side(images, benchmark, locator, spatialscore, cfg.sampling.batch_size)

    sides = {"base": judged()}
    if cfg.lora is not None:
        pipeline.transformer.load_lora_adapter(cfg.lora, use_safetensors=True)
        sides["lora"] = judged()
    return sides
