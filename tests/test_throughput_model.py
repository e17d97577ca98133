"""The throughput calculator: its arithmetic on hand-made numbers, and the FLOP model
against torch's FLOP counter on meta-device models of the real FLUX.1-dev shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from spatialrl.cli import main
from spatialrl.config import ConfigError, load_config
from spatialrl.throughput_model import (
    FLUX_VAE_DECODE_FLOPS_PER_PIXEL,
    StageSeconds,
    Workload,
    flux_forward_flops,
    learner_flops_per_sample,
    load_measured,
    plan_capacity,
    reward_flops_per_image,
    rollout_flops_per_image,
    stage_seconds,
    workers_from_config,
)

CLUSTER_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "flux-dev-cluster.yaml"
GPUS = {"rollout": "l40s", "reward": "l4", "learner": "a100"}


def seconds(rollout: float, reward: float, learner: float) -> dict[str, float]:
    return {"rollout": rollout, "reward": reward, "learner": learner}


def test_balanced_cluster_keeps_every_stage_equally_busy():
    # 100 images at 2 s on 4 workers = 50 s; at 0.5 s on 1 worker = 50 s;
    # 50 samples at 4 s on 4 workers = 50 s.
    plan = plan_capacity(seconds(2.0, 0.5, 4.0), Workload(images=100, samples=50),
                         {"rollout": 4, "reward": 1, "learner": 4})
    assert plan.stage_seconds == pytest.approx(seconds(50.0, 50.0, 50.0))
    assert plan.iteration_seconds == pytest.approx(50.0)
    assert plan.learner_busy == pytest.approx(1.0)
    assert plan.workers_for_busy_learner == {"rollout": 4, "reward": 1}
    assert plan.images_per_second == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("workers", "bottleneck", "iteration", "needed"),
    [
        # Too few rollout workers: 100 s of sampling against 50 s of learning.
        ({"rollout": 2, "reward": 1, "learner": 4}, "rollout", 100.0, {"rollout": 4, "reward": 1}),
        # A faster learner (8 workers, 25 s) needs twice the rollout and reward workers.
        ({"rollout": 4, "reward": 1, "learner": 8}, "rollout", 50.0, {"rollout": 8, "reward": 2}),
        # A slow learner (1 worker, 200 s): one rollout and one reward worker suffice.
        ({"rollout": 4, "reward": 1, "learner": 1}, "learner", 200.0, {"rollout": 1, "reward": 1}),
    ],
)
def test_bottleneck_and_workers_for_a_busy_learner(workers, bottleneck, iteration, needed):
    plan = plan_capacity(seconds(2.0, 0.5, 4.0), Workload(images=100, samples=50), workers)
    assert plan.bottleneck == bottleneck
    assert plan.iteration_seconds == pytest.approx(iteration)
    assert plan.workers_for_busy_learner == needed
    assert plan.learner_busy == pytest.approx(plan.stage_seconds["learner"] / iteration)


def test_reward_can_be_the_bottleneck():
    plan = plan_capacity(seconds(1.0, 3.0, 1.0), Workload(images=60, samples=30),
                         {"rollout": 6, "reward": 2, "learner": 3})
    assert plan.bottleneck == "reward"  # 90 s against 10 s and 10 s
    assert plan.workers_for_busy_learner == {"rollout": 6, "reward": 18}


def test_synchronous_loop_adds_the_stages():
    plan = plan_capacity(seconds(2.0, 0.5, 4.0), Workload(images=100, samples=50),
                         {"rollout": 4, "reward": 1, "learner": 4}, mode="sync")
    assert plan.iteration_seconds == pytest.approx(150.0)
    assert plan.learner_busy == pytest.approx(1 / 3)


def test_workload_and_workers_follow_the_config():
    cfg = load_config(CLUSTER_CONFIG)
    # 8 prompts x 24 images; 8 x (6 best + 6 worst) x 1 update trained.
    assert Workload.from_config(cfg) == Workload(images=192, samples=96)
    unfiltered = load_config(CLUSTER_CONFIG, ["grpo.top_k=null", "optim.updates_per_iteration=2"])
    assert Workload.from_config(unfiltered) == Workload(images=192, samples=384)
    # Reward replicas count at the autoscaling maximum, then the fixed count.
    assert workers_from_config(cfg) == {"rollout": 16, "reward": 8, "learner": 8}
    fixed = load_config(CLUSTER_CONFIG, ["reward.serving.autoscaling=null",
                                         "reward.serving.replicas=3"])
    assert workers_from_config(fixed)["reward"] == 3


def test_flux_forward_flops_match_torch_flop_counter_on_the_real_shape():
    from diffusers import FluxTransformer2DModel

    # FLUX.1-dev's transformer config is the class default plus guidance embedding; on the
    # meta device nothing is allocated or computed, only shapes flow.
    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
        image_tokens, text_tokens = 1024, 512  # 512 x 512 px, max_sequence_length 512
        inputs = dict(
            hidden_states=torch.empty(1, image_tokens, 64),
            encoder_hidden_states=torch.empty(1, text_tokens, 4096),
            pooled_projections=torch.empty(1, 768),
            timestep=torch.ones(1),
            guidance=torch.ones(1),
            img_ids=torch.zeros(image_tokens, 3),
            txt_ids=torch.zeros(text_tokens, 3),
        )
    params = sum(p.numel() for p in model.parameters())
    assert 11.8e9 < params < 12.0e9
    with FlopCounterMode(display=False) as counter:
        model(**inputs)
    estimate = flux_forward_flops(512, 512, 512)
    assert estimate == pytest.approx(counter.get_total_flops(), rel=0.01)
    # The naive 2 * params * tokens over-counts the double-stream blocks.
    assert estimate < 0.65 * 2 * params * (image_tokens + text_tokens)


def test_vae_decode_flops_per_pixel_match_torch_flop_counter():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(  # the FLUX.1 VAE's configuration
            latent_channels=16, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False,
        )
        latents = torch.empty(1, 16, 64, 64)
    with FlopCounterMode(display=False) as counter:
        vae.decode(latents)
    assert FLUX_VAE_DECODE_FLOPS_PER_PIXEL * 512 * 512 == pytest.approx(
        counter.get_total_flops(), rel=0.02)


def test_stage_flops_are_in_a_sane_range():
    cfg = load_config(CLUSTER_CONFIG)
    one_pass = flux_forward_flops(512, 512, 512)
    # 16 transformer passes plus a few TFLOP of VAE and text encoding.
    assert 16 * one_pass < rollout_flops_per_image(cfg) < 16 * one_pass + 4e12
    # ceil(0.6 * 16) = 10 trained steps x (forward, LoRA backward, recompute, reference).
    assert learner_flops_per_sample(cfg) == pytest.approx(10 * 4 * one_pass)
    full = load_config(CLUSTER_CONFIG, ["lora.enabled=false", "grpo.kl_beta=0"])
    assert learner_flops_per_sample(full) == pytest.approx(10 * 4 * one_pass)
    # Qwen2.5-VL-7B on 324 image tokens + ~128 text tokens: ~6.5e9 LLM weights per token.
    reward = reward_flops_per_image(512, 512)
    assert 2 * 6.5e9 * 450 < reward < 2 * 8.3e9 * 600


def test_stage_seconds_prefer_measured_and_estimate_the_rest():
    cfg = load_config(CLUSTER_CONFIG)
    estimates = stage_seconds(cfg, GPUS, 0.5, StageSeconds(reward=0.25))
    assert estimates["reward"].seconds == 0.25
    assert estimates["reward"].source == "measured"
    assert estimates["rollout"].seconds == pytest.approx(
        rollout_flops_per_image(cfg) / (362e12 * 0.5))
    assert "l40s" in estimates["rollout"].source


@pytest.mark.parametrize(
    ("overrides", "gpus", "mfu", "message"),
    [
        (["rollout.gpus_per_actor=0"], GPUS, 0.4, "rollout: no GPUs per worker"),
        ([], {**GPUS, "learner": "v100"}, 0.4, "learner GPU: unknown type 'v100'"),
        ([], GPUS, 1.5, "mfu"),
        (["sampling.noise_level=0"], GPUS, 0.4, "sampling.noise_level"),
    ],
)
def test_stage_seconds_errors_name_the_problem(overrides, gpus, mfu, message):
    with pytest.raises(ConfigError, match=message):
        stage_seconds(load_config(CLUSTER_CONFIG, overrides), gpus, mfu)


def test_measured_file_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_measured(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        load_measured(bad)
    bad.write_text(json.dumps({"stage_seconds": {"rollout": 1.0, "learnr": 2.0}}))
    with pytest.raises(ConfigError, match="learnr"):
        load_measured(bad)
    bad.write_text(json.dumps({"stage_seconds": {"reward": -1}}))
    with pytest.raises(ConfigError, match="reward"):
        load_measured(bad)


def test_capacity_cli_with_measured_figures(tmp_path, capsys):
    # 192 images x 1 s / 16 = 12 s; 192 x 0.5 s / 8 = 12 s; 96 samples x 2 s / 8 = 24 s.
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps(
        {"stage_seconds": {"rollout": 1.0, "reward": 0.5, "learner": 2.0}, "device": "test"}))
    assert main(["capacity", "--config", str(CLUSTER_CONFIG), "--measured", str(measured)]) == 0
    out = capsys.readouterr().out
    assert "iteration: 24 s (async), bottleneck: learner, learner busy 100%" in out
    assert "keep the learner busy: rollout 8, reward 4" in out

    assert main(["capacity", "--config", str(CLUSTER_CONFIG), "--measured",
                 str(tmp_path / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err
