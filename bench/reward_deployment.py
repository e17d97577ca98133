"""Reward deployment costs on a local Ray: Serve startup and per-call latency of score_group,
beside the same reward called in-process. Writes bench/results/reward_deployment.json.

    OMP_NUM_THREADS=1 .venv/bin/python bench/reward_deployment.py [--calls 20]

One caller sends one group of shapes-world renders (64x64) at a time, so latency is one
batch's compute plus Serve's routing and batch wait; the rewards are shapes_rule and a tiny
random SpatialScore checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image
from ray import serve
from results_file import write_result

from spatialrl.actors.reward import score_group, start_reward_deployment
from spatialrl.commands.tiny_models import write_tiny_models
from spatialrl.config import RewardConfig
from spatialrl.data.grammar import sample_scene, scene_to_prompt
from spatialrl.data.render import render
from spatialrl.reward import SpatialScore, SpatialScoreConfig
from spatialrl.reward_functions import build_reward


def shapes_group(size: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(size)]
    images = np.stack([np.asarray(render(scene, 64, rng)) for scene in scenes])
    return [scene_to_prompt(scene) for scene in scenes], images


def seconds(call, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def measure(cfg: RewardConfig, name: str, group, calls: int) -> dict:
    prompts, images = group
    start = time.perf_counter()
    handle = start_reward_deployment(cfg, name=name)
    startup = time.perf_counter() - start
    first = seconds(lambda: score_group(handle, prompts, images), 1)["median_s"]
    served = seconds(lambda: score_group(handle, prompts, images), calls)
    reward = build_reward(cfg, "cpu")
    pil = [Image.fromarray(image) for image in images]
    reward(pil, prompts)  # warm up like the replica's first call
    return {
        "deployment_startup_s": startup,
        "first_call_s": first,
        "served_call": served,
        "in_process_call": seconds(lambda: reward(pil, prompts), calls),
        "group_size": len(prompts),
        "serving": cfg.serving.model_dump(),
    }


def run(calls: int, group_size: int, workdir: Path) -> dict:
    models = write_tiny_models(workdir / "tiny-models")
    torch.manual_seed(0)
    checkpoint = SpatialScore.from_config(SpatialScoreConfig(
        base_model=str(models["qwen2.5-vl"]), dtype="float32", head_hidden_size=32,
    )).save_pretrained(workdir / "spatialscore")
    serving = {"gpus_per_replica": 0, "cpus_per_replica": 0.5}
    configs = {
        "shapes_rule": RewardConfig(kind="shapes_rule", serving=serving),
        "spatialscore": RewardConfig(
            kind="spatialscore", spatialscore_path=str(checkpoint), serving=serving),
    }
    group = shapes_group(group_size)

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False)
    ray_init = time.perf_counter() - start
    start = time.perf_counter()
    serve.start(proxy_location="Disabled")
    serve_start = time.perf_counter() - start
    try:
        rewards = {kind: measure(cfg, f"bench-{kind}", group, calls)
                   for kind, cfg in configs.items()}
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"ray_init_s": ray_init, "serve_start_s": serve_start, "calls": calls,
            "rewards": rewards}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--out", default="bench/results/reward_deployment.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.calls, args.group_size, Path(tmp))
    write_result(result, args.out)


if __name__ == "__main__":
    main()
