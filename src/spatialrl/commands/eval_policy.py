"""`spatialrl eval-policy`: a position benchmark of a policy, for a base pipeline and, side by
side, the same pipeline with a trained LoRA.

The prompts are held-out prompts of a world (`--world shapes`: unseen colour/shape
combinations, judged by the rule evaluator; `--world real`: unseen object-class pairs, judged
by a zero-shot detector and the same rules for the 2-D relations), or a prompt file
(`--prompt-file`): a parquet prompt file of the world, or GenEval's evaluation_metadata.jsonl,
whose "position" lines are judged by the detector and GenEval's position rule.

Images come from the ODE sampler (noise 0), which equals FluxPipeline's own output, with one
fixed seed per prompt, so two runs of a model give the same figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval-policy", help="rule-evaluator figures of a FLUX policy on held-out prompts",
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True,
                        help="FluxPipeline folder or hub id (e.g. models/shapes-flux)")
    parser.add_argument("--lora", type=Path, default=None,
                        help="LoRA folder (pytorch_lora_weights.safetensors) to compare")
    parser.add_argument("--world", choices=["shapes", "real"], default="shapes",
                        help="whose held-out prompts (or --prompt-file's) to judge")
    parser.add_argument("--prompt-file", type=Path, default=None,
                        help="a parquet prompt file of --world, or GenEval metadata (.jsonl)")
    parser.add_argument("--prompts", type=int, default=300,
                        help="held-out prompts (at most this many from --prompt-file)")
    parser.add_argument("--prompt-seed", type=int, default=0, help="draws the prompts")
    parser.add_argument("--seed", type=int, default=0, help="draws each prompt's noise")
    parser.add_argument("--num-steps", type=int, default=16, help="ODE steps")
    parser.add_argument("--guidance-scale", type=float, default=3.5)
    parser.add_argument("--max-sequence-length", type=int, default=40)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--detector", default="google/owlv2-base-patch16-ensemble",
                        help="OWLv2 hub id or folder that judges real objects")
    parser.add_argument("--detector-threshold", type=float, default=0.2,
                        help="lowest detector score that counts as finding an object")
    parser.add_argument("--device", default="cpu", help="where the policy and detector run")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spatialrl.config import PolicyModelConfig, SamplingConfig
    from spatialrl.flux.loading import load_flux_pipeline
    from spatialrl.policy_evaluation import position_figures, sample_eval_images
    from spatialrl.position_benchmark import held_out_benchmark, read_benchmark

    if args.prompt_file is not None:
        benchmark = read_benchmark(args.prompt_file, args.world, args.prompts)
    else:
        benchmark = held_out_benchmark(args.world, args.prompts, args.prompt_seed)
    locator = _locator(args, benchmark.needs_detector)  # before the policy: fails fast
    prompts = benchmark.prompts
    sampling = SamplingConfig(
        height=args.size, width=args.size, eval_num_steps=args.num_steps,
        num_steps=args.num_steps, batch_size=args.batch_size,
        guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length,
    )
    pipeline = load_flux_pipeline(PolicyModelConfig(pretrained=args.model, dtype="float32"),
                                  device=args.device)

    def score() -> dict[str, float]:
        images = sample_eval_images(pipeline, prompts, sampling, args.seed)
        return position_figures(images, benchmark.scenes, locator, benchmark.rule)

    figures = {"base": score()}
    if args.lora is not None:
        pipeline.transformer.load_lora_adapter(args.lora, use_safetensors=True)
        figures["lora"] = score()
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    record = {"settings": json.loads(json.dumps(settings, default=str)),
              "benchmark": benchmark.name, "prompts": len(prompts), "figures": figures}
    text = json.dumps(record, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


def _locator(args: argparse.Namespace, needs_detector: bool):
    """The rule evaluator's colour reading for shapes, else the detector."""
    from spatialrl.data.judge import ColourLocator

    if not needs_detector:
        return ColourLocator()
    from spatialrl.detection import OwlDetector

    return OwlDetector.from_pretrained(args.detector, args.device, args.detector_threshold)
