"""Policy evaluation: deterministic ODE samples on held-out prompts, scored by the reward
and, for shapes-world prompts, by the rule evaluator that reads relations from pixels."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from spatialrl.config import SamplingConfig
from spatialrl.flux.sampler import sample
from spatialrl.rewards import RewardFn, RewardOutput, shapes_rule, shapes_soft
from spatialrl.rollout import rollout_seed


@dataclass
class EvalResult:
    metrics: dict[str, float]
    images: list[Image.Image]


def sample_eval_images(
    pipeline, prompts: list[str], cfg: SamplingConfig, seed: int
) -> list[Image.Image]:
    """ODE samples with fixed seeds (iteration -1), so evaluations at different versions see
    the same noise."""
    seeds = [rollout_seed(seed, -1, p, 0) for p in prompts]
    images = []
    for start in range(0, len(prompts), cfg.batch_size):
        end = start + cfg.batch_size
        _, batch = sample(
            pipeline, prompts[start:end], seeds[start:end], cfg,
            noise_level=0.0, num_steps=cfg.eval_num_steps,
        )
        images.extend(batch)
    return images


def eval_metrics(
    images: list[Image.Image], prompts: list[str], scores: RewardOutput, shapes_world: bool
) -> dict[str, float]:
    metrics = {"eval/reward_mean": float(scores.mu.mean())}
    if shapes_world:
        accuracy = shapes_rule(images, prompts).mu
        metrics["eval/relation_accuracy"] = float(accuracy.mean())
        metrics["eval/all_relations_correct"] = float((accuracy == 1.0).float().mean())
        metrics["eval/soft_relation_score"] = float(shapes_soft(images, prompts).mu.mean())
    return metrics


def evaluate_policy(
    pipeline, prompts: list[str], reward: RewardFn, cfg: SamplingConfig, seed: int,
    shapes_world: bool,
) -> EvalResult:
    images = sample_eval_images(pipeline, prompts, cfg, seed)
    return EvalResult(eval_metrics(images, prompts, reward(images, prompts), shapes_world), images)
