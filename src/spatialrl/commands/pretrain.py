"""`spatialrl pretrain generator`: train the shapes-world base generator (a small FLUX.1-dev).

The build is resumable: rerun the same command with the same --work folder and it continues
where it stopped. Measure the result with `spatialrl eval-generator`.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints


def register(subparsers: argparse._SubParsersAction) -> None:
    from spatialrl.config import GeneratorPretraining

    parser = subparsers.add_parser(
        "pretrain", help="train a base model of the shapes world",
        description="Train a base model of the shapes world from scratch.",
    )
    kinds = parser.add_subparsers(dest="kind", required=True)
    generator = kinds.add_parser(
        "generator", help="the base generator: a small FLUX.1-dev (VAE, transformer, encoders)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    generator.add_argument("--out", type=Path, required=True, help="FluxPipeline folder to write")
    generator.add_argument("--work", type=Path, required=True,
                           help="staging folder; rerunning with it resumes the build")
    generator.add_argument("--threads", type=int, default=None,
                           help="torch threads (default: torch's own choice, all cores)")
    hints = get_type_hints(GeneratorPretraining)
    for field in fields(GeneratorPretraining):
        if isinstance(field.default, tuple):
            continue
        choices = get_args(hints[field.name]) if get_origin(hints[field.name]) is Literal else None
        generator.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default),
                               default=field.default, choices=choices)
    generator.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from spatialrl.config import GeneratorPretraining
    from spatialrl.flux.pretraining import pretrain_generator

    if args.threads:
        torch.set_num_threads(args.threads)

    settings = GeneratorPretraining(**{
        f.name: getattr(args, f.name) for f in fields(GeneratorPretraining) if hasattr(args, f.name)
    })
    print(pretrain_generator(args.out, args.work, settings))
    return 0
