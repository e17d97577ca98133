"""The mission in miniature: does filtered GRPO make the shipped shapes generator place
objects where the prompt says? Judged by the rule evaluator, which no model ever sees.

Each arm trains a fresh LoRA on models/shapes-flux with the in-process loop (the stages the
Ray loop distributes), at equal images sampled, and differs from configs/local.yaml only in
its reward and filter:

    spatialscore          the learned SpatialScore, top-k/bottom-k (k = G/4, the paper's)
    spatialscore_all      the learned SpatialScore, no filtering (all G)
    win_probability       the learned SpatialScore, uncertainty-aware win-rate advantages
    oracle                the rule evaluator as the reward (the upper reference), top-k
    oracle_all            the rule evaluator, no filtering

During training each arm is evaluated on the trainer's held-out prompts (learning curves
against images sampled and training seconds, logged to MLflow too); at the end the base and
every arm are compared on --final-prompts other held-out prompts (test-split scenes: colour
and shape combinations that neither RL nor SpatialScore training saw): fully correct,
accuracy per relation, readable objects, mean SpatialScore mu.

    OMP_NUM_THREADS=1 .venv/bin/python bench/spatial_rl.py [--iterations 40] [--arms ...]

Finished arms are kept in --work and skipped by a rerun (a session may end mid-way).
Results: bench/results/spatial_rl.json and bench/results/spatial_rl.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from results_file import write_result

from spatialrl.config import TrainConfig, load_config
from spatialrl.flux.loading import load_flux_pipeline
from spatialrl.inprocess import InProcessTrainer
from spatialrl.policy_evaluation import rule_figures, sample_eval_images
from spatialrl.prompts import eval_prompts
from spatialrl.reward_functions import spatialscore
from spatialrl.tracking import Tracker

SPATIALSCORE = "models/spatialscore-shapes"
ARMS = {
    "spatialscore": ["reward.kind=spatialscore"],
    "spatialscore_all": ["reward.kind=spatialscore", "grpo.top_k=null"],
    "win_probability": ["reward.kind=spatialscore", "grpo.group_reward=win_probability"],
    "oracle": ["reward.kind=shapes_rule"],
    "oracle_all": ["reward.kind=shapes_rule", "grpo.top_k=null"],
}
CURVE_KEYS = ("eval/all_relations_correct", "eval/relation_accuracy", "eval/readable_objects",
              "eval/reward_mean", "eval/reward_rule_agreement")


def arm_config(args: argparse.Namespace, arm: str) -> TrainConfig:
    return load_config(args.config, [
        *ARMS[arm], f"reward.spatialscore_path={args.spatialscore}",
        f"iterations={args.iterations}", f"eval_every={args.eval_every}", "checkpoint_every=0",
        f"prompts.num_eval_prompts={args.eval_prompts}", f"output_dir={args.work / arm}",
        f"mlflow.experiment={args.experiment}", f"mlflow.run_name=bench {arm}",
        *args.set,
    ])


def final_prompts(cfg: TrainConfig, count: int, seed: int) -> list[str]:
    """The held-out prompts of the final comparison: the shapes world's test split with their
    own seed, or from a prompt file the rows after the ones the trainer evaluates on."""
    source, skip = cfg.prompts.eval_source, cfg.prompts.num_eval_prompts
    if source == "shapes":
        return eval_prompts(source, count, seed)
    prompts = eval_prompts(source, skip + count, seed)[skip:]
    if len(prompts) < count:
        raise SystemExit(f"{source}: {len(prompts)} prompts after the trainer's {skip}, "
                         f"fewer than --final-prompts {count}")
    return prompts


def final_images(pipeline, cfg: TrainConfig, prompts: list[str], where: Path) -> str:
    """The policy's ODE samples of the final prompts, [N, H, W, 3] uint8, saved to `where`;
    returns that path."""
    images = sample_eval_images(pipeline, prompts, cfg.sampling, seed=cfg.seed)
    np.save(where, np.stack([np.asarray(image) for image in images]))
    return str(where)


def final_figures(pixels: np.ndarray, prompts: list[str], score) -> dict[str, float]:
    """The rule evaluator's figures and the mean SpatialScore mu on the final prompts."""
    images = [Image.fromarray(p) for p in pixels]
    return rule_figures(images, prompts) | {
        "spatialscore_mu": float(score(images, prompts).mu.mean())}


def learning_curve(history: list[dict[str, float]], images_per_iteration: int) -> list[dict]:
    """One point per evaluation: images sampled and training seconds (evaluation excluded)
    so far, and the held-out figures."""
    points, seconds = [], 0.0
    for iteration, metrics in enumerate(history):
        seconds += sum(metrics[k] for k in ("time/rollout_s", "time/reward_s", "time/learn_s"))
        if "eval/all_relations_correct" in metrics:
            points.append({"iteration": iteration,
                           "images_sampled": (iteration + 1) * images_per_iteration,
                           "train_seconds": round(seconds, 1),
                           **{k.removeprefix("eval/"): metrics[k] for k in CURVE_KEYS}})
    return points


def run_arm(args: argparse.Namespace, arm: str, prompts: list[str]) -> dict:
    cfg = arm_config(args, arm)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)  # an unfinished try restarts whole
    start = time.perf_counter()
    with Tracker(cfg.mlflow, tags={"backend": "inprocess", "bench": "spatial_rl"}) as tracker:
        trainer = InProcessTrainer(cfg)
        history = trainer.fit(tracker)
    train_s = time.perf_counter() - start
    images = cfg.prompts.prompts_per_iteration * cfg.grpo.group_size
    return {
        "overrides": [*ARMS[arm], *args.set],
        "images_sampled": cfg.iterations * images,
        "run_seconds": round(train_s, 1),
        "curve": learning_curve(history, images),
        **trainer.loop.hacking_watch.tags(),  # reward_hacking_suspected, reward_decoupled
        "final_images": final_images(trainer.pipeline, cfg, prompts,
                                     args.work / f"{arm}_final.npy"),
    }


def cached(path: Path, compute) -> dict:
    """compute() once: its result is kept in `path` for reruns (training arms may finish in
    different sessions; the final figures are recomputed from the kept images)."""
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def plot(result: dict, out: Path) -> None:
    """Learning curves on the trainer's eval prompts, and the final figures of the base and
    every arm on the final prompts (another prompt set: the two are not comparable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4))
    for arm, figures in result["arms"].items():
        curve = figures["curve"]
        for axis, x in zip(axes[:2], ("images_sampled", "train_seconds"), strict=True):
            axis.plot([p[x] for p in curve], [p["all_relations_correct"] for p in curve],
                      marker="o", label=arm)
    for axis, label in zip(axes[:2], ("images sampled", "training seconds"), strict=True):
        axis.set_xlabel(label)
        axis.set_ylabel("all relations correct (eval prompts)")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    names = ["base", *result["arms"]]
    finals = [result["base"], *(a["final"] for a in result["arms"].values())]
    width = 0.4
    for offset, key in ((-width / 2, "all_relations_correct"), (width / 2, "readable_objects")):
        axes[2].bar([i + offset for i in range(len(names))], [f[key] for f in finals], width,
                    label=key.replace("_", " "))
    axes[2].set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    axes[2].set_title(f"{result['final_prompts']} final held-out prompts", fontsize=10)
    axes[2].legend(fontsize=8)
    figure.suptitle("Filtered GRPO on the shipped shapes generator, judged by the rule evaluator")
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--spatialscore", default=SPATIALSCORE)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--final-prompts", type=int, default=300)
    parser.add_argument("--final-seed", type=int, default=1000,
                        help="the final prompts' seed; the trainer's eval prompts use the config's")
    parser.add_argument("--experiment", default="spatial-rl-bench")
    parser.add_argument("--work", type=Path, default=Path("runs/spatial-rl-bench"))
    parser.add_argument("--out", default="bench/results/spatial_rl.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every arm (e.g. optim.lr=1e-3)")
    parser.add_argument("--train-only", action="store_true",
                        help="train and sample the arms, then stop (no SpatialScore needed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    cfg = arm_config(args, args.arms[0])
    prompts = final_prompts(cfg, args.final_prompts, args.final_seed)
    base = cached(args.work / "base.json", lambda: {"final_images": final_images(
        load_flux_pipeline(cfg.model), cfg, prompts, args.work / "base_final.npy")})
    arms = {arm: cached(args.work / f"{arm}.json", lambda arm=arm: run_arm(args, arm, prompts))
            for arm in args.arms}
    if args.train_only:
        return
    score = spatialscore(args.spatialscore)
    base = final_figures(np.load(base["final_images"]), prompts, score)
    for figures in arms.values():
        figures["final"] = final_figures(np.load(figures.pop("final_images")), prompts, score)
    result = {"base": base, "arms": arms, "config": args.config,
              "spatialscore": args.spatialscore, "final_prompts": args.final_prompts,
              "gain_all_relations_correct": {
                  arm: round(a["final"]["all_relations_correct"] - base["all_relations_correct"],
                             4) for arm, a in arms.items()}}
    out = Path(args.out)
    plot(result, out.with_suffix(".png"))
    write_result(result, out)


if __name__ == "__main__":
    main()
