"""Classifier-free guidance in the shapes world: what the rule evaluator reads from a
generator's ODE samples at each true-CFG scale (FluxPipeline's `true_cfg_scale` with the empty
prompt as the negative one, two transformer passes per step) and each guidance-embedding value
(`guidance_scale`, one pass: what a guidance-distilled model such as FLUX.1-dev uses).

It measures what `spatialrl pretrain guidance` builds on: a generator trained without caption
dropout has no unconditional velocity to guide with, the caption-dropout teacher has, and the
distilled student should reproduce the teacher's guided figures in one pass.

    .venv/bin/python bench/classifier_free_guidance.py \\
        --model teacher=runs/pretrain-guidance/teacher --true-cfg 1 3 5 \\
        --model student=models/shapes-flux --guidance 1 3.5 5

Prompts: the held-out shapes benchmark (unseen colour/shape combinations), one fixed seed per
prompt (its index), so every setting sees the same noise.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import FluxPipeline
from results_file import write_result

from spatialrl.policy_evaluation import rule_figures
from spatialrl.position_benchmark import held_out_benchmark

FIGURES = ("readable_objects", "all_relations_correct", "relation_accuracy",
           "all_reversed_relations_hold")


def figures_at(pipeline: FluxPipeline, prompts: list[str], args: argparse.Namespace,
               true_cfg: float, guidance: float) -> dict[str, float]:
    started, images = time.monotonic(), []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        guided = {"true_cfg_scale": true_cfg, "negative_prompt": [""] * len(batch)}
        images += pipeline(
            batch, height=64, width=64, num_inference_steps=args.num_steps,
            guidance_scale=guidance, max_sequence_length=40,
            generator=[torch.Generator().manual_seed(start + i) for i in range(len(batch))],
            **(guided if true_cfg > 1 else {}),
        ).images
    figures = rule_figures(images, prompts)
    return {"true_cfg_scale": true_cfg, "guidance_scale": guidance,
            **{name: round(figures[name], 4) for name in FIGURES},
            "seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER",
                        help="a FluxPipeline folder to measure (repeatable)")
    parser.add_argument("--true-cfg", type=float, nargs="+", default=[1.0],
                        help="true-CFG scales (1: no unconditional pass)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[3.5],
                        help="guidance-embedding values")
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--num-steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--out", default="bench/results/classifier_free_guidance.json")
    args = parser.parse_args()
    prompts = held_out_benchmark("shapes", args.prompts, 0).prompts
    rows = []
    for named in args.model:
        name, _, folder = named.partition("=")
        if not Path(folder, "model_index.json").is_file():
            raise SystemExit(f"--model {named}: no FluxPipeline folder at {folder}")
        pipeline = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)
        pipeline.set_progress_bar_config(disable=True)
        for true_cfg in args.true_cfg:
            for guidance in args.guidance:
                rows.append({"model": name, "folder": folder,
                             **figures_at(pipeline, prompts, args, true_cfg, guidance)})
                print(rows[-1], flush=True)
    write_result({"benchmark": "shapes held-out prompts, rule evaluator",
                  "prompts": len(prompts), "ode_steps": args.num_steps, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
