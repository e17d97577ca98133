"""LoRA on the FLUX transformer through diffusers' peft integration.

The adapter starts as an exact no-op (lora_B = 0), so the policy starts as the base model and the
reference policy of the KL term is the same network with its adapters switched off.
`lora_state_dict` / `load_lora_state_dict` are what the learner broadcasts to rollout actors;
`save_lora` writes diffusers' format, which `FluxPipeline.load_lora_weights` reads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import peft
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from spatialrl.config import LoraConfig, TrainConfig

ADAPTER_NAME = "default"


def add_initial_adapter(transformer: FluxTransformer2DModel, cfg: TrainConfig) -> None:
    """The run's initial adapter (with lora.enabled), drawn from the run seed: the learners,
    the rollout actors and the in-process loop all start from the same weights."""
    if cfg.lora.enabled:
        torch.manual_seed(cfg.seed)
        add_lora(transformer, cfg.lora)


def add_lora(transformer: FluxTransformer2DModel, cfg: LoraConfig) -> None:
    """Inject a fresh adapter; the base weights are frozen, only the adapter trains."""
    transformer.add_adapter(
        peft.LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
            init_lora_weights=True,  # lora_B = 0: the adapter starts as a no-op
        ),
        adapter_name=ADAPTER_NAME,
    )


def lora_state_dict(transformer: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """The adapter weights as detached CPU copies, keyed without the adapter name."""
    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


def load_lora_state_dict(
    transformer: FluxTransformer2DModel, state: dict[str, torch.Tensor]
) -> None:
    """Copy `state` (from `lora_state_dict`) into the adapter in place; every adapter weight
    must be given, and nothing else."""
    result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
    missing = [name for name in result.missing_keys if "lora_" in name]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"LoRA state does not match the adapter: unexpected {result.unexpected_keys[:5]}, "
            f"missing {missing[:5]}"
        )


def save_lora(model: FluxPipeline | FluxTransformer2DModel, out_dir: str | Path) -> Path:
    """Write the adapter (and its peft config, so rank and alpha survive) in diffusers' LoRA
    format: `FluxPipeline.load_lora_weights(out_dir)` loads it."""
    transformer = getattr(model, "transformer", model)
    FluxPipeline.save_lora_weights(
        out_dir,
        transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME),
        transformer_lora_adapter_metadata=transformer.peft_config[ADAPTER_NAME].to_dict(),
    )
    return Path(out_dir)


@contextmanager
def reference_policy(transformer: FluxTransformer2DModel) -> Iterator[FluxTransformer2DModel]:
    """The base model: adapters off inside the block, no second copy of the weights.

    peft's switch also flips requires_grad of the adapter weights; it is restored on exit.
    """
    adapter_params = [param for name, param in transformer.named_parameters() if "lora_" in name]
    requires_grad = [param.requires_grad for param in adapter_params]
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()
        for param, flag in zip(adapter_params, requires_grad, strict=True):
            param.requires_grad_(flag)


def lora_checksum(state: dict[str, torch.Tensor]) -> str:
    """A deterministic hash of names, dtypes, shapes and bytes: equal iff the weights are."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
