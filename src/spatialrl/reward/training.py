"""SpatialScore training core: preference pairs -> batches -> Gaussian Bradley-Terry loss ->
metrics. No Ray and no DeepSpeed here; learners/spatialscore_trainer.py wraps these in both.

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
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from transformers import BatchFeature, get_cosine_schedule_with_warmup

from spatialrl.data.pairs import PairReadResult, PreferencePair, decode_image, iter_pairs
from spatialrl.errors import InputError
from spatialrl.reward.loss import gaussian_bt_loss, pairwise_accuracy
from spatialrl.reward.model import HeadOutput, SpatialScore
from spatialrl.reward.train_config import RewardOptimConfig


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


def batch_at(
    pairs: Sequence[PreferencePair], batch_size: int, seed: int, step: int
) -> list[PreferencePair]:
    """Batch `step` of endless reshuffled epochs: positions [step * B, (step + 1) * B) of
    the concatenated epochs, each epoch a permutation drawn from (seed, epoch)."""
    n = len(pairs)
    positions = range(step * batch_size, (step + 1) * batch_size)
    return [pairs[_epoch_order(n, seed, p // n)[p % n]] for p in positions]


def batches(
    pairs: Sequence[PreferencePair], batch_size: int, seed: int, start_step: int = 0
) -> Iterator[list[PreferencePair]]:
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
