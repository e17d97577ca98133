"""Images + prompts -> SpatialScore's model inputs.

Each sample is one chat: a user turn holding the image and the instruction (with the prompt in
it), then the assistant turn opened by `<|Reward|>`, whose final hidden state the head reads.
This composes the base model's own tokenizer (its chat template) and image processor, as
`Qwen2_5_VLProcessor` does, because that class needs torchvision for its video processor in
transformers 5, and scoring images must not.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, BatchFeature

from spatialrl.reward.config import PROMPT_FIELD, SpatialScoreConfig

REWARD_TOKEN = "<|Reward|>"


class SpatialScoreProcessor:
    def __init__(self, tokenizer, image_processor, instruction: str, image_token_id: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.instruction = instruction
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        self.reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        # Prompts are plain text: a special token inside one would break the layout.
        self.special_tokens = set(tokenizer.all_special_tokens)

    @classmethod
    def from_config(cls, config: SpatialScoreConfig) -> SpatialScoreProcessor:
        """The base model's tokenizer, with `<|Reward|>` added, and its image processor."""
        source = dict(pretrained_model_name_or_path=config.base_model, revision=config.revision)
        tokenizer = AutoTokenizer.from_pretrained(**source)
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [REWARD_TOKEN]}, replace_extra_special_tokens=False
        )
        budget = {"min_pixels": config.min_pixels, "max_pixels": config.max_pixels}
        pixels = {name: value for name, value in budget.items() if value is not None}
        image_processor = AutoImageProcessor.from_pretrained(**source, **pixels)
        image_token_id = AutoConfig.from_pretrained(**source).image_token_id
        return cls(tokenizer, image_processor, config.instruction, image_token_id)

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> BatchFeature:
        """input_ids and attention_mask [B, L] (padded on `tokenizer.padding_side`),
        pixel_values [patches, C*T*P*P] and image_grid_thw [B, 3]."""
        self._check(images, prompts)
        vision = self.image_processor(images=list(images), return_tensors="pt")
        merged_patches = vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2
        texts = [
            self._chat_text(prompt, count)
            for prompt, count in zip(prompts, merged_patches.tolist(), strict=True)
        ]
        text = self.tokenizer(texts, padding=True, return_tensors="pt")
        return BatchFeature({**text, **vision})

    def _chat_text(self, prompt: str, image_tokens: int) -> str:
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": self.instruction.replace(PROMPT_FIELD, prompt)},
                ],
            }
        ]
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        # The template holds one placeholder per image; the model needs one per merged patch.
        return text.replace(self.image_token, self.image_token * image_tokens) + REWARD_TOKEN

    def _check(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> None:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        if not images:
            raise ValueError("images: need at least one image")
        for index, image in enumerate(images):
            if not isinstance(image, Image.Image):
                kind = type(image).__name__
                raise ValueError(f"images[{index}]: expected a PIL image, got {kind}")
            if image.width == 0 or image.height == 0:
                raise ValueError(f"images[{index}]: zero-size image ({image.width}x{image.height})")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompts[{index}]: empty prompt {prompt!r}")
            if found := [token for token in self.special_tokens if token in prompt]:
                raise ValueError(f"prompts[{index}]: contains special tokens {found}")
