"""`spatialrl pretrain generator|guidance|editor`: train the shapes-world base models.

- generator: a small FLUX.1-dev (VAE, transformer, text encoders) from scratch;
- guidance: the generator guidance-distilled as FLUX.1-dev is (a caption-dropout teacher
  whose classifier-free-guided velocity the guidance embedding learns);
- editor: the generator fine-tuned on edit triples with Kontext conditioning (a small
  FLUX.1-Kontext-dev).
Every build is resumable: rerun the same command with the same --work folder and it continues
where it stopped. Measure the results with `spatialrl eval-policy` (generators) and
`spatialrl eval-editor` (editors).
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

SHIPPED_GENERATOR = "models/shapes-flux"


def register(subparsers: argparse._SubParsersAction) -> None:
    from spatialrl.config import EditorPretraining, GeneratorPretraining, GuidanceDistillation

    parser = subparsers.add_parser(
        "pretrain", help="train a base model of the shapes world",
        description="Train a base model of the shapes world.",
    )
    kinds = parser.add_subparsers(dest="kind", required=True)
    generator = kinds.add_parser(
        "generator", help="the base generator: a small FLUX.1-dev (VAE, transformer, encoders)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_build_flags(generator, GeneratorPretraining, "FluxPipeline")
    guidance = kinds.add_parser(
        "guidance", help="the base generator guidance-distilled: classifier-free guidance "
                         "in one pass, through FLUX's guidance embedding",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # No default: the shipped generator is already distilled.
    guidance.add_argument("--generator", type=Path, required=True,
                          help="the generator to distil (a FluxPipeline folder from "
                               "`pretrain generator`)")
    _add_build_flags(guidance, GuidanceDistillation, "FluxPipeline")
    editor = kinds.add_parser(
        "editor", help="the base editor: the base generator fine-tuned on edit triples "
                       "with Kontext conditioning (a small FLUX.1-Kontext-dev)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    editor.add_argument("--generator", type=Path, default=Path(SHIPPED_GENERATOR),
                        help="the base generator to start from (a FluxPipeline folder)")
    _add_build_flags(editor, EditorPretraining, "FluxKontextPipeline")


def _add_build_flags(parser: argparse.ArgumentParser, settings: type, pipeline: str) -> None:
    """--out, --work, --threads and one flag per settings field (tuples keep their default)."""
    parser.add_argument("--out", type=Path, required=True, help=f"{pipeline} folder to write")
    parser.add_argument("--work", type=Path, required=True,
                        help="staging folder; rerunning with it resumes the build")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice, all cores)")
    hints = get_type_hints(settings)
    for field in fields(settings):
        if isinstance(field.default, tuple):
            continue
        choices = get_args(hints[field.name]) if get_origin(hints[field.name]) is Literal else None
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default),
                            default=field.default, choices=choices)
    parser.set_defaults(func=run, settings_type=settings)


def run(args: argparse.Namespace) -> int:
    import torch

    from spatialrl.flux.pretraining import distil_guidance, pretrain_editor, pretrain_generator

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = args.settings_type(**{
        f.name: getattr(args, f.name) for f in fields(args.settings_type) if hasattr(args, f.name)
    })
    if args.kind == "editor":
        print(pretrain_editor(args.generator, args.out, args.work, settings))
    elif args.kind == "guidance":
        print(distil_guidance(args.generator, args.out, args.work, settings))
    else:
        print(pretrain_generator(args.out, args.work, settings))
    return 0
