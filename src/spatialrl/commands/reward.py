"""`spatialrl reward`: evaluate and use the SpatialScore reward model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("reward", help="the SpatialScore reward model")
    commands = parser.add_subparsers(dest="reward_command", required=True)

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


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="CKPT",
                        help="SpatialScore checkpoint folder or hub repo (save_pretrained)")
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
    print(json.dumps(summary, indent=2))
    print(f"per-pair results and summary.json -> {args.out}")
    return 0


def run_score(args: argparse.Namespace) -> int:
    from spatialrl.errors import InputError

    if args.jsonl and (args.prompt is not None or args.images):
        raise InputError("give either --jsonl or --prompt with IMAGE files, not both")
    if args.jsonl:
        requests = _read_score_requests(args.jsonl)
    elif args.prompt is None or not args.images:
        raise InputError("give --prompt and at least one IMAGE, or --jsonl")
    elif not args.prompt.strip():
        raise InputError("--prompt: empty prompt")
    else:
        requests = [(args.prompt, path) for path in args.images]
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
        prompt, image = record["prompt"], record["image"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where}: empty prompt {prompt!r}")
        if not isinstance(image, str) or not image:
            raise InputError(f"{where}: 'image' must be a file path, got {image!r}")
        requests.append((prompt, path.parent / image))
    if not requests:
        raise InputError(f"{path}: no requests")
    return requests


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    from spatialrl.errors import InputError

    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"{path}: not a readable image ({err})") from None
