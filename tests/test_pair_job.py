"""Pair sets made in shards (spatialrl.data.pair_shards): planned up front, written shard by
shard, resumed after a kill without redoing finished shards, with throughput in MLflow; made
in this process or by a Ray Data job (`spatialrl data pairs --ray`, spatialrl.actors.pair_job)
on a local Ray instance that the command starts itself."""

import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from sessions import kill_session, spatialrl

from spatialrl.cli import main
from spatialrl.data.generated import sample_prompt_pairs
from spatialrl.data.pair_shards import PairSetSpec, ShardFolder, plan_shards
from spatialrl.errors import InputError

OUTPUTS = ("train.parquet", "test.parquet")


def _argv(model: Path, out: Path, database: Path, *extra: str) -> list[str]:
    return ["data", "pairs", "--model", str(model), "--out", str(out), "--n", "12",
            "--size", "64", "--steps", "8", "--batch-size", "2", "--shard-size", "2",
            "--seed", "5", "--tracking-uri", f"sqlite:///{database}", *extra]


def _finished_run(database: Path):
    client = MlflowClient(f"sqlite:///{database}")
    experiment = client.get_experiment_by_name("spatialrl-data")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    return runs[0]


def _shard_stamps(out: Path) -> dict[str, int]:
    """Each finished shard file's identity and modification time: unchanged if not redone."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns)
            for path in (out / "shards").glob("shard-*.parquet")}


def test_the_plan_is_the_prompt_pairs_in_order_cut_into_shards():
    spec = PairSetSpec(model="org/M", n=11, seed=2, shard_size=4)
    shards = plan_shards(spec)
    assert [len(s) for s in shards] == [4, 4, 3] and spec.shard_count == 3
    assert [p for s in shards for p in s] == sample_prompt_pairs(11, "org/M", 2, 0.2)


def test_shards_of_another_spec_are_refused_naming_what_changed(tmp_path):
    folder = ShardFolder(tmp_path)
    folder.claim(PairSetSpec(model="m", n=8))
    folder.claim(PairSetSpec(model="m", n=8))  # the same spec: resumed
    with pytest.raises(InputError, match=r"another pair set \(n 8 -> 10, seed 0 -> 1\)"):
        folder.claim(PairSetSpec(model="m", n=10, seed=1))


def test_ray_options_fail_fast_with_one_line_errors(tmp_path, capsys):
    base = ["data", "pairs", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "out"),
            "--n", "2", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main([*base, "--ray", "--gpus-per-worker", "0"]) == 2  # checked before Ray starts
    assert "no diffusers pipeline there" in capsys.readouterr().err
    assert main([*base, "--address", "127.0.0.1:6379"]) == 2
    assert "--address names a Ray cluster: use it with --ray" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_rerun_remakes_only_the_missing_shards_and_logs_drops(tiny_flux_path, tmp_path):
    out, database = tmp_path / "pairs", tmp_path / "mlflow.db"
    argv = _argv(tiny_flux_path, out, database, "--device", "cpu", "--verifier", "rules")
    assert main(argv) == 0
    first = {name: pq.read_table(out / name) for name in (*OUTPUTS, "verification.parquet")}
    verdicts = first["verification.parquet"].to_pylist()
    assert [v["pair_id"] for v in verdicts] == [
        p.pair_id for p in sample_prompt_pairs(12, str(tiny_flux_path), 5, 0.2)]
    reasons = Counter(v["reason"] for v in verdicts if v["reason"])
    run = _finished_run(database)
    assert run.data.params["shards_done_before"] == "0"
    assert run.data.metrics["job/shards_made"] == 6
    assert run.data.metrics["job/pairs_generated"] == 12
    assert run.data.metrics["job/pairs_per_s"] > 0
    kept = sum(v["kept"] for v in verdicts)
    assert run.data.metrics["set/kept_fraction"] == pytest.approx(kept / 12)
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("set/dropped/")} == {
        f"set/dropped/{reason}": count for reason, count in reasons.items()}

    (out / "shards" / "shard-000004.pairs.parquet").unlink()  # as if killed before shard 4
    redone = {"shard-000004.pairs.parquet", "shard-000004.verdicts.parquet"}
    untouched = {k: v for k, v in _shard_stamps(out).items() if k not in redone}
    assert main(argv) == 0
    after = _shard_stamps(out)
    assert {k: after[k] for k in untouched} == untouched and redone <= after.keys()
    run = _finished_run(database)
    assert run.data.params["shards_done_before"] == "5"
    assert run.data.metrics["job/shards_made"] == 1 and run.data.metrics["job/pairs_generated"] == 2
    for name, table in first.items():
        assert pq.read_table(out / name).equals(table), name


def _wait_for_a_shard(process: subprocess.Popen, out: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not list((out / "shards").glob("shard-*.pairs.parquet")):
        assert process.poll() is None, "the job ended before it wrote a shard"
        assert time.monotonic() < deadline, "no shard written in time"
        time.sleep(0.02)


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_ray_job_resumes_to_the_uninterrupted_set(tiny_flux_path, tmp_path):
    # Short: Ray's socket paths under it must stay below 108 characters.
    ray_dirs = [tempfile.mkdtemp(prefix="rpj-", dir="/tmp") for _ in range(2)]
    reference, out, database = tmp_path / "reference", tmp_path / "pairs", tmp_path / "mlflow.db"
    common = ("--verifier", "none")
    ray = ("--ray", "--workers", "1", "--gpus-per-worker", "0", *common)
    sessions = []
    try:
        # The uninterrupted set, made in one process through the same shard maker.
        made = spatialrl(_argv(tiny_flux_path, reference, database, "--device", "cpu",
                                *common), ray_dirs[0], tmp_path / "reference.log")
        sessions.append(made.pid)
        assert made.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]

        job = spatialrl(_argv(tiny_flux_path, out, database, *ray), ray_dirs[0],
                         tmp_path / "killed.log")
        sessions.append(job.pid)
        _wait_for_a_shard(job, out, timeout_s=400)
        kill_session(job.pid)
        job.wait(timeout=60)
        done = _shard_stamps(out)
        assert 1 <= len(done) < 6, done  # killed part-way
        assert not (out / "train.parquet").exists()

        job = spatialrl(_argv(tiny_flux_path, out, database, *ray), ray_dirs[1],
                         tmp_path / "resumed.log")
        sessions.append(job.pid)
        assert job.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    finally:
        for session in sessions:  # whatever a failed step left running
            kill_session(session)
        for ray_dir in ray_dirs:
            shutil.rmtree(ray_dir, ignore_errors=True)

    after = _shard_stamps(out)
    assert {name: after[name] for name in done} == done  # finished shards were not redone
    assert len(after) == 6 and not list((out / "shards").glob("*.partial"))
    for name in OUTPUTS:
        assert pq.read_table(out / name).equals(pq.read_table(reference / name)), name
    assert pq.read_table(out / "train.parquet").num_rows + pq.read_table(
        out / "test.parquet").num_rows == 12
    run = _finished_run(database)
    assert run.data.tags["backend"] == "ray"
    assert run.data.params["shards_done_before"] == str(len(done))
    assert run.data.metrics["job/shards_made"] == 6 - len(done)
    assert run.data.metrics["job/pairs_generated"] == 2 * (6 - len(done))
    assert run.data.metrics["job/pairs_per_s"] > 0
    assert run.data.metrics["job/kept_fraction"] == 1.0  # no verifier
    assert run.data.metrics["set/pairs_kept"] == 12
