"""Generation engines behind the SpatialReward service, one interface for all:
`score(items) -> list[ScoredEdit]`, where an item is (source, edited, instruction) with its
affinity key.

- `TransformersEngine` runs `SpatialReward` (transformers' Qwen3-VL) and is what runs here. It
  keeps a small LRU "prefix cache" per affinity key: the source image's processed vision
  inputs. This is a stand-in for a KV prefix cache, which transformers' `generate` does not
  share across calls: a hit saves the source's preprocessing, not its attention. It shows
  whether requests with the same source and instruction reach the replica that has seen
  them, which is what makes a real prefix cache pay.
- `VllmEngine` is the engine the field uses for generative rewards on GPU clusters, with
  vLLM's automatic prefix caching (the source image comes first in the edit prompt, so its
  tokens are the shared prefix). vLLM is not installable on the machines this project is
  tested on: that engine has never been run here.

The affinity key is a hash of the source's pixels (with their shape) and the instruction, so
that the same picture sent as PNG or JPEG, or re-encoded, is the same key.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature

from spatialrl.spatialreward.answers import EditAnswer
from spatialrl.spatialreward.model import (
    SpatialReward,
    SpatialRewardConfig,
    results_of,
)
from spatialrl.spatialreward.prompts import edit_turn, quality_turn
from spatialrl.spatialreward.reward import SpatialRewardResult

EngineKind = Literal["transformers", "vllm"]
VLLM_EXTRA = "pip install 'spatialrl[vllm]'"


def affinity_key(source: np.ndarray, instruction: str) -> str:
    """The routing and cache key of (source image pixels, instruction): sha256, 32 hex."""
    digest = hashlib.sha256()
    digest.update(np.asarray(source.shape, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(source, dtype=np.uint8).tobytes())
    digest.update(instruction.encode("utf-8"))
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class EditItem:
    source: Image.Image
    edited: Image.Image
    instruction: str
    key: str  # affinity_key(source pixels, instruction)


@dataclass(frozen=True)
class ScoredEdit:
    result: SpatialRewardResult
    prefix_hit: bool  # the item's prefix came from the cache


Prefix = TypeVar("Prefix")


@dataclass
class PrefixCache(Generic[Prefix]):
    """A least-recently-used map from affinity key to a prefix, counting hits and misses."""

    capacity: int
    hits: int = 0
    misses: int = 0
    _entries: OrderedDict[str, Prefix] = field(default_factory=OrderedDict)

    def get_or_build(self, key: str, build: Callable[[], Prefix]) -> tuple[Prefix, bool]:
        """(the prefix, whether it was cached); a built one evicts the oldest when full."""
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key], True
        self.misses += 1
        prefix = build()
        self._entries[key] = prefix
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return prefix, False

    def __len__(self) -> int:
        return len(self._entries)


class RewardEngine(Protocol):
    name: str
    prefix_cache: PrefixCache | None  # None: the engine's cache is its own (vLLM)
    input_pixels: int | None  # the most pixels it reads of an image; None: unknown

    def score(self, items: Sequence[EditItem]) -> list[ScoredEdit]: ...


@dataclass(frozen=True)
class SourcePrefix:
    """The source image as the edit prompt's first image: processed once per key."""

    pixel_values: torch.Tensor  # [patches, C*T*P*P]
    image_grid_thw: torch.Tensor  # [1, 3]
    image_tokens: int


class TransformersEngine:
    """SpatialReward in-process; the edit prompts of one call are one padded generate call
    (left padding), as are the quality prompts."""

    name = "transformers"

    def __init__(self, judge: SpatialReward, prefix_cache_size: int):
        self.judge = judge
        self.prefix_cache: PrefixCache[SourcePrefix] = PrefixCache(prefix_cache_size)
        # Qwen-VL image processors keep max_pixels as size.longest_edge.
        self.input_pixels = judge.encoder.image_processor.size.longest_edge

    @classmethod
    def from_config(
        cls, config: SpatialRewardConfig, device: str, prefix_cache_size: int
    ) -> TransformersEngine:
        judge = SpatialReward.from_config(config)
        judge.model.to(device)
        return cls(judge, prefix_cache_size)

    def score(self, items: Sequence[EditItem]) -> list[ScoredEdit]:
        edits = [item.edited for item in items]
        self.judge.encoder.check_inputs(
            [item.instruction for item in items], sources=[item.source for item in items],
            edits=edits,
        )
        prefixes = [self.prefix_cache.get_or_build(item.key, lambda item=item: self._prefix(
            item.source)) for item in items]
        inputs = self._edit_inputs(items, [prefix for prefix, _ in prefixes])
        edit_texts = self.judge.generate_from(self.judge.to_model_inputs(inputs), EditAnswer)
        results = results_of(edit_texts, self.judge.judge_quality(edits), self.judge.config)
        return [ScoredEdit(result, hit) for result, (_, hit) in zip(results, prefixes,
                                                                     strict=True)]

    def _prefix(self, source: Image.Image) -> SourcePrefix:
        vision = self._vision([source])
        return SourcePrefix(vision["pixel_values"], vision["image_grid_thw"],
                            self._image_tokens(vision["image_grid_thw"])[0])

    def _vision(self, images: list[Image.Image]) -> BatchFeature:
        return self.judge.encoder.image_processor(images=images, return_tensors="pt")

    def _image_tokens(self, grid_thw: torch.Tensor) -> list[int]:
        merge = self.judge.encoder.image_processor.merge_size
        return (grid_thw.prod(-1) // merge**2).tolist()

    def _edit_inputs(self, items: Sequence[EditItem], prefixes: list[SourcePrefix]) -> BatchFeature:
        """What `SpatialReward.judge_edits` encodes, with each source's vision inputs taken
        from its prefix: the same tensors (a test holds them equal)."""
        edited = self._vision([item.edited for item in items])
        edited_pixels = edited["pixel_values"].split(edited["image_grid_thw"].prod(-1).tolist())
        edited_tokens = self._image_tokens(edited["image_grid_thw"])
        score_range = self.judge.config.score_range
        texts = [
            self.judge.encoder._chat_text(
                edit_turn(item.instruction, score_range),
                [prefix.image_tokens, tokens],
            )
            for item, prefix, tokens in zip(items, prefixes, edited_tokens, strict=True)
        ]
        text = self.judge.encoder.tokenizer(texts, padding=True, return_tensors="pt")
        pairs = zip(prefixes, edited_pixels, edited["image_grid_thw"], strict=True)
        pixels, grids = zip(*[
            ((prefix.pixel_values, pixels), (prefix.image_grid_thw, grid[None]))
            for prefix, pixels, grid in pairs
        ], strict=True)
        return BatchFeature({
            **text,
            "pixel_values": torch.cat([tensor for pair in pixels for tensor in pair]),
            "image_grid_thw": torch.cat([tensor for pair in grids for tensor in pair]),
        })


class EngineUnavailable(RuntimeError):
    """An engine whose optional package is not installed."""


class VllmEngine:
    """SpatialReward on vLLM (greedy, automatic prefix caching; the same prompts and parsing
    as `SpatialReward`). NOT RUN HERE: vLLM is not installable on this project's test
    machines, so this class has never generated an answer in this repository; only its
    missing-package error is tested. Constrained decoding is not wired for it."""

    name = "vllm"
    prefix_cache = None  # vLLM's automatic prefix caching; its hit rate is vLLM's to report

    def __init__(self, config: SpatialRewardConfig):
        vllm = import_vllm()
        if config.constrained:
            raise ValueError("constrained: not supported by the vllm engine; use transformers")
        from transformers import AutoTokenizer

        self.config = config
        self.input_pixels = config.max_pixels
        self._tokenizer = AutoTokenizer.from_pretrained(config.model, revision=config.revision)
        pixels = {"min_pixels": config.min_pixels, "max_pixels": config.max_pixels}
        self._llm = vllm.LLM(
            model=config.model, revision=config.revision, dtype=config.dtype,
            enable_prefix_caching=True, limit_mm_per_prompt={"image": 2},
            mm_processor_kwargs={k: v for k, v in pixels.items() if v is not None},
        )
        self._sampling = vllm.SamplingParams(temperature=0.0, max_tokens=config.max_new_tokens)

    def score(self, items: Sequence[EditItem]) -> list[ScoredEdit]:
        edit_prompts = [self._prompt([item.source, item.edited],
                                     edit_turn(item.instruction, self.config.score_range))
                        for item in items]
        quality = quality_turn(self.config.score_range)
        quality_prompts = [self._prompt([item.edited], quality) for item in items]
        outputs = self._llm.generate(edit_prompts + quality_prompts, self._sampling)
        texts = [output.outputs[0].text for output in outputs]
        results = results_of(texts[:len(items)], texts[len(items):], self.config)
        return [ScoredEdit(result, prefix_hit=False) for result in results]

    def _prompt(self, images: list[Image.Image], turn: list[dict]) -> dict:
        """vLLM's multimodal prompt: the chat text of the user turn `turn`, whose image parts
        `images` fill."""
        chat = self._tokenizer.apply_chat_template(
            [{"role": "user", "content": turn}], tokenize=False, add_generation_prompt=True)
        return {"prompt": chat, "multi_modal_data": {"image": images}}


def import_vllm():
    try:
        import vllm
    except ModuleNotFoundError as error:
        raise EngineUnavailable(
            f"engine 'vllm' needs the optional package vllm, which is not installed ({VLLM_EXTRA} "
            "on a GPU machine); use engine 'transformers' here") from error
    return vllm


def build_engine(
    kind: EngineKind, config: SpatialRewardConfig, device: str, prefix_cache_size: int
) -> RewardEngine:
    if kind == "vllm":
        return VllmEngine(config)
    return TransformersEngine.from_config(config, device, prefix_cache_size)
