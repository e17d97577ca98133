"""`spatialrl spatialreward train`: SpatialReward SFT on the shared Ray Train + DeepSpeed
trainer (learners/deepspeed_trainer.py, which documents the workers, checkpoints and resume)
with SftTask (spatialrl.spatialreward.sft: edit examples, cross-entropy on the answer tokens,
held-out teacher-forced loss and token accuracy)."""

from __future__ import annotations

from spatialrl.learners.deepspeed_trainer import TrainResult, train_model
from spatialrl.spatialreward.sft import SftTask
from spatialrl.spatialreward.train_config import SpatialRewardTrainConfig

TASK = SftTask()


def train_spatialreward(cfg: SpatialRewardTrainConfig, resume: bool = False) -> TrainResult:
    """Train (or with `resume`, continue) the SpatialReward SFT run in cfg.output_dir."""
    return train_model(TASK, cfg, resume)
