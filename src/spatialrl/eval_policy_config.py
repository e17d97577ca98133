"""Typed configuration of `spatialrl eval-policy` (`--config FILE`, flags override it): which
policy, which prompts, how images are sampled and how they are judged. configs/eval/ holds
the GPU-sized runs and the local shapes-world one."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from spatialrl.config import Dtype, MlflowConfig, PolicyModelConfig, SamplingConfig, Section


# Subclasses, not default_factory: a section given in part (`--model`, `--tracking-uri`) is
# built from its class, whose defaults must then be this command's.
class EvalModelConfig(PolicyModelConfig):
    dtype: Dtype = "float32"  # CPU runs; GPU configs choose bfloat16
    gradient_checkpointing: bool = False  # sampling takes no gradients


class EvalMlflowConfig(MlflowConfig):
    experiment: str = "spatialrl-eval"


class BenchmarkConfig(Section):
    # Whose held-out prompts, or whose prompts `prompt_file` holds (GenEval's are real).
    world: Literal["shapes", "real"] = "shapes"
    # A parquet prompt file of `world`, or GenEval's evaluation_metadata.jsonl; None: drawn.
    prompt_file: str | None = None
    prompts: int = Field(300, ge=1, description="held-out prompts, or the file's first ones")
    prompt_seed: int = 0


class EvalSamplingConfig(Section):
    """Deterministic ODE samples: one fixed seed per prompt, the same for base and LoRA."""

    size: int = Field(64, ge=16, description="image side in pixels")
    num_steps: int = Field(16, ge=1)
    guidance_scale: float = Field(3.5, ge=0)
    max_sequence_length: int = Field(40, ge=1)
    batch_size: int = Field(50, ge=1, description="images per transformer (and scoring) batch")
    seed: int = 0

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            height=self.size, width=self.size, num_steps=self.num_steps,
            eval_num_steps=self.num_steps, batch_size=self.batch_size,
            guidance_scale=self.guidance_scale, max_sequence_length=self.max_sequence_length,
        )


class JudgeConfig(Section):
    # Judges real objects (shapes are read by the rule evaluator): an OWLv2 id or folder.
    detector: str = "google/owlv2-base-patch16-ensemble"  # detection.DEFAULT_DETECTOR
    detector_threshold: float = Field(0.2, ge=0, le=1)
    # A SpatialScore checkpoint whose mean mu and sigma join the figures; None: not scored.
    spatialscore: str | None = None
    grid_prompts: int = Field(32, ge=1, description="prompts shown in the MLflow image grid")


class EvalPolicyConfig(Section):
    model: EvalModelConfig = Field(default_factory=EvalModelConfig)
    # A LoRA folder (pytorch_lora_weights.safetensors) judged beside the base model.
    lora: str | None = None
    device: str = "cpu"
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    sampling: EvalSamplingConfig = Field(default_factory=EvalSamplingConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    out: str | None = Field(None, description="also write the report here (JSON)")
    mlflow: EvalMlflowConfig = Field(default_factory=EvalMlflowConfig)
