"""Load test of the SpatialScore HTTP service on loopback, from a second process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/serve_load.py [--seconds 30] [--clients 16] \
        [--repeats 2]

For each reward batch limit (reward.serving.max_batch_size = 1, then 16; the pair --repeats
times, interleaved, so that a shared machine's changing load hits both alike) this starts
`spatialrl serve` as its own process (configs/serve/local.yaml, a tiny random SpatialScore,
no generator), waits for /readyz, and then runs --clients concurrent clients, each sending
one-item /v1/score requests (a 64x64 shapes-world PNG) back to back for --seconds. It records
throughput, p50/p99 latency, the batch sizes the answers report, and every failed request,
and writes bench/results/serve_load.json: every run, the medians per limit and the ratio of
the median throughputs (16 over 1). Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from best_of_n import random_spatialscore
from results_file import write_result

from spatialrl.data.grammar import sample_scene, scene_to_prompt
from spatialrl.data.render import render
from spatialrl.ports import free_port
from spatialrl.service.api import ImageRef
from spatialrl.service.client import ServiceError, SpatialScoreClient, image_ref

REPO = Path(__file__).resolve().parents[1]
BATCH_LIMITS = (1, 16)


def start_server(checkpoint: Path, max_batch_size: int, port: int, log: Path) -> subprocess.Popen:
    command = [
        str(Path(sys.executable).parent / "spatialrl"), "serve",
        "--config", str(REPO / "configs/serve/local.yaml"), "--model", str(checkpoint),
        "--port", str(port), "--set", f"reward.serving.max_batch_size={max_batch_size}",
        "--set", "generator=null",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def wait_until_ready(client: SpatialScoreClient, server: subprocess.Popen, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"spatialrl serve exited with {server.returncode}")
        try:
            return client.ready()
        except (OSError, ServiceError):  # not listening yet, or refusing until it is up
            time.sleep(2)
    raise TimeoutError(f"the service was not ready within {timeout_s} s")


def run_clients(client: SpatialScoreClient, prompt: str, image: ImageRef, clients: int,
                seconds: float) -> dict:
    """`clients` threads sending one-item requests back to back until the time is up."""
    latencies, batch_sizes, failures = [], [], []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def loop():
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            try:
                score = client.score_one(prompt, image)
            except Exception as error:  # every failure is counted and named
                with lock:
                    failures.append(repr(error)[:200])
                continue
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                batch_sizes.append(score.batch_size)

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - began
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "requests_ok": len(latencies),
        "requests_failed": len(failures),
        "failures": failures[:10],
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall,
        "latency_p50_ms": 1000 * quantiles[49],
        "latency_p99_ms": 1000 * quantiles[98],
        "latency_mean_ms": 1000 * statistics.fmean(latencies),
        "batch_size_mean": statistics.fmean(batch_sizes),
        "batch_size_max": max(batch_sizes),
    }


def measure(checkpoint: Path, max_batch_size: int, args, workdir: Path) -> dict:
    port = free_port()
    log = workdir / f"serve-{max_batch_size}.log"
    server = start_server(checkpoint, max_batch_size, port, log)
    client = SpatialScoreClient(f"http://127.0.0.1:{port}", timeout_s=60)
    try:
        started = time.monotonic()
        ready = wait_until_ready(client, server, args.startup_timeout)
        startup = time.monotonic() - started
        rng = np.random.default_rng(0)
        scene = sample_scene(rng)
        # Encoded once: the clients measure the service, not PNG encoding.
        prompt, image = scene_to_prompt(scene), ImageRef(**image_ref(render(scene, 64, rng)))
        run_clients(client, prompt, image, args.clients, args.warmup_seconds)
        result = run_clients(client, prompt, image, args.clients, args.seconds)
    finally:
        server.send_signal(signal.SIGINT)  # the server deletes its app and stops Ray
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"max_batch_size": max_batch_size, "server_startup_s": startup,
            "model_version": ready["model_version"], **result}


def medians(runs: list[dict]) -> dict:
    keys = ("throughput_rps", "latency_p50_ms", "latency_p99_ms", "batch_size_mean")
    return {key: statistics.median(run[key] for run in runs) for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup-seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--out", default=str(REPO / "bench/results/serve_load.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = random_spatialscore(workdir)
        runs = [measure(checkpoint, limit, args, workdir)
                for _ in range(args.repeats) for limit in BATCH_LIMITS]
    by_limit = {str(limit): medians([run for run in runs if run["max_batch_size"] == limit])
                for limit in BATCH_LIMITS}
    one, sixteen = by_limit["1"], by_limit["16"]
    result = {
        "what": "one-item /v1/score requests from concurrent clients in a second process, "
                "loopback HTTP, tiny random SpatialScore on CPU (configs/serve/local.yaml)",
        "clients": args.clients,
        "seconds": args.seconds,
        "by_limit": by_limit,
        "throughput_ratio_16_over_1": sixteen["throughput_rps"] / one["throughput_rps"],
        "p50_latency_ratio_16_over_1": sixteen["latency_p50_ms"] / one["latency_p50_ms"],
        "requests_failed": sum(run["requests_failed"] for run in runs),
        "runs": runs,
    }
    write_result(result, args.out)
    sys.exit(1 if result["requests_failed"] else 0)


if __name__ == "__main__":
    main()
