"""Bytes through the driver per iteration, at two image sizes: the driver holds references,
so they must not grow with the images or the trajectories.

Runs the asynchronous Ray loop (bench/async_vs_sync.py's run_once, configs/tiny.yaml) at
64 x 64 and 128 x 128 px, and reports per iteration the bytes the driver received (rollout
summaries: scores, seeds, names) plus sent (the learners' shard references and advantages),
beside the trajectory and image bytes that stayed in the actors' object stores.

    OMP_NUM_THREADS=1 .venv/bin/python bench/driver_bytes.py --iterations 4

Writes bench/results/driver_bytes.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import ray
from async_vs_sync import run_once
from ray import serve
from results_file import write_result

from spatialrl.commands.tiny_models import write_tiny_models
from spatialrl.config import load_config
from spatialrl.flux.loading import load_flux_pipeline
from spatialrl.rollout import sample_groups


def bytes_left_with_the_actors(size_overrides: list[str], workdir: Path) -> dict[str, int]:
    """One iteration's trajectories and images, sampled here: what the driver never sees."""
    cfg = load_config("configs/tiny.yaml", [
        f"model.pretrained={workdir / 'tiny-models' / 'flux'}", *size_overrides])
    prompts = [f"prompt {i}" for i in range(cfg.prompts.prompts_per_iteration)]
    groups = sample_groups(load_flux_pipeline(cfg.model), prompts, list(range(len(prompts))),
                           0, 0, cfg.seed, cfg.grpo.group_size, cfg.sampling)
    tensors = [t for g in groups for t in g.trajectory.to_tensors()[0].values()]
    return {"trajectory_bytes": sum(t.nbytes for t in tensors),
            "image_bytes": sum(3 * im.width * im.height for g in groups for im in g.images)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--out", default="bench/results/driver_bytes.json")
    args = parser.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            write_tiny_models(workdir / "tiny-models")
            for size in args.sizes:
                sizes = [f"sampling.height={size}", f"sampling.width={size}"]
                run = run_once(1, args.iterations, [*sizes, f"output_dir={workdir / str(size)}"],
                               workdir)
                per_iteration = run["driver_bytes_per_iteration"]
                results[f"{size}px"] = {
                    "driver_bytes_per_iteration_median": statistics.median(per_iteration),
                    "driver_bytes_per_iteration": per_iteration,
                    **bytes_left_with_the_actors(sizes, workdir),
                }
    finally:
        serve.shutdown()
        ray.shutdown()
    write_result({"sizes": results, "config": "configs/tiny.yaml",
                  "iterations": args.iterations}, args.out)


if __name__ == "__main__":
    main()
