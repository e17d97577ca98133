"""`spatialrl eval-editor`: how well an editing policy (a FluxKontextPipeline folder, such as
the shapes-world base editor) makes held-out shapes-world edits, as the rule evaluator reads
them, and, side by side, the same editor with a trained LoRA.

The edits are the edit engine's test split (unseen colour/shape combinations and edit-kind
pairs; spatialrl.spatialreward.edit_examples), the ones the training loop evaluates. Images
come from the ODE sampler with one fixed seed per edit. Reported: edit success (every edit of
the instruction made), the share of edits made overall and per kind, and the over-editing
rate (images that change an object the instruction does not name); beside them the same
figures for the unedited sources, the floor a do-nothing editor scores.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval-editor", help="held-out shapes-world edit success of an editing policy",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True,
                        help="FluxKontextPipeline folder or hub id (models/shapes-kontext)")
    parser.add_argument("--lora", type=Path, help="LoRA folder judged beside the base editor")
    parser.add_argument("--edits", type=int, default=300, help="held-out edits")
    parser.add_argument("--edit-seed", type=int, default=0,
                        help="the edit engine's seed (a training run's `seed`)")
    parser.add_argument("--seed", type=int, default=0, help="draws each edit's noise")
    parser.add_argument("--num-steps", type=int, default=16, help="ODE steps")
    parser.add_argument("--guidance-scale", type=float, default=3.5)
    parser.add_argument("--max-sequence-length", type=int, default=64, help="T5 tokens")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, help="also write the report here (JSON)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spatialrl.config import PolicyModelConfig, SamplingConfig
    from spatialrl.flux.loading import load_flux_pipeline
    from spatialrl.policy_evaluation import edit_rule_figures, sample_eval_images
    from spatialrl.prompts import shapes_edit_task

    if args.lora is not None and not args.lora.is_dir():
        raise FileNotFoundError(f"--lora: no LoRA folder at {args.lora}")
    examples = [shapes_edit_task(args.edit_seed, "test", i) for i in range(args.edits)]
    size = examples[0].size
    sampling = SamplingConfig(height=size, width=size, eval_num_steps=args.num_steps,
                              batch_size=args.batch_size, guidance_scale=args.guidance_scale,
                              max_sequence_length=args.max_sequence_length,
                              kontext_resolution=False)
    pipeline = load_flux_pipeline(PolicyModelConfig(pretrained=args.model, dtype="float32"))
    sources = [e.source_image for e in examples]

    def figures() -> dict[str, float]:
        images = sample_eval_images(pipeline, [e.instruction for e in examples], sampling,
                                    args.seed, sources)
        return edit_rule_figures(images, examples)

    started = time.monotonic()
    sides = {"unedited_sources": edit_rule_figures(sources, examples), "base": figures()}
    if args.lora is not None:
        pipeline.transformer.load_lora_adapter(str(args.lora), use_safetensors=True)
        sides["lora"] = figures()
    record = {
        "model": args.model, "lora": None if args.lora is None else str(args.lora),
        "edits": args.edits, "split": "test", "edit_seed": args.edit_seed, "seed": args.seed,
        "num_steps": args.num_steps, "guidance_scale": args.guidance_scale,
        "seconds": round(time.monotonic() - started, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "figures": sides,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0
