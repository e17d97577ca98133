"""`spatialrl reward`: train, evaluate and use the SpatialScore reward model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("reward", help="the SpatialScore reward model")
    commands = parser.add_subparsers(dest="reward_command", required=True)
    _register_train(commands)

    evaluate = commands.add_parser(
        "eval", help="pairwise accuracy on preference pairs, overall and by perturbed relations"
    )
    _model_arguments(evaluate)
    evaluate.add_argument("--pairs", required=True, type=Path, metavar="FILE",
                          help="preference-pair parquet (spatialrl.data.pairs schema)")
    evaluate.add_argument("--split", choices=["train", "test", "all"], default="test")
    evaluate.add_argument("--out", type=Path, default=Path("runs/reward-eval"), metavar="DIR",
                          help="summary.json and the per-pair parquet files")
    evaluate.add_argument(
        "--judge", metavar="QWEN_ID_OR_PATH",
        help="also judge the pairs zero-shot with this Qwen2.5-VL, both image orders averaged",
    )
    evaluate.add_argument("--judge-max-pixels", type=_positive_int, metavar="N",
                          help="pixel budget per image for the judge (default: its own)")
    evaluate.set_defaults(func=run_eval)

    score = commands.add_parser("score", help="mu and sigma per image, as JSON lines")
    _model_arguments(score)
    score.add_argument("--prompt", help="the prompt every IMAGE is scored against")
    score.add_argument("images", nargs="*", type=Path, metavar="IMAGE")
    score.add_argument("--jsonl", type=Path, metavar="FILE",
                       help='lines {"prompt": ..., "image": PATH} (relative to FILE\'s folder)')
    score.set_defaults(func=run_score)

    package = commands.add_parser(
        "package", help="copy a checkpoint with its local base model into one folder that "
                        "loads anywhere (how models/spatialscore-shapes is made)",
    )
    package.add_argument("--model", required=True, metavar="CKPT", help="checkpoint folder")
    package.add_argument("--out", required=True, type=Path, metavar="DIR")
    package.set_defaults(func=run_package)


def _register_train(commands: argparse._SubParsersAction) -> None:
    add_train_command(
        commands, "train SpatialScore on preference pairs (Ray Train + DeepSpeed, MLflow)",
        "configs/reward/", run_train)


def add_train_command(commands: argparse._SubParsersAction, summary: str, configs: str,
                      run) -> None:
    """`train --config FILE [--set KEY=VALUE]... [--resume]`, as every trained model has."""
    train = commands.add_parser("train", help=summary)
    train.add_argument("--config", required=True, help=f"YAML config (see {configs})")
    train.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)",
    )
    train.add_argument(
        "--resume", action="store_true",
        help="continue the run in output_dir from its newest checkpoint, in the same MLflow run",
    )
    train.set_defaults(func=run)


def run_train(args: argparse.Namespace) -> int:
    from spatialrl.learners.spatialscore_trainer import train_reward_model
    from spatialrl.reward.train_config import RewardTrainConfig

    return run_training(args, RewardTrainConfig, train_reward_model)


def run_training(args: argparse.Namespace, config_type: type, train) -> int:
    """Load --config with its --set overrides as `config_type`, and `train(cfg, resume)`."""
    from spatialrl.config import load_config

    cfg = load_config(args.config, args.overrides, model=config_type)
    result = train(cfg, resume=args.resume)
    print(f"mlflow run {result.mlflow_run_id}: {result.steps_done}/{cfg.optim.steps} steps; "
          f"model in {result.checkpoint}/model")
    return 0


def run_package(args: argparse.Namespace) -> int:
    from spatialrl.reward.model import package_checkpoint

    print(package_checkpoint(args.model, args.out))
    return 0


SHIPPED_SPATIALSCORE = "models/spatialscore-shapes"  # relative to the repository root


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=SHIPPED_SPATIALSCORE, metavar="CKPT",
                        help="SpatialScore checkpoint folder or hub repo (save_pretrained); "
                        "default: the shipped shapes-world SpatialScore")
    parser.add_argument("--base-model", metavar="QWEN_ID_OR_PATH",
                        help="replace the base model the checkpoint names (e.g. a local copy)")
    parser.add_argument("--batch-size", type=_positive_int, default=8,
                        help="pairs (eval) or images (score) per forward")
    parser.add_argument("--device", help="default: cuda if available, else cpu")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_spatialscore(args: argparse.Namespace):
    from spatialrl.reward.model import SpatialScore

    return SpatialScore.from_pretrained(args.model, base_model=args.base_model).to(_device(args))


def run_eval(args: argparse.Namespace) -> int:
    from spatialrl.reward.evaluation import evaluate_pairs
    from spatialrl.reward.judge import PairwiseJudge, PairwiseJudgeConfig

    judge = None
    if args.judge:
        device = _device(args)
        config = PairwiseJudgeConfig(
            model=args.judge, max_pixels=args.judge_max_pixels,
            dtype="float32" if device == "cpu" else "bfloat16",
        )
        judge = PairwiseJudge.from_config(config, device)
    summary = evaluate_pairs(
        args.pairs, None if args.split == "all" else args.split, args.out,
        _load_spatialscore(args), model_name=args.model, judge=judge,
        batch_size=args.batch_size,
    )
    print(_summary_table(summary))
    print(f"per-pair results and summary.json -> {args.out}")
    return 0


def _summary_table(summary: dict) -> str:
    """Accuracy per scorer: overall and by the number of perturbed relations."""
    from spatialrl.reward.evaluation import NUM_PERTURBED_GROUPS

    lines = [
        f"{summary['pairs_file']} ({summary['split']}): {summary['skipped_rows']} rows skipped "
        f"{summary['skipped_by_reason'] or ''}".rstrip(),
        "accuracy (pairs)  " + "".join(
            f"{g:>14}" for g in ["overall", *(f"{g} perturbed" for g in NUM_PERTURBED_GROUPS)]
        ),
    ]
    for name in ("spatialscore", "judge"):
        if name in summary:
            result = summary[name]
            groups = [result, *(result["by_num_perturbed"][g] for g in NUM_PERTURBED_GROUPS)]
            lines.append(f"{name:18}" + "".join(f"{_cell(group):>14}" for group in groups))
    return "\n".join(lines)


def _cell(group: dict) -> str:
    accuracy = "-" if group["accuracy"] is None else f"{group['accuracy']:.3f}"
    return f"{accuracy} ({group['pairs']})"


def run_score(args: argparse.Namespace) -> int:
    from spatialrl.errors import InputError
    from spatialrl.prompts import check_prompt

    if args.jsonl and (args.prompt is not None or args.images):
        raise InputError("give either --jsonl or --prompt with IMAGE files, not both")
    if args.jsonl:
        requests = _read_score_requests(args.jsonl)
    elif args.prompt is None or not args.images:
        raise InputError("give --prompt and at least one IMAGE, or --jsonl")
    else:
        requests = [(check_prompt(args.prompt, "--prompt"), path) for path in args.images]
    images = [_open_image(path) for _, path in requests]  # every file checked before loading

    model = _load_spatialscore(args)
    for start in range(0, len(requests), args.batch_size):
        batch = slice(start, start + args.batch_size)
        prompts = [prompt for prompt, _ in requests[batch]]
        output = model.score(images[batch], prompts)
        for (prompt, path), mu, sigma in zip(
            requests[batch], output.mu.tolist(), output.sigma.tolist(), strict=True
        ):
            print(json.dumps({"image": str(path), "prompt": prompt, "mu": mu, "sigma": sigma}))
    return 0


def _read_score_requests(path: Path) -> list[tuple[str, Path]]:
    """(prompt, image path) per line; a bad line is an error naming its line number."""
    from spatialrl.errors import InputError
    from spatialrl.prompts import check_prompt

    if not path.is_file():
        raise FileNotFoundError(f"--jsonl file not found: {path}")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not JSON ({err})") from None
        if not isinstance(record, dict) or not {"prompt", "image"} <= record.keys():
            raise InputError(f"{where}: needs the keys 'prompt' and 'image'")
        prompt, image = check_prompt(record["prompt"], where), record["image"]
        if not isinstance(image, str) or not image:
            raise InputError(f"{where}: 'image' must be a file path, got {image!r}")
        requests.append((prompt, path.parent / image))
    if not requests:
        raise InputError(f"{path}: no requests")
    return requests


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    from spatialrl.errors import InputError
    from spatialrl.images import upright_rgb

    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return upright_rgb(image)
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"{path}: not a readable image ({err})") from None
