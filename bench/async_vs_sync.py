"""The asynchronous loop against the synchronous one, on one local Ray instance.

Both runs use configs/tiny.yaml with the same overrides; only rollout.max_staleness differs
(0 = synchronous: rollouts wait for every update; 1 = rollouts for the next iteration run
while the learner trains). Throughput is steady-state: images trained on from the end of the
first iteration to the end of the last, over that wall time (start-up excluded).

    OMP_NUM_THREADS=1 .venv/bin/python bench/async_vs_sync.py --iterations 8 \
        --set rollout.num_actors=1 --set learner.num_workers=1

Writes bench/results/async_vs_sync.json (or --out). On a 2-core machine give each role its
own core as above: with tiny.yaml's 2 actors + 2 learners the overlapped stages share two
cores four ways and the asynchronous loop loses (bench/results/async_vs_sync_2x2.json); on a
cluster every role has its own GPUs, which is the case the one-core-per-role run models.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import ray
from ray import serve
from results_file import write_result

from spatialrl.commands.tiny_models import write_tiny_models
from spatialrl.config import load_config
from spatialrl.learners.ray_backend import RayTrainer
from spatialrl.tracking import Tracker


def run_once(max_staleness: int, iterations: int, overrides: list[str], workdir: Path) -> dict:
    cfg = load_config("configs/tiny.yaml", [
        f"model.pretrained={workdir / 'tiny-models' / 'flux'}",
        f"output_dir={workdir / f'staleness-{max_staleness}'}",
        f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        f"iterations={iterations}", "eval_every=0", "checkpoint_every=0",
        *overrides, f"rollout.max_staleness={max_staleness}",
    ])
    tracker = Tracker(cfg.mlflow)
    try:
        history = RayTrainer(cfg, tracker).run()
    finally:
        tracker.finish()
    images = (len(history) - 1) * cfg.prompts.prompts_per_iteration * cfg.grpo.group_size
    # time/iteration_s runs from one iteration's end to the next one's.
    steady_s = sum(h["time/iteration_s"] for h in history[1:])
    stage_means = {
        key: sum(h[key] for h in history[1:] if key in h) / (len(history) - 1)
        for key in ("time/rollout_s", "time/reward_s", "time/learn_s", "time/broadcast_s",
                    "time/wait_s", "time/iteration_s")
    }
    return {
        "max_staleness": max_staleness,
        "images_per_s": images / steady_s,
        "steady_state_seconds": steady_s,
        "iterations_timed": len(history) - 1,
        "mean_staleness": sum(h.get("staleness/mean", 0.0) for h in history) / len(history),
        "dropped_stale_groups": history[-1].get("staleness/dropped_groups", 0.0),
        "stage_seconds_mean": stage_means,
        # Through the driver: rollout summaries received, shard references sent to learners.
        "driver_bytes_per_iteration": [
            h["driver/rollout_bytes"] + h.get("learn/driver_bytes", 0.0) for h in history],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default="bench/results/async_vs_sync.json")
    args = parser.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_models(Path(tmp) / "tiny-models")
            sync = run_once(0, args.iterations, args.overrides, Path(tmp))
            async_ = run_once(1, args.iterations, args.overrides, Path(tmp))
    finally:
        serve.shutdown()
        ray.shutdown()
    write_result({
        "sync": sync,
        "async": async_,
        "async_over_sync_images_per_s": async_["images_per_s"] / sync["images_per_s"],
        "config": "configs/tiny.yaml",
        "overrides": args.overrides,
    }, args.out)


if __name__ == "__main__":
    main()
