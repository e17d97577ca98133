"""`spatialrl eval-policy`: what the rule evaluator reads from a policy's images of held-out
shapes-world prompts (unseen colour/shape combinations), for a base pipeline and, side by
side, the same pipeline with a trained LoRA.

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
    parser.add_argument("--prompts", type=int, default=300, help="held-out prompts")
    parser.add_argument("--prompt-seed", type=int, default=0, help="draws the prompts")
    parser.add_argument("--seed", type=int, default=0, help="draws each prompt's noise")
    parser.add_argument("--num-steps", type=int, default=16, help="ODE steps")
    parser.add_argument("--guidance-scale", type=float, default=3.5)
    parser.add_argument("--max-sequence-length", type=int, default=40)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spatialrl.config import PolicyModelConfig, SamplingConfig
    from spatialrl.data.shapes import sample_prompts
    from spatialrl.evaluation import rule_figures, sample_eval_images
    from spatialrl.flux.loading import load_flux_pipeline

    prompts = sample_prompts(args.prompts, seed=args.prompt_seed, split="test")
    sampling = SamplingConfig(
        height=args.size, width=args.size, eval_num_steps=args.num_steps,
        num_steps=args.num_steps, batch_size=args.batch_size,
        guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length,
    )
    pipeline = load_flux_pipeline(PolicyModelConfig(pretrained=args.model, dtype="float32"))
    figures = {"base": rule_figures(sample_eval_images(pipeline, prompts, sampling, args.seed),
                                    prompts)}
    if args.lora is not None:
        pipeline.transformer.load_lora_adapter(args.lora, use_safetensors=True)
        figures["lora"] = rule_figures(
            sample_eval_images(pipeline, prompts, sampling, args.seed), prompts
        )
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    record = {"settings": json.loads(json.dumps(settings, default=str)), "figures": figures}
    text = json.dumps(record, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0
