"""Learning check: filtered GRPO with a pixel reward (brightness of the left half) on the tiny
random FLUX. Writes bench/results/grpo_learning.json with the eval reward per evaluation.

    .venv/bin/python bench/grpo_learning.py [--iterations 80]

The eval reward is deterministic (ODE sampling, fixed seeds, fixed held-out prompts), so
its rise is the policy's doing, not sampling noise.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from results_file import write_result

from spatialrl.commands.tiny_models import write_tiny_models
from spatialrl.config import load_config
from spatialrl.inprocess import InProcessTrainer
from spatialrl.tracking import Tracker


def run(iterations: int, eval_every: int, workdir: Path) -> dict:
    """configs/tiny.yaml with the brightness reward, in a scratch folder."""
    models = write_tiny_models(workdir / "tiny-models")
    cfg = load_config("configs/tiny.yaml", [
        "reward.kind=brightness_left", "checkpoint_every=0",
        f"iterations={iterations}", f"eval_every={eval_every}",
        f"model.pretrained={models['flux']}", f"output_dir={workdir / 'run'}",
        f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
    ])
    start = time.perf_counter()
    with Tracker(cfg.mlflow, tags={"bench": "grpo_learning"}) as tracker:
        history = InProcessTrainer(cfg).fit(tracker)
    evals = [(i, h["eval/reward_mean"]) for i, h in enumerate(history) if "eval/reward_mean" in h]
    return {
        "eval_reward": [{"iteration": i, "reward": r} for i, r in evals],
        "eval_reward_gain": evals[-1][1] - evals[0][1],
        "train_reward_first5": sum(h["reward/mean"] for h in history[:5]) / 5,
        "train_reward_last5": sum(h["reward/mean"] for h in history[-5:]) / 5,
        "seconds": time.perf_counter() - start,
        "iterations": iterations,
        "config": "configs/tiny.yaml",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=80)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", default="bench/results/grpo_learning.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.iterations, args.eval_every, Path(tmp))
    write_result(result, args.out)


if __name__ == "__main__":
    main()
