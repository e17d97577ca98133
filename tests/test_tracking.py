"""The MLflow run as a user opens it: real MLflow on a sqlite store in a temporary folder."""

import logging
import re
import subprocess
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from spatialrl.config import MlflowConfig, load_config
from spatialrl.tracking import (
    CAPTION_PX,
    CELL_PX,
    EXPERIMENT_KIND_TAG,
    LOCAL_UI,
    MODEL_TRAINING,
    UI_MODEL_TRAINING,
    Tracker,
    captioned_grid,
    run_name,
    ui_server,
    ui_url,
)

REPO = Path(__file__).resolve().parents[1]


def mlflow_config(tmp_path) -> MlflowConfig:
    return MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="t")


def test_a_new_run_opens_as_model_training_with_its_name_commit_and_config(tmp_path):
    cfg = mlflow_config(tmp_path)
    config = load_config("configs/tiny.yaml", ["grpo.top_k=3"])
    with Tracker(cfg, name=run_name("grpo", "black-forest-labs/FLUX.1-dev/"),
                 system_metrics=False) as tracker:
        tracker.log_config(config)
    client = MlflowClient(cfg.tracking_uri)
    run = client.get_run(tracker.run_id)

    assert client.get_experiment_by_name("t").tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    assert re.fullmatch(r"grpo FLUX\.1-dev \d{4}-\d\d-\d\d \d\d:\d\d", run.info.run_name)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.params["grpo.top_k"] == "3"
    saved = Path(client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path)))
    assert load_config(saved) == config  # the artifact is a config `--config` takes


def test_an_experiment_made_before_the_kind_tag_gets_it(tmp_path):
    cfg = mlflow_config(tmp_path)
    client = MlflowClient(cfg.tracking_uri)
    client.create_experiment("t")
    Tracker(cfg, system_metrics=False).finish()
    assert client.get_experiment_by_name("t").tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING


def test_a_run_logs_its_link_on_the_ui_model_training_side(tmp_path, caplog):
    """MLflow 3.17's UI ignores the kind tag and opens experiments on its GenAI screens;
    a link with UI_MODEL_TRAINING opens the run as model training."""
    cfg = mlflow_config(tmp_path)
    with caplog.at_level(logging.INFO, logger="spatialrl.tracking"):
        tracker = Tracker(cfg, system_metrics=False)
        tracker.finish()
    experiment_id = MlflowClient(cfg.tracking_uri).get_run(tracker.run_id).info.experiment_id
    assert tracker.url == (f"{LOCAL_UI}/#/experiments/{experiment_id}/runs/{tracker.run_id}"
                           "?workflowType=machine_learning")
    assert (f"MLflow run {tracker.run_id}: {tracker.url} "
            f"(after `mlflow ui --backend-store-uri {cfg.tracking_uri}`)") in caplog.text


def test_ui_links_go_to_the_tracking_server_that_serves_them():
    assert ui_url("http://mlflow.internal:5000/", "7") == (
        "http://mlflow.internal:5000/#/experiments/7/runs?workflowType=machine_learning")
    assert ui_server("https://mlflow.internal") == ("https://mlflow.internal", "")
    assert ui_server("databricks://profile") is None


def test_the_installed_mlflow_ui_reads_the_workflow_type_from_the_link():
    """An upgrade guard: the UI bundle still takes the side from this query parameter (seen
    in a browser by scripts/dashboard_screenshots.py)."""
    bundle = Path(mlflow.__file__).parent / "server/js/build/static/js"
    main = "".join(path.read_text(errors="ignore") for path in bundle.glob("main.*.js"))
    if not main:
        pytest.skip("this MLflow ships no UI (mlflow-skinny)")
    key, value = UI_MODEL_TRAINING.split("=")
    assert f'.get("{key}")' in main
    assert f'"{value}"' in main


def test_eval_images_are_logged_per_step_with_prompts_beside_them(tmp_path):
    cfg = mlflow_config(tmp_path)
    images = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue", "green")]
    prompts = ["a red circle", "a blue square left of a star", "a green triangle"]
    with Tracker(cfg, system_metrics=False) as tracker:
        tracker.log_eval_images(images, prompts, [0.25, -1.0, 0.5], step=0)
        tracker.log_eval_images(images, prompts, [0.75, 0.0, 0.5], step=10)
    client = MlflowClient(cfg.tracking_uri)
    logged = [a.path for a in client.list_artifacts(tracker.run_id, "images")]
    steps = {int(m.group(1)) for p in logged if (m := re.search(r"eval~samples\+step\+(\d+)", p))}
    assert steps == {0, 10}
    saved = client.download_artifacts(tracker.run_id, "eval/prompts.txt", str(tmp_path))
    assert Path(saved).read_text().splitlines() == prompts


def test_the_grid_writes_each_caption_beside_its_image():
    images = [Image.fromarray(np.full((64, 64, 3), 255 * (i % 2), np.uint8)) for i in range(5)]
    captions = [f"reward {i}\na prompt number {i}" for i in range(5)]
    grid = np.asarray(captioned_grid(images, captions, columns=2))
    cell_w = CELL_PX + CAPTION_PX
    assert grid.shape == (3 * CELL_PX, 2 * cell_w, 3)  # 5 cells in 2 columns: 3 rows
    first_caption = grid[:CELL_PX, CELL_PX:cell_w]
    assert (first_caption < 128).any(), "the caption is written"
    assert (grid[:CELL_PX, :CELL_PX] == 0).all(), "the image is scaled, not captioned over"
    other = np.asarray(captioned_grid(images, [c + "!" for c in captions], columns=2))
    assert not np.array_equal(other[:CELL_PX, CELL_PX:cell_w], first_caption)
    assert (grid[2 * CELL_PX:, cell_w:] == 255).all(), "the missing sixth cell is blank"


def test_system_metrics_are_sampled_into_the_run_until_it_ends(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    cfg = mlflow_config(tmp_path)
    with Tracker(cfg) as tracker:
        time.sleep(1.5)
    metrics = MlflowClient(cfg.tracking_uri).get_run(tracker.run_id).data.metrics
    assert {"system/cpu_utilization_percentage",
            "system/system_memory_usage_megabytes"} <= set(metrics)
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"], (
        "the sampling thread stops with the run")

