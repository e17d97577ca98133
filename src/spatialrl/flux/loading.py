"""Load the FLUX pipeline the policy starts from: one code path for the hub and local folders."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from spatialrl.config import PolicyModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> str:
    """A config's device: "auto" is cuda where there is one, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_flux_pipeline(cfg: PolicyModelConfig, device: str | torch.device = "cpu") -> FluxPipeline:
    """`FluxPipeline.from_pretrained(cfg.pretrained)` in cfg.dtype on `device`.

    The VAE and both text encoders are frozen; the transformer keeps its parameters trainable
    (full fine-tuning) until LoRA is added, which freezes its base weights.
    """
    source = _resolve_source(cfg.pretrained)
    try:
        pipeline = FluxPipeline.from_pretrained(
            source, revision=cfg.revision, dtype=DTYPES[cfg.dtype],
            use_safetensors=True,  # never a pickled checkpoint
        )
    except OSError as err:
        if isinstance(source, Path):
            raise
        raise FileNotFoundError(
            f"model.pretrained={source!r} is neither a local folder nor a hub model that "
            f"can be loaded here: {err}"
        ) from err
    pipeline.to(device)
    for frozen in (pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2):
        frozen.requires_grad_(False)
        frozen.eval()
    pipeline.transformer.eval()
    if cfg.gradient_checkpointing:
        pipeline.transformer.enable_gradient_checkpointing()  # only acts when grad is enabled
    set_attention_backend(pipeline, cfg.attention_backend)
    return pipeline


def load_flux_transformer(
    cfg: PolicyModelConfig, device: str | torch.device = "cpu"
) -> FluxTransformer2DModel:
    """Only the pipeline's transformer, as load_flux_pipeline sets it up: what a learner needs
    to re-evaluate recorded trajectories, without text encoders or VAE."""
    transformer = FluxTransformer2DModel.from_pretrained(
        _resolve_source(cfg.pretrained), subfolder="transformer", revision=cfg.revision,
        dtype=DTYPES[cfg.dtype], use_safetensors=True,
    ).to(device)
    transformer.eval()
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    set_attention_backend(transformer, cfg.attention_backend)
    return transformer


def set_attention_backend(model: FluxPipeline | FluxTransformer2DModel, backend: str) -> None:
    """Select the transformer's attention kernel through diffusers' attention dispatcher:
    "native" is torch SDPA, "xformers" and "flash" need their packages (GPU only)."""
    try:
        getattr(model, "transformer", model).set_attention_backend(backend)
    except RuntimeError as err:  # diffusers' check that the backend's package is importable
        raise ImportError(
            f"model.attention_backend={backend!r} cannot be used here: {err} "
            "(xformers comes with `pip install spatialrl[gpu]`; 'native' works everywhere)"
        ) from err


def _resolve_source(pretrained: str) -> Path | str:
    """A local folder as a Path; otherwise the string, which must look like a hub id."""
    local = Path(pretrained).expanduser()
    if local.is_dir():
        return local
    if pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1:
        raise FileNotFoundError(f"model.pretrained: no pipeline folder at {local}")
    return pretrained
