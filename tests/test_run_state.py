"""Checkpoint layout and completeness on local paths and file:// URIs (the code path every
object-store URI takes), and the early output_dir check."""

from __future__ import annotations

import hashlib
import logging
import os
import re

import pytest

from spatialrl import storage
from spatialrl.config import ConfigError
from spatialrl.run_state import (
    CheckpointError,
    RunState,
    checkpoint_dir,
    latest_checkpoint,
    load_run_state,
    new_checkpoint_dir,
    prepare_output_dir,
    save_run_state,
)


def state(next_iteration: int) -> RunState:
    return RunState(next_iteration=next_iteration, version=next_iteration,
                    prompt_cursor=2 * next_iteration, mlflow_run_id="run-a",
                    counters={"faults/redone_groups": 1.0})


def write_learner_files(folder: str) -> None:
    storage.write_bytes(storage.join(folder, "learner", "learner", "mp_rank_00_model_states.pt"),
                        b"weights")


@pytest.fixture(params=["path", "file-uri"])
def output_dir(request, tmp_path) -> str:
    root = tmp_path / "run"
    return root.as_uri() if request.param == "file-uri" else str(root)


def test_the_newest_complete_checkpoint_wins_and_incomplete_ones_are_ignored(output_dir):
    for iteration in (1, 3):
        folder = checkpoint_dir(output_dir, iteration)
        write_learner_files(folder)
        save_run_state(folder, state(iteration + 1))
    # Newer, but the run died before the marker: learner files only.
    write_learner_files(checkpoint_dir(output_dir, 4))
    # Newer still: the marker's temporary file of a write that never finished.
    storage.write_bytes(storage.join(checkpoint_dir(output_dir, 5), "run_state.json.tmp-0"),
                        b"{")

    latest, latest_state = latest_checkpoint(output_dir)
    assert latest == checkpoint_dir(output_dir, 3)
    assert latest_state == load_run_state(latest) == state(4).model_copy(update={"files": {
        "learner/learner/mp_rank_00_model_states.pt": hashlib.sha256(b"weights").hexdigest()}})
    with pytest.raises(FileNotFoundError, match="iteration-000004"):
        load_run_state(checkpoint_dir(output_dir, 4))


def test_no_complete_checkpoint_is_an_error_naming_the_folder(output_dir):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint under .*run/checkpoints"):
        latest_checkpoint(output_dir)  # nothing written yet
    write_learner_files(checkpoint_dir(output_dir, 0))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        latest_checkpoint(output_dir)


def test_the_marker_is_replaced_whole(output_dir):
    folder = checkpoint_dir(output_dir, 2)
    save_run_state(folder, state(3))
    save_run_state(folder, state(7))
    assert load_run_state(folder) == state(7).model_copy(update={"files": {}})
    assert storage.list_files(folder) == ["run_state.json"]


def test_checkpoint_dir_keeps_the_uri(tmp_path):
    assert checkpoint_dir("s3://bucket/runs/a?region=us-east-1", 12) == (
        "s3://bucket/runs/a/checkpoints/iteration-000012?region=us-east-1")
    assert checkpoint_dir(str(tmp_path), 12) == str(tmp_path / "checkpoints" / "iteration-000012")


def test_prepare_output_dir_makes_local_paths_absolute_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert prepare_output_dir("runs/a") == str(tmp_path / "runs" / "a")
    assert (tmp_path / "runs" / "a").is_dir()
    uri = (tmp_path / "remote" / "b").as_uri()
    assert prepare_output_dir(uri) == uri
    assert (tmp_path / "remote" / "b").is_dir()


def test_an_unsupported_scheme_is_a_config_error_naming_output_dir():
    with pytest.raises(ConfigError, match=r"output_dir ftp2://host/runs/a: .*Unrecognized"):
        prepare_output_dir("ftp2://host/runs/a")


@pytest.mark.slow  # the S3 SDK's retries take about 12 s
def test_an_unreachable_bucket_is_a_config_error_naming_output_dir(monkeypatch):
    # An S3 endpoint on a closed local port: the bucket check fails (after the SDK's retries,
    # about 12 s) instead of the first checkpoint failing hours into a run.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    uri = "s3://bucket/runs/a?region=us-east-1&endpoint_override=127.0.0.1:9&scheme=http"
    with pytest.raises(ConfigError, match=r"output_dir s3://bucket/runs/a\?.*bucket"):
        prepare_output_dir(uri)


def test_a_local_output_dir_that_cannot_be_created_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=f"output_dir {os.fspath(blocker)}/run"):
        prepare_output_dir(str(blocker / "run"))


@pytest.mark.parametrize("earlier_file", ["checkpoints/iteration-000001/run_state.json",
                                          "ledger/000000.parquet"])
def test_a_fresh_run_refuses_an_output_dir_holding_a_run_and_leaves_it_intact(
    output_dir, earlier_file
):
    path = storage.join(output_dir, earlier_file)
    storage.write_bytes(path, b"an earlier run's file")
    folder = earlier_file.split("/")[0]
    with pytest.raises(ConfigError, match=rf"already holds a run \({folder}\).*--resume"):
        prepare_output_dir(output_dir)
    assert storage.read_bytes(path) == b"an earlier run's file"
    assert prepare_output_dir(output_dir, resume=True).endswith("run")


def test_a_fresh_run_may_use_an_existing_empty_output_dir(tmp_path):
    (tmp_path / "run" / "notes").mkdir(parents=True)
    assert prepare_output_dir(tmp_path / "run") == str(tmp_path / "run")


def complete_checkpoint(output_dir: str, iteration: int) -> str:
    folder = new_checkpoint_dir(output_dir, iteration)
    write_learner_files(folder)
    save_run_state(folder, state(iteration + 1))
    return folder


MODEL_FILE = "learner/learner/mp_rank_00_model_states.pt"


@pytest.mark.parametrize("damage, reason", [
    (lambda f: storage.write_bytes(storage.join(f, "run_state.json"), b'{"next_iteration": 3'),
     "run_state.json: not a valid marker (Invalid JSON: EOF"),
    (lambda f: storage.write_bytes(storage.join(f, MODEL_FILE), b"planted"),
     f"{MODEL_FILE}: sha256 differs from the one in run_state.json"),
    (lambda f: storage.write_bytes(storage.join(f, "learner/learner/extra.pt"), b"x"),
     "extra.pt: not listed in run_state.json"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_stays(
        output_dir, damage, reason, caplog):
    complete_checkpoint(output_dir, 1)
    newest = complete_checkpoint(output_dir, 3)
    damage(newest)
    before = {name: storage.read_bytes(storage.join(newest, name))
              for name in storage.list_files(newest)}

    with pytest.raises(CheckpointError, match=re.escape(reason)):
        load_run_state(newest)
    with caplog.at_level(logging.WARNING, "spatialrl.run_state"):
        folder, resumed = latest_checkpoint(output_dir)
    assert (folder, resumed.next_iteration) == (checkpoint_dir(output_dir, 1), 2)
    assert "skipping checkpoint iteration-000003" in caplog.text and reason in caplog.text

    # The redone iteration 3 checkpoints beside the damaged one, which is left as it was.
    redone = complete_checkpoint(output_dir, 3)
    assert redone == checkpoint_dir(output_dir, 3, attempt=1)
    assert latest_checkpoint(output_dir)[0] == redone
    assert {name: storage.read_bytes(storage.join(newest, name))
            for name in storage.list_files(newest)} == before


def test_when_every_checkpoint_is_damaged_resume_stops_naming_them(output_dir):
    folder = complete_checkpoint(output_dir, 2)
    storage.write_bytes(storage.join(folder, MODEL_FILE), b"planted")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*iteration-000002/"
                                              rf"{MODEL_FILE}: sha256 differs"):
        latest_checkpoint(output_dir)


def test_checkpoints_are_ordered_by_iteration_then_attempt(tmp_path):
    output_dir = str(tmp_path)
    for iteration in (9, 9, 9, 10):
        complete_checkpoint(output_dir, iteration)
    for attempt in range(2, 11):  # iteration-000009.10 must sort after .2
        folder = checkpoint_dir(output_dir, 9, attempt)
        write_learner_files(folder)
        save_run_state(folder, state(9 + attempt))
    assert latest_checkpoint(output_dir)[0] == checkpoint_dir(output_dir, 10)
    storage.write_bytes(storage.join(checkpoint_dir(output_dir, 10), "run_state.json"), b"{")
    assert latest_checkpoint(output_dir)[0] == checkpoint_dir(output_dir, 9, 10)
