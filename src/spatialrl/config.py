"""Typed run configuration, loaded from YAML with `--set a.b=c` overrides.

Every section forbids unknown keys, so a typo is an error that names the key instead of a
setting that silently does nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class Section(BaseModel):
    # Strict: `true` is not an int nor "1" a number; floats must be finite (no .inf, .nan).
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False
    )


Item = TypeVar("Item")
# A fixed-length tuple that YAML, JSON and model_dump(mode="json") write as a list; its
# items stay strict.
Pair = Annotated[
    tuple[Item, Item], BeforeValidator(lambda value: tuple(value) if isinstance(value, list)
                                       else value)
]


Dtype = Literal["float32", "bfloat16", "float16"]


class PolicyModelConfig(Section):
    """The FLUX pipeline the policy starts from (hub id or local from_pretrained folder)."""

    pretrained: str = "black-forest-labs/FLUX.1-dev"
    revision: str | None = None
    # Rollout forward passes run in this dtype; log-probs are always computed in fp32.
    dtype: Dtype = "bfloat16"
    attention_backend: Literal["native", "xformers", "flash"] = "native"
    gradient_checkpointing: bool = True


class LoraConfig(Section):
    enabled: bool = True
    rank: int = Field(32, ge=1)
    alpha: float = Field(64.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # FLUX attention and feed-forward projections, as in Flow-GRPO's FLUX setup.
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        ]
    )


class SamplingConfig(Section):
    height: int = Field(512, ge=16)
    width: int = Field(512, ge=16)
    num_steps: int = Field(16, ge=1)
    eval_num_steps: int = Field(28, ge=1)
    # Images per transformer batch when sampling; groups are split across batches.
    batch_size: int = Field(8, ge=1)
    guidance_scale: float = Field(3.5, ge=0)
    max_sequence_length: int = Field(512, ge=1)
    # 0 makes every step the plain ODE (Euler) step of FluxPipeline.
    noise_level: float = Field(0.7, ge=0)
    sde_type: Literal["flow_grpo", "cps"] = "flow_grpo"
    # Steps [start, end) use the SDE (and are trainable); the rest use the ODE. None = all.
    sde_window: Pair[int] | None = None
    # Edits: resize the source image to the preferred FLUX.1-Kontext resolution, as
    # FluxKontextPipeline does by default; false keeps its own size (small shapes models).
    kontext_resolution: bool = True
    # independent: every sample of a group starts from its own noise (Flow-GRPO). shared: the
    # G samples of a prompt start from one initial noise and differ only by the SDE steps'
    # noise (DanceGRPO), so that the reward differences within a group come from the steps
    # the policy gradient credits, not from a start it cannot change.
    group_initial_noise: Literal["independent", "shared"] = "independent"

    @model_validator(mode="after")
    def _check(self) -> SamplingConfig:
        if self.sde_type == "cps" and self.noise_level > 1:
            raise ValueError("noise_level: the CPS SDE needs noise_level in [0, 1]")
        if self.sde_window is not None:
            start, end = self.sde_window
            if not 0 <= start < end <= self.num_steps:
                raise ValueError(
                    f"sde_window: {self.sde_window} must satisfy 0 <= start < end <= "
                    f"num_steps ({self.num_steps})"
                )
        return self


class GRPOConfig(Section):
    group_size: int = Field(24, description="G: images sampled per prompt")
    # k best and k worst per group are kept; None keeps the whole group (plain GRPO).
    top_k: int | None = 6
    filter_order: Literal["select_then_normalize", "normalize_then_select"] = (
        "select_then_normalize"
    )
    std_scope: Literal["group", "global"] = "group"
    # What a sample's reward is within its group: the reward model's mu, or its probability
    # of beating the group's other samples given mu and sigma (spatialrl.grpo.advantages).
    group_reward: Literal["mu", "win_probability"] = "mu"
    adv_eps: float = Field(1e-4, gt=0)
    adv_clip: float | None = Field(5.0, gt=0)
    clip_range: float = Field(1e-4, gt=0)
    kl_beta: float = Field(0.004, ge=0)
    # Fraction of the SDE steps trained per trajectory (Flow-GRPO's timestep_fraction).
    timestep_fraction: float = Field(1.0, gt=0, le=1)
    # pi_old is always the rollout's stored fp32 log-probs. This also recomputes them with the
    # learner's weights before each update and logs the largest difference (a check: ~0 for
    # fresh data); it costs one forward per SDE step.
    check_old_log_probs: bool = False

    @model_validator(mode="after")
    def _check(self) -> GRPOConfig:
        if self.group_size < 2:
            raise ValueError(f"group_size: must be >= 2 to form advantages, got {self.group_size}")
        if self.top_k is not None and not 1 <= self.top_k <= self.group_size // 2:
            raise ValueError(
                f"top_k: must be in [1, group_size/2] = [1, {self.group_size // 2}], "
                f"got {self.top_k}"
            )
        return self


class OptimConfig(Section):
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: Pair[float] = (0.9, 0.999)
    max_grad_norm: float = Field(1.0, gt=0)
    updates_per_iteration: int = Field(1, ge=1, description="passes over each iteration's batch")
    micro_batch_size: int = Field(4, ge=1, description="trajectories per forward/backward")


class PromptsConfig(Section):
    # text_to_image: prompts. edit: (instruction, source image) records, each group G edits
    # of one source (spatialrl.prompts).
    task: Literal["text_to_image", "edit"] = "text_to_image"
    # "shapes" samples the shapes world (prompts, or edits); otherwise a parquet file with a
    # `prompt` column (text_to_image) or `instruction` and `image_source` columns (edit).
    source: str = "shapes"
    eval_source: str = "shapes"
    prompts_per_iteration: int = Field(4, ge=1)
    num_eval_prompts: int = Field(16, ge=1)


class AutoscalingConfig(Section):
    """Ray Serve replica autoscaling for the reward deployment."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas: {self.min_replicas} is above max_replicas ({self.max_replicas})"
            )
        return self


class RewardServingConfig(Section):
    """How reward replicas run on the cluster: dynamic batching, replicas, placement."""

    replicas: int = Field(1, ge=1, description="fixed replica count when autoscaling is unset")
    autoscaling: AutoscalingConfig | None = None
    max_batch_size: int = Field(32, ge=1, description="images per batched reward call")
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    # Requests (groups) one replica holds at once; more wait at the caller's handle.
    max_ongoing_requests: int = Field(32, ge=1)
    gpus_per_replica: float = Field(1.0, ge=0, description="0 on CPU machines")
    cpus_per_replica: float = Field(1.0, gt=0)
    # Ray custom resources each replica asks for, e.g. {reward_node: 0.01}, so that it lands
    # on the node type that offers them (see cluster/).
    custom_resources: dict[str, float] = Field(default_factory=dict)


RewardKind = Literal["brightness_left", "shapes_rule", "shapes_soft", "spatialscore",
                     "spatialreward"]


class RewardConfig(Section):
    # One reward, or "weighted": the sum of `weights` ({kind: weight}; see
    # spatialrl.reward_functions).
    kind: Literal[RewardKind, "weighted"] = "spatialscore"
    spatialscore_path: str | None = None
    # SpatialReward (an edit reward: source, edited image, instruction): a Qwen3-VL folder or
    # hub id. Answers that do not parse give NaN, and the group is dropped (counted).
    spatialreward_path: str | None = None
    # More SpatialRewardConfig fields (spatialrl.spatialreward.model), e.g. {dtype: float32,
    # constrained: true}.
    spatialreward_options: dict[str, Any] = Field(default_factory=dict)
    weights: dict[RewardKind, float] = Field(default_factory=dict)
    serving: RewardServingConfig = Field(default_factory=RewardServingConfig)

    def check_ready(self) -> None:
        """ConfigError for what a reward needs only once it is built (so that the defaults stay
        a valid config): a checkpoint for SpatialScore, an entry for a weighted sum. Call it
        before starting anything."""
        parts = self.weights if self.kind == "weighted" else [self.kind]
        if not parts:
            raise ConfigError("reward.weights: a weighted reward needs at least one entry")
        if "spatialscore" in parts and not self.spatialscore_path:
            raise ConfigError(
                "reward.spatialscore_path: the spatialscore reward needs a checkpoint (--model "
                "CKPT, or --set reward.spatialscore_path=PATH)"
            )
        if "spatialreward" in parts:
            self.spatialreward_config()

    def spatialreward_config(self):
        """The SpatialRewardConfig the spatialreward reward loads; ConfigError if it has no
        model or the options are not its fields."""
        from spatialrl.spatialreward.model import SpatialRewardConfig

        if not self.spatialreward_path:
            raise ConfigError("reward.spatialreward_path: the spatialreward reward needs a "
                              "model (--set reward.spatialreward_path=PATH)")
        try:
            return SpatialRewardConfig(model=self.spatialreward_path,
                                       **self.spatialreward_options)
        except ValidationError as err:
            raise ConfigError(validation_problems(err, "reward.spatialreward_options.")) from None


class MlflowConfig(Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "spatialrl"
    run_name: str | None = None


class LearnerConfig(Section):
    """The Ray trainer's DeepSpeed learner group: one worker per rank."""

    num_workers: int = Field(1, ge=1)
    zero_stage: Literal[1, 2, 3] = 2  # 0 is not offered: it reports no global grad norm
    gpus_per_worker: float = Field(1.0, ge=0, description="0 on CPU machines")
    cpus_per_worker: float = Field(1.0, gt=0)
    custom_resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources per worker, e.g. {learner_node: 1}"
    )


class RolloutConfig(Section):
    """The Ray trainer's rollout actors and the asynchronous loop around them."""

    num_actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(1.0, ge=0, description="0 on CPU machines")
    cpus_per_actor: float = Field(1.0, gt=0)
    custom_resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources per actor, e.g. {rollout_node: 1}"
    )
    # Staleness of a sample = learner version at train time - version that sampled it.
    # Older samples are dropped and counted; 0 is the synchronous on-policy loop.
    max_staleness: int = Field(1, ge=0)


class ClusterConfig(Section):
    """Where the Ray trainer runs."""

    # None: the cluster `ray job submit` (RAY_ADDRESS) points at, else a fresh local instance.
    address: str | None = None
    # False: a config needing more than the cluster has fails at once, naming what is short.
    # True: wait for an autoscaler to add nodes, up to placement_timeout_s.
    wait_for_autoscaler: bool = False
    placement_timeout_s: float = Field(900.0, gt=0)
    # Restarts allowed per rollout actor before the run fails.
    max_actor_restarts: int = Field(3, ge=0)
    # Times the learner group may be rebuilt from the last checkpoint after losing a rank.
    max_learner_restarts: int = Field(3, ge=0)
    # Longest wait in the full-weight broadcast group (full fine-tuning) before it errors.
    weight_sync_timeout_s: float = Field(600.0, gt=0)


class TrainConfig(Section):
    seed: int = 0
    iterations: int = Field(100, ge=1)
    eval_every: int = Field(10, ge=0, description="iterations between evaluations; 0 = never")
    checkpoint_every: int = Field(50, ge=0, description="0 = only at the end")
    output_dir: str = "runs/default"
    device: str = "auto"
    model: PolicyModelConfig = Field(default_factory=PolicyModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _check_task(self) -> TrainConfig:
        reward = self.reward
        kinds = reward.weights if reward.kind == "weighted" else [reward.kind]
        if "spatialreward" in kinds and self.prompts.task != "edit":
            raise ValueError("reward.kind: spatialreward judges edits; it needs prompts.task: "
                             "edit")
        return self


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. grpo.top_k=4")
    set_value(tree, key.strip(), _yaml(raw, f"--set {assignment}"), f"--set {key}")


def set_value(tree: dict[str, Any], key: str, value: Any, origin: str) -> None:
    """Set a dotted key in a config tree in place, making the sections on its way."""
    *parents, leaf = key.split(".")
    node = tree
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {name!r} is a value, not a section")
        node = child
    node[leaf] = value


class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.2 numbers: PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string, which
    a strict config would then refuse as a learning rate."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str, origin: str) -> Any:
    """Parsed YAML; a syntax error names `origin` (a file or a --set) and where in it."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or err
        raise ConfigError(f"{origin}: not valid YAML{where}: {problem}") from None


def validate_config(model: type[Section], tree: dict[str, Any], origin: str) -> Section:
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"invalid config {origin}: {validation_problems(err)}") from None


def validation_problems(err: ValidationError, prefix: str = "") -> str:
    """Each problem as `dotted.key: message`, joined by "; "."""
    return "; ".join(f"{prefix}{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                     for e in err.errors())


def load_config(
    path: str | Path | None, overrides: list[str] = (), model: type[Section] = TrainConfig,
    values: dict[str, Any] | None = None,
) -> Section:
    """Load `model` from a YAML file (or defaults when path is None) plus overrides, then
    `values` ({dotted key: value}, a command's own flags), which win over both."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = _yaml(path.read_text(), f"config file {path}")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        tree = loaded or {}
    for assignment in overrides:
        apply_override(tree, assignment)
    for key, value in (values or {}).items():
        set_value(tree, key, value, key)
    return validate_config(model, tree, str(path) if path else "<defaults>")


def flatten(config: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value, for logging the whole config as MLflow params."""
    flat: dict[str, Any] = {}
    for name, value in config:
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            flat.update(flatten(value, f"{key}."))
        else:
            flat[key] = value
    return flat


@dataclass(frozen=True)
class FlowMatchingTraining:
    """The transformer stage of a shapes-world base model: rectified-flow training of the
    transformer and both text encoders (spatialrl.flux.pretraining.train_transformer)."""

    seed: int = 0
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    lr_decay_steps: int = 1500
    ema_decay: float = 0.999
    # FluxPipeline pads every prompt to this many T5 tokens; 40 holds the longest
    # shapes-world prompt (35), so none is cut.
    max_sequence_length: int = 40
    # Guidance values drawn for the guidance embedding. Rectified-flow training ignores them
    # (any guidance_scale in the range samples alike); guidance distillation gives them
    # meaning: the classifier-free guidance scale the student reproduces.
    guidance_range: tuple[float, float] = (1.0, 5.0)
    # The fraction of prompts trained as the empty prompt (0: none, and no random draw).
    caption_dropout: float = 0.0
    checkpoint_every: int = 250
    log_every: int = 50
    # The saved pipeline's dtype; loaders cast to theirs. float16 halves the shipped size.
    save_dtype: Literal["float32", "float16", "bfloat16"] = "float16"


@dataclass(frozen=True)
class GeneratorPretraining(FlowMatchingTraining):
    """Settings of `spatialrl pretrain generator` (the shipped model card lists them)."""

    image_size: int = 64
    # The text encoders' (CLIP and T5) width and depth; the transformer's text projections
    # follow the width. The rest of the model is spatialrl.tiny.flux.SHAPES_GENERATOR.
    text_hidden_size: int = 64
    text_layers: int = 2
    num_renders: int = 50_000
    vae_steps: int = 1000
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6


@dataclass(frozen=True)
class GuidanceDistillation(FlowMatchingTraining):
    """Settings of `spatialrl pretrain guidance`: the base generator fine-tuned with caption
    dropout for `teacher_steps` (the classifier-free-guidance teacher), then `steps` of
    guidance distillation into FLUX's guidance embedding (spatialrl.flux.pretraining)."""

    image_size: int = 64
    num_renders: int = 50_000  # the generator's renders (same seed: the same scenes)
    caption_dropout: float = 0.1
    teacher_steps: int = 1500
    steps: int = 1500
    lr: float = 3e-4
    warmup_steps: int = 100
    lr_decay_steps: int = 500


@dataclass(frozen=True)
class EditorPretraining(FlowMatchingTraining):
    """Settings of `spatialrl pretrain editor`: the base generator fine-tuned on train-split
    edit triples (source, instruction, correct target) with Kontext conditioning."""

    num_examples: int = 8000
    steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 100
    lr_decay_steps: int = 1000
    # The longest instruction (three edits) is 52 T5 tokens with the generator's tokenizer.
    max_sequence_length: int = 64
