"""The cluster entry: `ray job submit --working-dir . -- spatialrl train ...` against a
`ray start --head` cluster on this machine, exactly as on a real cluster."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from spatialrl.actors.local_cluster import end_processes_naming

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def head_node(tmp_path):
    """A one-node cluster with token authentication (Ray's default); its processes find
    `spatialrl` on PATH, as in a cluster image."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    dashboard_port = free_port()
    # Its own short temp dir (socket paths stay under 108 characters): stopping it ends only
    # this cluster's processes, where `ray stop` would end every Ray instance on the machine.
    temp_dir = tempfile.mkdtemp(prefix="rayjs-", dir="/tmp")
    subprocess.run(
        [BIN / "ray", "start", "--head", "--num-cpus=2", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
         f"--dashboard-port={dashboard_port}", "--include-dashboard=true", "--disable-usage-stats",
         # Not the default agent ports: another Ray instance on the machine holds those, and
         # its job agent would then never come up.
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}"],
        check=True, env=env, capture_output=True, timeout=180,
    )
    try:
        yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        end_processes_naming(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_trainer_on_the_cluster(head_node, tiny_flux_path, tmp_path):
    address, env = head_node
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {"excludes": [".git", ".venv", "runs", "mlruns", "mlartifacts", "*.db",
                                "tiny-models"]}
    command = [
        BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "spatialrl", "train", "--config", "configs/local.yaml",
        "--set", f"model.pretrained={tiny_flux_path}", "--set", "iterations=2",
        "--set", "eval_every=1", "--set", "checkpoint_every=0",
        "--set", "prompts.prompts_per_iteration=2", "--set", "grpo.group_size=4",
        "--set", "grpo.top_k=1", "--set", "sampling.num_steps=4",
        "--set", "prompts.num_eval_prompts=2",
        "--set", f"output_dir={tmp_path / 'run'}", "--set", f"mlflow.tracking_uri={tracking_uri}"]
    job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs(client.get_experiment_by_name("spatialrl-local").experiment_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["backend"] == "ray"
    history = client.get_metric_history(run.info.run_id, "policy/version")
    assert [m.value for m in history] == [1.0, 2.0]
    assert (tmp_path / "run" / "checkpoints" / "iteration-000001" / "run_state.json").is_file()
