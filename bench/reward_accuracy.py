"""Accuracy check: a tiny SpatialScore trained on shapes-world pairs, judged on held-out pairs
whose scenes contain unseen (colour, shape) combinations. Writes
bench/results/reward_accuracy.json.

    .venv/bin/python bench/reward_accuracy.py [--pairs 3000] [--data DIR] [--set KEY=VALUE ...]

Steps, each timed:
1. shapes-world pairs (`spatialrl data shapes`' builder) into DIR/train.parquet and
   DIR/test.parquet; an existing DIR built with the same --pairs and --seed is reused.
2. `spatialrl reward train` with configs/reward/local.yaml (tiny random Qwen2.5-VL from
   `spatialrl tiny-models`): the same Ray Train + DeepSpeed entry point, one worker by default.
3. The final checkpoint's model scores the test pairs (spatialrl.reward.evaluation): pairwise
   accuracy overall, for 1 and for 2-3 perturbed relations, and mean mu of the correct and the
   perturbed render for 1, 2 and 3 perturbed relations.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from statistics import fmean

import torch
from mlflow.tracking import MlflowClient

from spatialrl.commands.tiny_models import QWEN_VL_DIR, write_tiny_models
from spatialrl.config import load_config
from spatialrl.data.pairs import read_pairs, write_pairs
from spatialrl.data.shapes import build_shapes_pairs
from spatialrl.learners.spatialscore_trainer import train_reward_model
from spatialrl.reward.evaluation import accuracy_summary, score_pairs
from spatialrl.reward.model import SpatialScore
from spatialrl.reward.train_config import RewardTrainConfig

CONFIG = "configs/reward/local.yaml"
TARGET_ACCURACY = 0.9
PACKAGES = ("torch", "transformers", "peft", "deepspeed", "ray", "mlflow", "pyarrow")


def shapes_pairs(folder: Path, n: int, seed: int) -> dict:
    """Build the pairs unless `folder` already holds the same set (its build.json says so)."""
    stamp = folder / "build.json"
    wanted = {"pairs": n, "seed": seed, "size": 64, "test_fraction": 0.2}
    if stamp.is_file() and json.loads(stamp.read_text())["settings"] == wanted:
        return {**json.loads(stamp.read_text()), "reused": True}
    start = time.perf_counter()
    pairs = build_shapes_pairs(n, seed=seed, size=64, test_fraction=0.2)
    counts = {split: write_pairs(folder / f"{split}.parquet", records)
              for split, records in pairs._asdict().items()}
    built = {"settings": wanted, "counts": counts, "seconds": time.perf_counter() - start}
    stamp.write_text(json.dumps(built, indent=2) + "\n")
    return {**built, "reused": False}


def mu_by_num_perturbed(records) -> dict:
    """Mean mu of the correct (preferred) and the perturbed (rejected) render per count."""
    means = {}
    for count in (1, 2, 3):
        group = [r for r in records if r.num_perturbed == count]
        means[str(count)] = {
            "pairs": len(group),
            "mu_correct": fmean([r.mu_preferred for r in group]) if group else None,
            "mu_perturbed": fmean([r.mu_rejected for r in group]) if group else None,
        }
    return means


def eval_history(workdir: Path, result) -> list[dict]:
    """The held-out accuracy the trainer logged to MLflow every eval_every steps."""
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    history = client.get_metric_history(result.mlflow_run_id, "eval/accuracy")
    return [{"step": m.step, "accuracy": m.value} for m in sorted(history, key=lambda m: m.step)]


def run(args: argparse.Namespace, workdir: Path) -> dict:
    data = Path(args.data)
    data_build = shapes_pairs(data, args.pairs, args.seed)
    models = write_tiny_models(workdir / "tiny-models")
    shipped = load_config(CONFIG, model=RewardTrainConfig)
    # The config's global batch (pairs per step over all workers), on args.workers workers.
    global_batch = shipped.optim.batch_size * shipped.distributed.num_workers
    settings = [f"distributed.num_workers={args.workers}",
                f"optim.batch_size={global_batch // args.workers}", *args.overrides]
    cfg = load_config(CONFIG, [
        f"model.base_model={models[QWEN_VL_DIR]}",
        f"data.train={data / 'train.parquet'}", f"data.test={data / 'test.parquet'}",
        f"output_dir={workdir / 'run'}", f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        *settings,
    ], model=RewardTrainConfig)

    start = time.perf_counter()
    result = train_reward_model(cfg)
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    model = SpatialScore.from_pretrained(f"{result.checkpoint}/model")
    test = read_pairs(data / "test.parquet", split="test")
    records = score_pairs(model, test.pairs, cfg.eval_batch_size)
    summary = accuracy_summary(records)
    eval_seconds = time.perf_counter() - start
    by_group = summary["by_num_perturbed"]
    return {
        "heldout_accuracy": summary["accuracy"],
        "heldout_accuracy_1_perturbed": by_group["1"]["accuracy"],
        "heldout_accuracy_2_3_perturbed": by_group["2-3"]["accuracy"],
        "heldout_pairs": summary,
        "mu_by_num_perturbed": mu_by_num_perturbed(records),
        "target_accuracy": TARGET_ACCURACY,
        "meets_target": summary["accuracy"] >= TARGET_ACCURACY,
        "data": {"folder": str(data), **data_build, "test_skipped_rows": test.skipped},
        "training": {"config": CONFIG, "overrides": settings, "steps": result.steps_done,
                     "seconds": train_seconds,
                     "eval_accuracy_during_training": eval_history(workdir, result)},
        "eval_seconds": eval_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3000, help="pairs in total (80%% train)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data", default="runs/bench-data/shapes",
                        help="where the pairs are built (and reused from)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override configs/reward/local.yaml")
    parser.add_argument("--out", default="bench/results/reward_accuracy.json")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    result.update(
        total_seconds=time.perf_counter() - start,
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        machine=f"{platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} torch threads",
        versions={name: version(name) for name in PACKAGES},
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
