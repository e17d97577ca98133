"""Images + text -> Qwen2.5-VL model inputs, for SpatialScore and the pairwise VLM judge.

Each sample is one chat: a user turn holding images and text, then the opened assistant turn.
This composes the base model's own tokenizer (its chat template) and image processor, as
`Qwen2_5_VLProcessor` does, because that class needs torchvision for its video processor in
transformers 5, and scoring images must not.

SpatialScore's user turn is its image and the instruction (with the prompt in it); its
assistant turn is opened by `<|Reward|>`, whose final hidden state the head reads.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, BatchFeature

from spatialrl.prompts import check_prompt
from spatialrl.reward.config import PROMPT_FIELD, SpatialScoreConfig

REWARD_TOKEN = "<|Reward|>"


def load_qwen_vl_processing(
    base_model: str,
    revision: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
):
    """(tokenizer, image processor, image token id) of a Qwen2.5-VL hub id or folder; a pixel
    budget left at None keeps the image processor's own."""
    source = dict(pretrained_model_name_or_path=base_model, revision=revision)
    return (
        AutoTokenizer.from_pretrained(**source),
        load_image_processor(base_model, revision, min_pixels, max_pixels),
        AutoConfig.from_pretrained(**source).image_token_id,
    )


def load_image_processor(
    base_model: str,
    revision: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
):
    """The Qwen2.5-VL image processor; a pixel budget left at None keeps its own."""
    budget = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    pixels = {name: value for name, value in budget.items() if value is not None}
    return AutoImageProcessor.from_pretrained(base_model, revision=revision, **pixels)


def max_input_pixels(config: SpatialScoreConfig) -> int:
    """The most pixels (width x height) SpatialScore reads of an image: its image processor
    resizes anything larger down to this (Qwen2-VL's processors keep max_pixels as
    size.longest_edge)."""
    processor = load_image_processor(
        config.base_model, config.revision, config.min_pixels, config.max_pixels
    )
    return processor.size.longest_edge


class QwenVLChatEncoder:
    """One user turn per sample, whose content parts ({"type": "image"} or {"type": "text",
    "text": ...}) are in order, then the opened assistant turn and an optional suffix."""

    def __init__(self, tokenizer, image_processor, image_token_id: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        # Prompts are plain text: a special token inside one would break the layout.
        self.special_tokens = set(tokenizer.all_special_tokens)

    def encode(
        self,
        contents: Sequence[list[dict]],
        images: Sequence[Sequence[Image.Image]],
        suffix: str = "",
    ) -> BatchFeature:
        """input_ids and attention_mask [B, L] (padded on `tokenizer.padding_side`),
        pixel_values [patches, C*T*P*P] and image_grid_thw [sum of images, 3], images in
        sample order. `images[i]` fills the image parts of `contents[i]`."""
        texts, vision = self.chat_inputs(contents, images)
        text = self.tokenizer([t + suffix for t in texts], padding=True, return_tensors="pt")
        return BatchFeature({**text, **vision})

    def chat_inputs(
        self, contents: Sequence[list[dict]], images: Sequence[Sequence[Image.Image]]
    ) -> tuple[list[str], BatchFeature]:
        """Each sample's chat text up to the opened assistant turn, with one image token per
        merged patch, and the image processor's tensors (see `encode`)."""
        vision = self.image_processor(
            images=[image for sample in images for image in sample], return_tensors="pt"
        )
        merged = vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2
        counts = iter(merged.tolist())
        texts = [
            self._chat_text(content, [next(counts) for _ in sample])
            for content, sample in zip(contents, images, strict=True)
        ]
        return texts, vision

    def _chat_text(self, content: list[dict], image_tokens: list[int]) -> str:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        # The template holds one placeholder per image; the model needs one per merged patch.
        before, *after = text.split(self.image_token)
        return before + "".join(
            self.image_token * count + piece
            for count, piece in zip(image_tokens, after, strict=True)
        )

    def check_inputs(
        self, prompts: Sequence[str], **image_lists: Sequence[Image.Image]
    ) -> None:
        """ValueError naming the first bad prompt or image; each image list (named by its
        keyword) holds one image per prompt."""
        for name, images in image_lists.items():
            if len(images) != len(prompts):
                raise ValueError(f"got {len(images)} {name} but {len(prompts)} prompts")
            if not images:
                raise ValueError(f"{name}: need at least one image")
            for index, image in enumerate(images):
                if not isinstance(image, Image.Image):
                    kind = type(image).__name__
                    raise ValueError(f"{name}[{index}]: expected a PIL image, got {kind}")
                if image.width == 0 or image.height == 0:
                    size = f"{image.width}x{image.height}"
                    raise ValueError(f"{name}[{index}]: zero-size image ({size})")
        for index, prompt in enumerate(prompts):
            check_prompt(prompt, f"prompts[{index}]")
            # The pattern check above misses special tokens of another form, if any.
            if found := [token for token in self.special_tokens if token in prompt]:
                raise ValueError(f"prompts[{index}]: contains special tokens {found}")


class SpatialScoreProcessor(QwenVLChatEncoder):
    def __init__(self, tokenizer, image_processor, instruction: str, image_token_id: int):
        super().__init__(tokenizer, image_processor, image_token_id)
        self.instruction = instruction
        self.reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)

    @classmethod
    def from_config(cls, config: SpatialScoreConfig) -> SpatialScoreProcessor:
        """The base model's tokenizer, with `<|Reward|>` added, and its image processor."""
        tokenizer, image_processor, image_token_id = load_qwen_vl_processing(
            config.base_model, config.revision, config.min_pixels, config.max_pixels
        )
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [REWARD_TOKEN]}, replace_extra_special_tokens=False
        )
        return cls(tokenizer, image_processor, config.instruction, image_token_id)

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> BatchFeature:
        """One image per prompt; see `QwenVLChatEncoder.encode` for the tensors."""
        self.check_inputs(prompts, images=images)
        contents = [
            [
                {"type": "image"},
                {"type": "text", "text": self.instruction.replace(PROMPT_FIELD, prompt)},
            ]
            for prompt in prompts
        ]
        return self.encode(contents, [[image] for image in images], suffix=REWARD_TOKEN)
