"""`spatialrl reward train`: SpatialScore on the shared Ray Train + DeepSpeed trainer
(learners/deepspeed_trainer.py, which documents the workers, checkpoints and resume) with
SpatialScoreTask (spatialrl.reward.training: preference pairs, Gaussian Bradley-Terry loss,
held-out pairwise accuracy)."""

from __future__ import annotations

from spatialrl.learners.deepspeed_trainer import (
    RUN_FILE,
    TrainResult,
    newest_model,
    train_model,
    verify_checkpoint,
)
from spatialrl.learners.deepspeed_trainer import step_line as _step_line
from spatialrl.reward.train_config import RewardTrainConfig
from spatialrl.reward.training import SpatialScoreTask

TASK = SpatialScoreTask()

__all__ = ["RUN_FILE", "newest_model", "step_line", "train_reward_model", "verify_checkpoint"]


def train_reward_model(cfg: RewardTrainConfig, resume: bool = False) -> TrainResult:
    """Train (or with `resume`, continue) the SpatialScore run in cfg.output_dir."""
    return train_model(TASK, cfg, resume)


def step_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """SpatialScore's printed step line: loss, accuracy, lr and held-out accuracy."""
    return _step_line(step, total, metrics, TASK.shown_metrics)
