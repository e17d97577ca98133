"""Performance harness: rollout, reward, learner and weight broadcast at the real model sizes.

    .venv/bin/python bench/perf.py --scale full --device cuda [--compile] [--suite all]
    OMP_NUM_THREADS=1 .venv/bin/python bench/perf.py --scale tiny --device cpu

--scale full builds FLUX.1-dev's transformer (with T5-XXL, CLIP-L and the FLUX VAE) and
Qwen2.5-VL-7B from the configs written down below, with random weights: no download. --scale
tiny uses the same classes at the sizes of spatialrl's tiny models (spatialrl.tiny) and
smaller images, so that the harness runs in seconds on a CPU; those numbers prove the harness
works, they say nothing about a GPU. Results go to bench/results/perf_<device>_<scale>.json.

Throughput is in FLOP/s from torch's FlopCounterMode over one run of the measured call; MFU is
that rate over the GPU's dense bf16 peak (spatialrl.throughput_model.GPU_PEAK_BF16). On a CPU
there is no such peak and MFU is left out. Times are medians of --repeats runs after one warm-up.
"""

from __future__ import annotations

import argparse
import pickle
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from PIL import Image
from results_file import write_result
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoConfig,
    CLIPTextConfig,
    CLIPTextModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
)

from spatialrl import throughput_model
from spatialrl.broadcast import weights_fingerprint
from spatialrl.config import GRPOConfig, LoraConfig, OptimConfig, SamplingConfig, TrainConfig
from spatialrl.flux.encoding import PromptEmbeddingCache, encode_prompts
from spatialrl.flux.loading import set_attention_backend
from spatialrl.flux.lora import ADAPTER_NAME, add_lora, lora_checksum, lora_state_dict
from spatialrl.flux.sampler import decode_latents, sample
from spatialrl.grpo.loss import num_train_steps
from spatialrl.grpo.update import TorchOptimization, grpo_update
from spatialrl.reward import SpatialScore, SpatialScoreConfig
from spatialrl.reward.inputs import SpatialScoreProcessor
from spatialrl.tiny.flux import build_tiny_flux
from spatialrl.tiny.qwen_vl import write_tiny_qwen_vl

# black-forest-labs/FLUX.1-dev: transformer/config.json, vae/config.json, and its encoders
# (text_encoder: CLIP ViT-L/14 text tower; text_encoder_2: T5 v1.1 XXL encoder).
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
FLUX_DEV_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, projection_dim=768,
                   num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")
T5_XXL_ENCODER = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
# Qwen/Qwen2.5-VL-7B-Instruct: config.json.
QWEN25_VL_7B_TEXT = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
)
QWEN25_VL_7B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
    patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)
# Qwen2.5-VL-7B's image processor pixel budget.
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 3136, 12845056

# Prompts of different token lengths, so that reward batches need padding.
PROMPTS = [
    "a red circle left of a blue square",
    "a small green triangle above a large yellow star beside a purple hexagon",
    "a mug",
    "a laptop on a table next to a lamp below a clock on the wall behind the chair",
    "two blue squares",
    "a cat under a table",
    "an orange diamond between a pink heart and a white ring near the bottom corner",
    "a tree",
]


@dataclass(frozen=True)
class Scale:
    resolutions: tuple[int, ...]  # rollout images, px
    rollout_batches: tuple[int, ...]
    num_steps: int
    max_sequence_length: int
    reward_batches: tuple[int, ...]
    reward_resolution: int
    learner_batch: int
    learner_timesteps: tuple[int, ...]  # trained timesteps per sample
    lora_ranks: tuple[int, ...]


SCALES = {
    # The paper's setting: 16 steps, 512 (and 1024) px, T5 context 512.
    "full": Scale((512, 1024), (1, 4, 8), 16, 512, (1, 8, 32), 512, 4, (1, 4), (32, 64)),
    # tiny FLUX's VAE downsamples 2x: 32 px is 64 latent tokens, 64 px 256.
    "tiny": Scale((32, 64), (1, 4), 4, 32, (1, 8, 32), 64, 2, (1, 2), (32, 64)),
}


@dataclass
class Bench:
    device: torch.device
    dtype: torch.dtype
    scale_name: str
    scale: Scale
    repeats: int
    peak_flops: float | None  # dense bf16 FLOP/s of the GPU; None on a CPU

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def seconds(self, run: Callable[[], object]) -> float:
        """Median wall-clock seconds of `run` over `repeats` calls, after one warm-up."""
        run()
        times = []
        for _ in range(self.repeats):
            self.sync()
            start = time.perf_counter()
            run()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def rates(self, flops: float, seconds: float) -> dict:
        row = {"flops": flops, "flop_per_s": flops / seconds}
        if self.peak_flops:
            row["mfu"] = flops / seconds / self.peak_flops
        return row


def count_flops(run: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def gpu_peak(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "CPU: no dense bf16 peak to compare with; MFU is not meaningful here"
    name = torch.cuda.get_device_name(device)
    for key, peak in throughput_model.GPU_PEAK_BF16.items():
        if key in name.lower():
            return peak, (f"{name}: {peak / 1e12:.0f} TFLOP/s dense bf16 "
                          "(throughput_model.GPU_PEAK_BF16)")
    return None, f"{name}: not in throughput_model.GPU_PEAK_BF16, MFU left out"


def peak_memory(bench: Bench) -> dict:
    if bench.device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(bench.device),
                "peak_memory_kind": "torch.cuda.max_memory_allocated since the reset"}
    # ru_maxrss is KiB on Linux and never goes down: the process's peak so far.
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "process peak RSS so far (getrusage ru_maxrss): monotone over "
                                "the run, not per configuration"}


def saved_activation_bytes(model: torch.nn.Module, run: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for backward during `run`, weights left
    out: the activation memory gradient checkpointing trades for recomputation, on any device.
    Tensors saved inside checkpointed blocks go through the checkpoint's own hooks and are
    not kept, so they are not counted. Meant for a run with one backward (storages freed by
    an earlier backward may be reused and then counted once)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def reset_peak_memory(bench: Bench) -> None:
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)


@contextmanager
def building(device: torch.device, dtype: torch.dtype):
    """Build modules straight on `device` in `dtype` (no fp32 CPU copy of 12B weights)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def flux_pipeline(bench: Bench) -> FluxPipeline:
    """FLUX.1-dev (full) or tiny FLUX with random weights; tokenizers and scheduler from
    spatialrl.tiny.flux (the scheduler config is FLUX.1-dev's)."""
    tiny = build_tiny_flux()
    if bench.scale_name == "tiny":
        return tiny.to(bench.device, bench.dtype)
    tokenizer, tokenizer_2 = tiny.tokenizer, tiny.tokenizer_2
    with building(bench.device, bench.dtype):
        return FluxPipeline(
            scheduler=tiny.scheduler, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
            transformer=FluxTransformer2DModel.from_config(FLUX_DEV_TRANSFORMER),
            vae=AutoencoderKL.from_config(FLUX_DEV_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(
                **CLIP_L_TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)),
            text_encoder_2=T5EncoderModel(T5Config(
                **T5_XXL_ENCODER, vocab_size=len(tokenizer_2),
                pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id)),
        ).to(bench.device, bench.dtype)


def attention_backends() -> dict[str, str | None]:
    """Backend -> None if usable here, else why not."""
    found = {"native": None}
    for backend, module in (("xformers", "xformers"), ("flash", "flash_attn")):
        try:
            __import__(module)
            found[backend] = None
        except ImportError:
            found[backend] = f"not installed ({module})"
    return found


def sampling(bench: Bench, resolution: int, batch: int) -> SamplingConfig:
    s = bench.scale
    return SamplingConfig(height=resolution, width=resolution, num_steps=s.num_steps,
                          max_sequence_length=s.max_sequence_length, batch_size=batch)


def rollout_suite(bench: Bench, pipeline: FluxPipeline) -> dict:
    """SDE trajectories per second: one prompt's group per batch, text embeddings cached
    (as a rollout worker does), bf16 transformer, fp32 states and log-probs."""
    rows = []
    backends = attention_backends()
    for backend, missing in backends.items():
        if missing:
            continue
        set_attention_backend(pipeline, backend)
        for resolution in bench.scale.resolutions:
            for batch in bench.scale.rollout_batches:
                cfg = sampling(bench, resolution, batch)
                cache = PromptEmbeddingCache()

                def run(cfg=cfg, cache=cache, batch=batch):
                    return sample(pipeline, [PROMPTS[0]] * batch, range(batch), cfg,
                                  output_type="pt", prompt_cache=cache)

                run()  # fills the cache: FLOPs below are the transformer's and the VAE's
                flops = count_flops(run)
                seconds = bench.seconds(run)
                rows.append({"attention": backend, "resolution": resolution, "batch": batch,
                             "steps": cfg.num_steps, "seconds": seconds,
                             "trajectories_per_s": batch / seconds,
                             **bench.rates(flops, seconds)})
    set_attention_backend(pipeline, "native")
    result = {"rows": rows, "attention_backends": {k: v or "installed" for k, v in
                                                   backends.items()}}
    return result


def compiled_rollout(bench: Bench, pipeline: FluxPipeline) -> dict:
    """The same rollout with the transformer under torch.compile, at the smallest setting."""
    resolution, batch = bench.scale.resolutions[0], bench.scale.rollout_batches[-1]
    cfg = sampling(bench, resolution, batch)
    cache = PromptEmbeddingCache()

    def run():
        return sample(pipeline, [PROMPTS[0]] * batch, range(batch), cfg, output_type="pt",
                      prompt_cache=cache)

    eager = bench.seconds(run)
    pipeline.transformer.compile()
    start = time.perf_counter()
    run()  # compiles
    compile_seconds = time.perf_counter() - start
    compiled = bench.seconds(run)
    return {"resolution": resolution, "batch": batch, "eager_seconds": eager,
            "compiled_seconds": compiled, "speedup": eager / compiled,
            "first_call_seconds": compile_seconds}


def reward_model(bench: Bench, workdir: Path) -> SpatialScore:
    """SpatialScore on Qwen2.5-VL-7B (full) or the tiny Qwen2.5-VL, random weights. The
    tokenizer and image processor are the tiny model's files (Qwen2's classes); at full
    scale with Qwen2.5-VL-7B's pixel budget."""
    folder = write_tiny_qwen_vl(workdir / "qwen2.5-vl")
    full = bench.scale_name == "full"
    config = SpatialScoreConfig(
        base_model=str(folder), dtype=str(bench.dtype).removeprefix("torch."),
        min_pixels=QWEN_MIN_PIXELS if full else None, max_pixels=QWEN_MAX_PIXELS if full else None)
    processor = SpatialScoreProcessor.from_config(config)
    backbone_config = AutoConfig.from_pretrained(folder)
    if full:  # the 7B's sizes, with the token ids of the tokenizer in use
        backbone_config = Qwen2_5_VLConfig(
            text_config={**QWEN25_VL_7B_TEXT,
                         "bos_token_id": backbone_config.text_config.bos_token_id,
                         "eos_token_id": backbone_config.text_config.eos_token_id},
            vision_config=QWEN25_VL_7B_VISION,
            image_token_id=backbone_config.image_token_id,
            video_token_id=backbone_config.video_token_id,
            vision_start_token_id=backbone_config.vision_start_token_id,
            vision_end_token_id=backbone_config.vision_end_token_id,
        )
    with building(bench.device, bench.dtype):
        backbone = Qwen2_5_VLForConditionalGeneration._from_config(
            backbone_config, attn_implementation=config.attn_implementation, dtype=bench.dtype)
        model = SpatialScore.from_backbone(backbone, processor, config)
    return model.to(bench.device).eval()


def reward_images(resolution: int, count: int) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (count, resolution, resolution, 3), generator=generator,
                           dtype=torch.uint8)
    return [Image.fromarray(row.numpy()) for row in pixels]


def reward_suite(bench: Bench, model: SpatialScore) -> dict:
    rows = []
    size = bench.scale.reward_resolution
    for batch in bench.scale.reward_batches:
        images = reward_images(size, batch)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]

        def run(images=images, prompts=prompts):
            return model.score(images, prompts)

        flops = count_flops(run)
        seconds = bench.seconds(run)
        rows.append({"batch": batch, "resolution": size, "seconds": seconds,
                     "images_per_s": batch / seconds, **bench.rates(flops, seconds)})
    return {"rows": rows, "includes": "preprocessing (PIL -> tensors) and the forward"}


def learner_suite(bench: Bench, pipeline: FluxPipeline) -> dict:
    """grpo_update on one micro-batch of recorded trajectories: one optimiser step over the
    trained timesteps, with the paper's KL term (a reference forward per timestep)."""
    s = bench.scale
    cfg = sampling(bench, s.resolutions[0], s.learner_batch)
    trajectory, _ = sample(pipeline, [PROMPTS[0]] * s.learner_batch, range(s.learner_batch),
                           cfg, output_type="pt")
    advantages = torch.linspace(-1, 1, s.learner_batch)
    transformer = pipeline.transformer
    rows = []
    for rank in s.lora_ranks:
        add_lora(transformer, LoraConfig(rank=rank, alpha=2 * rank))
        params = [p for p in transformer.parameters() if p.requires_grad]
        optimization = TorchOptimization(torch.optim.AdamW(params, lr=1e-6), max_grad_norm=1.0)
        for checkpointing in (False, True):
            if checkpointing:
                transformer.enable_gradient_checkpointing()
            else:
                transformer.disable_gradient_checkpointing()
            saved = None
            for timesteps in s.learner_timesteps:
                grpo = GRPOConfig(group_size=2 * s.learner_batch, top_k=None,
                                  timestep_fraction=timesteps / s.num_steps)
                optim = OptimConfig(micro_batch_size=s.learner_batch)
                trained = num_train_steps(s.num_steps, grpo.timestep_fraction)

                def run(grpo=grpo, optim=optim, optimization=optimization):
                    transformer.train()
                    grpo_update(transformer, trajectory, advantages, grpo, optim, optimization,
                                torch.Generator().manual_seed(0))
                    transformer.eval()

                row = {"lora_rank": rank, "gradient_checkpointing": checkpointing,
                       "batch": s.learner_batch, "resolution": cfg.height,
                       "trained_timesteps": trained}
                reset_peak_memory(bench)
                try:
                    seconds = bench.seconds(run)
                    if trained == 1:
                        saved = saved_activation_bytes(transformer, run)
                except torch.OutOfMemoryError as err:  # e.g. no checkpointing at full size
                    optimization.optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    rows.append({**row, "error": f"out of memory: {str(err)[:200]}"})
                    continue
                rows.append({**row, "seconds_per_step": seconds,
                             "seconds_per_trained_timestep": seconds / trained,
                             **peak_memory(bench)})
            for row in rows[-len(s.learner_timesteps):]:
                row["autograd_saved_bytes_per_trained_timestep"] = saved
        transformer.delete_adapters(ADAPTER_NAME)
    transformer.requires_grad_(False)
    return {"rows": rows,
            "optimizer": "plain torch AdamW (TorchOptimization), one process: DeepSpeed "
                         "ZeRO-2 on one device was not measured"}


def module_bytes(module: torch.nn.Module, only_lora: bool = False) -> int:
    return sum(p.numel() * p.element_size() for name, p in module.named_parameters()
               if not only_lora or "lora_" in name)


def serialization_seconds(bench: Bench, state: dict[str, torch.Tensor]) -> dict:
    """pickle (protocol 5, as Ray's object store serialises) out and back, and the checksum."""
    payload = pickle.dumps(state, protocol=5)
    return {"bytes": sum(t.numel() * t.element_size() for t in state.values()),
            "pickle_bytes": len(payload),
            "pickle_roundtrip_seconds": bench.seconds(
                lambda: pickle.loads(pickle.dumps(state, protocol=5))),
            "checksum_seconds": bench.seconds(lambda: lora_checksum(state))}


def broadcast_suite(bench: Bench, pipeline: FluxPipeline) -> dict:
    """LoRA: lora_state_dict (device -> CPU copy) and its serialisation, for this scale's
    transformer and, materialised on the CPU, for FLUX.1-dev's LoRA shapes. Full weights:
    FLUX.1-dev's bf16 bytes from its config (on `meta`), and the fingerprint and
    serialisation of this scale's transformer."""
    transformer = pipeline.transformer
    with torch.device("meta"):
        full = FluxTransformer2DModel.from_config(FLUX_DEV_TRANSFORMER).to(torch.bfloat16)
    lora_rows = []
    for rank in bench.scale.lora_ranks:
        add_lora(transformer, LoraConfig(rank=rank, alpha=2 * rank))
        state = lora_state_dict(transformer)
        lora_rows.append({"model": f"{bench.scale_name} FLUX transformer", "rank": rank,
                          "state_dict_seconds": bench.seconds(lambda: lora_state_dict(transformer)),
                          **serialization_seconds(bench, state)})
        transformer.delete_adapters(ADAPTER_NAME)
        with torch.device("meta"):
            add_lora(full, LoraConfig(rank=rank, alpha=2 * rank))
        shapes = {name: (p.shape, p.dtype) for name, p in full.named_parameters()
                  if "lora_" in name}
        full.delete_adapters(ADAPTER_NAME)
        if bench.scale_name == "tiny":  # the real payload size, filled on this CPU
            real = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in
                    shapes.items()}
            lora_rows.append({"model": "FLUX.1-dev shapes (zeros on the CPU)", "rank": rank,
                              **serialization_seconds(bench, real)})
            del real
        else:
            lora_rows.append({"model": "FLUX.1-dev shapes", "rank": rank,
                              "bytes": sum(s.numel() * d.itemsize for s, d in shapes.values())})
    full_state = {name: p.detach().cpu() for name, p in transformer.named_parameters()}
    return {
        "lora": lora_rows,
        "full_weights": {
            "flux_dev_bf16_bytes": module_bytes(full),
            "flux_dev_parameters": sum(p.numel() for p in full.parameters()),
            "measured_model": f"{bench.scale_name} FLUX transformer",
            "measured_bytes": module_bytes(transformer),
            "fingerprint_seconds": bench.seconds(
                lambda: weights_fingerprint(transformer.named_parameters())),
            "pickle_roundtrip_seconds": bench.seconds(
                lambda: pickle.loads(pickle.dumps(full_state, protocol=5))),
            "transport": "not measured: the gloo/NCCL broadcast itself needs several processes "
                         "(tests/test_weight_sync covers it functionally)",
        },
    }


def bottleneck_suite(bench: Bench, pipeline: FluxPipeline, model: SpatialScore) -> dict:
    return {
        "text_embeddings": text_embedding_cache(bench, pipeline),
        "rollout_precision": rollout_precision(bench, pipeline),
        "vae_decode_precision": vae_decode_precision(bench, pipeline),
        "reward_padding": reward_padding(bench, model),
        "host_syncs": host_syncs(bench, pipeline),
    }


def text_embedding_cache(bench: Bench, pipeline: FluxPipeline) -> dict:
    """A group of G = 24 spans 3 rollout batches of 8: before, each batch encoded its prompt
    (no cache was passed); now sample_groups shares one cache."""
    length = bench.scale.max_sequence_length
    cache = PromptEmbeddingCache()
    encode_prompts(pipeline, [PROMPTS[0]], length, cache)
    cold = bench.seconds(lambda: encode_prompts(pipeline, [PROMPTS[0]] * 8, length))
    warm = bench.seconds(lambda: encode_prompts(pipeline, [PROMPTS[0]] * 8, length, cache))
    return {"encode_seconds_per_batch_uncached": cold, "encode_seconds_per_batch_cached": warm,
            "saved_seconds_per_group_of_24_in_batches_of_8": 3 * cold - (cold + 2 * warm)}


def rollout_precision(bench: Bench, pipeline: FluxPipeline) -> dict:
    resolution, batch = bench.scale.resolutions[0], bench.scale.rollout_batches[-1]
    cfg = sampling(bench, resolution, batch)
    cache = PromptEmbeddingCache()
    rows = {}
    for dtype in (torch.float32, bench.dtype):
        pipeline.transformer.to(dtype)
        rows[str(dtype).removeprefix("torch.")] = bench.seconds(
            lambda: sample(pipeline, [PROMPTS[0]] * batch, range(batch), cfg,
                           output_type="pt", prompt_cache=cache))
    return {"resolution": resolution, "batch": batch, "transformer_seconds_by_dtype": rows,
            "note": "log-probs and states stay fp32 either way"}


def vae_decode_precision(bench: Bench, pipeline: FluxPipeline) -> dict:
    resolution = bench.scale.resolutions[0]
    scale = pipeline.vae_scale_factor * 2
    channels = pipeline.transformer.config.in_channels
    latents = torch.randn(4, (resolution // scale) ** 2, channels, device=bench.device)
    rows, images = {}, {}
    for dtype in (torch.float32, bench.dtype):
        pipeline.vae.to(dtype)
        name = str(dtype).removeprefix("torch.")
        rows[name] = bench.seconds(lambda: decode_latents(pipeline, latents, resolution,
                                                          resolution, output_type="pt"))
        images[name] = decode_latents(pipeline, latents, resolution, resolution, "pt").float()
    low = str(bench.dtype).removeprefix("torch.")
    return {"resolution": resolution, "batch": 4, "seconds_by_dtype": rows,
            "max_abs_pixel_difference": float((images[low] - images["float32"]).abs().max()),
            "note": "decode_latents runs the VAE in the pipeline's dtype (model.dtype)"}


def reward_padding(bench: Bench, model: SpatialScore) -> dict:
    """Score the same 32 (image, prompt) pairs in batches of 8, in arrival order and sorted
    by token length: the share of padded positions and the seconds."""
    count, batch = 32, 8
    images = reward_images(bench.scale.reward_resolution, count)
    prompts = [PROMPTS[(3 * i) % len(PROMPTS)] for i in range(count)]
    lengths = [len(model.processor.tokenizer(p).input_ids) for p in prompts]
    orders = {"arrival": list(range(count)),
              "sorted_by_length": sorted(range(count), key=lengths.__getitem__)}
    rows = {}
    for name, order in orders.items():
        chunks = [order[i:i + batch] for i in range(0, count, batch)]
        padded = total = 0
        for chunk in chunks:
            mask = model.prepare_inputs([images[i] for i in chunk],
                                        [prompts[i] for i in chunk]).attention_mask
            padded += int((mask == 0).sum())
            total += mask.numel()
        rows[name] = {"padding_fraction": padded / total, "seconds": bench.seconds(
            lambda chunks=chunks: [model.score([images[i] for i in c], [prompts[i] for i in c])
                                   for c in chunks])}
    return rows


def host_syncs(bench: Bench, pipeline: FluxPipeline) -> dict:
    if bench.device.type != "cuda":
        return {"note": "not measurable on a CPU: its ops are synchronous. On CUDA this counts "
                        "torch.cuda.set_sync_debug_mode warnings in one rollout call"}
    cfg = sampling(bench, bench.scale.resolutions[0], 1)
    cache = PromptEmbeddingCache()
    sample(pipeline, [PROMPTS[0]], [0], cfg, output_type="pt", prompt_cache=cache)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sample(pipeline, [PROMPTS[0]], [0], cfg, output_type="pt", prompt_cache=cache)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return {"syncs_per_rollout_call": len(caught), "steps": cfg.num_steps,
            "first": sorted({str(w.message)[:120] for w in caught})[:5]}


def e2e_estimate(assumed_mfu: float, gpu: str) -> dict:
    """Seconds per iteration for the paper's setting on one GPU, composed from throughput_model.py's
    FLOP model at an assumed MFU: every stage runs on the same GPU, one after another."""
    cfg = TrainConfig.model_validate({
        "grpo": {"group_size": 24, "top_k": 6},
        "sampling": {"height": 512, "width": 512, "num_steps": 16},
        "prompts": {"prompts_per_iteration": 1},
    })
    seconds = throughput_model.stage_seconds(
        cfg, {role: gpu for role in throughput_model.ROLES}, assumed_mfu)
    workload = throughput_model.Workload.from_config(cfg)
    plan = throughput_model.plan_capacity(
        {r: e.seconds for r, e in seconds.items()}, workload,
        {role: 1 for role in throughput_model.ROLES}, mode="sync")
    return {
        "kind": f"ESTIMATE from the FLOP model at an assumed {assumed_mfu:.0%} MFU on one "
                f"{gpu}, not a measurement",
        "setting": "G=24, top_k=6 (12 trained), 512 px, 16 steps, all 16 SDE steps trained, "
                   "kl_beta>0, LoRA, gradient checkpointing, 1 prompt per iteration",
        "stage_seconds_per_item": {r: {"seconds": e.seconds, "from": e.source}
                                   for r, e in seconds.items()},
        "stage_seconds_per_iteration": plan.stage_seconds,
        "seconds_per_iteration": plan.iteration_seconds,
        "published_figures": (
            "not found: Flow-GRPO's README (github.com/yifan123/flow_grpo) gives no seconds "
            "per iteration or GPU hours for FLUX.1-dev, and no DanceGRPO figure was found "
            "with the search tools; no comparison is made"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--suite", nargs="+", default=["all"],
                        choices=("rollout", "reward", "learner", "broadcast", "bottlenecks",
                                 "e2e", "all"))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--assumed-mfu", type=float, default=0.4,
                        help="for the end-to-end estimate only")
    parser.add_argument("--estimate-gpu", default="h100",
                        choices=sorted(throughput_model.GPU_PEAK_BF16))
    parser.add_argument("--out", help="default bench/results/perf_<device>_<scale>.json")
    args = parser.parse_args()
    suites = {"rollout", "reward", "learner", "broadcast", "bottlenecks", "e2e"} if (
        "all" in args.suite) else set(args.suite)
    device = torch.device(args.device)
    peak, peak_note = gpu_peak(device)
    bench = Bench(device, torch.bfloat16, args.scale, SCALES[args.scale], args.repeats, peak)
    result: dict = {"scale": args.scale, "device": peak_note, "dtype": "bfloat16",
                    "scale_settings": SCALES[args.scale].__dict__}
    if args.device == "cpu":
        result["gpu_figures"] = ("MISSING: measured on a CPU at reduced sizes only; run "
                                 "`bench/perf.py --scale full --device cuda` on a GPU")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = flux_pipeline(bench) if suites - {"reward", "e2e"} else None
        model = reward_model(bench, Path(tmp)) if suites & {"reward", "bottlenecks"} else None
        if "rollout" in suites:
            result["rollout"] = rollout_suite(bench, pipeline)
        if "reward" in suites:
            result["reward"] = reward_suite(bench, model)
        if "learner" in suites:
            result["learner"] = learner_suite(bench, pipeline)
        if "broadcast" in suites:
            result["broadcast"] = broadcast_suite(bench, pipeline)
        if "bottlenecks" in suites:
            result["bottlenecks"] = bottleneck_suite(bench, pipeline, model)
        if "rollout" in suites:  # last: compiling changes the transformer in place
            result["rollout"]["compile"] = compiled_rollout(bench, pipeline) if (
                args.compile) else "not run (pass --compile)"
    if "e2e" in suites:
        result["e2e"] = e2e_estimate(args.assumed_mfu, args.estimate_gpu)
    write_result(result, args.out or f"bench/results/perf_{args.device}_{args.scale}.json")


if __name__ == "__main__":
    main()
