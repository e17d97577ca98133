"""Learnability probe: can a tiny random Qwen2.5-VL SpatialScore learn shapes-world relations
at all, and which backbone choices matter? Plain torch on one process (no Ray, no DeepSpeed:
~0.3 s per 32-pair step on one CPU core), so sweeps are cheap. Writes a result file with the
held-out pairwise accuracy every --eval-every steps.

    OMP_NUM_THREADS=1 .venv/bin/python bench/reward_learnability.py --task left-right \
        --train-mode full --rope-theta 2 --layers 4 --steps 800

Tasks:
- shapes: the pairs of bench/reward_accuracy.py (1-3 perturbed relations, 2-3 objects),
  built into --data or reused from it.
- colour, left-right, above-below, front-behind, on-under, relation: the curriculum pair sets
  of spatialrl.data.curriculum (`spatialrl data shapes --task`), two objects and one change.

--then TASK:STEPS (repeatable) makes a curriculum: the same model goes on to train on TASK
with a fresh optimizer, and the result file ends with every stage's held-out accuracy.
A TASK may mix tasks, as shapes+relation: each batch then takes an equal share of each, so
a new task is learnt while an earlier one is kept (one task at a time forgets the last).

    OMP_NUM_THREADS=1 .venv/bin/python bench/reward_learnability.py --task colour --steps 400 \
        --then left-right:1500 --train-mode full --rope-theta 2 --layers 4

Backbone choices are applied to the tiny model's config before its random weights are drawn:
--layers, --hidden (LM width), --rope-theta (1e6, the 7B's, leaves a few image columns within
1e-3 rad of each other; ~2 resolves them), --init-std (default 1/sqrt(width) per tower; the
7B's 0.02 leaves the tiny model on a long, seed-dependent plateau).
--train-mode lora trains what `spatialrl reward train` trains (LoRA, head, reward token);
full trains every weight, vision tower included.
(Layout-caption pretraining of the backbone was tried here and measured not to help; it was
removed from the project on 2026-12-07, see bench/README.md.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from results_file import write_result
from reward_accuracy import mu_by_num_perturbed, shapes_pairs
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

from spatialrl.data.curriculum import CURRICULUM_TASKS, curriculum_pairs
from spatialrl.data.pairs import PreferencePair, read_pairs
from spatialrl.reward.config import SpatialScoreConfig
from spatialrl.reward.evaluation import accuracy_summary, score_pairs
from spatialrl.reward.inputs import SpatialScoreProcessor, load_qwen_vl_processing
from spatialrl.reward.model import SpatialScore
from spatialrl.reward.train_config import RewardOptimConfig
from spatialrl.reward.training import batch_at, encode_pairs, make_optimizer, pair_loss
from spatialrl.tiny import save_atomically
from spatialrl.tiny.qwen_vl import fan_in_std, write_tiny_qwen_vl

TASK_PAIRS = {task: partial(curriculum_pairs, task) for task in CURRICULUM_TASKS}


def task_pairs(task: str, args: argparse.Namespace) -> dict[str, list[PreferencePair]]:
    if task in TASK_PAIRS:
        return {split: TASK_PAIRS[task](n, split, args.seed)
                for split, n in (("train", args.train_pairs), ("test", args.test_pairs))}
    folder = Path(args.data)
    shapes_pairs(folder, args.shapes_pairs, seed=1)
    return {split: read_pairs(folder / f"{split}.parquet", split=split).pairs[:n]
            for split, n in (("train", args.train_pairs), ("test", args.test_pairs))}


def build_model(args: argparse.Namespace, workdir: Path) -> SpatialScore:
    if args.init:  # a model an earlier run saved; its own config holds the backbone choices
        model = SpatialScore.from_pretrained(Path(args.init) / "spatialscore", trainable=True)
        return model.requires_grad_(True) if args.train_mode == "full" else model
    base = write_tiny_qwen_vl(workdir / "qwen2.5-vl")
    config = AutoConfig.from_pretrained(base)
    text = config.text_config
    text.num_hidden_layers, text.layer_types = args.layers, ["full_attention"] * args.layers
    text.hidden_size, text.intermediate_size = args.hidden, 2 * args.hidden
    text.head_dim = args.hidden // text.num_attention_heads
    rotary_pairs = text.head_dim // 2  # split over (time, height, width) as the tiny model's
    spatial = 3 * rotary_pairs // 8
    text.rope_parameters.update(rope_theta=args.rope_theta,
                                mrope_section=[rotary_pairs - 2 * spatial, spatial, spatial])
    vision = config.vision_config
    vision.out_hidden_size = args.hidden
    text.initializer_range = args.init_std or fan_in_std(text.hidden_size)
    vision.initializer_range = args.init_std or fan_in_std(vision.hidden_size)
    score_config = SpatialScoreConfig(
        base_model=str(base), dtype="float32", instruction="Prompt: {prompt}",
        lora={"rank": 16, "alpha": 32, "dropout": 0.0}, head_hidden_size=64, mc_samples=0,
        min_pixels=112 * 112, max_pixels=112 * 112, train_vision_tower=args.train_mode == "full",
    )
    torch.manual_seed(args.seed)
    backbone = Qwen2_5_VLForConditionalGeneration(config)
    model = SpatialScore.from_backbone(
        backbone, SpatialScoreProcessor.from_config(score_config), score_config)
    return model.requires_grad_(True) if args.train_mode == "full" else model


def processing(base: Path) -> list:
    tokenizer, image_processor, _ = load_qwen_vl_processing(str(base))
    return [tokenizer, image_processor]


def mixed_batch(stage: Stage, pairs_by_task: dict, batch_size: int, seed: int, step: int
                ) -> list[PreferencePair]:
    """An equal share of the batch from each of the stage's tasks."""
    share = batch_size // len(stage.tasks)
    return [pair for task in stage.tasks
            for pair in batch_at(pairs_by_task[task]["train"], share, seed, step)]


def heldout_by_task(model: SpatialScore, tasks, pairs_by_task: dict) -> dict[str, float]:
    return {task: accuracy_summary(score_pairs(model, pairs_by_task[task]["test"], 32))
            ["accuracy"] for task in tasks}


def shapes_heldout(model: SpatialScore, pairs_by_task: dict) -> dict | None:
    """On the held-out shapes pairs: accuracy split by perturbed relations (1 vs 2-3), and
    the mean mu of correct and perturbed renders per count."""
    if "shapes" not in pairs_by_task:
        return None
    records = score_pairs(model, pairs_by_task["shapes"]["test"], 32)
    return {**accuracy_summary(records), "mu_by_num_perturbed": mu_by_num_perturbed(records)}


def train(args: argparse.Namespace, model: SpatialScore, stage: Stage, pairs_by_task: dict
          ) -> list[dict]:
    """One stage: a fresh optimizer and schedule, the model carried over from the last."""
    optim = RewardOptimConfig(lr=args.lr, steps=stage.steps,
                              warmup_steps=min(30, stage.steps // 10), batch_size=args.batch_size)
    optimizer, schedule = make_optimizer(model, optim)
    trainable = [p for p in model.parameters() if p.requires_grad]
    history, train_accuracy = [], []
    model.train()
    for step in range(stage.steps):
        batch = mixed_batch(stage, pairs_by_task, args.batch_size, args.seed, step)
        loss, stats = pair_loss(model(**encode_pairs(model, batch)), mc_samples=0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, optim.grad_clip)
        optimizer.step()
        schedule.step()
        train_accuracy.append(stats["accuracy"].item())
        if (step + 1) % args.eval_every == 0:
            heldout = heldout_by_task(model, stage.tasks, pairs_by_task)
            history.append({"task": stage.name, "step": step + 1,
                            "train_accuracy": float(np.mean(train_accuracy)),
                            "heldout_accuracy": heldout[stage.tasks[0]],
                            **({"heldout_by_task": heldout} if len(heldout) > 1 else {})})
            train_accuracy = []
            print(history[-1], flush=True)
    return history


@dataclass(frozen=True)
class Stage:
    tasks: tuple[str, ...]  # more than one: a mixed stage
    steps: int

    @property
    def name(self) -> str:
        return "+".join(self.tasks)


def tasks_arg(text: str) -> tuple[str, ...]:
    """TASK or TASK+TASK+..., each one of shapes and TASK_PAIRS."""
    tasks = tuple(text.split("+"))
    unknown = [t for t in tasks if t not in ["shapes", *TASK_PAIRS]]
    if unknown or len(set(tasks)) < len(tasks):
        raise argparse.ArgumentTypeError(f"tasks are shapes, {', '.join(TASK_PAIRS)}, joined "
                                         f"by + without repeats; got {text!r}")
    return tasks


def stage_arg(text: str) -> Stage:
    """TASK:STEPS, as --then takes it."""
    tasks, _, steps = text.partition(":")
    if not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected TASK:STEPS with STEPS >= 1; got {text!r}")
    return Stage(tasks_arg(tasks), int(steps))


def save_model(model: SpatialScore, out_dir: Path) -> Path:
    """The trained model as from_pretrained folders, for bench/best_of_n.py --spatialscore:
    full fine-tuning changes the backbone too, so its weights (LoRA left out) become the base
    model (out_dir/base) that the SpatialScore checkpoint (out_dir/spatialscore) names."""
    vl_model = model.backbone.get_base_model()
    weights = {  # peft's wrappers removed; a trained vision tower is peft's modules_to_save copy
        name.replace(".base_layer", "").replace(".modules_to_save.default", ""): value
        for name, value in vl_model.state_dict().items()
        if "lora_" not in name and ".original_module." not in name
    }
    base = Qwen2_5_VLForConditionalGeneration(vl_model.config)
    base.load_state_dict(weights)
    save_atomically(out_dir / "base", [base, *processing(Path(model.config.base_model))])
    model.config = model.config.model_copy(update={"base_model": str(out_dir / "base")})
    return model.save_pretrained(out_dir / "spatialscore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", type=tasks_arg, default=("shapes",),
                        help=f"shapes, {', '.join(TASK_PAIRS)}, or a mix as shapes+relation")
    parser.add_argument("--data", default="runs/bench-data/shapes")
    parser.add_argument("--shapes-pairs", type=int, default=3000, help="as reward_accuracy.py")
    parser.add_argument("--train-pairs", type=int, default=2400)
    parser.add_argument("--test-pairs", type=int, default=300)
    parser.add_argument("--train-mode", choices=["lora", "full"], default="lora")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rope-theta", type=float, default=1e6)
    parser.add_argument("--init-std", type=float,
                        help="std of the random weights; default 1/sqrt(width) per tower, as "
                        "spatialrl tiny-models draws them (0.02, the 7B's, before 2026-12)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--then", type=stage_arg, action="append", default=[],
                        metavar="TASK:STEPS", help="a curriculum: train on TASK for STEPS "
                        "more steps after the stages before it (repeatable)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", help="start from a model --save wrote (its folder), e.g. to "
                        "go on with a curriculum; the backbone options are then its own")
    parser.add_argument("--save", help="folder for the trained model (base/, spatialscore/)")
    parser.add_argument("--out", default="bench/results/reward_learnability.json")
    args = parser.parse_args()
    start = time.perf_counter()
    stages = [Stage(args.task, args.steps), *args.then]
    pairs_by_task = {task: task_pairs(task, args) for stage in stages for task in stage.tasks}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args, Path(tmp))
        history = [entry for stage in stages
                   for entry in train(args, model, stage, pairs_by_task)]
        finals = heldout_by_task(model, pairs_by_task, pairs_by_task)
        shapes = shapes_heldout(model, pairs_by_task)
        if args.save:
            saved = SpatialScore.from_pretrained(save_model(model, Path(args.save)))
            reloaded = heldout_by_task(saved, pairs_by_task, pairs_by_task)
            assert reloaded == finals, f"the saved model scores differently: {reloaded} {finals}"
    write_result({
        "settings": {**vars(args), "task": stages[0].name,
                     "then": [f"{s.name}:{s.steps}" for s in args.then]},
        "pairs": {task: {split: len(records) for split, records in pairs.items()}
                  for task, pairs in pairs_by_task.items()},
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "history": history,
        "final_heldout_accuracy": history[-1]["heldout_accuracy"] if history else None,
        "final_heldout_accuracy_by_task": finals,
        "final_shapes_heldout": shapes,
        "seconds": time.perf_counter() - start,
    }, args.out)


if __name__ == "__main__":
    main()
