"""Kontext conditioning: the tokens of a source image that FLUX.1-Kontext attends to.

As in diffusers' FluxKontextPipeline, each image is resized (to the Kontext training resolution
nearest its aspect ratio, or kept at its own size), VAE-encoded to its latent mode, packed into
2x2-patch tokens like the noisy latents, and given RoPE ids whose first coordinate is 1 where the
noisy tokens have 0: that coordinate is how the transformer tells the two apart. Text-to-image
has no conditioning tokens: an empty sequence, which leaves the transformer's inputs unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import FluxPipeline
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.flux.pipeline_flux_kontext import (
    PREFERRED_KONTEXT_RESOLUTIONS,
    retrieve_latents,
)


@dataclass
class ConditionTokens:
    latents: torch.Tensor  # [B, Lc, C]: packed, shifted and scaled VAE latents
    image_ids: torch.Tensor  # [Lc, 3]: RoPE positions, first coordinate 1


def no_condition(
    batch_size: int, channels: int, dtype: torch.dtype, device: torch.device
) -> ConditionTokens:
    """Text-to-image: zero conditioning tokens."""
    return ConditionTokens(
        torch.zeros(batch_size, 0, channels, dtype=dtype, device=device),
        torch.zeros(0, 3, device=device),
    )


@torch.no_grad()
def encode_condition_images(
    pipeline: FluxPipeline, images: Sequence[PipelineImageInput], kontext_resolution: bool = True
) -> ConditionTokens:
    """One row of tokens per image (repeats allowed). All images must give the same token grid.

    kontext_resolution is FluxKontextPipeline's `_auto_resize` (default True there): resize to
    the nearest of its PREFERRED_KONTEXT_RESOLUTIONS; False keeps each image's size, rounded
    down to a multiple of 16. Images are encoded one at a time, as the pipeline does with a
    list of generators, so a row does not depend on the batch.
    """
    rows = [_encode_one(pipeline, image, kontext_resolution) for image in images]
    if len({row.latents.shape for row in rows}) != 1:
        raise ValueError("conditioning images of one batch must have the same size")
    return ConditionTokens(torch.cat([row.latents for row in rows]), rows[0].image_ids)


def _encode_one(
    pipeline: FluxPipeline, image: PipelineImageInput, kontext_resolution: bool
) -> ConditionTokens:
    vae = pipeline.vae
    pixels = _preprocess(pipeline, image, kontext_resolution)
    pixels = pixels.to(device=pipeline._execution_device, dtype=vae.dtype)
    latents = retrieve_latents(vae.encode(pixels), sample_mode="argmax")
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    return pack_condition_latents(pipeline, latents)


def pack_condition_latents(pipeline: FluxPipeline, latents: torch.Tensor) -> ConditionTokens:
    """Normalised VAE latents [B, C, h, w] of source images as conditioning tokens."""
    batch, channels, height, width = latents.shape
    image_ids = pipeline._prepare_latent_image_ids(
        batch, height // 2, width // 2, latents.device, torch.float32
    )
    image_ids[:, 0] = 1
    return ConditionTokens(pipeline._pack_latents(latents, batch, channels, height, width),
                           image_ids)


def _preprocess(
    pipeline: FluxPipeline, image: PipelineImageInput, kontext_resolution: bool
) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1]. FluxKontextPipeline resizes and then preprocesses at the same
    size; the second resize is the identity, so one resize here gives the same pixels."""
    multiple_of = pipeline.vae_scale_factor * 2
    height, width = pipeline.image_processor.get_default_height_width(image)
    if kontext_resolution:
        _, width, height = min(
            (abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS
        )
    height, width = height // multiple_of * multiple_of, width // multiple_of * multiple_of
    return pipeline.image_processor.preprocess(image, height, width)
