"""The SpatialScore curriculum through the product trainer: reads the stages that
scripts/reward_curriculum.sh ran (`spatialrl reward train`, Ray Train + DeepSpeed, MLflow)
and scores the last stage's model on held-out shapes pairs. Writes
bench/results/reward_curriculum.json.

    DATA=runs/bench-data SHAPES_PAIRS=72000 scripts/reward_curriculum.sh
    .venv/bin/python bench/reward_curriculum.py --pairs runs/bench-data/shapes-72000/test.parquet

Per stage: its pairs, steps, learning rate, held-out accuracy at every evaluation and wall
time (MLflow run start to its last logged training step). The final model: pairwise accuracy
on the first --test-pairs held-out pairs, by perturbed relations, and the mean mu of correct
and perturbed renders.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

from mlflow.tracking import MlflowClient
from results_file import write_result
from reward_accuracy import mu_by_num_perturbed

from spatialrl.data.pairs import read_pairs
from spatialrl.learners.spatialscore_trainer import RUN_FILE, newest_model
from spatialrl.reward.evaluation import accuracy_summary, score_pairs
from spatialrl.reward.model import SpatialScore


def train_files(params: dict[str, str]) -> list[str]:
    """data.train as logged: one path (older runs) or a list's repr."""
    logged = params["data.train"]
    return ast.literal_eval(logged) if logged.startswith("[") else [logged]


def stage_record(client: MlflowClient, folder: Path) -> dict:
    run = client.get_run(json.loads((folder / RUN_FILE).read_text())["run_id"])
    params, info = run.data.params, run.info
    evals = client.get_metric_history(run.info.run_id, "eval/accuracy")
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    return {
        "stage": folder.name,
        "status": info.status,
        "train_pairs": "+".join(Path(path).parent.name for path in train_files(params)),
        "steps": int(params["optim.steps"]),
        "lr": float(params["optim.lr"]),
        "init_from": None if params.get("init_from") in (None, "None") else params["init_from"],
        "heldout_accuracy": [{"step": m.step, "accuracy": m.value}
                             for m in sorted(evals, key=lambda m: m.step)],
        # Run start to its last training step: a finished stage that a rerun of the script
        # resumed (doing nothing) has a later end time.
        "seconds": (max(m.timestamp for m in losses) - info.start_time) / 1000 if losses else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/reward-curriculum", help="the script's OUT")
    parser.add_argument("--pairs", required=True, help="held-out shapes pairs (parquet)")
    parser.add_argument("--test-pairs", type=int, default=300)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--out", default="bench/results/reward_curriculum.json")
    args = parser.parse_args()

    client = MlflowClient(tracking_uri=args.tracking_uri)
    stages = sorted(p for p in Path(args.runs).iterdir() if (p / RUN_FILE).is_file())
    records = [stage_record(client, folder) for folder in stages]
    final = newest_model(stages[-1])
    model = SpatialScore.from_pretrained(final)
    pairs = read_pairs(args.pairs, split="test").pairs[: args.test_pairs]
    scored = score_pairs(model, pairs, 32)
    write_result({
        "stages": records,
        "seconds_total": sum(r["seconds"] or 0 for r in records),
        "final_model": str(final),
        "final_shapes_heldout": {**accuracy_summary(scored),
                                 "mu_by_num_perturbed": mu_by_num_perturbed(scored)},
    }, args.out)


if __name__ == "__main__":
    main()
