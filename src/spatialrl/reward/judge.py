"""A zero-shot pairwise VLM judge: Qwen2.5-VL shown two images and a prompt, asked which
image matches the prompt's spatial relations.

The answer is read deterministically from the next-token logits of "1" and "2" after the
opened assistant turn (no sampling): P(first) = softmax over those two logits. As the paper
does for its VLM baselines, every pair is judged in both image orders and the two
probabilities are averaged, which cancels the judge's bias towards a position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from pydantic import Field, model_validator
from transformers import Qwen2_5_VLForConditionalGeneration

from spatialrl.config import Section
from spatialrl.reward.config import PROMPT_FIELD
from spatialrl.reward.inputs import QwenVLChatEncoder, load_qwen_vl_processing

ANSWERS = ("1", "2")

DEFAULT_QUESTION = (
    "Which of the two images depicts the spatial relations described in the prompt "
    "correctly: which object is left or right of, above or below, in front of or behind "
    "which? Ignore style and image quality.\n"
    "Prompt: {prompt}\n"
    "Answer with 1 or 2."
)


class PairwiseJudgeConfig(Section):
    # Hub id or local from_pretrained folder of a Qwen2.5-VL model and its processor files.
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # The text after the two images; "{prompt}" is replaced by the generation prompt.
    question: str = DEFAULT_QUESTION
    # Pixel budget per image; None keeps the model's image processor's own.
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> PairwiseJudgeConfig:
        if PROMPT_FIELD not in self.question:
            raise ValueError(f"question: must contain {PROMPT_FIELD} where the prompt goes")
        return self


@dataclass
class PairwiseVerdict:
    """P(image a matches the prompt better than image b), [B] fp32 each, per order shown."""

    a_shown_first: torch.Tensor
    a_shown_second: torch.Tensor

    @property
    def p_a(self) -> torch.Tensor:
        """Both orders averaged."""
        return (self.a_shown_first + self.a_shown_second) / 2


class PairwiseJudge:
    def __init__(
        self,
        model: Qwen2_5_VLForConditionalGeneration,
        encoder: QwenVLChatEncoder,
        config: PairwiseJudgeConfig,
    ):
        self.model = model
        self.encoder = encoder
        self.config = config
        self.answer_ids = [self._single_token_id(answer) for answer in ANSWERS]

    @classmethod
    def from_config(
        cls, config: PairwiseJudgeConfig, device: str | torch.device = "cpu"
    ) -> PairwiseJudge:
        encoder = QwenVLChatEncoder(
            *load_qwen_vl_processing(
                config.model, config.revision, config.min_pixels, config.max_pixels
            )
        )
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            config.model,
            revision=config.revision,
            dtype=getattr(torch, config.dtype),
            attn_implementation=config.attn_implementation,
        )
        return cls(model.requires_grad_(False).eval().to(device), encoder, config)

    def _single_token_id(self, answer: str) -> int:
        ids = self.encoder.tokenizer.encode(answer, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{self.config.model}: answer {answer!r} is not one token ({ids})")
        return ids[0]

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def compare(
        self, images_a: Sequence[Image.Image], images_b: Sequence[Image.Image],
        prompts: Sequence[str],
    ) -> PairwiseVerdict:
        """Judge a against b for each prompt, in both orders (one forward of 2B chats)."""
        self.encoder.check_inputs(prompts, images_a=images_a, images_b=images_b)
        first = list(images_a) + list(images_b)
        second = list(images_b) + list(images_a)
        a_first, b_first = self.p_first(first, second, list(prompts) * 2).chunk(2)
        return PairwiseVerdict(a_shown_first=a_first, a_shown_second=1 - b_first)

    @torch.no_grad()
    def p_first(
        self, first: Sequence[Image.Image], second: Sequence[Image.Image], prompts: Sequence[str]
    ) -> torch.Tensor:
        """[B] fp32: P(answer "1"), i.e. that the image shown first matches better, against
        answer "2"."""
        contents = [
            [
                {"type": "text", "text": "Image 1:"},
                {"type": "image"},
                {"type": "text", "text": "Image 2:"},
                {"type": "image"},
                {"type": "text", "text": self.config.question.replace(PROMPT_FIELD, prompt)},
            ]
            for prompt in prompts
        ]
        images = [[a, b] for a, b in zip(first, second, strict=True)]
        inputs = self.encoder.encode(contents, images).to(self.device)
        vl_model = self.model.model
        hidden = vl_model(
            **inputs,
            # Marks image tokens, so padded rows get the same 3D positions as unpadded ones.
            mm_token_type_ids=(inputs["input_ids"] == vl_model.config.image_token_id).int(),
            use_cache=False,
        ).last_hidden_state
        # The last real token of each row, under left or right padding alike.
        mask = inputs["attention_mask"]
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
        next_token = hidden[torch.arange(len(last), device=last.device), last]
        # The LM head on one position per row, not on the whole sequence.
        logits = self.model.lm_head(next_token)[:, self.answer_ids].float()
        return logits.softmax(-1)[:, 0]
