"""A training run whose driver is killed (SIGKILL of the driver, its local Ray instance and
every actor, as when the head node goes) resumes from its newest complete checkpoint with
`--resume`, in the same MLflow run, and trains on every group exactly once. Its output_dir is
a file:// URI: the object-store path, where every learner rank stages and uploads its files
and a resume downloads them."""

import shutil
import tempfile
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient
from sessions import kill_session, spatialrl
from test_ray_trainer import assert_both_ranks_saved_and_the_lora_loads, trainer_config

from spatialrl import storage
from spatialrl.run_state import checkpoint_dir, latest_checkpoint
from spatialrl.train_batch import audit_ledger

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.slow]


def wait_for(condition, process, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} in {timeout_s:g} s"
        time.sleep(0.05)


def test_a_run_whose_driver_was_killed_resumes_from_its_last_checkpoint(tiny_flux_path,
                                                                         tmp_path):
    cfg = trainer_config(tiny_flux_path, tmp_path, "iterations=6", "checkpoint_every=1",
                         "eval_every=0", f"output_dir={(tmp_path / 'run').as_uri()}")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # Short: Ray's socket paths under these must stay below 108 characters.
    ray_dirs = [tempfile.mkdtemp(prefix="rdk-", dir="/tmp") for _ in range(2)]
    sessions = []
    try:
        run = spatialrl(["train", "--config", str(config_file)], ray_dirs[0],
                        tmp_path / "killed.log")
        sessions.append(run.pid)
        first = storage.join(checkpoint_dir(cfg.output_dir, 1), "run_state.json")
        wait_for(lambda: storage.exists(first), run, 900, "the checkpoint of iteration 1")
        kill_session(run.pid)
        run.wait(timeout=60)
        folder, state = latest_checkpoint(cfg.output_dir)
        assert 2 <= state.next_iteration < 6, folder  # killed part-way

        resumed = spatialrl(["train", "--config", str(config_file), "--resume"], ray_dirs[1],
                            tmp_path / "resumed.log")
        sessions.append(resumed.pid)
        assert resumed.wait(timeout=900) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    finally:
        for session in sessions:
            kill_session(session)
        for ray_dir in ray_dirs:
            shutil.rmtree(ray_dir, ignore_errors=True)

    client = MlflowClient(cfg.mlflow.tracking_uri)
    run_info = client.get_run(state.mlflow_run_id)
    assert run_info.info.status == "FINISHED"  # the killed run, finished by the resume
    assert len(client.search_runs([run_info.info.experiment_id])) == 1
    versions = client.get_metric_history(state.mlflow_run_id, "policy/version")
    assert {m.step for m in versions} == set(range(6))
    assert max(versions, key=lambda m: (m.step, m.timestamp)).value == 6.0
    assert set(audit_ledger(cfg).values()) == {0}  # every group trained on once, whole
    last, last_state = latest_checkpoint(cfg.output_dir)
    assert last_state.next_iteration == 6
    assert_both_ranks_saved_and_the_lora_loads(last, tiny_flux_path)
