"""Policy evaluation: deterministic ODE samples on held-out prompts, scored by the reward and by
a judge that reads relations from pixels: the rule evaluator for shapes-world prompts, a
detector for real objects (`position_figures` takes either, spatialrl.data.judge)."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
from PIL import Image

from spatialrl.config import SamplingConfig
from spatialrl.data.geometry import relation_holds
from spatialrl.data.grammar import CONVERSE, Relation, Scene, parse_prompt, scene_to_prompt
from spatialrl.data.judge import ColourLocator, Judgement, ObjectLocator, RelationRule, judge
from spatialrl.flux.sampler import sample
from spatialrl.prompts import EvalTasks
from spatialrl.reward_functions import RewardOutput, shapes_soft
from spatialrl.rollout import rollout_seed

log = logging.getLogger(__name__)


def sample_eval_images(
    pipeline, prompts: list[str], cfg: SamplingConfig, seed: int,
    sources: list[Image.Image] | None = None,
) -> list[Image.Image]:
    """ODE samples (edits of `sources`, if given) with fixed seeds (iteration -1), so
    evaluations at different versions see the same noise."""
    seeds = [rollout_seed(seed, -1, p, 0) for p in prompts]
    images = []
    for start in range(0, len(prompts), cfg.batch_size):
        end = start + cfg.batch_size
        _, batch = sample(
            pipeline, prompts[start:end], seeds[start:end], cfg,
            noise_level=0.0, num_steps=cfg.eval_num_steps,
            condition_images=None if sources is None else sources[start:end],
            kontext_resolution=cfg.kontext_resolution,
        )
        images.extend(batch)
    return images


def eval_metrics(
    images: list[Image.Image], prompts: list[str], scores: RewardOutput, shapes_world: bool
) -> dict[str, float]:
    """The reward's mean and, for shapes-world prompts, the rule evaluator's figures and how
    well the reward orders the images as the rule evaluator does."""
    metrics = {"eval/reward_mean": float(scores.mu.mean())}
    if shapes_world:
        scenes = [parse_prompt(prompt) for prompt in prompts]
        judged = judge_images(images, scenes, ColourLocator())
        accuracy = np.array([_accuracy(j) for j, _ in judged])
        figures = judged_figures(scenes, judged)
        metrics |= {f"eval/{name}": value for name, value in figures.items()}
        metrics["eval/relation_accuracy_se"] = float(accuracy.std() / np.sqrt(len(accuracy)))
        metrics["eval/soft_relation_score"] = float(shapes_soft(images, prompts).mu.mean())
        metrics["eval/reward_rule_agreement"] = pairwise_agreement(scores.mu.numpy(), accuracy)
    return metrics


def edit_eval_metrics(images: list[Image.Image], scores: RewardOutput,
                      examples: list | None) -> dict[str, float]:
    """Held-out edits: the reward's mean over the answers that parsed and their share and,
    for shapes-world edits (`examples`, their ground truth), the rule evaluator's figures
    (`edit_rule_figures`)."""
    mu = scores.mu.numpy()
    valid = np.isfinite(mu)
    metrics = {"eval/reward_mean": float(mu[valid].mean()) if valid.any() else float("nan"),
               "eval/reward_valid_fraction": float(valid.mean())}
    if examples is not None:
        metrics |= {f"eval/{k}": v for k, v in edit_rule_figures(images, examples).items()}
    return metrics


def edit_rule_figures(images: list[Image.Image], examples: list) -> dict[str, float]:
    """What the rule evaluator reads from edits of shapes-world edit examples
    (spatialrl.spatialreward.edit_examples): edit success (every edit of the instruction
    made) with its standard error, the fraction of edits made, the over-editing rate (images
    that change an object the instruction does not name), edits both successful and free of
    over-editing (edit_correct), and the share of edits made per kind (edits_done/<kind>)."""
    done = [example.edits_done(image) for example, image in zip(examples, images, strict=True)]
    success = np.array([all(d) for d in done], dtype=float)
    over = np.array([e.unasked_changes(image) > 0
                     for e, image in zip(examples, images, strict=True)], dtype=float)
    figures = {
        "edit_success": float(success.mean()),
        "edit_success_se": float(success.std() / np.sqrt(len(success))),
        "edits_done": float(np.mean([x for d in done for x in d])),
        "over_editing": float(over.mean()),
        # Success without collateral change: an image that is noise "removes" every object.
        "edit_correct": float((success * (1 - over)).mean()),
    }
    by_kind: dict[str, list[bool]] = {}
    for example, made in zip(examples, done, strict=True):
        for kind, x in zip(example.kinds, made, strict=True):
            by_kind.setdefault(kind, []).append(x)
    return figures | {f"edits_done/{kind}": float(np.mean(xs))
                      for kind, xs in sorted(by_kind.items())}


def task_eval_metrics(task: str, images: list[Image.Image], tasks: EvalTasks,
                      scores: RewardOutput, shapes_world: bool) -> dict[str, float]:
    """The held-out figures of a task (PromptsConfig.task): edit figures for edits."""
    if task == "edit":
        return edit_eval_metrics(images, scores, tasks.edit_examples)
    return eval_metrics(images, tasks.prompts, scores, shapes_world)


def pairwise_agreement(reward: np.ndarray, rule_accuracy: np.ndarray) -> float:
    """Of the image pairs the rule evaluator tells apart, the fraction the reward orders the
    same way (a reward tie counts one half): 1 agrees fully, 0.5 is chance. NaN when the rule
    evaluator tells no pair apart."""
    rule = np.sign(rule_accuracy[:, None] - rule_accuracy[None, :])
    same = np.sign(reward[:, None] - reward[None, :]) * rule
    told_apart = rule != 0
    if not told_apart.any():
        return float("nan")
    return float(((same[told_apart] + 1) / 2).mean())


# The held-out figures a run's last line compares, first evaluation against last.
SUMMARY_FIGURES = ("eval/relation_accuracy", "eval/all_relations_correct",
                   "eval/readable_objects", "eval/edit_success", "eval/edits_done",
                   "eval/over_editing",
                   "eval/reward_mean", "eval/reward_rule_agreement")
# The rule evaluator's figure that the hacking watch follows, per task.
RULE_FIGURE = {"text_to_image": "eval/relation_accuracy", "edit": "eval/edit_success"}
# A reward that orders held-out image pairs as the rule evaluator does this often or less
# (0.5 is a coin) no longer tells the rule evaluator's better images from its worse ones.
AGREEMENT_AT_CHANCE = 0.55


class RewardHackingWatch:
    """Flags two signs that the policy learns the reward and not the task.

    - Suspected hacking: the reward rising while the rule evaluator's figure falls. Each
      evaluation is compared with the one where the rule figure peaked: a higher reward mean
      with a figure lower by more than two standard errors of the difference.
    - A decoupled reward: the reward mean above the first evaluation's while the reward orders
      the held-out images no better than chance as the rule evaluator does
      (eval/reward_rule_agreement <= AGREEMENT_AT_CHANCE). This catches what the first
      misses: a reward that rises by changing what the rule evaluator does not judge (issue
      20's 150-iteration run: mu +5.7, relation accuracy flat, agreement 0.665 -> 0.493).
    Shapes-world evaluations only (they carry the figures and their standard errors):
    eval/relation_accuracy for text-to-image, eval/edit_success for edits."""

    def __init__(self, rule_figure: str = "eval/relation_accuracy") -> None:
        self.rule_figure = rule_figure
        self.peak: dict[str, float] | None = None
        self.first: dict[str, float] | None = None
        self.last: dict[str, float] | None = None
        self.suspected_at: list[int] = []
        self.decoupled_at: list[int] = []

    def update(self, metrics: dict[str, float], iteration: int) -> dict[str, float]:
        rule, se = self.rule_figure, f"{self.rule_figure}_se"
        if rule not in metrics:
            return {}
        now = {k: metrics[k] for k in (*SUMMARY_FIGURES, se) if k in metrics}
        self.first = self.first or now
        self.last = now
        if self.peak is None or now[rule] >= self.peak[rule]:
            self.peak = now
        margin = 2 * np.hypot(now[se], self.peak[se])
        suspected = (now["eval/reward_mean"] > self.peak["eval/reward_mean"]
                     and now[rule] < self.peak[rule] - margin)
        if suspected:
            self.suspected_at.append(iteration)
            log.warning("iteration %d: the reward rose (%.4g -> %.4g) while held-out %s fell "
                        "(%.3f -> %.3f) since its peak: possible reward hacking",
                        iteration + 1, self.peak["eval/reward_mean"], now["eval/reward_mean"],
                        rule.removeprefix("eval/"), self.peak[rule], now[rule])
        return {"eval/reward_hacking_suspected": float(suspected),
                **self._decoupled(now, iteration)}

    def _decoupled(self, now: dict[str, float], iteration: int) -> dict[str, float]:
        agreement = now.get("eval/reward_rule_agreement", float("nan"))
        if not np.isfinite(agreement):  # absent (edits), or no pair told apart
            return {}
        decoupled = (now["eval/reward_mean"] > self.first["eval/reward_mean"]
                     and agreement <= AGREEMENT_AT_CHANCE)
        if decoupled:
            self.decoupled_at.append(iteration)
            log.warning("iteration %d: the reward rose (%.4g -> %.4g) but orders held-out "
                        "images as the rule evaluator does only %.3f of the time (0.5 is "
                        "chance): the reward no longer follows the task",
                        iteration + 1, self.first["eval/reward_mean"], now["eval/reward_mean"],
                        agreement)
        return {"eval/reward_decoupled": float(decoupled)}

    def tags(self) -> dict[str, str]:
        return {"reward_hacking_suspected": str(bool(self.suspected_at)).lower(),
                "reward_decoupled": str(bool(self.decoupled_at)).lower()}

    def summary(self) -> str:
        """One line for the end of a run: the held-out figures first and last, and the verdict."""
        if self.first is None or self.last is None:
            return "no shapes-world evaluation ran"
        parts = [f"{name.removeprefix('eval/')} {self.first[name]:.4g} -> {self.last[name]:.4g}"
                 for name in SUMMARY_FIGURES if name in self.first and name in self.last]
        verdicts = [f"{what} at iterations {[i + 1 for i in when]}" for what, when in (
            ("possible reward hacking", self.suspected_at),
            ("reward decoupled from the rule evaluator", self.decoupled_at)) if when]
        verdict = "; ".join(verdicts) or "no reward hacking seen"
        return "held-out, first evaluation -> last: " + ", ".join(parts) + f"; {verdict}"


def reversed_prompt(prompt: str) -> str:
    """The prompt with every relation stating its opposite ("next to" has none and stays):
    how often an image satisfies it is the chance level of getting all relations right."""
    return scene_to_prompt(reversed_scene(parse_prompt(prompt)))


def reversed_scene(scene: Scene) -> Scene:
    relations = tuple(
        Relation(r.subject_index, CONVERSE[r.predicate], r.object_index) for r in scene.relations
    )
    return replace(scene, relations=relations)


def rule_figures(images: list[Image.Image], prompts: list[str]) -> dict[str, float]:
    """What the rule evaluator reads from a generator's images of shapes-world prompts."""
    return position_figures(images, [parse_prompt(p) for p in prompts], ColourLocator())


def position_figures(
    images: list[Image.Image],
    scenes: list[Scene],
    locator: ObjectLocator,
    rule: RelationRule = relation_holds,
) -> dict[str, float]:
    """What a judge reads from a generator's images: every named object found, every relation
    it can check right, the fraction of those right, per relation, and the chance reference
    (every relation reversed, yet all hold). `checkable_relations` is the share of relations
    the judge can check at all (1 for the rule evaluator; boxes tell no depth or support)."""
    return judged_figures(scenes, judge_images(images, scenes, locator, rule))


def judge_images(
    images: list[Image.Image],
    scenes: list[Scene],
    locator: ObjectLocator,
    rule: RelationRule = relation_holds,
) -> list[tuple[Judgement, Judgement]]:
    """(judgement of each image, of the same objects against the reversed scene)."""
    located = locator.locate(images, scenes)
    return [(judge(objects, scene, locator.checkable, rule),
             judge(objects, reversed_scene(scene), locator.checkable, rule))
            for objects, scene in zip(located, scenes, strict=True)]


def _accuracy(judged: Judgement) -> float:
    """The fraction of the relations that can be checked that hold; NaN if none can."""
    return float(np.mean(judged.checked)) if judged.checked else float("nan")


def judged_figures(scenes: list[Scene], judged: list[tuple[Judgement, Judgement]]
                   ) -> dict[str, float]:
    """position_figures of images already judged (judge_images)."""
    by_predicate: dict[str, list[bool]] = {}
    for scene, (judgement, _) in zip(scenes, judged, strict=True):
        for relation, holds in zip(scene.relations, judgement.per_relation, strict=True):
            if holds is not None:
                by_predicate.setdefault(relation.predicate.value, []).append(holds)
    per_relation = [h for judgement, _ in judged for h in judgement.per_relation]
    return {
        "readable_objects": float(np.mean([all(j.objects_found) for j, _ in judged])),
        "all_relations_correct": float(np.mean([j.satisfied for j, _ in judged])),
        "relation_accuracy": float(np.nanmean([_accuracy(j) for j, _ in judged])),
        "all_reversed_relations_hold": float(np.mean([r.satisfied for _, r in judged])),
        "checkable_relations": float(np.mean([h is not None for h in per_relation])),
    } | {f"relation/{name}": float(np.mean(held)) for name, held in sorted(by_predicate.items())}


def summary_line(metrics: dict[str, float]) -> str:
    """The headline metrics of one training iteration, for its log line."""
    keys = ("reward/mean", "filter/kept_fraction", "learn/policy_loss", "staleness/mean",
            "eval/reward_mean", "eval/relation_accuracy", "eval/all_relations_correct",
            "eval/readable_objects", "eval/reward_rule_agreement", "throughput/images_per_s")
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
