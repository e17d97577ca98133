"""MLflow tracking through an explicit client (no global active run), so that the driver,
a resumed run and tests never trip over each other's state."""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from diffusers.utils import make_image_grid
from mlflow.entities import Metric, Param
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.git_utils import get_git_commit
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT
from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel

import spatialrl
from spatialrl.config import ConfigError, MlflowConfig, flatten

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
# MLflow 3 UIs before the "GenAI | Model training" switch read this tag to open an experiment
# on model training rather than GenAI (traces) screens. The pinned 3.17 UI ignores it: it
# opens every experiment on the GenAI side unless the link carries UI_MODEL_TRAINING (or
# the user flips the switch, which that browser remembers), so runs log such a link.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
UI_MODEL_TRAINING = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default
EVAL_IMAGE_KEY = "eval/samples"  # one captioned grid per evaluation step (the UI's slider)
CELL_PX = 192  # eval images are scaled to this side: tiny ones readable, 512 px ones small
CAPTION_PX = 2 * CELL_PX
FONT_PX = 14


def _artifact_root(tracking_uri: str) -> str | None:
    """Next to a local sqlite store, so a run's files live beside its database."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


def ui_url(server: str, experiment_id: str, run_id: str | None = None) -> str:
    """The UI page of an experiment's runs, or of one run, on the model-training side."""
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/{page}?{UI_MODEL_TRAINING}"


def ui_server(tracking_uri: str) -> tuple[str, str] | None:
    """Where the UI of a tracking store is served, and how to serve it if it is local;
    None for Databricks, whose UI lives elsewhere."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri, ""
    if tracking_uri.startswith("databricks"):
        return None
    return LOCAL_UI, f"mlflow ui --backend-store-uri {tracking_uri}"


def run_name(kind: str, model: str) -> str:
    """A readable default run name: what is trained, from which model, when."""
    return f"{kind} {Path(model.rstrip('/')).name} {datetime.now():%Y-%m-%d %H:%M}"


def source_tags(tags: dict | None) -> dict:
    """MLflow's own context tags (user, entry point) and the commit of the installed
    spatialrl source: the entry point is a console script outside the repository."""
    resolved = resolve_tags(tags or {})
    if commit := get_git_commit(spatialrl.__file__):
        resolved[MLFLOW_GIT_COMMIT] = commit
    return resolved


class Tracker:
    """One MLflow run, new or resumed (`run_id`). A new run gets a name (`cfg.run_name`, else
    `name`) and the source tags; `system_metrics` samples this machine's CPU, memory, disk,
    network and GPUs into it (system/...) until the run ends. `url` is the run's page in the
    MLflow UI (None for Databricks), logged when the run opens."""

    def __init__(self, cfg: MlflowConfig, run_id: str | None = None, tags: dict | None = None,
                 name: str | None = None, system_metrics: bool = True):
        self.client = MlflowClient(tracking_uri=cfg.tracking_uri)
        resumed = run_id is not None
        if run_id is None:
            run = self.client.create_run(self._experiment_id(cfg), run_name=cfg.run_name or name,
                                         tags=source_tags(tags))
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self.ended = False
        self.url = None
        if served := ui_server(cfg.tracking_uri):
            server, serve = served
            self.url = ui_url(server, self.client.get_run(run_id).info.experiment_id, run_id)
            log.info("MLflow run %s: %s%s", run_id, self.url,
                     f" (after `{serve}`)" if serve else "")
        self.monitor = None
        if system_metrics:
            self.monitor = SystemMetricsMonitor(run_id, resume_logging=resumed,
                                                tracking_uri=cfg.tracking_uri)
            self.monitor.start()

    def _experiment_id(self, cfg: MlflowConfig) -> str:
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            return self.client.create_experiment(
                cfg.experiment, artifact_location=_artifact_root(cfg.tracking_uri),
                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # one made before the tag existed
            self.client.set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return experiment.experiment_id

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, error: BaseException | None, traceback) -> None:
        """A block that raises ends the run as `end_by` says; one that returns finishes it,
        unless it already ended the run with a status of its own."""
        if error is not None:
            self.end_by(error)
        elif not self.ended:
            self.finish()

    def log_config(self, config: BaseModel) -> None:
        """The whole config as params (searchable; a resumed run keeps its own) and as
        config.yaml (reusable with --config)."""
        self.log_params(flatten(config))
        self.log_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
                      "config.yaml")

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

    def log_eval_images(self, images: Sequence[Image.Image], prompts: Sequence[str],
                        rewards: Sequence[float], step: int,
                        sources: Sequence[Image.Image] | None = None) -> None:
        """The evaluation's samples as one image of `step` (the UI's image slider steps
        through them), each with its reward and prompt written beside it; edits as source |
        edit, with the instruction beside."""
        if sources is not None:
            images = [side_by_side(s, im) for s, im in zip(sources, images, strict=True)]
        captions = [f"reward {r:.3f}\n{p}" for p, r in zip(prompts, rewards, strict=True)]
        self.log_image_grid(images, captions, EVAL_IMAGE_KEY, step)
        self.log_text("\n".join(prompts) + "\n", "eval/prompts.txt")  # the same at every step

    def log_image_grid(self, images: Sequence[Image.Image], captions: Sequence[str], key: str,
                       step: int) -> None:
        """One image of `step` under `key`: the images, four a row, each caption beside."""
        self.client.log_image(self.run_id, captioned_grid(images, captions, columns=4),
                              key=key, step=step)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def set_summary(self, text: str, tags: dict[str, str]) -> None:
        """The run's description in the UI (MLflow's note tag), and searchable tags."""
        self.client.set_tag(self.run_id, "mlflow.note.content", text)
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        if self.monitor is not None:
            self.monitor.finish()  # flushes its last samples while the run still takes them
        self.client.set_terminated(self.run_id, status=status)
        self.ended = True

    def end_by(self, error: BaseException) -> None:
        """End the run an exception stopped: Ctrl-C (or a job stop) kills it, anything else
        fails it, so the dashboard tells an interrupted run from a broken one."""
        self.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")


def captioned_grid(images: Sequence[Image.Image], captions: Sequence[str], columns: int
                   ) -> Image.Image:
    """Each image scaled to CELL_PX with its caption to its right, `columns` per row."""
    cells = [_captioned(image, caption) for image, caption in zip(images, captions, strict=True)]
    rows = math.ceil(len(cells) / columns)
    blank = Image.new("RGB", cells[0].size, "white")
    return make_image_grid(cells + [blank] * (rows * columns - len(cells)), rows, columns)


def side_by_side(source: Image.Image, edit: Image.Image) -> Image.Image:
    """source | edit, the source at the edit's size."""
    pair = Image.new("RGB", (2 * edit.width, edit.height), "white")
    pair.paste(source.convert("RGB").resize(edit.size), (0, 0))
    pair.paste(edit.convert("RGB"), (edit.width, 0))
    return pair


def _captioned(image: Image.Image, caption: str) -> Image.Image:
    """The image CELL_PX high (its aspect kept), its caption to its right."""
    small = image.height < CELL_PX  # tiny images: keep pixels sharp rather than blur them
    width = round(image.width * CELL_PX / image.height)
    scaled = image.convert("RGB").resize(
        (width, CELL_PX), Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS)
    cell = Image.new("RGB", (width + CAPTION_PX, CELL_PX), "white")
    cell.paste(scaled, (0, 0))
    font = ImageFont.load_default(size=FONT_PX)
    lines = [line for paragraph in caption.split("\n")
             for line in _wrap(paragraph, font, CAPTION_PX - 12)]
    ImageDraw.Draw(cell).multiline_text((width + 6, 4), "\n".join(lines), fill="black",
                                        font=font)
    return cell


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels."""
    lines = [""]
    for word in text.split():
        joined = f"{lines[-1]} {word}".strip()
        if font.getlength(joined) <= width or not lines[-1]:
            lines[-1] = joined
        else:
            lines.append(word)
    return lines


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """ConfigError naming mlflow.tracking_uri when its http(s) server cannot be reached
    (MLflow's client retries for minutes before it fails); local stores need no check."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(f"mlflow.tracking_uri {uri}: cannot be reached ({err})") from None
