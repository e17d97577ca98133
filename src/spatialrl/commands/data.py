"""`spatialrl data`: build shapes-world datasets (preference pairs, RL prompt sets)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="build shapes-world datasets")
    commands = parser.add_subparsers(dest="data_command", required=True)

    shapes = commands.add_parser(
        "shapes", help="preference pairs: DIR/train.parquet and DIR/test.parquet"
    )
    shapes.add_argument("--out", required=True, type=Path, metavar="DIR")
    shapes.add_argument("--n", required=True, type=_positive_int, help="pairs in total")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--size", type=_positive_int, default=64, help="image side in pixels")
    shapes.add_argument(
        "--test-fraction", type=_fraction, default=0.2,
        help="share of pairs in the test split (held-out colour/shape combinations)",
    )
    shapes.set_defaults(func=run_shapes)

    prompts = commands.add_parser("prompts", help="an RL prompt file (columns prompt, split)")
    prompts.add_argument("--out", required=True, type=Path, metavar="FILE")
    prompts.add_argument("--n", required=True, type=_positive_int)
    prompts.add_argument("--split", choices=["train", "test"], default="train")
    prompts.add_argument("--seed", type=int, default=0)
    prompts.set_defaults(func=run_prompts)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def run_shapes(args: argparse.Namespace) -> int:
    from spatialrl.data.pairs import write_pairs
    from spatialrl.data.shapes import build_shapes_pairs

    pairs = build_shapes_pairs(args.n, seed=args.seed, size=args.size,
                               test_fraction=args.test_fraction)
    for split, records in pairs._asdict().items():
        count = write_pairs(args.out / f"{split}.parquet", records)
        by_perturbed = {k: sum(r.num_perturbed == k for r in records) for k in (1, 2, 3)}
        print(f"{split}: {count} pairs -> {args.out / f'{split}.parquet'} "
              f"(perturbed relations 1/2/3: {by_perturbed[1]}/{by_perturbed[2]}/{by_perturbed[3]})")
    return 0


def run_prompts(args: argparse.Namespace) -> int:
    from spatialrl.data.shapes import sample_prompts, write_prompts_parquet

    prompts = sample_prompts(args.n, seed=args.seed, split=args.split)
    write_prompts_parquet(args.out, prompts, args.split)
    print(f"{args.split}: {len(prompts)} prompts -> {args.out}")
    return 0
