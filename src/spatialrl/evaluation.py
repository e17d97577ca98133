"""Policy evaluation: deterministic ODE samples on held-out prompts, scored by the reward
and, for shapes-world prompts, by the rule evaluator that reads relations from pixels."""

from __future__ import annotations

import numpy as np
from PIL import Image

from spatialrl.config import SamplingConfig
from spatialrl.data.evaluate import evaluate
from spatialrl.data.grammar import CONVERSE, Relation, Scene, parse_prompt, scene_to_prompt
from spatialrl.flux.sampler import sample
from spatialrl.rewards import RewardOutput, shapes_rule, shapes_soft
from spatialrl.rollout import rollout_seed


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


def reversed_prompt(prompt: str) -> str:
    """The prompt with every relation stating its opposite ("next to" has none and stays):
    how often an image satisfies it is the chance level of getting all relations right."""
    scene = parse_prompt(prompt)
    relations = tuple(
        Relation(r.subject_index, CONVERSE[r.predicate], r.object_index) for r in scene.relations
    )
    return scene_to_prompt(Scene(scene.objects, relations))


def rule_figures(images: list[Image.Image], prompts: list[str]) -> dict[str, float]:
    """What the rule evaluator reads from a generator's images of shapes-world prompts:
    every named object readable, every relation right, the fraction of relations right, and
    the chance reference (every relation reversed, yet all hold)."""
    results = [evaluate(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
    reversed_results = [
        evaluate(image, reversed_prompt(prompt))
        for image, prompt in zip(images, prompts, strict=True)
    ]
    by_predicate: dict[str, list[bool]] = {}
    for prompt, result in zip(prompts, results, strict=True):
        for relation, holds in zip(parse_prompt(prompt).relations, result.per_relation,
                                   strict=True):
            by_predicate.setdefault(relation.predicate.value, []).append(holds)
    return {
        "readable_objects": float(np.mean([all(r.objects_found) for r in results])),
        "all_relations_correct": float(np.mean([r.all_correct for r in results])),
        "relation_accuracy": float(np.mean([r.accuracy for r in results])),
        "all_reversed_relations_hold": float(np.mean([r.all_correct for r in reversed_results])),
    } | {f"relation/{name}": float(np.mean(held)) for name, held in sorted(by_predicate.items())}
