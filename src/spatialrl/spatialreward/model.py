"""SpatialReward: a Qwen3-VL judge that answers in JSON, then the scalar reward.

`SpatialReward.from_config` loads the published "SpatialReward/SpatialReward-8B" or the
project's tiny random Qwen3-VL through the same `Qwen3VLForConditionalGeneration
.from_pretrained` call (safetensors only). Inputs are composed from the checkpoint's own
tokenizer (chat template) and image processor, as `Qwen3VLProcessor` does, because that class
needs torchvision for its video part.

Decoding is greedy. With `constrained: true` an outlines logits processor (the optional
`outlines` package) keeps generation inside the answer's JSON shape; the parser still checks
every answer, since a grammar cannot say x1 < x2.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from transformers import BatchFeature, LogitsProcessorList, Qwen3VLForConditionalGeneration

from spatialrl.reward.inputs import QwenVLChatEncoder, load_qwen_vl_processing
from spatialrl.spatialreward.answers import (
    BOX_MAX,
    EditAnswer,
    QualityAnswer,
    parse_answer,
)
from spatialrl.spatialreward.prompts import DEFAULT_SCORE_RANGE, edit_turn, quality_turn
from spatialrl.spatialreward.reward import RewardWeights, SpatialRewardResult, combine

PUBLISHED_MODEL = "SpatialReward/SpatialReward-8B"


class SpatialRewardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = PUBLISHED_MODEL  # hub id or save_pretrained folder of a Qwen3-VL judge
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    attn_implementation: str = "sdpa"
    min_pixels: int | None = None  # None keeps the checkpoint's image processor budget
    max_pixels: int | None = None
    max_new_tokens: int = Field(512, ge=1)  # the public server's limit
    score_range: int = Field(DEFAULT_SCORE_RANGE, ge=1)
    weights: RewardWeights = RewardWeights()
    constrained: bool = False
    max_reasoning_chars: int = Field(600, ge=1)  # only bounds constrained decoding


class SpatialReward:
    def __init__(self, model, encoder: QwenVLChatEncoder, config: SpatialRewardConfig):
        self.model = model
        self.encoder = encoder
        self.config = config
        self._constraints: dict[type, object] = {}  # answer schema -> logits processor

    @classmethod
    def from_config(cls, config: SpatialRewardConfig) -> SpatialReward:
        tokenizer, image_processor, image_token_id = load_qwen_vl_processing(
            config.model, config.revision, config.min_pixels, config.max_pixels
        )
        tokenizer.padding_side = "left"  # generation continues every row at the right end
        model = Qwen3VLForConditionalGeneration.from_pretrained(
            config.model,
            revision=config.revision,
            dtype=getattr(torch, config.dtype),
            attn_implementation=config.attn_implementation,
            use_safetensors=True,  # never a pickled checkpoint
        ).eval()
        return cls(model, QwenVLChatEncoder(tokenizer, image_processor, image_token_id), config)

    def judge_edits(
        self,
        sources: Sequence[Image.Image],
        edits: Sequence[Image.Image],
        instructions: Sequence[str],
    ) -> list[str]:
        """The raw edit answers, one per (source, edited image, instruction)."""
        self.encoder.check_inputs(instructions, sources=sources, edits=edits)
        contents = [edit_turn(instruction, self.config.score_range) for instruction in instructions]
        return self._generate(contents, list(zip(sources, edits, strict=True)), EditAnswer)

    def judge_quality(self, edits: Sequence[Image.Image]) -> list[str]:
        """The raw quality answers, one per edited image."""
        self.encoder.check_inputs(["quality"] * len(edits), edits=edits)
        contents = [quality_turn(self.config.score_range) for _ in edits]
        return self._generate(contents, [[edit] for edit in edits], QualityAnswer)

    def score(
        self,
        sources: Sequence[Image.Image],
        edits: Sequence[Image.Image],
        instructions: Sequence[str],
    ) -> list[SpatialRewardResult]:
        """Both judgements and the reward of each sample; invalid ones say why."""
        return results_of(self.judge_edits(sources, edits, instructions),
                          self.judge_quality(edits), self.config)

    def _generate(self, contents, images, schema: type) -> list[str]:
        return self.generate_from(self._encode(contents, images), schema)

    @torch.no_grad()
    def generate_from(self, inputs: BatchFeature, schema: type) -> list[str]:
        """The answers generated for encoded inputs (see `to_model_inputs`), one per row."""
        processors = LogitsProcessorList()
        if self.config.constrained:
            processors.append(self._constraint(schema))
        output = self.model.generate(
            **inputs, max_new_tokens=self.config.max_new_tokens, do_sample=False,
            logits_processor=processors,
            pad_token_id=self.encoder.tokenizer.pad_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return self.encoder.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def _encode(self, contents, images) -> BatchFeature:
        return self.to_model_inputs(self.encoder.encode(contents, images))

    def to_model_inputs(self, inputs: BatchFeature) -> BatchFeature:
        """The encoder's tensors on the model's device and dtype, with the image-token mask
        that Qwen3-VL's rotary positions need."""
        inputs = inputs.to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        # Qwen3-VL places its multimodal rotary positions by these (1 = image token).
        image_token_id = self.model.config.image_token_id
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_token_id).int()
        return inputs

    def _constraint(self, schema: type):
        """A fresh-state outlines JSON-schema logits processor for `schema` (built once)."""
        if schema not in self._constraints:
            try:
                import outlines
                from outlines.backends import get_json_schema_logits_processor
            except ModuleNotFoundError as error:
                raise RuntimeError("constrained decoding needs the optional package outlines "
                                   "(pip install 'spatialrl[constrained]')") from error
            wrapped = outlines.from_transformers(self.model, self.encoder.tokenizer)
            document = json.dumps(answer_json_schema(schema, self.config))
            self._constraints[schema] = get_json_schema_logits_processor(
                "outlines_core", wrapped, document)
        processor = self._constraints[schema]
        processor.reset()
        return processor


def results_of(
    edit_texts: Sequence[str], quality_texts: Sequence[str], config: SpatialRewardConfig
) -> list[SpatialRewardResult]:
    """Each sample's reward from its two raw answers; invalid ones say why."""
    score_range = config.score_range
    return [
        combine(parse_answer(edit, EditAnswer, score_range),
                parse_answer(quality, QualityAnswer, score_range), config.weights, score_range)
        for edit, quality in zip(edit_texts, quality_texts, strict=True)
    ]


def answer_json_schema(schema: type, config: SpatialRewardConfig) -> dict:
    """The JSON schema that constrained decoding follows. Numbers are integer enums, because
    outlines' JSON-schema regex ignores minimum/maximum; key order is the published one."""
    pair = {"type": "array", "items": {"enum": list(range(config.score_range + 1))},
            "minItems": 2, "maxItems": 2}
    reasoning = {"type": "string", "maxLength": config.max_reasoning_chars}
    properties = {"reasoning": reasoning, "score": pair}
    if schema is EditAnswer:
        box = {"type": "array", "items": {"enum": list(range(BOX_MAX + 1))},
               "minItems": 4, "maxItems": 4}
        region = {"type": "object", "additionalProperties": False,
                  "required": ["id", "label", "bbox_2d"],
                  "properties": {"id": {"type": "integer", "minimum": 0},
                                 "label": {"type": "string", "maxLength": 80},
                                 "bbox_2d": box}}
        properties = {"edit_region": {"type": "array", "items": region}, **properties}
    return {"type": "object", "additionalProperties": False,
            "required": list(properties), "properties": properties}


def package_judge(model: str, out: Path, dtype: str = "float16") -> Path:
    """A trained judge (a run's checkpoint model/ folder) rewritten for shipping: its weights
    in `dtype` (safetensors), with its tokenizer and image processor. `from_config` casts the
    weights to the dtype it is asked for."""
    from spatialrl.tiny import save_atomically

    tokenizer, image_processor, _ = load_qwen_vl_processing(model)
    weights = Qwen3VLForConditionalGeneration.from_pretrained(
        model, dtype=getattr(torch, dtype), use_safetensors=True)
    return save_atomically(Path(out), [weights, tokenizer, image_processor])
