"""FLUX sampling that records SDE trajectories for GRPO, and their re-evaluation by the learner.

With noise level 0 `sample` is FluxPipeline.__call__: the same initial latents, sigma schedule
(with FLUX's resolution-dependent shift mu), embedded guidance, transformer inputs, Euler steps
and VAE decode. With noise, steps inside `sde_window` become Gaussian transitions (see
spatialrl.flux.sde) whose log-probabilities are recorded; the other steps stay ODE steps.

Every sample owns a CPU torch.Generator seeded with its seed, drawing first its initial noise
(as FluxPipeline does with a list of generators) and then its noise for each SDE step, so a
sample's trajectory does not depend on the batch it was drawn in.

With conditioning images, `sample` is FluxKontextPipeline.__call__ instead (at height x width,
i.e. max_area = height * width): each sample's source image becomes conditioning tokens (see
spatialrl.flux.conditioning) appended to the noisy tokens along the sequence, the transformer
sees both, and only the noisy tokens' velocity is used. The schedule's shift still depends on
the noisy tokens alone. The tokens are stored in the Trajectory, so the learner's log-probs see
the same input as the sampler's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spatialrl.config import SamplingConfig
from spatialrl.flux.conditioning import encode_condition_images, no_condition
from spatialrl.flux.encoding import PromptEmbeddingCache, encode_prompts
from spatialrl.flux.sde import SdeType, Transition, gaussian_log_prob, sample_next, transition

# Trajectory fields with one row per sample, and tensors shared by the whole record.
PER_SAMPLE_TENSORS = (
    "states", "log_probs", "prompt_embeds", "pooled_prompt_embeds", "guidance", "seeds",
    "condition_latents",
)
SHARED_TENSORS = (
    "sde_mask", "sigmas", "timesteps", "text_ids", "latent_image_ids", "condition_image_ids",
)
SHARED_METADATA = ("height", "width", "noise_level", "sde_type")


@dataclass
class Trajectory:
    """Denoising paths of B samples over T steps, with what is needed to re-evaluate them.

    Latents are FLUX's packed latents: L = (H/16)(W/16) tokens of C = 64 channels for
    FLUX.1-dev. `states[:, j]` is the input of step j and `states[:, j + 1]` its output.
    """

    states: torch.Tensor  # [B, T+1, L, C] float32
    # [B, T] float32: log p(states[:, j+1] | states[:, j]); NaN at ODE steps
    log_probs: torch.Tensor
    prompt_embeds: torch.Tensor  # [B, S, D] pipeline dtype
    pooled_prompt_embeds: torch.Tensor  # [B, P] pipeline dtype
    guidance: torch.Tensor  # [B] float32: FLUX.1-dev's embedded guidance scale
    seeds: torch.Tensor  # [B] int64
    prompts: list[str]
    sde_mask: torch.Tensor  # [T] bool: SDE steps, the trainable ones
    sigmas: torch.Tensor  # [T+1] float32, ending in 0
    timesteps: torch.Tensor  # [T] float32: sigmas * 1000, as the scheduler gives them
    text_ids: torch.Tensor  # [S, 3]
    latent_image_ids: torch.Tensor  # [L, 3]
    # Kontext's packed source-image latents, Lc = 0 for text-to-image: [B, Lc, C] pipeline dtype
    condition_latents: torch.Tensor
    condition_image_ids: torch.Tensor  # [Lc, 3], first coordinate 1
    height: int
    width: int
    noise_level: float
    sde_type: SdeType

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def select(self, indices: Sequence[int] | torch.Tensor) -> Trajectory:
        """The samples at `indices`, in that order."""
        index = torch.as_tensor(indices, dtype=torch.long)
        rows = {name: getattr(self, name)[index.to(getattr(self, name).device)]
                for name in PER_SAMPLE_TENSORS}
        return dataclasses.replace(self, **rows, prompts=[self.prompts[i] for i in index.tolist()])

    @classmethod
    def concat(cls, parts: Sequence[Trajectory]) -> Trajectory:
        """One record of all samples of `parts`, which must share schedule and resolution."""
        first = parts[0]
        for part in parts[1:]:
            for name in SHARED_METADATA:
                if getattr(part, name) != getattr(first, name):
                    raise ValueError(f"Trajectory.concat: records differ in {name}")
            for name in SHARED_TENSORS:
                if not torch.equal(getattr(part, name), getattr(first, name)):
                    raise ValueError(f"Trajectory.concat: records differ in {name}")
        rows = {name: torch.cat([getattr(part, name) for part in parts])
                for name in PER_SAMPLE_TENSORS}
        return dataclasses.replace(
            first, **rows, prompts=[prompt for part in parts for prompt in part.prompts]
        )

    def to(self, device: str | torch.device) -> Trajectory:
        tensors = {name: getattr(self, name).to(device)
                   for name in PER_SAMPLE_TENSORS + SHARED_TENSORS}
        return dataclasses.replace(self, **tensors)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Plain tensors and string metadata (safetensors' format): no pickled code."""
        tensors = {name: getattr(self, name).contiguous()
                   for name in PER_SAMPLE_TENSORS + SHARED_TENSORS}
        metadata = {name: json.dumps(getattr(self, name)) for name in SHARED_METADATA}
        metadata["prompts"] = json.dumps(self.prompts)
        return tensors, metadata

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Trajectory:
        fields = {name: json.loads(metadata[name]) for name in SHARED_METADATA + ("prompts",)}
        if "condition_latents" not in tensors:  # saved before edits: text-to-image samples
            states = tensors["states"]
            empty = no_condition(states.shape[0], states.shape[-1], states.dtype, states.device)
            tensors = {**tensors, "condition_latents": empty.latents,
                       "condition_image_ids": empty.image_ids}
        return cls(**tensors, **fields)

    def save(self, path: str | Path) -> None:
        tensors, metadata = self.to("cpu").to_tensors()
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> Trajectory:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        return cls.from_tensors(load_file(str(path)), metadata)


def flux_schedule(
    pipeline: FluxPipeline, num_steps: int, image_seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [T+1], timesteps [T]) exactly as FluxPipeline.__call__ sets them, computed on a
    copy of the scheduler so the pipeline's own scheduler state is left alone."""
    scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
    config = scheduler.config
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    timesteps, _ = retrieve_timesteps(scheduler, num_steps, device, sigmas=sigmas, mu=mu)
    return scheduler.sigmas, timesteps


def predict_velocity(
    transformer: torch.nn.Module, trajectory: Trajectory, latents: torch.Tensor, step_index: int
) -> torch.Tensor:
    """The transformer's velocity at step `step_index`, float32, with FluxPipeline's (or, with
    conditioning tokens, FluxKontextPipeline's) inputs: all in the transformer's dtype except
    the guidance, which stays float32. Conditioning tokens follow the noisy ones; their outputs
    are dropped."""
    dtype = transformer.dtype
    timestep = trajectory.timesteps[step_index].expand(latents.shape[0]).to(dtype)
    velocity = transformer(
        hidden_states=torch.cat([latents.to(dtype), trajectory.condition_latents.to(dtype)], 1),
        timestep=timestep / 1000,
        guidance=trajectory.guidance,
        pooled_projections=trajectory.pooled_prompt_embeds.to(dtype),
        encoder_hidden_states=trajectory.prompt_embeds.to(dtype),
        txt_ids=trajectory.text_ids.to(dtype),
        img_ids=torch.cat([trajectory.latent_image_ids, trajectory.condition_image_ids]).to(dtype),
        return_dict=False,
    )[0]
    return velocity[:, : latents.shape[1]].float()


def step_distribution(
    transformer: torch.nn.Module,
    trajectory: Trajectory,
    step_index: int,
    noise_level: float | None = None,
    sde_type: SdeType | None = None,
) -> Transition:
    """p(states[:, j+1] | states[:, j]) under the transformer's current weights, for every
    sample of the record. Differentiable: the learner backpropagates through the mean.
    noise_level and sde_type default to those the record was sampled with."""
    noise_level = trajectory.noise_level if noise_level is None else noise_level
    sde_type = trajectory.sde_type if sde_type is None else sde_type
    latents = trajectory.states[:, step_index]
    velocity = predict_velocity(transformer, trajectory, latents, step_index)
    return transition(
        latents,
        velocity,
        trajectory.sigmas[step_index],
        trajectory.sigmas[step_index + 1],
        noise_level,
        sde_type,
    )


def recompute_log_probs(
    transformer: torch.nn.Module, trajectory: Trajectory, step_indices: Sequence[int]
) -> torch.Tensor:
    """[B, len(step_indices)] log-probs of the recorded SDE steps under the current weights."""
    columns = []
    for step_index in step_indices:
        if not bool(trajectory.sde_mask[step_index]):
            raise ValueError(f"step {step_index} is an ODE step: it has no log-prob")
        step = step_distribution(transformer, trajectory, step_index)
        columns.append(gaussian_log_prob(trajectory.states[:, step_index + 1], step.mean, step.std))
    return torch.stack(columns, dim=1)


@torch.no_grad()
def sample(
    pipeline: FluxPipeline,
    prompts: list[str],
    seeds: Sequence[int],
    cfg: SamplingConfig,
    noise_level: float | None = None,
    num_steps: int | None = None,
    output_type: str = "pil",
    prompt_cache: PromptEmbeddingCache | None = None,
    condition_images: Sequence[PipelineImageInput] | None = None,
    kontext_resolution: bool = True,
    initial_seeds: Sequence[int] | None = None,
) -> tuple[Trajectory, list | torch.Tensor | np.ndarray]:
    """Sample one image per (prompt, seed) and record its trajectory.

    noise_level and num_steps override cfg's (e.g. 0 and cfg.eval_num_steps for evaluation).
    output_type is FluxPipeline's: "pil" (list of images), "pt" ([B, 3, H, W] in [0, 1]), "np".
    To reproduce `pipeline(prompts, generator=[torch.Generator().manual_seed(s) for s in
    seeds], ...)` use noise_level=0: the generators are CPU generators seeded the same way.
    condition_images (one per prompt, repeats allowed) make it an edit of those images, as
    FluxKontextPipeline(image=..., height=h, width=w, max_area=h * w, _auto_resize=
    kontext_resolution); see spatialrl.flux.conditioning.
    initial_seeds (one per prompt) seed the initial noise apart from the SDE steps' noise,
    which then comes from `seeds` alone; None draws both from `seeds`, as FluxPipeline does.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if initial_seeds is not None and len(initial_seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(initial_seeds)} initial seeds")
    if condition_images is not None and len(condition_images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(condition_images)} condition images")
    noise_level = cfg.noise_level if noise_level is None else noise_level
    num_steps = cfg.num_steps if num_steps is None else num_steps
    device = pipeline._execution_device
    batch_size = len(prompts)

    embeddings = encode_prompts(pipeline, prompts, cfg.max_sequence_length, prompt_cache)
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    latents, latent_image_ids = pipeline.prepare_latents(
        batch_size,
        pipeline.transformer.config.in_channels // 4,
        cfg.height,
        cfg.width,
        torch.float32,  # states are kept in float32; the transformer gets a cast copy
        device,
        generators if initial_seeds is None else
        [torch.Generator("cpu").manual_seed(int(seed)) for seed in initial_seeds],
    )
    condition = (
        no_condition(batch_size, latents.shape[-1], embeddings.prompt_embeds.dtype, device)
        if condition_images is None
        else encode_condition_images(pipeline, condition_images, kontext_resolution)
    )
    sigmas, timesteps = flux_schedule(pipeline, num_steps, latents.shape[1], device)
    window = range(num_steps) if cfg.sde_window is None else range(*cfg.sde_window)

    trajectory = Trajectory(
        states=latents.new_empty((batch_size, num_steps + 1, *latents.shape[1:])),
        log_probs=torch.full((batch_size, num_steps), float("nan"), device=device),
        prompt_embeds=embeddings.prompt_embeds,
        pooled_prompt_embeds=embeddings.pooled_prompt_embeds,
        guidance=torch.full((batch_size,), cfg.guidance_scale, dtype=torch.float32, device=device),
        seeds=torch.tensor([int(seed) for seed in seeds], dtype=torch.long, device=device),
        prompts=list(prompts),
        sde_mask=torch.zeros(num_steps, dtype=torch.bool, device=device),
        sigmas=sigmas,
        timesteps=timesteps,
        text_ids=embeddings.text_ids,
        latent_image_ids=latent_image_ids,
        condition_latents=condition.latents,
        condition_image_ids=condition.image_ids,
        height=cfg.height,
        width=cfg.width,
        noise_level=float(noise_level),
        sde_type=cfg.sde_type,
    )
    trajectory.states[:, 0] = latents
    for j in range(num_steps):
        step_noise_level = noise_level if j in window else 0.0
        step = step_distribution(pipeline.transformer, trajectory, j, step_noise_level)
        if step.std > 0:
            noise = randn_tensor(
                latents.shape, generator=generators, device=device, dtype=torch.float32
            )
            latents = sample_next(step, noise)
            trajectory.log_probs[:, j] = gaussian_log_prob(latents, step.mean, step.std)
            trajectory.sde_mask[j] = True
        else:  # an ODE step; also CPS's last step, whose noise std sigma_next * sin(.) is 0
            latents = step.mean
        trajectory.states[:, j + 1] = latents

    images = decode_latents(pipeline, latents, cfg.height, cfg.width, output_type)
    return trajectory, images


def decode_latents(
    pipeline: FluxPipeline, latents: torch.Tensor, height: int, width: int, output_type: str = "pil"
) -> list | torch.Tensor | np.ndarray:
    """Packed latents to images, as the end of FluxPipeline.__call__ does."""
    latents = pipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
    latents = (latents / pipeline.vae.config.scaling_factor) + pipeline.vae.config.shift_factor
    image = pipeline.vae.decode(latents.to(pipeline.vae.dtype), return_dict=False)[0]
    return pipeline.image_processor.postprocess(image, output_type=output_type)
