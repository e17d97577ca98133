"""bench/perf.py runs end to end at the tiny scale on the CPU and writes a complete result file.
No timing thresholds: only that it runs, says what it measured, and every figure is positive."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_rollout_and_estimate_write_a_result_file(tmp_path):
    out = tmp_path / "perf.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "bench/perf.py", "--scale", "tiny", "--device", "cpu",
         "--suite", "rollout", "e2e", "--repeats", "1", "--out", str(out)],
        cwd=REPO, env=env, check=True, capture_output=True, timeout=600,
    )
    result = json.loads(out.read_text())

    assert "bench/perf.py" in result["command"] and result["torch"] and result["machine"]
    assert result["scale"] == "tiny" and result["gpu_figures"].startswith("MISSING")
    assert {"reward", "learner", "broadcast", "bottlenecks"}.isdisjoint(result)

    rollout = result["rollout"]
    assert rollout["attention_backends"]["native"] == "installed"
    rows = rollout["rows"]
    assert {(row["resolution"], row["batch"]) for row in rows} == {
        (32, 1), (32, 4), (64, 1), (64, 4)}
    for row in rows:
        assert row["seconds"] > 0 and row["flops"] > 0 and row["flop_per_s"] > 0
        assert row["trajectories_per_s"] == row["batch"] / row["seconds"]
        assert "mfu" not in row  # no GPU peak to divide by on a CPU
    by_size = {(row["resolution"], row["batch"]): row["flops"] for row in rows}
    assert by_size[(32, 4)] == 4 * by_size[(32, 1)]  # FLOPs are counted, not timed
    assert by_size[(64, 1)] > by_size[(32, 1)]

    estimate = result["e2e"]
    assert estimate["kind"].startswith("ESTIMATE")
    stages = estimate["stage_seconds_per_iteration"]
    assert set(stages) == {"rollout", "reward", "learner"}
    assert all(value > 0 for value in stages.values())
    assert abs(estimate["seconds_per_iteration"] - sum(stages.values())) < 1e-9
