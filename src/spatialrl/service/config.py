"""Typed configuration of `spatialrl serve` (YAML, `--set` overrides, errors name the key)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from spatialrl.config import PolicyModelConfig, RewardConfig, Section

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class ReplicaConfig(Section):
    """Replicas and resources of one Ray Serve deployment."""

    replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(0.25, gt=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    # Requests one replica works on at once; more wait in Serve's queue.
    max_ongoing_requests: int = Field(64, ge=1)
    # Requests waiting for a replica beyond which Serve answers 503 at once; -1: no bound.
    max_queued_requests: int = Field(256, ge=-1)
    custom_resources: dict[str, float] = Field(default_factory=dict)


class LimitsConfig(Section):
    """What one request may ask for; anything larger is refused with a 4xx naming the limit."""

    max_body_bytes: int = Field(16 * 2**20, ge=1024)
    max_items: int = Field(64, ge=1, description="(prompt, image) items per score request")
    max_image_pixels: int = Field(2048 * 2048, ge=1, description="width x height per image")
    # Qwen2.5-VL refuses images whose sides differ by 200x or more.
    max_aspect_ratio: float = Field(200.0, ge=1)
    max_prompt_chars: int = Field(2000, ge=1)
    max_best_of: int = Field(16, ge=1, description="largest N of a best-of-N request")
    # Memory: images are decoded one at a time and downscaled at once to what the reward reads,
    # but each request holds its pixels until it is scored; these bound that in one ingress.
    max_request_pixels: int = Field(
        64 * 512 * 512, ge=1, description="width x height summed over a request's images"
    )
    max_pixels_in_flight: int = Field(
        4 * 64 * 512 * 512, ge=1, description="pixels of the requests one ingress replica "
        "decodes or scores at once; a request beyond waits up to pixel_wait_s, then gets 429",
    )
    pixel_wait_s: float = Field(5.0, ge=0)
    # Slow clients: a request holds an ingress slot from its headers to its answer.
    body_timeout_s: float = Field(
        10.0, gt=0, description="seconds from the headers to the whole body; then 408"
    )
    max_requests_in_flight: int = Field(
        48, ge=1, description="requests one ingress replica works on; more get 503 at once "
        "(keep it below ingress.max_ongoing_requests, so that the refusals are answered)",
    )
    max_requests_per_client: int = Field(
        16, ge=1, description="requests in flight from one client address; more get 429 at "
        "once (behind a reverse proxy every client has its address: raise it there)",
    )

    @model_validator(mode="after")
    def _check(self) -> LimitsConfig:
        if self.max_pixels_in_flight < self.max_request_pixels:
            raise ValueError(
                f"max_pixels_in_flight: {self.max_pixels_in_flight} is below "
                f"max_request_pixels ({self.max_request_pixels}): a full request would never run"
            )
        return self


class FluxGeneratorConfig(Section):
    """Best-of-N candidates from a FLUX pipeline (+ an optional LoRA), the ODE sampler of
    FluxPipeline with one seed per candidate."""

    kind: Literal["flux"] = "flux"
    model: PolicyModelConfig = Field(default_factory=PolicyModelConfig)
    # A `spatialrl.flux.lora.save_lora` folder (diffusers' LoRA format, safetensors only).
    lora_path: str | None = None
    height: int = Field(512, ge=16)
    width: int = Field(512, ge=16)
    num_steps: int = Field(28, ge=1)
    guidance_scale: float = Field(3.5, ge=0)
    max_sequence_length: int = Field(512, ge=1)
    batch_size: int = Field(4, ge=1, description="candidates per pipeline call")
    serving: ReplicaConfig = Field(default_factory=lambda: ReplicaConfig(gpus_per_replica=1.0))


class ShapesGeneratorConfig(Section):
    """A stand-in policy for the shapes world: each candidate is a render of the prompt's
    scene in which every reversible relation is, independently, reversed with probability
    `relation_error_rate`. It shows best-of-N on CPU, where no model can draw the scenes."""

    kind: Literal["shapes"] = "shapes"
    size: int = Field(64, ge=32)
    relation_error_rate: float = Field(0.5, ge=0, le=1)
    serving: ReplicaConfig = Field(default_factory=ReplicaConfig)


GeneratorConfig = Annotated[
    FluxGeneratorConfig | ShapesGeneratorConfig, Field(discriminator="kind")
]


class HttpServiceConfig(Section):
    """What every HTTP service shares: address, token, limits and the ingress replicas."""

    # Loopback unless another address is asked for here or with `spatialrl serve --host`.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Seconds before Serve's proxy answers 408 for a request still running.
    request_timeout_s: float = Field(120.0, gt=0)
    # Name of an environment variable holding a bearer token; every /v1 request must carry
    # `Authorization: Bearer <token>`. None: no authentication.
    auth_token_env: str | None = None
    # Images may also be given as file:// URLs to files under this folder. None: base64 only.
    local_files_root: str | None = None
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    ingress: ReplicaConfig = Field(default_factory=ReplicaConfig)

    @model_validator(mode="after")
    def _check_slots(self) -> HttpServiceConfig:
        # Serve's proxy answers requests beyond the ingress's slots itself, in plain text.
        if self.limits.max_requests_in_flight >= self.ingress.max_ongoing_requests:
            raise ValueError(
                f"limits.max_requests_in_flight: {self.limits.max_requests_in_flight} must be "
                f"below ingress.max_ongoing_requests ({self.ingress.max_ongoing_requests}), so "
                "that the replica has slots left to refuse the excess"
            )
        return self


ServiceKind = Literal["spatialscore", "spatialreward"]


class ServiceKindOnly(BaseModel):
    """Reads only a serve config's `kind`, to pick the config class of the rest."""

    model_config = ConfigDict(extra="ignore")

    kind: ServiceKind = "spatialscore"


class ServiceConfig(HttpServiceConfig):
    """SpatialScore: score, compare and best-of-N."""

    kind: Literal["spatialscore"] = "spatialscore"
    reward: RewardConfig = Field(default_factory=RewardConfig)
    # None: the best-of-N endpoint answers 404.
    generator: GeneratorConfig | None = None


def resolve_local_paths(cfg: ServiceConfig) -> None:
    """Make the config's local folders absolute (replicas do not share the caller's working
    directory); hub ids stay as they are."""

    def absolute(location: str | None) -> str | None:
        return str(Path(location).resolve()) if location and Path(location).exists() else location

    cfg.local_files_root = absolute(cfg.local_files_root)
    cfg.reward.spatialscore_path = absolute(cfg.reward.spatialscore_path)
    if isinstance(cfg.generator, FluxGeneratorConfig):
        cfg.generator.model.pretrained = absolute(cfg.generator.model.pretrained)
        cfg.generator.lora_path = absolute(cfg.generator.lora_path)
