"""Throughput model: how many rollout and reward workers keep the learner busy.

Work per iteration (from the run config):
    images  = prompts_per_iteration * group_size                    sampled, then scored
    samples = prompts_per_iteration * kept * updates_per_iteration  trained
    kept    = 2 * top_k per group (group_size without filtering)

With s_role the seconds one worker (one rollout actor, reward replica or learner rank)
spends per item, and N_role workers sharing the work evenly:
    T_rollout = images  * s_rollout / N_rollout
    T_reward  = images  * s_reward  / N_reward       (reward replicas at autoscaling max)
    T_learner = samples * s_learner / N_learner      (data parallel; all-reduce time ignored)
The asynchronous loop (max_staleness >= 1) overlaps the stages, so an iteration takes
max(T_rollout, T_reward, T_learner) and the largest is the bottleneck. The synchronous loop
(max_staleness = 0) runs them one after another: the sum. The learner stays busy with
    N_rollout >= images * s_rollout / T_learner,   N_reward >= images * s_reward / T_learner.

Seconds per item come from measured figures when given (a JSON file, see load_measured),
else from FLOPs:  s = FLOPs / (gpus_per_worker * peak dense bf16 FLOP/s * MFU).

FLUX transformer, one forward pass over T = T_image + T_text tokens:
    F = 2 * P_token * T + 4 * L * d * T^2
    T_image = (H / 16) * (W / 16)   (8x VAE downsampling, 2x2 patches); T_text = max_sequence_length
    P_token = L * 12 d^2: the weights each token multiplies by in each of the L = 19 + 38
        blocks (q, k, v, out: 4 d^2; the 4x MLP: 8 d^2). The 19 double-stream blocks hold
        separate image and text weights, so a token meets half of their parameters, and the
        adaLN modulation runs once per sample, not per token. With d = 3072 that is 6.46e9
        of FLUX.1-dev's 11.9e9 parameters; 2 * 11.9e9 * T would over-count by 1.7x.
    4 L d T^2: attention scores and their weighted sum.
    At 512 px (1024 + 512 tokens): 21.5 TFLOP, equal to torch's FlopCounterMode count on the
    FLUX.1-dev transformer (tests/test_throughput_model.py).
Rollout, per image: num_steps * F (FLUX.1-dev is guidance-distilled: one pass per step)
    + the VAE decoder (9.6 MFLOP per output pixel, 2.5 TFLOP at 512 px, counted the same way)
    + the T5-XXL prompt encoding, shared by the group: (2 * 4.63e9 * T_text + 4 * 24 * 4096 *
    T_text^2) / group_size.
Learner, per trained sample: ceil(timestep_fraction * SDE steps) trained steps, each costing
    F * (1 forward + backward + recompute + reference):
    backward = 1 forward with LoRA (gradients flow to activations only; frozen weights need
    none), 2 for full fine-tuning; recompute = 1 with gradient checkpointing; reference = 1
    when kl_beta > 0 (the LoRA-disabled forward for the KL term).
Reward (Qwen2.5-VL-7B), per image resized to a multiple of 28 px:
    ViT: 2 * 32 * (4 * 1280^2 + 3 * 1280 * 3420) FLOP per 14 px patch (its windowed
    attention is left out: < 1%); merger: 2 * (5120^2 + 5120 * 3584) per 2x2 patches;
    LLM: 2 * 28 * (2 * 3584^2 + 2 * 3584 * 512 + 3 * 3584 * 18944) * T + 4 * 28 * 3584 * T^2
    over T = image tokens + 128 text tokens (chat template, instruction, prompt: an estimate).
Evaluation sampling (every eval_every iterations) is not counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from spatialrl.config import ConfigError, Section, TrainConfig, validate_config

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s per GPU.
GPU_PEAK_BF16 = {
    "a100": 312e12,  # p4d/p4de
    "h100": 989e12,  # SXM, p5
    "h200": 989e12,  # p5e/p5en
    "l40s": 362e12,  # g6e
    "l4": 121e12,  # g6
}
ROLES = ("rollout", "reward", "learner")

# FLUX.1-dev: 19 double-stream + 38 single-stream blocks of width 3072.
FLUX_BLOCKS = 19 + 38
FLUX_WIDTH = 3072
FLUX_VAE_DECODE_FLOPS_PER_PIXEL = 9.6e6
# T5-XXL encoder: 24 layers, d_model 4096, gated FFN of 10240.
T5_LAYERS, T5_WIDTH, T5_FFN = 24, 4096, 10240
# Qwen2.5-VL-7B.
QWEN_VIT_FLOPS_PER_PATCH = 2 * 32 * (4 * 1280**2 + 3 * 1280 * 3420)
QWEN_MERGER_FLOPS_PER_TOKEN = 2 * (5120**2 + 5120 * 3584)
QWEN_LLM_LAYERS, QWEN_LLM_WIDTH = 28, 3584
QWEN_LLM_TOKEN_PARAMS = QWEN_LLM_LAYERS * (2 * 3584**2 + 2 * 3584 * 512 + 3 * 3584 * 18944)
QWEN_TEXT_TOKENS = 128


def flux_forward_flops(height: int, width: int, text_tokens: int) -> float:
    tokens = (height // 16) * (width // 16) + text_tokens
    token_params = FLUX_BLOCKS * 12 * FLUX_WIDTH**2
    return 2 * token_params * tokens + 4 * FLUX_BLOCKS * FLUX_WIDTH * tokens**2


def t5_encoder_flops(tokens: int) -> float:
    token_params = T5_LAYERS * (4 * T5_WIDTH**2 + 3 * T5_WIDTH * T5_FFN)
    return 2 * token_params * tokens + 4 * T5_LAYERS * T5_WIDTH * tokens**2


def sde_steps(cfg: TrainConfig) -> int:
    if cfg.sampling.noise_level == 0:
        return 0
    start, end = cfg.sampling.sde_window or (0, cfg.sampling.num_steps)
    return end - start


def rollout_flops_per_image(cfg: TrainConfig) -> float:
    s = cfg.sampling
    return (
        s.num_steps * flux_forward_flops(s.height, s.width, s.max_sequence_length)
        + FLUX_VAE_DECODE_FLOPS_PER_PIXEL * s.height * s.width
        + t5_encoder_flops(s.max_sequence_length) / cfg.grpo.group_size
    )


def learner_flops_per_sample(cfg: TrainConfig) -> float:
    from spatialrl.grpo.loss import num_train_steps  # imports torch: not at --help

    s = cfg.sampling
    if sde_steps(cfg) == 0:
        raise ConfigError("sampling.noise_level: 0 leaves no SDE steps to train")
    passes = (
        1
        + (1 if cfg.lora.enabled else 2)
        + (1 if cfg.model.gradient_checkpointing else 0)
        + (1 if cfg.grpo.kl_beta > 0 else 0)
    )
    steps = num_train_steps(sde_steps(cfg), cfg.grpo.timestep_fraction)
    return steps * passes * flux_forward_flops(s.height, s.width, s.max_sequence_length)


def reward_flops_per_image(height: int, width: int) -> float:
    image_tokens = max(1, round(height / 28)) * max(1, round(width / 28))
    tokens = image_tokens + QWEN_TEXT_TOKENS
    return (
        QWEN_VIT_FLOPS_PER_PATCH * 4 * image_tokens
        + QWEN_MERGER_FLOPS_PER_TOKEN * image_tokens
        + 2 * QWEN_LLM_TOKEN_PARAMS * tokens
        + 4 * QWEN_LLM_LAYERS * QWEN_LLM_WIDTH * tokens**2
    )


@dataclass(frozen=True)
class Workload:
    images: int  # sampled and scored per iteration
    samples: int  # trained per iteration

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Workload:
        kept = 2 * cfg.grpo.top_k if cfg.grpo.top_k else cfg.grpo.group_size
        prompts = cfg.prompts.prompts_per_iteration
        return cls(prompts * cfg.grpo.group_size,
                   prompts * kept * cfg.optim.updates_per_iteration)


def workers_from_config(cfg: TrainConfig) -> dict[str, int]:
    serving = cfg.reward.serving
    reward = serving.autoscaling.max_replicas if serving.autoscaling else serving.replicas
    return {"rollout": cfg.rollout.num_actors, "reward": reward,
            "learner": cfg.learner.num_workers}


def gpus_per_worker(cfg: TrainConfig) -> dict[str, float]:
    return {"rollout": cfg.rollout.gpus_per_actor,
            "reward": cfg.reward.serving.gpus_per_replica,
            "learner": cfg.learner.gpus_per_worker}


class StageSeconds(Section):
    """Seconds one worker spends per item; any of them may be left out of a measured file."""

    rollout: float | None = Field(None, gt=0, description="per sampled image")
    reward: float | None = Field(None, gt=0, description="per scored image")
    learner: float | None = Field(None, gt=0, description="per trained sample")


def load_measured(path: str | Path) -> StageSeconds:
    """The `stage_seconds` mapping of a JSON file (as bench/stage_seconds.py writes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"measured figures file not found: {path}")
    try:
        tree = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"measured figures file {path}: not JSON ({err})") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("stage_seconds"), dict):
        raise ConfigError(f"measured figures file {path}: needs a 'stage_seconds' mapping")
    return validate_config(StageSeconds, tree["stage_seconds"], str(path))


@dataclass(frozen=True)
class Estimate:
    seconds: float
    source: str  # "measured" or how the FLOP estimate was made


def stage_seconds(
    cfg: TrainConfig, gpus: dict[str, str], mfu: float, measured: StageSeconds | None = None
) -> dict[str, Estimate]:
    """Seconds per item and role: measured where given, else FLOPs on the role's GPU type."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu: must be in (0, 1], got {mfu}")
    flops = {
        "rollout": lambda: rollout_flops_per_image(cfg),
        "reward": lambda: reward_flops_per_image(cfg.sampling.height, cfg.sampling.width),
        "learner": lambda: learner_flops_per_sample(cfg),
    }
    per_worker = gpus_per_worker(cfg)
    estimates = {}
    for role in ROLES:
        given = getattr(measured, role) if measured else None
        if given is not None:
            estimates[role] = Estimate(given, "measured")
            continue
        if gpus[role] not in GPU_PEAK_BF16:
            raise ConfigError(f"{role} GPU: unknown type {gpus[role]!r}; known: "
                              f"{', '.join(GPU_PEAK_BF16)}")
        if per_worker[role] <= 0:
            raise ConfigError(f"{role}: no GPUs per worker in the config, so the FLOP "
                              "estimate does not apply; give measured seconds for it")
        rate = per_worker[role] * GPU_PEAK_BF16[gpus[role]] * mfu
        estimates[role] = Estimate(
            flops[role]() / rate,
            f"{flops[role]() / 1e12:.1f} TFLOP on {per_worker[role]:g} x {gpus[role]} "
            f"at {mfu:.0%} MFU",
        )
    return estimates


@dataclass(frozen=True)
class CapacityPlan:
    stage_seconds: dict[str, float]  # per iteration, per role
    iteration_seconds: float
    bottleneck: str
    learner_busy: float  # fraction of the iteration the learner computes
    workers_for_busy_learner: dict[str, int]  # rollout and reward workers
    images_per_second: float


def plan_capacity(
    seconds: dict[str, float],
    workload: Workload,
    workers: dict[str, int],
    mode: Literal["async", "sync"] = "async",
) -> CapacityPlan:
    """Stage times per iteration, the bottleneck, and the workers that keep the learner busy.
    `seconds` maps each role to seconds per item for one worker."""
    work = {"rollout": workload.images * seconds["rollout"],
            "reward": workload.images * seconds["reward"],
            "learner": workload.samples * seconds["learner"]}
    per_iteration = {role: work[role] / workers[role] for role in ROLES}
    iteration = (max if mode == "async" else sum)(per_iteration.values())
    learner = per_iteration["learner"]
    return CapacityPlan(
        stage_seconds=per_iteration,
        iteration_seconds=iteration,
        bottleneck=max(ROLES, key=per_iteration.__getitem__),
        learner_busy=learner / iteration,
        # 1e-9 keeps an exact balance from rounding up to one worker too many.
        workers_for_busy_learner={
            role: max(1, math.ceil(work[role] / learner - 1e-9)) for role in ("rollout", "reward")
        },
        images_per_second=workload.images / iteration,
    )
