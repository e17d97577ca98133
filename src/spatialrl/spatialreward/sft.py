"""SpatialReward's supervised fine-tuning: edit examples -> chats -> next-token cross-entropy
on the answer's tokens only, and SftTask, which hands these to the shared Ray Train +
DeepSpeed trainer (learners/deepspeed_trainer.py, through learners/spatialreward_trainer.py).

A sample is one candidate row of an edits file (spatialrl.spatialreward.edit_examples) asked
either judgement: the edit one (source and edited image, instruction; target: the row's
edit_answer) or, for one row in `data.quality_every`, the quality one (edited image; target:
quality_answer). Its tokens are the chat the judge sees at inference (SpatialReward's own
encoder and chat template) up to the opened assistant turn, then the target and the turn's
end token; only the last two carry labels, so the prompt and the images cost no loss.

A run's model/ folder is a complete Qwen3-VL folder (config, safetensors weights, tokenizer,
image processor) that `SpatialReward.from_config` loads as it loads the published model; a
LoRA run saves its backbone with the adapter merged in. No Ray and no DeepSpeed here.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from PIL import Image
from torch import nn
from transformers import BatchFeature

from spatialrl.config import ConfigError
from spatialrl.data.pairs import decode_image
from spatialrl.errors import InputError
from spatialrl.reward.model import lora_config
from spatialrl.reward.train_task import TaskData
from spatialrl.spatialreward.edit_examples import EditRow, read_edit_rows
from spatialrl.spatialreward.model import SpatialReward, SpatialRewardConfig
from spatialrl.spatialreward.prompts import edit_turn, quality_turn
from spatialrl.spatialreward.train_config import SftModelConfig, SpatialRewardTrainConfig

TURN_END = "<|im_end|>"  # how Qwen chat templates close the assistant turn
IGNORED = -100  # the label of a token without loss (transformers' and torch's convention)


@dataclass(frozen=True)
class SftSample:
    row: EditRow
    judgement: Literal["edit", "quality"]

    @property
    def target(self) -> str:
        return self.row.edit_answer if self.judgement == "edit" else self.row.quality_answer

    def chat(self, score_range: int) -> tuple[list[dict], list[Image.Image]]:
        """The user turn's content parts and the images that fill them, as the judge asks."""
        edited = decode_image(self.row.image_edited)
        if self.judgement == "quality":
            return quality_turn(score_range), [edited]
        return edit_turn(self.row.instruction, score_range), \
            [decode_image(self.row.image_source), edited]


def load_samples(
    paths: Sequence[str], split: str, quality_every: int, rank: int = 0, world_size: int = 1,
    limit: int | None = None,
) -> list[SftSample]:
    """This worker's share (every world_size-th) of the samples of the split's first `limit`
    rows of the files in turn: each row's edit sample, and after every `quality_every`-th
    row its quality sample."""
    rows = itertools.chain.from_iterable(read_edit_rows(path, split) for path in paths)
    samples = []
    for index, row in enumerate(itertools.islice(rows, limit)):
        samples.append(SftSample(row, "edit"))
        if quality_every and index % quality_every == quality_every - 1:
            samples.append(SftSample(row, "quality"))
    if len(samples) < world_size:
        raise InputError(f"{', '.join(paths)}: {len(samples)} {split} samples, fewer than the "
                         f"{world_size} workers")
    return samples[rank::world_size]


def encode_samples(judge: SpatialReward, samples: Sequence[SftSample],
                   score_range: int) -> BatchFeature:
    """input_ids, attention_mask and labels [B, L] (padded on the right; labels only on the
    target and the turn's end) and the image tensors, on the judge's device."""
    chats = [sample.chat(score_range) for sample in samples]
    tokenizer = judge.encoder.tokenizer
    texts, vision = judge.encoder.chat_inputs([c for c, _ in chats], [i for _, i in chats])
    # Prompt and target are tokenised apart so that no token spans the boundary.
    prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
    targets = tokenizer([s.target + TURN_END for s in samples],
                        add_special_tokens=False)["input_ids"]
    length = max(len(p) + len(t) for p, t in zip(prompts, targets, strict=True))
    input_ids = torch.full((len(samples), length), tokenizer.pad_token_id)
    labels = torch.full((len(samples), length), IGNORED)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        end = len(prompt) + len(target)
        input_ids[row, :end] = torch.tensor(prompt + target)
        labels[row, len(prompt):end] = torch.tensor(target)
        attention_mask[row, :end] = 1
    inputs = BatchFeature({"input_ids": input_ids, "attention_mask": attention_mask, **vision})
    inputs = judge.to_model_inputs(inputs)
    inputs["labels"] = labels.to(inputs["input_ids"].device)
    return inputs


def answer_token_stats(logits: torch.Tensor,
                       labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number, correctly predicted number) of the labelled tokens,
    each predicted from the position before it."""
    predicted, target = logits[:, :-1].float(), labels[:, 1:]
    mask = target != IGNORED
    nll = nn.functional.cross_entropy(predicted.transpose(1, 2), target,
                                      ignore_index=IGNORED, reduction="sum")
    correct = ((predicted.argmax(-1) == target) & mask).sum()
    return nll, mask.sum(), correct


class SftLearner(nn.Module):
    """The judge's Qwen3-VL made trainable: every weight (finetune full) or a LoRA adapter
    on its language model. `judge` generates with the weights being trained."""

    def __init__(self, judge: SpatialReward, config: SftModelConfig):
        super().__init__()
        model = judge.model.train()
        if config.gradient_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        if config.finetune == "lora":
            with warnings.catch_warnings():  # peft reads transformers' deprecated property
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                        FutureWarning)
                model = get_peft_model(model, lora_config(config.lora))
        else:
            model.requires_grad_(True)
        judge.model = model
        self.model = model
        self.judge = judge
        self.config = config

    @classmethod
    def from_config(cls, config: SftModelConfig, start: str | None = None) -> SftLearner:
        """From config.base_model, or the weights of `start` (a Qwen3-VL folder or hub id)."""
        judge = SpatialReward.from_config(SpatialRewardConfig(
            model=start or config.base_model, revision=None if start else config.revision,
            dtype=config.dtype, attn_implementation=config.attn_implementation,
            min_pixels=config.min_pixels, max_pixels=config.max_pixels,
            score_range=config.score_range,
        ))
        return cls(judge, config)

    def forward(self, **inputs):
        return self.model(**inputs)

    def save_pretrained(self, folder: Path) -> Path:
        """A Qwen3-VL folder that SpatialReward.from_config loads: config, safetensors
        weights (LoRA merged in), tokenizer and image processor."""
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(self.model, PeftModel):
            base = self.model.get_base_model()
            base.save_pretrained(folder, state_dict=merged_state_dict(self.model))
        else:
            self.model.save_pretrained(folder)
        self.judge.encoder.tokenizer.save_pretrained(folder)
        self.judge.encoder.image_processor.save_pretrained(folder)
        return folder


def merged_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's weights with the adapter added, out of place: merging in place and
    back would round a bf16 backbone that trains on."""
    base = model.get_base_model()
    state = {}
    for name, tensor in base.state_dict().items():
        if ".lora_" not in name:
            state[name.replace(".base_layer.", ".")] = tensor.detach()
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                state[f"{name}.weight"] = weight + module.get_delta_weight("default").to(
                    weight.dtype)
    return {name: tensor.contiguous() for name, tensor in state.items()}


class SftTask:
    """SpatialReward SFT for the shared trainer (spatialrl.reward.train_task.TrainTask)."""

    kind = "spatialreward"
    unit = "samples"
    config_type = SpatialRewardTrainConfig
    shown_metrics = ("train/loss", "train/token_accuracy", "train/lr", "eval/loss",
                     "eval/token_accuracy")

    def check_data(self, cfg: SpatialRewardTrainConfig) -> None:
        """Each file is a valid edits file (every row checked) with rows of its split."""
        files = [("train", path) for path in cfg.data.train] + [("test", cfg.data.test)]
        for split, path in files:
            if path is not None and not read_edit_rows(path, split):
                raise ConfigError(f"data.{split}: {path} has no {split} rows")

    def check_init_from(self, location: str, cfg: SpatialRewardTrainConfig) -> None:
        local = Path(location)
        if local.is_dir() and not (local / "config.json").is_file():
            raise ConfigError(f"init_from: {location} is not a model folder (no config.json)")
        if not local.is_dir() and (local.exists() or location.startswith(("/", ".", "~"))):
            raise ConfigError(f"init_from: model folder not found: {location}")

    def build_model(self, cfg: SpatialRewardTrainConfig) -> SftLearner:
        return SftLearner.from_config(cfg.model, cfg.init_from)

    def load_data(self, cfg: SpatialRewardTrainConfig, split: str, rank: int,
                  world_size: int) -> TaskData:
        paths = cfg.data.train if split == "train" else [cfg.data.test]
        limit = cfg.data.max_test_rows if split == "test" else None
        return TaskData(load_samples(paths, split, cfg.data.quality_every, rank, world_size,
                                     limit))

    def micro_batch_loss(
        self, forward: Callable, model: SftLearner, items: Sequence[SftSample],
        cfg: SpatialRewardTrainConfig,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = encode_samples(model.judge, items, cfg.model.score_range)
        labels = inputs.pop("labels")
        nll, tokens, correct = answer_token_stats(forward(**inputs).logits, labels)
        loss = nll / tokens
        return loss, {"loss": loss.detach(), "token_accuracy": correct / tokens,
                      "answer_tokens": tokens.float()}

    @torch.no_grad()
    def eval_records(self, model: SftLearner, items: Sequence[SftSample],
                     cfg: SpatialRewardTrainConfig) -> list[tuple[float, int, int]]:
        """(summed cross-entropy, tokens, correct tokens) per batch, teacher-forced."""
        records = []
        for start in range(0, len(items), cfg.eval_batch_size):
            inputs = encode_samples(model.judge, items[start:start + cfg.eval_batch_size],
                                    cfg.model.score_range)
            labels = inputs.pop("labels")
            nll, tokens, correct = answer_token_stats(model(**inputs).logits, labels)
            records.append((float(nll), int(tokens), int(correct)))
        return records

    def eval_metrics(self, records: Sequence[tuple[float, int, int]]) -> dict[str, float]:
        nll, tokens, correct = (sum(column) for column in zip(*records, strict=True))
        return {"eval/loss": nll / tokens, "eval/token_accuracy": correct / tokens,
                "eval/answer_tokens": tokens}

    def save_model(self, model: SftLearner, folder: Path) -> Path:
        return model.save_pretrained(folder)
