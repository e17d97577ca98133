"""Configuration of the SpatialScore reward model (backbone, LoRA, head, loss, image budget)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from spatialrl.config import Section

PROMPT_FIELD = "{prompt}"

DEFAULT_INSTRUCTION = (
    "You are given an image generated from a text prompt. Judge how accurately the image "
    "depicts the spatial relations described in the prompt: which object is left or right of, "
    "above or below, in front of or behind which. Ignore style and image quality.\n"
    "Prompt: {prompt}"
)


class RewardLoraConfig(Section):
    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # Projection names inside the language model's decoder layers; the vision tower has
    # projections with the same names (mlp.gate_proj, ...), which these never touch.
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
        ],
        min_length=1,
    )


class SpatialScoreConfig(Section):
    # Hub id or local from_pretrained folder of a Qwen2.5-VL model and its processor files.
    base_model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    revision: str | None = None
    # Backbone compute dtype; the head, the reward-token embedding and the loss stay in fp32.
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # The user turn's text after the image; "{prompt}" is replaced by the generation prompt.
    instruction: str = DEFAULT_INSTRUCTION
    lora: RewardLoraConfig = Field(default_factory=RewardLoraConfig)
    # Fine-tune the whole vision tower (saved with the adapter) instead of freezing it.
    train_vision_tower: bool = False
    # lora: the adapter (and the vision tower if trained), head and reward token train.
    # full: every backbone weight trains too, the embedding matrix included, and checkpoints
    # carry the whole backbone. A tiny random backbone needs it to learn relations at all
    # (bench/README.md, the SpatialScore curriculum); the LoRA adapter stays on beside it.
    finetune: Literal["lora", "full"] = "lora"
    gradient_checkpointing: bool = False
    head_hidden_size: int = Field(1024, ge=1)
    # M in the Gaussian Bradley-Terry loss; 0 = plain Bradley-Terry on mu.
    mc_samples: int = Field(1000, ge=0)
    # Pixel budget per image; None keeps the base processor's own (Qwen2.5-VL-7B: 3136 and
    # 12845056). Images are resized to a multiple of 28 px within [min_pixels, max_pixels].
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> SpatialScoreConfig:
        if PROMPT_FIELD not in self.instruction:
            raise ValueError(f"instruction: must contain {PROMPT_FIELD} where the prompt goes")
        if self.finetune == "full" and self.train_vision_tower:
            raise ValueError("train_vision_tower: finetune full already trains the vision tower")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(
                f"min_pixels: {self.min_pixels} is larger than max_pixels ({self.max_pixels})"
            )
        return self
