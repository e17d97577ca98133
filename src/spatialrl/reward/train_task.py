"""What a model brings to the shared Ray Train + DeepSpeed trainer (learners/deepspeed_trainer.py):
its data, its loss, its evaluation and its checkpoint format. Everything else (workers,
DeepSpeed, batches by (seed, step), checkpoints and their checksums, resume, init_from of an
earlier run, MLflow) is the trainer's, written once for every model.

Two tasks exist: SpatialScore's (spatialrl.reward.training.SpatialScoreTask, preference pairs,
Gaussian Bradley-Terry) and SpatialReward's SFT (spatialrl.spatialreward.sft.SftTask, edit
examples, next-token cross-entropy on the answer). No Ray and no DeepSpeed here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from spatialrl.reward.train_config import TrainRunConfig


@dataclass
class TaskData:
    """One worker's share of a split, and the rows of the files that were skipped, by reason."""

    items: list
    skipped: dict[str, int] = field(default_factory=dict)


class TrainTask(Protocol):
    kind: str  # names the MLflow tag, the run name and the DeepSpeed checkpoint tag
    unit: str  # what an item is, in metric names: train/{unit}_per_s
    config_type: type[TrainRunConfig]
    shown_metrics: tuple[str, ...]  # the metrics of the printed step line, in order

    def check_data(self, cfg: Any) -> None:
        """Fail before any worker starts (ConfigError, FileNotFoundError, InputError) when a
        data file is missing or has nothing to train or test on."""

    def check_init_from(self, location: str, cfg: Any) -> None:
        """ConfigError unless `location` (a folder or hub id) can start `cfg.model`."""

    def build_model(self, cfg: Any) -> nn.Module:
        """The model to train, from cfg.init_from if set; torch is seeded already."""

    def load_data(self, cfg: Any, split: str, rank: int, world_size: int) -> TaskData:
        """Every world_size-th item of `split` from `rank` on."""

    def micro_batch_loss(
        self, forward: Callable[..., Any], model: nn.Module, items: Sequence, cfg: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one micro-batch through `forward` (the DeepSpeed engine, which wraps
        `model`), and its detached statistics (averaged over ranks by the trainer)."""

    def eval_records(self, model: nn.Module, items: Sequence, cfg: Any) -> list:
        """Per-item results of the test items of this rank (gathered by the trainer)."""

    def eval_metrics(self, records: Sequence) -> dict[str, float]:
        """eval/... metrics of every rank's records."""

    def save_model(self, model: nn.Module, folder: Path) -> Path:
        """Write the model (safetensors only) into `folder`, which from_pretrained loads."""
