"""SpatialReward's answers: the pydantic schema, and parsing that never turns a bad answer
into a score.

An answer must be one JSON object and nothing else. Boxes are clamped to 0-1000 and must keep
x1 < x2 and y1 < y2 after clamping; scores outside 0-`score_range` are rejected, never
clipped; reasoning may only cite regions that exist. Whatever fails gets `valid=False` and a
reason from `INVALID_REASONS`, so that the caller can count it and drop the sample's group.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Generic, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from spatialrl.spatialreward.prompts import DEFAULT_SCORE_RANGE

BOX_MAX = 1000
# Why an answer is invalid; each is counted under its own name.
INVALID_REASONS = (
    "empty", "not_json", "truncated", "extra_text", "missing_key", "extra_key", "schema",
    "box", "score_range", "region_reference",
)
_REGION_MARKER = re.compile(r"<\|bbox_(\d+)\|>")
# pydantic error types that have a reason of their own; every other error is "schema"
_REASON_BY_ERROR = {"missing": "missing_key", "extra_forbidden": "extra_key",
                    "box": "box", "score_range": "score_range",
                    "region_reference": "region_reference"}

Coordinate = StrictInt | StrictFloat  # strict: "12" or true is not a coordinate
Score = StrictInt | StrictFloat


class EditRegion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[StrictInt, Field(ge=0)]
    label: str
    bbox_2d: tuple[Coordinate, Coordinate, Coordinate, Coordinate]

    @field_validator("bbox_2d")
    @classmethod
    def clamp_and_check(cls, box: tuple[float, ...]) -> tuple[float, ...]:
        x1, y1, x2, y2 = (min(max(float(value), 0.0), float(BOX_MAX)) for value in box)
        if not (x1 < x2 and y1 < y2):
            raise PydanticCustomError(
                "box", "empty after clamping to 0-1000: {box}", {"box": list(box)}
            )
        return x1, y1, x2, y2


def _check_scores(scores: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
    """Scores lie in 0-score_range (the parse context's, else the default)."""
    score_range = (info.context or {}).get("score_range", DEFAULT_SCORE_RANGE)
    if not all(0 <= score <= score_range for score in scores):
        raise PydanticCustomError(
            "score_range", "scores {scores} outside 0-{score_range}",
            {"scores": list(scores), "score_range": score_range},
        )
    return tuple(float(score) for score in scores)


class EditAnswer(BaseModel):
    """The edit judgement: where the edit is, why, and [success, over_editing]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    edit_region: list[EditRegion]
    reasoning: str
    score: tuple[Score, Score]

    check_scores = field_validator("score")(_check_scores)

    @model_validator(mode="after")
    def regions_are_unique_and_cited_ones_exist(self) -> EditAnswer:
        ids = [region.id for region in self.edit_region]
        if len(set(ids)) != len(ids):
            raise PydanticCustomError("region_reference", "repeated region ids {ids}",
                                      {"ids": ids})
        cited = {int(found) for found in _REGION_MARKER.findall(self.reasoning)}
        if missing := sorted(cited - set(ids)):
            raise PydanticCustomError("region_reference", "reasoning cites regions {missing} "
                                      "that edit_region lacks", {"missing": missing})
        return self

    @property
    def success(self) -> float:
        return self.score[0]

    @property
    def over_editing(self) -> float:
        return self.score[1]


class QualityAnswer(BaseModel):
    """The quality judgement: why, and [naturalness, artifacts]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reasoning: str
    score: tuple[Score, Score]

    check_scores = field_validator("score")(_check_scores)

    @property
    def naturalness(self) -> float:
        return self.score[0]

    @property
    def artifacts(self) -> float:
        return self.score[1]


AnswerT = TypeVar("AnswerT", EditAnswer, QualityAnswer)


@dataclass(frozen=True)
class ParsedAnswer(Generic[AnswerT]):
    """An answer read from generated text: `answer` when valid, else `reason` (one of
    INVALID_REASONS) and `detail` saying what was wrong."""

    valid: bool
    answer: AnswerT | None = None
    reason: str | None = None
    detail: str = ""


def parse_answer(
    text: str, schema: type[AnswerT], score_range: int = DEFAULT_SCORE_RANGE
) -> ParsedAnswer[AnswerT]:
    """Read `text` as exactly one JSON object of `schema`; never raises on a bad answer."""
    document, problem = _json_object(text)
    if problem:
        return ParsedAnswer(valid=False, reason=problem[0], detail=problem[1])
    try:
        answer = schema.model_validate(document, context={"score_range": score_range})
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "answer"
        return ParsedAnswer(valid=False, reason=_reason(first), detail=f"{where}: {first['msg']}")
    return ParsedAnswer(valid=True, answer=answer)


def _reason(error: dict) -> str:
    """The INVALID_REASONS name of a pydantic error; a missing list item (a short score
    pair) is a schema error, not a missing key."""
    if error["type"] == "missing" and not isinstance(error["loc"][-1], str):
        return "schema"
    return _REASON_BY_ERROR.get(error["type"], "schema")


def _json_object(text: str) -> tuple[object, tuple[str, str] | None]:
    """(the decoded object, None), or (None, (reason, detail))."""
    stripped = text.strip()
    if not stripped:
        return None, ("empty", "no text generated")
    if not stripped.startswith("{"):
        if "{" in stripped:
            return None, ("extra_text", f"text before the JSON object: {stripped[:40]!r}")
        return None, ("not_json", f"no JSON object in {stripped[:40]!r}")
    try:
        document, end = json.JSONDecoder().raw_decode(stripped)
    except json.JSONDecodeError as error:
        if error.pos >= len(stripped) or "Unterminated" in error.msg:
            return None, ("truncated", f"JSON ends early: {error.msg}")
        return None, ("not_json", f"{error.msg} at character {error.pos}")
    if rest := stripped[end:].strip():
        return None, ("extra_text", f"text after the JSON object: {rest[:40]!r}")
    return document, None
