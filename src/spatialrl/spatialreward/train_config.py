"""Typed configuration of SpatialReward's SFT run (`spatialrl spatialreward train --config`),
on the same TrainRunConfig as SpatialScore's run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from spatialrl.config import Dtype, MlflowConfig, Section
from spatialrl.reward.config import RewardLoraConfig
from spatialrl.reward.train_config import TrainDataConfig, TrainRunConfig
from spatialrl.spatialreward.prompts import DEFAULT_SCORE_RANGE


class SftModelConfig(Section):
    # Hub id or from_pretrained folder of a Qwen3-VL (with its tokenizer and image processor).
    base_model: str = "Qwen/Qwen3-VL-8B-Instruct"
    revision: str | None = None
    # Backbone dtype; with bfloat16/float16 only LoRA trains (the optimiser is fp32).
    dtype: Dtype = "bfloat16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # lora: an adapter on the language model's projections (the real 8B); full: every weight
    # (the tiny random model, which has nothing to adapt).
    finetune: Literal["lora", "full"] = "lora"
    lora: RewardLoraConfig = Field(default_factory=RewardLoraConfig)
    gradient_checkpointing: bool = False
    score_range: int = Field(DEFAULT_SCORE_RANGE, ge=1)  # the prompts' 0-N scales
    # Pixel budget per image; None keeps the model's image processor budget.
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> SftModelConfig:
        if self.finetune == "full" and self.dtype != "float32":
            raise ValueError(f"dtype: finetune full trains every weight with the fp32 "
                             f"optimiser, so the model must be float32, not {self.dtype}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(
                f"min_pixels: {self.min_pixels} is larger than max_pixels ({self.max_pixels})")
        return self


class EditDataConfig(TrainDataConfig):
    # Edit-example files (`spatialrl data edits`; spatialrl.spatialreward.edit_examples).
    # Every candidate row is one edit-judgement sample (its SFT target: edit_answer).
    # One quality-judgement sample (target: quality_answer) per this many rows; 0: none.
    quality_every: int = Field(6, ge=0)
    # Evaluate on the first N test rows only (a large test split, frequent evals).
    max_test_rows: int | None = Field(None, ge=1)


class SpatialRewardTrainConfig(TrainRunConfig):
    output_dir: str = "runs/spatialreward"
    # init_from here: a Qwen3-VL folder or hub id (a run's model/ folder is one).
    model: SftModelConfig = Field(default_factory=SftModelConfig)
    data: EditDataConfig
    mlflow: MlflowConfig = Field(default_factory=lambda: MlflowConfig(experiment="spatialreward"))
