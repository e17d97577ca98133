"""Typed configuration of a training run on Ray Train + DeepSpeed: what every run has
(TrainRunConfig: steps, checkpoints, evaluation, init_from, optimiser, workers), and the
SpatialScore run (`spatialrl reward train --config`) built on it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from spatialrl.config import MlflowConfig, Pair, Section
from spatialrl.reward.config import SpatialScoreConfig


class TrainDataConfig(Section):
    # Parquet files; only their matching split is used, so one file holding both splits
    # works as well. Several train files are one mixed set (each epoch shuffles them
    # together): a curriculum stage that must not forget the last stage's task trains on both.
    train: list[str] = Field(min_length=1)
    test: str | None = None

    @field_validator("train", mode="before")
    @classmethod
    def _one_file_is_a_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


class RewardDataConfig(TrainDataConfig):
    # Preference-pair files (spatialrl.data.pairs schema).
    # Evaluate on the first N valid test pairs only (a large test split, frequent evals).
    max_test_pairs: int | None = Field(None, ge=1)


class RewardOptimConfig(Section):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: Pair[float] = (0.9, 0.999)
    steps: int = Field(1000, ge=1, description="optimizer steps in total")
    batch_size: int = Field(8, ge=1, description="examples (pairs) per step on each worker")
    # Examples per forward/backward; batch_size / micro_batch_size of them are accumulated.
    micro_batch_size: int | None = Field(None, ge=1, description="None: the whole batch")
    grad_clip: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear warmup, then cosine decay to 0")

    @model_validator(mode="after")
    def _check(self) -> RewardOptimConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"warmup_steps: {self.warmup_steps} must be below steps ({self.steps})"
            )
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size: {self.micro_batch_size} must divide batch_size "
                f"({self.batch_size})"
            )
        return self

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)


class RewardDistributedConfig(Section):
    # The Ray cluster: None means RAY_ADDRESS (set by `ray job submit`) if set, otherwise a
    # fresh local instance, never some other cluster that happens to run on this machine.
    ray_address: str | None = None
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False  # one GPU per worker, NCCL; otherwise CPU workers on gloo
    zero_stage: Literal[1, 2] = 2
    cpus_per_worker: float = Field(1.0, gt=0)


class TrainRunConfig(Section):
    """What the shared trainer (learners/deepspeed_trainer.py) reads; a model's run config
    adds `model` (with a `base_model`), `data` (a TrainDataConfig) and `mlflow`."""

    seed: int = 0
    # Checkpoints (Ray Train's, holding DeepSpeed's) and the MLflow run id live here.
    output_dir: str
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = at the end")
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0, description="steps between test evaluations; 0 = at the end")
    eval_batch_size: int = Field(16, ge=1, description="examples per forward when evaluating")
    log_every: int = Field(1, ge=1)
    # End this invocation after this step, with a checkpoint; `--resume` continues the run
    # (time-sliced or preemptible allocations). None: train to optim.steps.
    stop_after: int | None = Field(None, ge=1)
    # Start from trained weights: a checkpoint folder or hub id of the model trained, or the
    # output_dir of an earlier run (its newest checkpoint). A curriculum's next stage, or
    # more training on new data; `model` must build the same shapes.
    init_from: str | None = None
    optim: RewardOptimConfig = Field(default_factory=RewardOptimConfig)
    distributed: RewardDistributedConfig = Field(default_factory=RewardDistributedConfig)


class RewardTrainConfig(TrainRunConfig):
    output_dir: str = "runs/reward"
    # init_from here: a SpatialScore checkpoint (base model architecture, LoRA, head alike).
    model: SpatialScoreConfig = Field(default_factory=SpatialScoreConfig)
    data: RewardDataConfig
    mlflow: MlflowConfig = Field(default_factory=lambda: MlflowConfig(experiment="spatialscore"))
