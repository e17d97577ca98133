"""Typed configuration of the SpatialReward service (`spatialrl serve` with `kind:
spatialreward`). Apart from service.config because the judge's config comes with torch, which
the HTTP client must not need."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from spatialrl.model_checksum import files_checksum
from spatialrl.service.config import HttpServiceConfig, ReplicaConfig
from spatialrl.spatialreward.engines import EngineKind
from spatialrl.spatialreward.model import SpatialRewardConfig


class SpatialRewardServingConfig(ReplicaConfig):
    """The judge's replicas: the engine, batching of generation, the prefix cache, routing."""

    engine: EngineKind = "transformers"
    max_batch_size: int = Field(8, ge=1, description="items per generate call")
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    prefix_cache_size: int = Field(
        64, ge=1, description="affinity keys whose source prefix one replica keeps (LRU)"
    )
    # Replicas tried, in hash-ring order, after a key's own replica when that one is full
    # (max_ongoing_requests): 0 keeps strict affinity, and a request waits for its replica.
    fallback_replicas: int = Field(0, ge=0)


class SpatialRewardServiceConfig(HttpServiceConfig):
    """SpatialReward: POST /v1/edit-reward judges (source, edited, instruction) items."""

    kind: Literal["spatialreward"] = "spatialreward"
    model: SpatialRewardConfig = Field(default_factory=SpatialRewardConfig)
    serving: SpatialRewardServingConfig = Field(
        default_factory=lambda: SpatialRewardServingConfig(gpus_per_replica=1.0)
    )


def resolve_model_path(cfg: SpatialRewardServiceConfig) -> None:
    """Make a local model folder absolute (replicas do not share the caller's working
    directory); a hub id stays as it is."""
    if Path(cfg.model.model).exists():
        cfg.model = cfg.model.model_copy(update={"model": str(Path(cfg.model.model).resolve())})


def model_version(cfg: SpatialRewardServiceConfig) -> str:
    """What the answers mean: engine and model, with a checksum of a local folder's weights
    (a retrained model at the same path is a new version) or a hub id's revision."""
    folder = Path(cfg.model.model)
    if folder.is_dir():
        weights = sorted(folder.glob("*.safetensors"))
        return f"spatialreward:{cfg.serving.engine}@{files_checksum(weights)}"
    revision = cfg.model.revision or "main"
    return f"spatialreward:{cfg.serving.engine}:{cfg.model.model}@{revision}"
