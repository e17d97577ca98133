"""The main job's wiring on the shipped models (configs/local.yaml): the asynchronous Ray loop
trains the shipped shapes generator against the shipped SpatialScore served by Ray Serve,
logs the rule evaluator's held-out figures, and leaves a LoRA that loads into FluxPipeline.

The eval reward the run logged is recomputed here, outside Ray: the LoRA in diffusers, the
same held-out prompts and seeds, scored by models/spatialscore-shapes. They agree only if the
rewards came from that SpatialScore and the LoRA is the policy the loop evaluated."""

import pytest
import torch
from diffusers import FluxPipeline
from mlflow.tracking import MlflowClient

from spatialrl import storage
from spatialrl.actors.local_cluster import LocalRayHead, connected
from spatialrl.config import load_config
from spatialrl.learners.ray_backend import train_on_ray
from spatialrl.policy_evaluation import eval_metrics, sample_eval_images
from spatialrl.prompts import eval_prompts
from spatialrl.reward_functions import spatialscore
from spatialrl.run_state import checkpoint_dir

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.slow]

SHIPPED_GENERATOR, SHIPPED_SPATIALSCORE = "models/shapes-flux", "models/spatialscore-shapes"


@pytest.fixture
def local_ray():
    with connected(LocalRayHead(num_cpus=2)):
        yield


def test_main_job_trains_the_shipped_generator_against_the_shipped_spatialscore(local_ray,
                                                                              tmp_path):
    cfg = load_config("configs/local.yaml", [
        f"output_dir={tmp_path / 'run'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        "iterations=2", "eval_every=1", "checkpoint_every=0", "prompts.prompts_per_iteration=2",
        "prompts.num_eval_prompts=4", "grpo.group_size=4", "grpo.top_k=1",
    ])
    assert (cfg.model.pretrained, cfg.reward.kind, cfg.reward.spatialscore_path) == (
        SHIPPED_GENERATOR, "spatialscore", SHIPPED_SPATIALSCORE)
    run_id = train_on_ray(cfg)

    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("eval/relation_accuracy", "eval/all_relations_correct", "eval/readable_objects",
                "eval/reward_rule_agreement", "eval/reward_hacking_suspected"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 1], key
    assert {run.data.tags[t] for t in ("reward_hacking_suspected", "reward_decoupled")} <= {
        "true", "false"}
    assert "held-out, first evaluation -> last" in run.data.tags["mlflow.note.content"]

    pipeline = FluxPipeline.from_pretrained(SHIPPED_GENERATOR, torch_dtype=torch.float32)
    pipeline.load_lora_weights(storage.join(checkpoint_dir(cfg.output_dir, 1), "learner", "lora"))
    prompts = eval_prompts(cfg.prompts.eval_source, cfg.prompts.num_eval_prompts, cfg.seed)
    images = sample_eval_images(pipeline, prompts, cfg.sampling, cfg.seed)
    recomputed = eval_metrics(images, prompts, spatialscore(SHIPPED_SPATIALSCORE)(images, prompts),
                              shapes_world=True)
    logged = run.data.metrics
    assert recomputed["eval/reward_mean"] == pytest.approx(logged["eval/reward_mean"], rel=1e-3)
    assert recomputed["eval/relation_accuracy"] == pytest.approx(
        logged["eval/relation_accuracy"], abs=1e-6)
