"""What `spatialrl eval-policy` reports of a policy: each side's figures (the base pipeline's,
and with a LoRA its own), read by the benchmark's judge and optionally SpatialScore, and the
difference per figure. One record feeds the JSON report, the printed table, the MLflow
metrics and the captioned image grid."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from PIL import Image

from spatialrl.data.judge import Judgement, ObjectLocator
from spatialrl.eval_policy_config import EvalPolicyConfig
from spatialrl.policy_evaluation import judge_images, judged_figures
from spatialrl.position_benchmark import PositionBenchmark
from spatialrl.reward_functions import RewardFn, RewardOutput
from spatialrl.tracking import Tracker

DIFFERENCE = "lora_minus_base"
GRID_KEY = "eval-policy/samples"


@dataclass(frozen=True)
class JudgedSide:
    """One policy's images of a benchmark and what was read from them."""

    images: list[Image.Image]
    judgements: list[Judgement]  # one per image
    figures: dict[str, float]
    scores: RewardOutput | None  # SpatialScore's, when one was given


def judge_side(images: list[Image.Image], benchmark: PositionBenchmark, locator: ObjectLocator,
               spatialscore: RewardFn | None, batch_size: int) -> JudgedSide:
    judged = judge_images(images, benchmark.scenes, locator, benchmark.rule)
    figures = judged_figures(benchmark.scenes, judged)
    scores = None
    if spatialscore is not None:
        scores = score_in_batches(spatialscore, images, benchmark.prompts, batch_size)
        figures |= {"spatialscore_mu": float(scores.mu.mean()),
                    "spatialscore_sigma": float(scores.sigma.mean())}
    return JudgedSide(images, [judgement for judgement, _ in judged], figures, scores)


def score_in_batches(reward: RewardFn, images: list[Image.Image], prompts: list[str],
                     batch_size: int) -> RewardOutput:
    parts = [reward(images[start:start + batch_size], prompts[start:start + batch_size])
             for start in range(0, len(images), batch_size)]
    return RewardOutput(mu=torch.cat([p.mu for p in parts]),
                        sigma=torch.cat([p.sigma for p in parts]))


def report_record(cfg: EvalPolicyConfig, benchmark: PositionBenchmark,
                  sides: dict[str, JudgedSide]) -> dict:
    """The settings, the benchmark and each side's figures; with a LoRA, lora - base too."""
    figures = {name: side.figures for name, side in sides.items()}
    record = {"settings": cfg.model_dump(mode="json"), "benchmark": benchmark.name,
              "prompts": len(benchmark.prompts), "figures": figures}
    if "lora" in figures:
        record[DIFFERENCE] = {key: figures["lora"][key] - base
                              for key, base in figures["base"].items() if key in figures["lora"]}
    return record


def report_columns(record: dict) -> dict[str, dict[str, float]]:
    """base, lora and lora_minus_base (those present): figure name -> value."""
    return record["figures"] | ({DIFFERENCE: record[DIFFERENCE]} if DIFFERENCE in record else {})


def report_metrics(record: dict) -> dict[str, float]:
    """Every figure of every column as an MLflow metric: base/..., lora/..., lora_minus_base/..."""
    return {f"{column}/{name}": value for column, figures in report_columns(record).items()
            for name, value in figures.items()}


def figure_table(record: dict) -> str:
    columns = report_columns(record)
    names = list(dict.fromkeys(name for figures in columns.values() for name in figures))
    width = max(map(len, names))
    lines = [f"{record['benchmark']}, {record['prompts']} prompts",
             f"{'figure':<{width}}" + "".join(f"{column:>17}" for column in columns)]
    for name in names:
        cells = [_cell(figures.get(name, math.nan), column == DIFFERENCE)
                 for column, figures in columns.items()]
        lines.append(f"{name:<{width}}" + "".join(f"{cell:>17}" for cell in cells))
    return "\n".join(lines)


def _cell(value: float, signed: bool) -> str:
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def log_report(tracker: Tracker, record: dict, sides: dict[str, JudgedSide], prompts: list[str],
               grid_prompts: int) -> None:
    """Metrics, the first `grid_prompts` prompts' images (each side's side by side) and the
    JSON report into the run."""
    tracker.log_metrics(report_metrics(record), step=0)
    images, captions = grid_cells(sides, prompts[:grid_prompts])
    tracker.log_image_grid(images, captions, GRID_KEY, step=0)
    tracker.log_text(json.dumps(record, indent=2) + "\n", "report.json")


def grid_cells(sides: dict[str, JudgedSide], prompts: list[str]
               ) -> tuple[list[Image.Image], list[str]]:
    """Each prompt's image from every side in turn, captioned with the side, what the judge
    read and SpatialScore's score."""
    images, captions = [], []
    for index, prompt in enumerate(prompts):
        for name, side in sides.items():
            images.append(side.images[index])
            captions.append(f"{name}: {_verdict(side, index)}\n{prompt}")
    return images, captions


def _verdict(side: JudgedSide, index: int) -> str:
    checked = side.judgements[index].checked
    verdict = f"{sum(checked)}/{len(checked)} relations hold"
    if side.scores is not None:
        verdict += (f", SpatialScore {side.scores.mu[index]:.2f} "
                    f"(sigma {side.scores.sigma[index]:.2f})")
    return verdict
