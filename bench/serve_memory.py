"""Memory amplification of the SpatialScore service (issue 26, item 6): peak memory of the
ingress and reward replicas while a small body of large images is scored, before and after
the pixel limits and early downscaling.

    OMP_NUM_THREADS=1 .venv/bin/python bench/serve_memory.py [--before-tree DIR]

Starts `spatialrl serve` (configs/serve/local.yaml, a tiny random SpatialScore whose image
processor reads at most 112x112 pixels, no generator) as its own process, once from this
tree ("after") and, with --before-tree, once from another copy of the repository ("before"),
whose src/spatialrl must hold actors/ and learners/ as the editable install maps them:

    git archive COMMIT | tar -x -C DIR
    ln -s ../../actors DIR/src/spatialrl/actors; ln -s ../../learners DIR/src/spatialrl/learners

Each server
gets two requests, one after the other: 4 flat 2048x2048 PNGs (the most pixels the default
limits admit in one request), then 16 (4x that, in a body of about 0.3 MB). It samples the
resident memory of both replica processes every 20 ms and records, per request, the status
and the peak above the replica's idle memory, and what stays in use 2 s after the answer.
64 images, as in the issue, would take about 5 GB before the change: 16 keep the benchmark
within about 1.5 GB. Writes bench/results/serve_memory.json, with the load average.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
from best_of_n import random_spatialscore
from PIL import Image
from results_file import write_result
from serve_load import free_port, wait_until_ready

from spatialrl.service.client import SpatialScoreClient

REPO = Path(__file__).resolve().parents[1]
REPLICAS = {"ingress": "SpatialScoreService", "reward": "RewardDeployment"}
SIDE = 2048
IMAGE_COUNTS = (4, 16)
MB = 2**20


def start_server(tree: Path, checkpoint: Path, port: int, log: Path) -> subprocess.Popen:
    """`spatialrl serve` with `tree`'s code first on the path (its Ray workers inherit it)."""
    command = [
        sys.executable, "-c", "from spatialrl.cli import main; raise SystemExit(main())", "serve",
        "--config", str(REPO / "configs/serve/local.yaml"), "--model", str(checkpoint),
        "--port", str(port), "--set", "generator=null",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(tree / "src")}
    return subprocess.Popen(command, cwd=tree, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def replica(server: subprocess.Popen, name: str) -> psutil.Process:
    for process in psutil.Process(server.pid).children(recursive=True):
        if name in " ".join(process.cmdline()):
            return process
    raise RuntimeError(f"no {name} replica under the server")


class PeakSampler:
    """The largest resident memory of some processes, sampled every 20 ms."""

    def __init__(self, processes: dict[str, psutil.Process]):
        self.processes, self.peak = processes, {name: 0 for name in processes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        while not self._stop.wait(0.02):
            for name, process in self.processes.items():
                self.peak[name] = max(self.peak[name], process.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()


def body(count: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), "white").save(buffer, "PNG")
    image = {"base64": base64.b64encode(buffer.getvalue()).decode()}
    items = [{"prompt": "a red circle to the left of a blue square", "image": image}] * count
    return json.dumps({"items": items}).encode()


def post(port: int, data: bytes) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/score", data,
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, "ok"
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["error"]


def measure(label: str, tree: Path, checkpoint: Path, workdir: Path) -> dict:
    port = free_port()
    server = start_server(tree, checkpoint, port, workdir / f"serve-{label}.log")
    try:
        wait_until_ready(SpatialScoreClient(f"http://127.0.0.1:{port}"), server, 600)
        processes = {role: replica(server, name) for role, name in REPLICAS.items()}
        idle = {role: p.memory_info().rss for role, p in processes.items()}
        requests = []
        for count in IMAGE_COUNTS:
            data = body(count)
            with PeakSampler(processes) as sampler:
                started = time.monotonic()
                status, outcome = post(port, data)
                seconds = time.monotonic() - started
            time.sleep(2)
            requests.append({
                "images": count, "body_mb": round(len(data) / MB, 2), "status": status,
                "outcome": outcome, "seconds": round(seconds, 2),
                **{f"{role}_peak_above_idle_mb": round((sampler.peak[role] - idle[role]) / MB)
                   for role in processes},
                **{f"{role}_in_use_after_mb":
                   round((p.memory_info().rss - idle[role]) / MB) for role, p in processes.items()},
            })
        return {"code": label, "idle_mb": {role: round(v / MB) for role, v in idle.items()},
                "requests": requests}
    finally:
        server.send_signal(signal.SIGINT)  # the server deletes its app and stops Ray
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-tree", type=Path,
                        help="a checkout of the code before the change, measured first")
    parser.add_argument("--out", default=str(REPO / "bench/results/serve_memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = random_spatialscore(workdir)
        trees = [("before", args.before_tree)] if args.before_tree else []
        runs = [measure(label, tree.resolve(), checkpoint, workdir)
                for label, tree in [*trees, ("after", REPO)]]
    write_result({
        "what": f"/v1/score with {' then '.join(map(str, IMAGE_COUNTS))} flat {SIDE}x{SIDE} "
                "PNGs in one body; resident memory of each replica process above its idle "
                "memory, sampled every 20 ms, and in use 2 s after the answer",
        "model_input_pixels": 112 * 112,
        "runs": runs,
    }, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
