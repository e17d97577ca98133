"""Best-of-N in the shapes world: does ranking N candidates by a reward pick images that the
rule evaluator judges correct more often than one sample is? Writes
bench/results/best_of_n.json.

    OMP_NUM_THREADS=1 .venv/bin/python bench/best_of_n.py [--prompts 100] [--n 8] \
        [--spatialscore NAME=CKPT ...]

Candidates: a tiny random FLUX draws no shapes, so the policy here is the shapes-world stand-in
(spatialrl.generation.ShapesCandidates): each candidate renders the prompt's scene with every
reversible relation reversed independently with probability --relation-error-rate. Prompts
are held-out test-split prompts (unseen colour/shape combinations). Every ranker sees the same
candidates:
- shapes_rule: the rule evaluator ranks with the judge's own reading of the pixels. This
  shows the mechanics and the ceiling, not the worth of a learned reward.
- spatialscore-random: an untrained tiny SpatialScore, the control (should be near one sample).
- each --spatialscore NAME=CKPT: a SpatialScore checkpoint, e.g. one from
  `spatialrl reward train` on shapes-world pairs or a `spatialrl reward package` folder.
Per ranker: the best-of-N rate (share of prompts whose pick the evaluator judges fully
correct) and mean relation accuracy of the picks, beside the single-sample rates (share of all
candidates judged fully correct: the expected rate of one sample). With --pairs, each
SpatialScore's held-out pairwise accuracy on that file's test split, to read the rates by.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from results_file import write_result

from spatialrl.commands.tiny_models import write_tiny_models
from spatialrl.config import RewardConfig
from spatialrl.data.pairs import read_pairs
from spatialrl.data.rule_evaluator import evaluate
from spatialrl.data.shapes import sample_prompts
from spatialrl.generation import ShapesCandidates, best_index, candidate_seeds
from spatialrl.reward import SpatialScore, SpatialScoreConfig
from spatialrl.reward.evaluation import accuracy_summary, score_pairs
from spatialrl.reward_functions import build_reward, reward_version
from spatialrl.service.config import ShapesGeneratorConfig

REPO = Path(__file__).resolve().parents[1]


def random_spatialscore(workdir: Path) -> Path:
    models = write_tiny_models(workdir / "tiny-models")
    torch.manual_seed(0)
    return SpatialScore.from_config(SpatialScoreConfig(
        base_model=str(models["qwen2.5-vl"]), dtype="float32", head_hidden_size=32,
    )).save_pretrained(workdir / "spatialscore-random")


def rankers(args, workdir: Path) -> dict[str, RewardConfig]:
    configs = {"shapes_rule": RewardConfig(kind="shapes_rule"),
               "spatialscore-random": RewardConfig(
                   kind="spatialscore", spatialscore_path=str(random_spatialscore(workdir)))}
    for entry in args.spatialscore:
        name, _, path = entry.partition("=")
        configs[name] = RewardConfig(kind="spatialscore", spatialscore_path=path)
    return configs


def pairwise_accuracy(cfg: RewardConfig, pairs_file: str | None) -> float | None:
    if cfg.kind != "spatialscore" or pairs_file is None:
        return None
    model = SpatialScore.from_pretrained(cfg.spatialscore_path)
    records = score_pairs(model, read_pairs(pairs_file, "test").pairs, batch_size=16)
    return accuracy_summary(records)["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--relation-error-rate", type=float, default=0.5)
    parser.add_argument("--spatialscore", action="append", default=[], metavar="NAME=CKPT")
    parser.add_argument("--pairs", help="shapes-world pairs parquet (test split) to measure "
                        "each SpatialScore's pairwise accuracy on")
    parser.add_argument("--out", default=str(REPO / "bench/results/best_of_n.json"))
    args = parser.parse_args()

    sampler = ShapesCandidates(ShapesGeneratorConfig(relation_error_rate=args.relation_error_rate))
    prompts = sample_prompts(args.prompts, seed=args.seed, split="test")
    start = time.perf_counter()
    candidates = [sampler(prompt, candidate_seeds(1000 * i, args.n))
                  for i, prompt in enumerate(prompts)]
    sampling_s = time.perf_counter() - start
    judged = [[evaluate(image, prompt) for image in images]
              for prompt, images in zip(prompts, candidates, strict=True)]
    correct = np.array([[j.all_correct for j in row] for row in judged], dtype=float)
    accuracy = np.array([[j.accuracy for j in row] for row in judged])

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in rankers(args, Path(tmp)).items():
            reward = build_reward(cfg)
            start = time.perf_counter()
            picks = [best_index(reward(images, [prompt] * args.n).mu.tolist())
                     for prompt, images in zip(prompts, candidates, strict=True)]
            ranking_s = time.perf_counter() - start
            rows = np.arange(len(prompts))
            results[name] = {
                "reward_version": reward_version(cfg),
                "checkpoint": cfg.spatialscore_path,
                "heldout_pairwise_accuracy": pairwise_accuracy(cfg, args.pairs),
                "best_of_n_all_correct_rate": float(correct[rows, picks].mean()),
                "best_of_n_relation_accuracy": float(accuracy[rows, picks].mean()),
                "ranking_s": ranking_s,
            }
    write_result({
        "what": f"best-of-{args.n} vs one sample on {args.prompts} held-out shapes-world "
                "prompts; candidates from the shapes-world stand-in policy; judged by the rule "
                "evaluator",
        "n": args.n,
        "prompts": args.prompts,
        "relation_error_rate": args.relation_error_rate,
        "single_sample_all_correct_rate": float(correct.mean()),
        "single_sample_relation_accuracy": float(accuracy.mean()),
        "sampling_s": sampling_s,
        "rankers": results,
    }, args.out)


if __name__ == "__main__":
    main()
