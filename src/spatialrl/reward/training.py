"""SpatialScore training core: preference pairs -> batches -> Gaussian Bradley-Terry loss ->
metrics, and SpatialScoreTask, which hands them to the shared trainer
(learners/deepspeed_trainer.py, through learners/spatialscore_trainer.py). No Ray and no
DeepSpeed here.

A batch of n pairs is one forward over 2n images: the n preferred ones, then the n rejected
ones, each with the pair's clean prompt (the rejected image shows the perturbed prompt, and is
judged against the clean one).

Every random draw of a step (its pairs, LoRA dropout, the loss's Monte Carlo noise) is a
function of (seed, step, rank, micro-batch), so a run resumed at step s repeats exactly what
the uninterrupted run would have done from s on.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from transformers import BatchFeature, get_cosine_schedule_with_warmup

from spatialrl.config import ConfigError
from spatialrl.data.pairs import PairReadResult, PreferencePair, decode_image, iter_pairs
from spatialrl.errors import InputError
from spatialrl.reward.evaluation import ScoredPair, accuracy_summary, score_pairs
from spatialrl.reward.loss import gaussian_bt_loss, pairwise_accuracy
from spatialrl.reward.model import (
    HeadOutput,
    SpatialScore,
    checkpoint_folder,
    read_checkpoint_config,
)
from spatialrl.reward.train_config import RewardOptimConfig, RewardTrainConfig
from spatialrl.reward.train_task import TaskData

Item = TypeVar("Item")


def load_pairs(
    paths: str | Sequence[str], split: str, rank: int = 0, world_size: int = 1,
    limit: int | None = None,
) -> PairReadResult:
    """This worker's share (every world_size-th valid pair) of a split's first `limit` valid
    pairs of the files in turn (all without one), with the skipped-row counts of the rows
    read. Only the share is kept in memory."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    skipped: Counter[str] = Counter()
    shard, total = [], 0
    valid = itertools.chain.from_iterable(
        iter_pairs(path, split=split, skipped=skipped) for path in paths)
    for index, pair in enumerate(itertools.islice(valid, limit)):
        total = index + 1
        if index % world_size == rank:
            shard.append(pair)
    if total < world_size:
        raise InputError(
            f"{', '.join(paths)}: {total} valid {split} pairs, fewer than the {world_size} "
            f"workers (skipped rows: {dict(skipped)})"
        )
    return PairReadResult(pairs=shard, skipped=dict(skipped))


def batch_at(items: Sequence[Item], batch_size: int, seed: int, step: int) -> list[Item]:
    """Batch `step` of endless reshuffled epochs: positions [step * B, (step + 1) * B) of
    the concatenated epochs, each epoch a permutation drawn from (seed, epoch)."""
    n = len(items)
    positions = range(step * batch_size, (step + 1) * batch_size)
    return [items[_epoch_order(n, seed, p // n)[p % n]] for p in positions]


def batches(
    pairs: Sequence[Item], batch_size: int, seed: int, start_step: int = 0
) -> Iterator[list[Item]]:
    """batch_at for start_step, start_step + 1, ..."""
    if not pairs:
        raise ValueError("no pairs to draw batches from")
    for step in itertools.count(start_step):
        yield batch_at(pairs, batch_size, seed, step)


@functools.lru_cache(maxsize=4)  # consecutive batches mostly reuse one epoch's order
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def encode_pairs(model: SpatialScore, pairs: Sequence[PreferencePair]) -> BatchFeature:
    """Model inputs for 2n images: preferred ones first, then rejected ones."""
    images = [decode_image(p.image_preferred) for p in pairs]
    images += [decode_image(p.image_rejected) for p in pairs]
    return model.prepare_inputs(images, [p.prompt for p in pairs] * 2)


def pair_loss(
    output: HeadOutput, mc_samples: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of a forward made by `encode_pairs`, and its detached statistics."""
    mu_w, mu_l = output.mu.chunk(2)
    log_sigma_w, log_sigma_l = output.log_sigma.chunk(2)
    loss = gaussian_bt_loss(mu_w, log_sigma_w, mu_l, log_sigma_l, mc_samples, generator)
    mu, sigma = output.mu.detach(), output.log_sigma.detach().exp()
    stats = {
        "loss": loss.detach(),
        "accuracy": pairwise_accuracy(mu_w.detach(), mu_l.detach()),
        "margin_mean": (mu_w - mu_l).detach().mean(),
        "mu_mean": mu.mean(),
        "mu_std": mu.std(correction=0),
        "sigma_mean": sigma.mean(),
        "sigma_std": sigma.std(correction=0),
    }
    return loss, stats


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(
    model: torch.nn.Module, cfg: RewardOptimConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters, with linear warmup and cosine decay."""
    optimizer = torch.optim.AdamW(
        trainable_parameters(model), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    return optimizer, get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)


def step_seed(seed: int, step: int, rank: int = 0, micro_batch: int = 0) -> int:
    """The seed of one micro-batch's randomness (dropout, Monte Carlo noise)."""
    return int(np.random.SeedSequence([seed, step, rank, micro_batch]).generate_state(1)[0])


class SpatialScoreTask:
    """SpatialScore for the shared trainer: preference pairs, the Gaussian Bradley-Terry loss
    and held-out pairwise accuracy by the number of perturbed relations."""

    kind = "spatialscore"
    unit = "pairs"
    config_type = RewardTrainConfig
    shown_metrics = ("train/loss", "train/accuracy", "train/lr", "eval/accuracy")

    def check_data(self, cfg: RewardTrainConfig) -> None:
        """Each file exists, has every column and a valid pair of its split (the workers read
        them fully and count skipped rows)."""
        files = [("train", path) for path in cfg.data.train] + [("test", cfg.data.test)]
        for split, path in files:
            if path is not None and next(iter_pairs(path, split=split), None) is None:
                raise ConfigError(f"data.{split}: {path} has no valid {split} pairs")

    def check_init_from(self, location: str, cfg: RewardTrainConfig) -> None:
        try:
            saved = read_checkpoint_config(checkpoint_folder(location))
        except (FileNotFoundError, OSError, ValueError) as err:
            raise ConfigError(f"init_from: {err}") from err
        if saved.finetune == "full" and cfg.model.finetune != "full":
            raise ConfigError(
                f"init_from: {location} was trained with finetune full; set model.finetune "
                "full to start from its backbone weights"
            )

    def build_model(self, cfg: RewardTrainConfig) -> SpatialScore:
        model = SpatialScore.from_config(cfg.model)
        if cfg.init_from:  # a --resume then loads its own checkpoint over these weights
            model.load_weights(cfg.init_from)
        return model

    def load_data(self, cfg: RewardTrainConfig, split: str, rank: int,
                  world_size: int) -> TaskData:
        paths = cfg.data.train if split == "train" else cfg.data.test
        limit = cfg.data.max_test_pairs if split == "test" else None
        read = load_pairs(paths, split, rank, world_size, limit)
        return TaskData(read.pairs, read.skipped)

    def micro_batch_loss(
        self, forward: Callable, model: SpatialScore, items: Sequence[PreferencePair],
        cfg: RewardTrainConfig,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = encode_pairs(model, items)
        return pair_loss(forward(**inputs.to(model.device)), cfg.model.mc_samples)

    def eval_records(self, model: SpatialScore, items: Sequence[PreferencePair],
                     cfg: RewardTrainConfig) -> list[ScoredPair]:
        return score_pairs(model, items, cfg.eval_batch_size)

    def eval_metrics(self, records: Sequence[ScoredPair]) -> dict[str, float]:
        summary = accuracy_summary(records)
        metrics = {"eval/accuracy": summary["accuracy"], "eval/pairs": summary["pairs"]}
        for group, result in summary["by_num_perturbed"].items():
            if result["accuracy"] is not None:
                metrics[f"eval/accuracy_{group.replace('-', '_')}"] = result["accuracy"]
        return metrics

    def save_model(self, model: SpatialScore, folder: Path) -> Path:
        return model.save_pretrained(folder)
