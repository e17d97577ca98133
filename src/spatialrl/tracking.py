"""MLflow tracking through an explicit client (no global active run), so that the driver,
a resumed run and tests never trip over each other's state."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from spatialrl.config import MlflowConfig

MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value


def _artifact_root(tracking_uri: str) -> str | None:
    """Next to a local sqlite store, so a run's files live beside its database."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


class Tracker:
    def __init__(self, cfg: MlflowConfig, run_id: str | None = None, tags: dict | None = None):
        self.client = MlflowClient(tracking_uri=cfg.tracking_uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment
                else self.client.create_experiment(
                    cfg.experiment, artifact_location=_artifact_root(cfg.tracking_uri)
                )
            )
            run = self.client.create_run(experiment_id, run_name=cfg.run_name, tags=tags or {})
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self.ended = False

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, error: BaseException | None, traceback) -> None:
        """A block that raises ends the run as `end_by` says; one that returns finishes it,
        unless it already ended the run with a status of its own."""
        if error is not None:
            self.end_by(error)
        elif not self.ended:
            self.finish()

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        fresh = [
            Param(key, str(value)[:MAX_PARAM_CHARS])
            for key, value in params.items()
            if key not in existing  # a resumed run keeps its original params
        ]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
        self.ended = True

    def end_by(self, error: BaseException) -> None:
        """End the run an exception stopped: Ctrl-C (or a job stop) kills it, anything else
        fails it, so the dashboard tells an interrupted run from a broken one."""
        self.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Tile equally sized images row-major, for one sample grid per evaluation."""
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for n, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((n % columns) * width, (n // columns) * height))
    return grid

