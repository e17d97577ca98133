"""`spatialrl spatialreward`: train (SFT) and evaluate the SpatialReward edit judge."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spatialrl.commands.reward import _positive_int, add_train_command, run_training


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "spatialreward", help="the SpatialReward edit judge (Qwen3-VL, JSON answers)")
    commands = parser.add_subparsers(dest="spatialreward_command", required=True)
    add_train_command(
        commands, "SFT of SpatialReward on edit examples (Ray Train + DeepSpeed, MLflow)",
        "configs/spatialreward/", run_train)

    evaluate = commands.add_parser(
        "eval", help="valid-JSON rate, edit-region IoU, pairwise accuracy by negative type "
                     "(single and multi-edit) and the attention-collapse probe")
    evaluate.add_argument("--model", required=True, metavar="DIR_OR_HUB_ID",
                          help="a Qwen3-VL judge: a run's checkpoint model/ folder, or "
                               "SpatialReward/SpatialReward-8B")
    evaluate.add_argument("--edits", type=Path, metavar="FILE",
                          help="edit examples (`spatialrl data edits`), e.g. DIR/test.parquet")
    evaluate.add_argument("--split", choices=["train", "test", "all"], default="test")
    evaluate.add_argument("--max-examples", type=_positive_int, metavar="N",
                          help="judge the first N examples only (every candidate of each)")
    evaluate.add_argument("--bench", type=Path, metavar="JSONL",
                          help="also score a MER-Bench / EditReward-Bench style file "
                               "(spatialrl.spatialreward.evaluation.BenchPair)")
    evaluate.add_argument("--out", type=Path, metavar="JSON", help="write the summary here")
    evaluate.add_argument("--batch-size", type=_positive_int, default=8,
                          help="candidates per generate call")
    evaluate.add_argument("--max-new-tokens", type=_positive_int, default=512)
    evaluate.add_argument("--device", help="default: cuda if available, else cpu")
    evaluate.set_defaults(func=run_eval)

    package = commands.add_parser(
        "package", help="rewrite a trained judge for shipping (weights in float16 by default)")
    package.add_argument("--model", required=True, metavar="DIR",
                         help="a run's checkpoint model/ folder")
    package.add_argument("--out", required=True, type=Path, metavar="DIR")
    package.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                         default="float16")
    package.set_defaults(func=run_package)


def run_train(args: argparse.Namespace) -> int:
    from spatialrl.learners.spatialreward_trainer import train_spatialreward
    from spatialrl.spatialreward.train_config import SpatialRewardTrainConfig

    return run_training(args, SpatialRewardTrainConfig, train_spatialreward)


def run_package(args: argparse.Namespace) -> int:
    from spatialrl.errors import InputError
    from spatialrl.spatialreward.model import package_judge

    if not (Path(args.model) / "config.json").is_file():
        raise InputError(f"--model: {args.model} is not a model folder (no config.json)")
    print(package_judge(args.model, args.out, args.dtype))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from spatialrl.errors import InputError

    if args.edits is None and args.bench is None:
        raise InputError("give --edits FILE, --bench FILE or both")
    rows = _edit_rows(args) if args.edits else None  # files checked before the model loads
    bench = _bench(args) if args.bench else None
    judge = _load_judge(args)
    summary = {"model": args.model}
    if rows is not None:
        summary["edits"] = _edits_summary(judge, rows, args)
    if bench is not None:
        from spatialrl.spatialreward.evaluation import score_bench

        summary["bench"] = {"file": str(args.bench), **score_bench(judge, bench, args.batch_size)}
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


def _edit_rows(args: argparse.Namespace) -> list:
    from spatialrl.errors import InputError
    from spatialrl.spatialreward.edit_examples import read_edit_rows

    rows = read_edit_rows(args.edits, None if args.split == "all" else args.split)
    if args.max_examples:
        kept = list(dict.fromkeys(row.example_id for row in rows))[:args.max_examples]
        rows = [row for row in rows if row.example_id in set(kept)]
    if not rows:
        raise InputError(f"--edits: {args.edits} has no {args.split} rows")
    return rows


def _bench(args: argparse.Namespace) -> list:
    from spatialrl.spatialreward.evaluation import read_bench_pairs

    return read_bench_pairs(args.bench)


def _edits_summary(judge, rows: list, args: argparse.Namespace) -> dict:
    from spatialrl.spatialreward.evaluation import judge_rows, summarise

    judged = judge_rows(judge, rows, args.batch_size, progress=True)
    return {"file": str(args.edits), "split": args.split, **summarise(judged)}


def _load_judge(args: argparse.Namespace):
    import torch

    from spatialrl.spatialreward.model import SpatialReward, SpatialRewardConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = SpatialRewardConfig(model=args.model, max_new_tokens=args.max_new_tokens,
                                 dtype="float32" if device == "cpu" else "bfloat16")
    judge = SpatialReward.from_config(config)
    judge.model.to(device)
    return judge
