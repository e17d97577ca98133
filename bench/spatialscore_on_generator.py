"""Does a SpatialScore judge the generator's own images as the rule evaluator does? The RL
reward only helps where it does (bench/spatial_rl.py found the shipped one agreeing on about
0.6 of the pairs, and barely penalising a missing object).

Samples --prompts held-out shapes prompts (the final prompts of bench/spatial_rl.py) from
the generator with the ODE sampler of configs/local.yaml, and reports for each SpatialScore:
- reward_rule_agreement: of the image pairs the rule evaluator tells apart, the fraction the
  SpatialScore orders the same way (0.5 is chance);
- mu for images with every named object readable and for the others, and the AUC of mu
  separating them (0.5 is chance);
- the rule evaluator's own figures of the images, once.

    OMP_NUM_THREADS=1 .venv/bin/python bench/spatialscore_on_generator.py \
        --spatialscore models/spatialscore-shapes [OTHER_SPATIALSCORE ...]

Writes bench/results/spatialscore_on_generator.json (or --out).
"""

from __future__ import annotations

import argparse

import numpy as np
from results_file import write_result

from spatialrl.config import load_config
from spatialrl.data.rule_evaluator import evaluate
from spatialrl.flux.loading import load_flux_pipeline
from spatialrl.policy_evaluation import eval_metrics, rule_figures, sample_eval_images
from spatialrl.prompts import eval_prompts
from spatialrl.reward_functions import spatialscore


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties one half."""
    if not len(positive) or not len(negative):
        return float("nan")
    diff = positive[:, None] - negative[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def judge(path: str, images, prompts, readable: np.ndarray) -> dict[str, float]:
    scores = spatialscore(path)(images, prompts)
    mu = scores.mu.numpy()
    return {
        "reward_rule_agreement": eval_metrics(images, prompts, scores, shapes_world=True)[
            "eval/reward_rule_agreement"],
        "mu_readable": float(mu[readable].mean()),
        "mu_object_missing": float(mu[~readable].mean()),
        "auc_readable_vs_missing": auc(mu[readable], mu[~readable]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spatialscore", nargs="+", default=["models/spatialscore-shapes"])
    parser.add_argument("--generator", default="models/shapes-flux")
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--prompt-seed", type=int, default=1000)
    parser.add_argument("--out", default="bench/results/spatialscore_on_generator.json")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"model.pretrained={args.generator}"])
    prompts = eval_prompts("shapes", args.prompts, args.prompt_seed)
    images = sample_eval_images(load_flux_pipeline(cfg.model), prompts, cfg.sampling, cfg.seed)
    readable = np.array([all(evaluate(im, p).objects_found) for im, p in zip(images, prompts,
                                                                             strict=True)])
    write_result({
        "generator": args.generator, "prompts": args.prompts, "prompt_seed": args.prompt_seed,
        "eval_num_steps": cfg.sampling.eval_num_steps,
        "rule_figures": rule_figures(images, prompts),
        "spatialscores": {path: judge(path, images, prompts, readable)
                          for path in args.spatialscore},
    }, args.out)


if __name__ == "__main__":
    main()
