"""Pretraining a small FLUX.1-dev on the shapes world: the base generator the RL starts from.

The pipeline's own classes are trained, in the order FLUX itself was built:
1. renders: a pool of train-split shapes-world scenes (unseen colour/shape combinations never
   appear), drawn by the renderer;
2. the VAE (AutoencoderKL) learns to reconstruct them; its scaling and shift factors are then
   set from the latents' statistics, as FLUX.1-dev's are;
3. the FluxTransformer2DModel, with both text encoders trained jointly, learns the rectified
   flow objective of diffusers' FLUX training scripts: x_t = (1 - s) x_0 + s noise, the
   network predicts noise - x_0, given the packed latents, the pipeline's prompt embeddings
   and the guidance embedding.

The base editor (`pretrain_editor`) is the base generator fine-tuned the same way on
train-split edit triples of the SpatialReward edit engine: the instruction is the prompt, the
correct target the image to denoise, and the source image's latents are Kontext conditioning
tokens beside the noisy ones (spatialrl.flux.conditioning), as FluxKontextPipeline samples.

Every stage writes its result into a work folder and is skipped once done, and the long
transformer stage checkpoints as it goes, so an interrupted build continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxKontextPipeline, FluxPipeline
from diffusers.training_utils import EMAModel
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from spatialrl.config import (
    EditorPretraining,
    FlowMatchingTraining,
    GeneratorPretraining,
    GuidanceDistillation,
)
from spatialrl.data.grammar import scene_to_prompt
from spatialrl.data.render import LayoutError, render
from spatialrl.data.shapes import sample_split_scene
from spatialrl.flux.conditioning import pack_condition_latents
from spatialrl.policy_evaluation import rule_figures
from spatialrl.tiny import save_atomically
from spatialrl.tiny.flux import SHAPES_GENERATOR, build_tiny_flux

log = logging.getLogger(__name__)

RENDERS_FILE = "renders.safetensors"
PROMPTS_FILE = "prompts.json"
VAE_DIR = "vae"
LATENTS_FILE = "latents.safetensors"
EDITS_FILE = "edits.safetensors"  # the editor's (source, target) renders
INSTRUCTIONS_FILE = "instructions.json"
SOURCE_LATENTS_FILE = "source_latents.safetensors"
TEACHER_DIR = "teacher"  # the guidance teacher's FluxPipeline (float32)
CHECKPOINT_DIR = "checkpoint"  # the transformer stage's newest checkpoint
STATE_FILE = "training_state.pt"  # optimiser and EMA tensors; loaded with weights_only=True
PROGRESS_FILE = "progress.json"
TRAINED_PARTS = ("transformer", "text_encoder", "text_encoder_2")


def pretrain_generator(
    out_dir: Path, work_dir: Path, settings: GeneratorPretraining
) -> Path:
    """Build the base generator into `out_dir` (a FluxPipeline folder), staging in `work_dir`.

    Rerunning with the same work folder continues an interrupted build."""
    work_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(work_dir, settings)
    torch.manual_seed(settings.seed)
    pipeline = build_tiny_flux(replace(SHAPES_GENERATOR, text_hidden_size=settings.text_hidden_size,
                                       text_layers=settings.text_layers))
    images, prompts = renders(work_dir, settings)
    pipeline.vae = trained_vae(pipeline.vae, images, work_dir, settings)
    latents = encoded_latents(pipeline.vae, images, work_dir / LATENTS_FILE)
    train_transformer(pipeline, latents, prompts, work_dir, settings)
    return save_atomically(Path(out_dir), [pipeline.to(getattr(torch, settings.save_dtype))])


def pretrain_editor(
    generator_dir: Path, out_dir: Path, work_dir: Path, settings: EditorPretraining
) -> Path:
    """Fine-tune the base generator in `generator_dir` into the base editor: a
    FluxKontextPipeline folder in `out_dir` (the generator's VAE and tokenizers, unchanged),
    staging in `work_dir`. Rerunning with the same work folder continues an interrupted build."""
    work_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(work_dir, settings)
    torch.manual_seed(settings.seed)
    pipeline = FluxPipeline.from_pretrained(generator_dir, torch_dtype=torch.float32,
                                            use_safetensors=True)
    sources, targets, instructions = edit_triples(work_dir, settings)
    condition = encoded_latents(pipeline.vae, sources, work_dir / SOURCE_LATENTS_FILE)
    latents = encoded_latents(pipeline.vae, targets, work_dir / LATENTS_FILE)
    train_transformer(pipeline, latents, instructions, work_dir, settings, condition)
    editor = FluxKontextPipeline(**pipeline.components)
    return save_atomically(Path(out_dir), [editor.to(getattr(torch, settings.save_dtype))])


def distil_guidance(
    generator_dir: Path, out_dir: Path, work_dir: Path, settings: GuidanceDistillation
) -> Path:
    """Make the base generator a guidance-distilled one, as FLUX.1-dev is, into `out_dir`:
    1. the teacher: the generator fine-tuned with caption dropout, so that it also predicts
       the unconditional velocity and classifier-free guidance works (saved, float32, in the
       work folder's `teacher/`, where `FluxPipeline(true_cfg_scale=...)` can sample it);
    2. the student, initialised from the teacher, learns the teacher's guided velocity at
       guidance g from FLUX's guidance embedding (`guidance_distillation_loss`).
    Rerunning with the same work folder continues an interrupted build."""
    work_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(work_dir, settings)
    torch.manual_seed(settings.seed)
    pipeline = FluxPipeline.from_pretrained(generator_dir, torch_dtype=torch.float32,
                                            use_safetensors=True)
    images, prompts = renders(work_dir, settings)
    latents = encoded_latents(pipeline.vae, images, work_dir / LATENTS_FILE)
    teacher_dir = work_dir / TEACHER_DIR
    if not (teacher_dir / "model_index.json").is_file():
        train_transformer(pipeline, latents, prompts, work_dir / "teacher_training",
                          replace(settings, steps=settings.teacher_steps))
        save_atomically(teacher_dir, [pipeline])
    teacher = FluxPipeline.from_pretrained(teacher_dir, torch_dtype=torch.float32,
                                           use_safetensors=True)
    pipeline = FluxPipeline.from_pretrained(teacher_dir, torch_dtype=torch.float32,
                                            use_safetensors=True)
    train_transformer(pipeline, latents, prompts, work_dir / "student_training",
                      replace(settings, caption_dropout=0.0),
                      loss_of=partial(guidance_distillation_loss, teacher=teacher))
    return save_atomically(Path(out_dir), [pipeline.to(getattr(torch, settings.save_dtype))])


# Settings that do not change what was trained so far: a build may go on with other values.
CHANGEABLE_ON_RESUME = frozenset({"steps", "save_dtype", "checkpoint_every", "log_every"})


def _check_settings(work_dir: Path, settings: FlowMatchingTraining) -> None:
    """A work folder belongs to one set of settings: resuming with others would mix builds."""
    recorded = work_dir / "settings.json"
    current = json.loads(json.dumps(asdict(settings)))
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        changed = {k for k in current
                   if before.get(k) != current[k] and k not in CHANGEABLE_ON_RESUME}
        if changed:
            raise ValueError(
                f"{work_dir} holds a build with other settings ({sorted(changed)}); "
                "use a new work folder"
            )
    recorded.write_text(json.dumps(current, indent=2) + "\n")


# 1. Renders ----------------------------------------------------------------------------


def renders(
    work_dir: Path, settings: GeneratorPretraining | GuidanceDistillation
) -> tuple[np.ndarray, list[str]]:
    """(uint8 [N, H, W, 3] images, their prompts): train-split scenes, made once."""
    images_path, prompts_path = work_dir / RENDERS_FILE, work_dir / PROMPTS_FILE
    if not prompts_path.is_file():
        rng = np.random.default_rng([settings.seed, 1])
        images, prompts = render_split(rng, "train", settings.num_renders, settings.image_size)
        save_numpy({"images": images}, str(images_path))
        prompts_path.write_text(json.dumps(prompts))  # written last: it marks the stage done
        log.info("rendered %d train-split scenes", len(prompts))
    return load_numpy(str(images_path))["images"], json.loads(prompts_path.read_text())


def render_split(
    rng: np.random.Generator, split: str, n: int, size: int
) -> tuple[np.ndarray, list[str]]:
    """n renders of `split` scenes (uint8 [n, size, size, 3]) and their prompts; scenes the
    renderer cannot lay out are drawn again."""
    images, prompts = [], []
    while len(prompts) < n:
        scene = sample_split_scene(rng, split)
        try:
            images.append(np.asarray(render(scene, size, rng)))
        except LayoutError:
            continue
        prompts.append(scene_to_prompt(scene))
    return np.stack(images), prompts


def edit_triples(
    work_dir: Path, settings: EditorPretraining
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(source renders, correct targets, instructions) of train-split edit examples (uint8
    [N, H, W, 3] each), made once."""
    from spatialrl.spatialreward.edit_examples import build_example

    images_path, instructions_path = work_dir / EDITS_FILE, work_dir / INSTRUCTIONS_FILE
    if not instructions_path.is_file():
        examples = [build_example(settings.seed, "train", i) for i in range(settings.num_examples)]
        save_numpy({"sources": np.stack([np.asarray(e.source_image) for e in examples]),
                    "targets": np.stack([np.asarray(e.candidate("correct").image)
                                         for e in examples])}, str(images_path))
        instructions_path.write_text(json.dumps([e.instruction for e in examples]))  # marker
        log.info("built %d train-split edit examples", len(examples))
    saved = load_numpy(str(images_path))
    return saved["sources"], saved["targets"], json.loads(instructions_path.read_text())


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# 2. VAE --------------------------------------------------------------------------------


def trained_vae(
    vae: AutoencoderKL, images: np.ndarray, work_dir: Path, settings: GeneratorPretraining
) -> AutoencoderKL:
    folder = work_dir / VAE_DIR
    if (folder / "config.json").is_file():
        return AutoencoderKL.from_pretrained(folder, use_safetensors=True)
    rng = np.random.default_rng([settings.seed, 2])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr)
    vae.train()
    for step in range(settings.vae_steps):
        pixels = to_pixels(images[rng.integers(len(images), size=settings.vae_batch_size)])
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, pixels) + settings.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % settings.log_every == 0:
            log.info("vae step %d/%d: loss %.5f", step + 1, settings.vae_steps, loss.item())
    vae.eval()
    _set_latent_normalisation(vae, images)
    figures = reconstruction_figures(vae, settings)
    log.info("vae reconstructions of held-out renders: %s", figures)
    (work_dir / "vae_figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    save_atomically(folder, [vae])
    return vae


@torch.no_grad()
def reconstruction_figures(
    vae: AutoencoderKL, settings: GeneratorPretraining, n: int = 200
) -> dict[str, float]:
    """What the rule evaluator reads from the VAE's reconstructions of test-split renders
    (unseen colour/shape combinations): the ceiling for any generator on this VAE."""
    rng = np.random.default_rng([settings.seed, 4])
    images, prompts = render_split(rng, "test", n, settings.image_size)
    decoded = vae.decode(vae.encode(to_pixels(images)).latent_dist.mode()).sample
    pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return rule_figures(list(pixels), prompts)


@torch.no_grad()
def _set_latent_normalisation(vae: AutoencoderKL, images: np.ndarray) -> None:
    """FLUX's VAE stores a shift and scale that bring its latents to mean 0, std 1; the
    pipeline applies them when it decodes. They are measured here the same way."""
    latents = vae.encode(to_pixels(images[:2048])).latent_dist.mode()
    shift = latents.mean().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / (latents - shift).std().item())


@torch.no_grad()
def encoded_latents(vae: AutoencoderKL, images: np.ndarray, path: Path) -> torch.Tensor:
    """Normalised latents [N, C, h, w] of every image (the posterior's mean), made once."""
    if path.is_file():
        return load_file(path)["latents"]
    parts = [vae.encode(to_pixels(images[i:i + 256])).latent_dist.mode()
             for i in range(0, len(images), 256)]
    latents = (torch.cat(parts) - vae.config.shift_factor) * vae.config.scaling_factor
    save_file({"latents": latents.contiguous()}, str(path))
    return latents


# 3. Transformer and text encoders --------------------------------------------------------


def train_transformer(
    pipeline: FluxPipeline,
    latents: torch.Tensor,
    prompts: list[str],
    work_dir: Path,
    settings: FlowMatchingTraining,
    condition: torch.Tensor | None = None,
    loss_of: Callable[..., torch.Tensor] | None = None,
) -> None:
    """Training of the transformer and both text encoders on `loss_of` (rectified flow when
    None), resumed from the work folder's checkpoint; at the end the EMA weights are copied
    into the pipeline. `condition`: latents of the images each target edits (the editor),
    row for row."""
    loss_of = loss_of or flow_matching_loss
    parts = [getattr(pipeline, name) for name in TRAINED_PARTS]
    parameters = [p for part in parts for p in part.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, settings=settings))
    ema = EMAModel(parameters, decay=settings.ema_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    rng = np.random.default_rng([settings.seed, 3])
    state = TrainingState(parts, optimizer, schedule, ema, generator, rng)
    start = state.resume(work_dir)
    for part in parts:
        part.train()
    started, losses = time.monotonic(), []
    for step in range(start, settings.steps):
        rows = rng.integers(len(prompts), size=settings.batch_size)
        loss = loss_of(
            pipeline, latents[rows], _dropped_captions([prompts[i] for i in rows], settings, rng),
            settings, generator, None if condition is None else condition[rows],
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(parameters)
        losses.append(loss.item())
        if (step + 1) % settings.log_every == 0:
            rate = (step + 1 - start) / (time.monotonic() - started)
            log.info("transformer step %d/%d: loss %.4f (%.2f steps/s)", step + 1,
                     settings.steps, float(np.mean(losses[-settings.log_every:])), rate)
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            state.save(work_dir, step + 1, float(np.mean(losses)))
            losses = []
    for part in parts:
        part.eval()
    ema.copy_to(parameters)


def _dropped_captions(
    prompts: list[str], settings: FlowMatchingTraining, rng: np.random.Generator
) -> list[str]:
    """Caption dropout: a fraction of prompts become the empty prompt, so the model also
    learns the unconditional velocity that classifier-free guidance needs. Without it no
    random number is drawn, so builds without dropout are unchanged."""
    if settings.caption_dropout == 0:
        return prompts
    dropped = rng.random(len(prompts)) < settings.caption_dropout
    return ["" if drop else prompt for prompt, drop in zip(prompts, dropped, strict=True)]


def lr_factor(step: int, settings: FlowMatchingTraining) -> float:
    """Linear warmup, constant, then a linear decay to 0 over the last lr_decay_steps."""
    warmup = min(1.0, (step + 1) / settings.warmup_steps)
    if settings.lr_decay_steps == 0:
        return warmup
    return warmup * min(1.0, max(0.0, (settings.steps - step) / settings.lr_decay_steps))


def flow_matching_loss(
    pipeline: FluxPipeline,
    latents: torch.Tensor,
    prompts: list[str],
    settings: FlowMatchingTraining,
    generator: torch.Generator,
    condition: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error of the predicted velocity (noise - x_0) at logit-normal noise
    levels, the weighting SD3 and the FLUX scripts offer. With `condition` (latents of the
    source images), their tokens follow the noisy ones as in FluxKontextPipeline, and only
    the noisy tokens' prediction is scored."""
    sigmas, noise, noisy = _noised(latents, generator)
    guidance = _guidance(settings, len(latents), generator)
    prediction = _velocity(pipeline, noisy, sigmas, guidance, prompts, settings, condition)
    return F.mse_loss(prediction, _packed(pipeline, noise - latents))


def guidance_distillation_loss(
    pipeline: FluxPipeline,
    latents: torch.Tensor,
    prompts: list[str],
    settings: FlowMatchingTraining,
    generator: torch.Generator,
    condition: torch.Tensor | None = None,
    *,
    teacher: FluxPipeline,
) -> torch.Tensor:
    """FLUX.1-dev's guidance distillation: at guidance g the student's one velocity must equal
    the teacher's classifier-free-guided one, v_uncond + g (v_cond - v_uncond), where the
    unconditional velocity is the teacher's for the empty prompt (it learnt it from caption
    dropout). Sampling then costs one pass per step instead of two."""
    sigmas, _, noisy = _noised(latents, generator)
    guidance = _guidance(settings, len(latents), generator)
    with torch.no_grad():
        both = _velocity(teacher, noisy.repeat(2, 1, 1, 1), sigmas.repeat(2), guidance.repeat(2),
                         prompts + [""] * len(prompts), settings,
                         None if condition is None else condition.repeat(2, 1, 1, 1))
        conditional, unconditional = both.chunk(2)
        target = unconditional + guidance[:, None, None] * (conditional - unconditional)
    prediction = _velocity(pipeline, noisy, sigmas, guidance, prompts, settings, condition)
    return F.mse_loss(prediction, target)


def _noised(
    latents: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigmas, noise, x_t = (1 - sigma) x_0 + sigma noise) at logit-normal noise levels."""
    sigmas = torch.sigmoid(torch.randn(len(latents), generator=generator))
    noise = torch.randn(latents.shape, generator=generator)
    noisy = (1 - sigmas[:, None, None, None]) * latents + sigmas[:, None, None, None] * noise
    return sigmas, noise, noisy


def _guidance(settings: FlowMatchingTraining, batch: int,
              generator: torch.Generator) -> torch.Tensor:
    low, high = settings.guidance_range
    return low + (high - low) * torch.rand(batch, generator=generator)


def _packed(pipeline: FluxPipeline, latents: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = latents.shape
    return pipeline._pack_latents(latents, batch, channels, height, width)


def _velocity(
    pipeline: FluxPipeline,
    noisy: torch.Tensor,
    sigmas: torch.Tensor,
    guidance: torch.Tensor,
    prompts: list[str],
    settings: FlowMatchingTraining,
    condition: torch.Tensor | None,
) -> torch.Tensor:
    """The transformer's packed velocity for the noisy latents' tokens, the pipeline's way."""
    batch, _, height, width = noisy.shape
    prompt_embeds, pooled, text_ids = pipeline.encode_prompt(
        prompt=prompts, prompt_2=None, max_sequence_length=settings.max_sequence_length
    )
    tokens = _packed(pipeline, noisy)
    image_ids = pipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu",
                                                   noisy.dtype)
    if condition is not None:
        source = pack_condition_latents(pipeline, condition)
        hidden_states = torch.cat([tokens, source.latents], 1)
        image_ids = torch.cat([image_ids, source.image_ids])
    else:
        hidden_states = tokens
    return pipeline.transformer(
        hidden_states=hidden_states,
        timestep=sigmas,  # the pipeline passes timesteps / 1000, i.e. sigma
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0][:, :tokens.shape[1]]


@dataclass
class TrainingState:
    """Everything the transformer stage needs to continue bit for bit: weights, optimiser,
    schedule, EMA and both random streams."""

    parts: list
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    ema: EMAModel
    generator: torch.Generator
    rng: np.random.Generator

    def save(self, work_dir: Path, step: int, mean_loss: float) -> None:
        """Weights as safetensors, the rest as plain tensors and JSON, written beside the
        old checkpoint and swapped in, so a kill mid-write keeps the previous one."""
        staging = work_dir / f"{CHECKPOINT_DIR}.tmp"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        for name, part in zip(TRAINED_PARTS, self.parts, strict=True):
            part.save_pretrained(staging / name)
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "schedule": self.schedule.state_dict(),
                    "ema": self.ema.state_dict(),
                    "generator": self.generator.get_state()}, staging / STATE_FILE)
        progress = {"step": step, "rng": self.rng.bit_generator.state}
        (staging / PROGRESS_FILE).write_text(json.dumps(progress))
        final, old = work_dir / CHECKPOINT_DIR, work_dir / f"{CHECKPOINT_DIR}.old"
        if final.exists():
            final.rename(old)
        staging.rename(final)
        if old.exists():
            shutil.rmtree(old)
        with (work_dir / "loss.jsonl").open("a") as record:
            record.write(json.dumps({"step": step, "loss": mean_loss}) + "\n")

    def resume(self, work_dir: Path) -> int:
        """The step to start from: that of the work folder's checkpoint, or 0."""
        folder = work_dir / CHECKPOINT_DIR
        if not (folder / PROGRESS_FILE).is_file():
            return 0
        for name, part in zip(TRAINED_PARTS, self.parts, strict=True):
            saved = type(part).from_pretrained(folder / name, use_safetensors=True)
            part.load_state_dict(saved.state_dict())
        state = torch.load(folder / STATE_FILE, weights_only=True)  # tensors only, no code
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])
        progress = json.loads((folder / PROGRESS_FILE).read_text())
        self.rng.bit_generator.state = progress["rng"]
        log.info("resuming the transformer stage at step %d from %s", progress["step"], folder)
        return progress["step"]
