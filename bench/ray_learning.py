"""Learning check of the Ray trainer (the asynchronous loop, DeepSpeed learner, Serve reward).
Evaluation (ODE, fixed seeds, held-out shapes-world prompts) reports the reward and the shapes
world's hard relation accuracy and dense centroid-order score.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ray_learning.py --reward brightness_left \
        --iterations 60 --set rollout.num_actors=1 --set learner.num_workers=1 \
        --out bench/results/ray_learning_brightness.json

With `--reward shapes_rule` the tiny random FLUX gets no signal at all: it never draws an
object the evaluator can read, so every group's rewards are equal (all 0) and every
advantage is 0. `shapes_soft` scores the colour-centroid order of the prompt's objects,
which a random generator already varies in (bench/results/ray_learning_shapes_soft.json).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray
from ray import serve
from results_file import write_result

from spatialrl.commands.tiny_models import write_tiny_models
from spatialrl.config import load_config
from spatialrl.learners.ray_backend import RayTrainer
from spatialrl.tracking import Tracker

EVAL_KEYS = ("eval/relation_accuracy", "eval/all_relations_correct", "eval/soft_relation_score",
             "eval/reward_mean")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reward", default="brightness_left")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default="bench/results/ray_learning_brightness.json")
    args = parser.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            models = write_tiny_models(Path(tmp) / "tiny-models")
            cfg = load_config("configs/tiny.yaml", [
                f"model.pretrained={models['flux']}", f"output_dir={Path(tmp) / 'run'}",
                f"mlflow.tracking_uri=sqlite:///{Path(tmp) / 'mlflow.db'}",
                f"reward.kind={args.reward}", f"iterations={args.iterations}",
                f"eval_every={args.eval_every}", "checkpoint_every=0",
                "prompts.num_eval_prompts=16",
                *args.overrides,
            ])
            tracker = Tracker(cfg.mlflow)
            try:
                history = RayTrainer(cfg, tracker).run()
            finally:
                tracker.finish()
    finally:
        serve.shutdown()
        ray.shutdown()
    evals = [{"iteration": i, **{k: h[k] for k in EVAL_KEYS}}
             for i, h in enumerate(history) if "eval/relation_accuracy" in h]
    write_result({
        "reward": args.reward,
        "evaluations": evals,
        "gain": {k: evals[-1][k] - evals[0][k] for k in EVAL_KEYS},
        "train_reward_first5": sum(h["reward/mean"] for h in history[:5]) / 5,
        "train_reward_last5": sum(h["reward/mean"] for h in history[-5:]) / 5,
        "seconds": time.perf_counter() - start,
        "config": "configs/tiny.yaml",
        "overrides": args.overrides,
    }, args.out)


if __name__ == "__main__":
    main()
