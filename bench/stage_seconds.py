"""Seconds per item of each stage (rollout per image, reward per image, learner per trained
sample) for one worker, measured with the in-process loop on the config's models. Writes
the file that `spatialrl capacity --measured` reads.

    .venv/bin/python bench/stage_seconds.py [--config configs/tiny.yaml] [--iterations 5]

With configs/tiny.yaml this measures the tiny random FLUX on this machine's CPU; on a GPU
node, pass a config that loads FLUX.1-dev and SpatialScore to measure the real stages.
The first iteration is a warm-up and is not counted; figures are medians over the rest.
They are wall-clock seconds, so on a shared machine they include waiting for cores: the
file records the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from results_file import write_result

from spatialrl.commands.tiny_models import write_tiny_models
from spatialrl.config import load_config
from spatialrl.inprocess import InProcessTrainer
from spatialrl.tracking import Tracker


def measure(config: str, iterations: int, workdir: Path, tiny: bool) -> dict:
    overrides = [f"output_dir={workdir / 'run'}", "eval_every=0", "checkpoint_every=0",
                 f"iterations={iterations + 1}",
                 f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}"]
    if tiny:
        overrides.append(f"model.pretrained={write_tiny_models(workdir / 'models')['flux']}")
    cfg = load_config(config, overrides)
    trainer = InProcessTrainer(cfg)
    with Tracker(cfg.mlflow, tags={"bench": "stage_seconds"}) as tracker:
        history = trainer.fit(tracker)
    images = cfg.prompts.prompts_per_iteration * cfg.grpo.group_size
    rows = []
    for metrics in history[1:]:  # after a warm-up iteration
        trained = round(metrics["filter/kept_fraction"] * images) * cfg.optim.updates_per_iteration
        if "time/learn_s" not in metrics:
            continue
        rows.append({
            "rollout": metrics["time/rollout_s"] / images,
            "reward": metrics["time/reward_s"] / images,
            "learner": metrics["time/learn_s"] / trained,
            "trained_samples": trained,
        })
    return {
        "stage_seconds": {
            role: statistics.median(row[role] for row in rows)
            for role in ("rollout", "reward", "learner")
        },
        "per_iteration": rows,
        "images_per_iteration": images,
        "config": config,
        "model": cfg.model.pretrained if not tiny else "tiny random FLUX (spatialrl tiny-models)",
        "reward": cfg.reward.kind,
        "device": trainer.device,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--iterations", type=int, default=5, help="measured, after a warm-up")
    parser.add_argument("--no-tiny", dest="tiny", action="store_false",
                        help="use the config's model instead of freshly built tiny models")
    parser.add_argument("--out", default="bench/results/stage_seconds_tiny.json")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.config, args.iterations, Path(tmp), args.tiny)
    result["load_average_1min_before"] = load_before
    write_result(result, args.out)


if __name__ == "__main__":
    main()
