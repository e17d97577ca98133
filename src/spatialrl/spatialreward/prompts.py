"""The two SpatialReward instructions: the edit judgement (source and edited image) and the
quality judgement (edited image alone).

The wording is this project's own; what matches the published model is what its answers are
parsed against: the JSON keys, the 0-1000 box coordinates, the 0-`score_range` scales (25 by
default) and the `<|bbox_{id}|>` / `<|global|>` markers that reasoning uses to cite regions.
"""

from __future__ import annotations

DEFAULT_SCORE_RANGE = 25
GLOBAL_MARKER = "<|global|>"

EDIT_TEMPLATE = """You judge image edits. The first image is the original; the second is the \
edited version of it, made by following the editing instruction below.

Answer with one JSON object and nothing else, in this shape (keep the reasoning short):
{{"edit_region": [...], "reasoning": "...", "score": [...]}}

1. edit_region: where the second image differs from the first because of the edit, as a list of \
{{"id": 0, "label": "what changed there", "bbox_2d": [x1, y1, x2, y2]}} with coordinates \
from 0 to 1000 (0 is the left or top edge, 1000 the right or bottom edge). If nothing was \
edited, give an empty list [].
2. reasoning: write <|bbox_{{id}}|> before what you say about region id, and <|global|> \
before the overall verdict.
3. score: [success, over_editing], each from 0 to {score_range}. success: 0 when the edited \
image does not follow the instruction at all, {score_range} when it follows it perfectly. \
over_editing: 0 when the edited image is a different scene, {score_range} when only what the \
instruction asks for has changed.

Editing instruction:
{instruction}"""

QUALITY_TEMPLATE = """You judge the quality of a generated image.

Answer with one JSON object and nothing else, in this shape (keep the reasoning short):
{{"reasoning": "...", "score": [...]}}

score: [naturalness, artifacts], each from 0 to {score_range}. naturalness: 0 when the scene \
looks unnatural (wrong distances, shadows or lighting), {score_range} when it looks natural. \
artifacts: 0 when much of the image is distorted, blurred, watermarked or badly blended, \
{score_range} when it has no artifacts."""


def bbox_marker(region_id: int) -> str:
    """The marker that cites edit region `region_id` in the reasoning."""
    return f"<|bbox_{region_id}|>"


def edit_prompt(instruction: str, score_range: int = DEFAULT_SCORE_RANGE) -> str:
    """The text that follows the source and edited images."""
    if not instruction.strip():
        raise ValueError("edit instruction is empty")
    return EDIT_TEMPLATE.format(instruction=instruction.strip(), score_range=score_range)


def quality_prompt(score_range: int = DEFAULT_SCORE_RANGE) -> str:
    """The text that follows the edited image."""
    return QUALITY_TEMPLATE.format(score_range=score_range)


def edit_turn(instruction: str, score_range: int = DEFAULT_SCORE_RANGE) -> list[dict]:
    """The content parts of the edit judgement's user turn: the source image, the edited
    image, then the prompt. Every engine and the SFT data build the turn here."""
    return [{"type": "image"}, {"type": "image"},
            {"type": "text", "text": edit_prompt(instruction, score_range)}]


def quality_turn(score_range: int = DEFAULT_SCORE_RANGE) -> list[dict]:
    """The content parts of the quality judgement's user turn: the edited image, the prompt."""
    return [{"type": "image"}, {"type": "text", "text": quality_prompt(score_range)}]
