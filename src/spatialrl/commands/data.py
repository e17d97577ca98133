"""`spatialrl data`: build preference-pair datasets (shapes-world renders or a generator's
images) and RL prompt sets."""

from __future__ import annotations

import argparse
from pathlib import Path

from spatialrl.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    from spatialrl.data.curriculum import CURRICULUM_TASKS

    parser = subparsers.add_parser("data", help="build shapes-world datasets")
    commands = parser.add_subparsers(dest="data_command", required=True)

    shapes = commands.add_parser(
        "shapes", help="preference pairs: DIR/train.parquet and DIR/test.parquet"
    )
    shapes.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="folder for train.parquet and test.parquet")
    shapes.add_argument("--n", required=True, type=_positive_int, help="pairs in total")
    shapes.add_argument("--seed", type=int, default=0, help="draws the scenes")
    shapes.add_argument("--size", type=_positive_int, default=64, help="image side in pixels")
    shapes.add_argument(
        "--test-fraction", type=_fraction, default=0.2,
        help="share of pairs in the test split (held-out colour/shape combinations)",
    )
    shapes.add_argument(
        "--task", default="shapes", choices=["shapes", *CURRICULUM_TASKS],
        help="shapes: 1-3 perturbed relations among 2-3 objects; the others are curriculum "
             "sets of two objects and one change (spatialrl.data.curriculum)",
    )
    shapes.set_defaults(func=run_shapes)

    pairs = commands.add_parser(
        "pairs",
        help="preference pairs from a diffusers pipeline: DIR/train.parquet, DIR/test.parquet",
    )
    pairs.add_argument("--model", required=True, metavar="PIPELINE",
                       help="hub id or local folder that DiffusionPipeline.from_pretrained loads")
    pairs.add_argument("--out", required=True, type=Path, metavar="DIR",
                       help="folder for train.parquet and test.parquet")
    pairs.add_argument("--n", required=True, type=_positive_int,
                       help="pairs generated in total (before verification drops some)")
    pairs.add_argument("--steps", type=_positive_int, default=28, help="denoising steps")
    pairs.add_argument("--size", type=_positive_int, default=512, help="image side in pixels")
    pairs.add_argument("--seed", type=int, default=0, help="draws the prompts and the noise")
    pairs.add_argument(
        "--test-fraction", type=_fraction, default=0.2,
        help="share of pairs in the test split (held-out colour/shape combinations)",
    )
    pairs.add_argument("--batch-size", type=_positive_int, default=4,
                       help="pairs per pipeline call")
    pairs.add_argument("--max-sequence-length", type=_positive_int, default=512,
                       help="text tokens per prompt (models/shapes-flux was trained with 40)")
    pairs.add_argument("--world", choices=["shapes", "real"], default="shapes",
                       help="the prompts: coloured shapes, or real objects (COCO classes)")
    pairs.add_argument(
        "--verifier", choices=["auto", "rules", "detector", "none"], default="auto",
        help="keep a pair only if its preferred image satisfies the prompt and its rejected "
             "one does not, judged by the rule evaluator (rules: shapes world only) or a "
             "zero-shot detector plus the same rules for the 2-D relations (detector); auto: "
             "rules for shapes, detector for real objects. Verdicts: DIR/verification.parquet",
    )
    pairs.add_argument("--detector", default="google/owlv2-base-patch16-ensemble",
                       help="OWLv2 hub id or local folder for --verifier detector")
    pairs.add_argument("--detector-threshold", type=_fraction, default=0.2,
                       help="lowest detector score that counts as finding an object")
    pairs.add_argument("--device", help="default: cuda if available, else cpu")
    pairs.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="default: bfloat16 on cuda, float32 on cpu")
    pairs.set_defaults(func=run_pairs)

    prompts = commands.add_parser("prompts", help="an RL prompt file (columns prompt, split)")
    prompts.add_argument("--out", required=True, type=Path, metavar="FILE",
                         help="parquet file to write (for prompts.source)")
    prompts.add_argument("--n", required=True, type=_positive_int, help="prompts to write")
    prompts.add_argument("--world", choices=["shapes", "real"], default="shapes",
                         help="shapes: coloured shapes, 1-3 relations; real: COCO's 80 object "
                              "classes, 2-3 relations (spatialrl.data.real_world)")
    prompts.add_argument("--split", choices=["train", "test"], default="train",
                         help="test: only held-out combinations (colour/shape pairs in the "
                              "shapes world, class pairs among real objects); train: none")
    prompts.add_argument("--seed", type=int, default=0, help="draws the prompts")
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
    from spatialrl.data.curriculum import curriculum_pairs
    from spatialrl.data.pairs import write_pairs
    from spatialrl.data.shapes import build_shapes_pairs, split_sizes

    if args.task == "shapes":
        pairs = build_shapes_pairs(args.n, seed=args.seed, size=args.size,
                                   test_fraction=args.test_fraction)._asdict()
    else:
        pairs = {split: curriculum_pairs(args.task, count, split, args.seed, args.size)
                 for split, count in split_sizes(args.n, args.test_fraction).items()}
    for split, records in pairs.items():
        count = write_pairs(args.out / f"{split}.parquet", records)
        _report_split(split, count, args.out, [r.num_perturbed for r in records])
    return 0


def run_pairs(args: argparse.Namespace) -> int:
    import torch

    from spatialrl.data.generated import generate_pairs, load_generator, sample_prompt_pairs
    from spatialrl.data.pairs import SPLITS, write_pairs
    from spatialrl.data.verify import write_verdicts
    from spatialrl.data.worlds import WORLDS

    world = WORLDS[args.world]
    prompt_pairs = sample_prompt_pairs(args.n, args.model, args.seed, args.test_fraction, world)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    # Before the pipeline: a bad detector fails fast.
    verifier = _pair_verifier(args, device, world.vocabulary)
    pipeline = load_generator(args.model, dtype, device)
    for split in SPLITS:
        chosen = [p for p in prompt_pairs if p.split == split]
        records = generate_pairs(pipeline, chosen, args.model, args.size, args.steps,
                                 args.batch_size, args.max_sequence_length)
        count = write_pairs(args.out / f"{split}.parquet",
                            verifier.keep(records) if verifier else records)
        if verifier:
            kept = {v.pair_id for v in verifier.verdicts if v.kept}
            chosen = [p for p in chosen if p.pair_id in kept]
            print(f"{split}: verification dropped {verifier.dropped_by_reason(split)}")
        _report_split(split, count, args.out, [p.num_perturbed for p in chosen])
    if verifier:
        write_verdicts(args.out / "verification.parquet", verifier.verdicts)
    return 0


def _pair_verifier(args: argparse.Namespace, device: str, vocabulary):
    """The PairVerifier that --verifier names for --world, or None."""
    from spatialrl.data.judge import ColourLocator
    from spatialrl.data.verify import PairVerifier

    kind = args.verifier
    if kind == "auto":
        kind = "rules" if args.world == "shapes" else "detector"
    if kind == "none":
        return None
    if kind == "rules":
        if args.world != "shapes":
            raise InputError("--verifier rules reads shapes by colour: use it with --world shapes")
        locator = ColourLocator()
    else:
        from spatialrl.detection import OwlDetector

        locator = OwlDetector.from_pretrained(args.detector, device, args.detector_threshold)
    return PairVerifier(locator, vocabulary)


def _report_split(split: str, count: int, out: Path, num_perturbed: list[int]) -> None:
    by_perturbed = "/".join(str(num_perturbed.count(k)) for k in (1, 2, 3))
    print(f"{split}: {count} pairs -> {out / f'{split}.parquet'} "
          f"(perturbed relations 1/2/3: {by_perturbed})")


def run_prompts(args: argparse.Namespace) -> int:
    from spatialrl.data.shapes import sample_prompts, write_prompts_parquet
    from spatialrl.data.worlds import WORLDS

    prompts = sample_prompts(args.n, seed=args.seed, split=args.split, world=WORLDS[args.world])
    write_prompts_parquet(args.out, prompts, args.split)
    print(f"{args.world} {args.split}: {len(prompts)} prompts -> {args.out}")
    return 0
