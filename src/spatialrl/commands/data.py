"""`spatialrl data`: build preference-pair datasets (shapes-world renders or a generator's
images), SpatialReward edit sets and RL prompt sets."""

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
    _add_rendered_set_arguments(shapes, "pairs", "held-out colour/shape combinations")
    shapes.add_argument(
        "--task", default="shapes", choices=["shapes", *CURRICULUM_TASKS],
        help="shapes: 1-3 perturbed relations among 2-3 objects; the others are curriculum "
             "sets of two objects and one change (spatialrl.data.curriculum)",
    )
    shapes.set_defaults(func=run_shapes)

    edits = commands.add_parser(
        "edits", help="SpatialReward edit examples with exact ground truth "
                      "(spatialrl.spatialreward.edit_examples): DIR/train.parquet and "
                      "DIR/test.parquet, a row per candidate edit",
    )
    _add_rendered_set_arguments(
        edits, "examples", "held-out colour/shape combinations and pairs of edit kinds")
    edits.set_defaults(func=run_edits)

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
    pairs.add_argument(
        "--shard-size", type=_positive_int, default=64,
        help="pairs per shard: the unit of work, each written to DIR/shards as it finishes; "
             "a rerun of the same command skips the shards already there",
    )
    pairs.add_argument("--ray", action="store_true",
                       help="make the shards with a Ray Data job (spatialrl.actors.pair_job)")
    pairs.add_argument("--address", help="with --ray: the cluster to join (default: "
                       "RAY_ADDRESS, else a new local instance)")
    pairs.add_argument("--workers", type=_positive_int, default=1,
                       help="with --ray: workers, each holding a pipeline and a verifier")
    pairs.add_argument("--gpus-per-worker", type=float, default=1.0,
                       help="with --ray: 0 on machines without GPUs")
    pairs.add_argument("--cpus-per-worker", type=float, default=1.0, help="with --ray")
    pairs.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                       help="MLflow store for the job's throughput, kept fraction and drops")
    pairs.add_argument("--experiment", default="spatialrl-data", help="MLflow experiment")
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


def _add_rendered_set_arguments(parser: argparse.ArgumentParser, unit: str,
                                held_out: str) -> None:
    """The options of a set rendered in the shapes world and split into train and test."""
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="folder for train.parquet and test.parquet")
    parser.add_argument("--n", required=True, type=_positive_int, help=f"{unit} in total")
    parser.add_argument("--seed", type=int, default=0, help="draws the scenes")
    parser.add_argument("--size", type=_positive_int, default=64, help="image side in pixels")
    parser.add_argument("--test-fraction", type=_fraction, default=0.2,
                        help=f"share of {unit} in the test split ({held_out})")


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


def run_edits(args: argparse.Namespace) -> int:
    from collections import Counter

    from spatialrl.spatialreward.edit_examples import build_edit_examples, write_edit_examples

    examples = build_edit_examples(args.n, seed=args.seed, size=args.size,
                                   test_fraction=args.test_fraction)
    for split, chosen in examples.items():
        path = args.out / f"{split}.parquet"
        rows = write_edit_examples(path, chosen)
        labels = Counter(candidate.label for example in chosen for candidate in example.candidates)
        print(f"{split}: {len(chosen)} examples, {rows} candidates -> {path} ({dict(labels)})")
    return 0


def run_pairs(args: argparse.Namespace) -> int:
    from spatialrl.config import MlflowConfig
    from spatialrl.data.pair_shards import PairSetSpec, make_pair_set, resolve_verifier
    from spatialrl.data.verify import dropped_by_reason
    from spatialrl.tracking import Tracker, run_name

    spec = PairSetSpec(
        model=args.model, n=args.n, seed=args.seed, test_fraction=args.test_fraction,
        world=args.world, steps=args.steps, size=args.size, batch_size=args.batch_size,
        max_sequence_length=args.max_sequence_length,
        verifier=resolve_verifier(args.verifier, args.world), detector=args.detector,
        detector_threshold=args.detector_threshold, shard_size=args.shard_size,
    )
    mlflow = MlflowConfig(tracking_uri=args.tracking_uri, experiment=args.experiment)
    with _shard_runner(spec, args) as run_shards, Tracker(
        mlflow, name=run_name("pairs", args.model),
        tags={"backend": "ray" if args.ray else "inprocess"},
    ) as tracker:
        result = make_pair_set(spec, args.out, run_shards, tracker)
    for split, num_perturbed in result.kept.items():
        if result.verdicts:
            print(f"{split}: verification dropped {dropped_by_reason(result.verdicts, split)}")
        _report_split(split, len(num_perturbed), args.out, num_perturbed)
    return 0


def _shard_runner(spec, args: argparse.Namespace):
    """A context giving the function that makes shards: a Ray Data job with --ray, else this
    process (whose pipeline is loaded first, so a bad --model fails before anything else)."""
    from contextlib import nullcontext

    from spatialrl.data.generated import check_generator
    from spatialrl.data.pair_shards import ShardMaker

    if not args.ray:
        if args.address:
            raise InputError("--address names a Ray cluster: use it with --ray")
        maker = ShardMaker(spec, args.out, args.device, args.dtype)
        return nullcontext(lambda todo: (maker.make(index) for index in todo))
    from spatialrl.actors.pair_job import PairWorkers, ray_shard_runner

    check_generator(args.model)  # on the driver: a bad --model fails before Ray starts
    workers = PairWorkers(args.workers, args.gpus_per_worker, args.cpus_per_worker)
    return ray_shard_runner(spec, args.out, workers, args.address, args.device, args.dtype)


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
