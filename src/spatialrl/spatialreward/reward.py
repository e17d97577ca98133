"""The scalar SpatialReward from its two judgements, with the public defaults:

    edit    = (0.6 success + 0.4 over_editing) / (score_range / 10)   (0-10)
    quality = (0.5 naturalness + 0.5 artifacts) / (score_range / 10)  (0-10)
    reward  = edit^0.8 * quality^0.2 / 10                              (0-1)

A sample whose answers do not both parse gets no reward at all (`reward` None, `valid`
False and the reason), never a default score.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from spatialrl.spatialreward.answers import EditAnswer, ParsedAnswer, QualityAnswer


class RewardWeights(BaseModel):
    """Weights of the scalar reward; each pair sums to 1, `edit_exponent` is in [0, 1]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    success: float = Field(0.6, ge=0, le=1)
    over_editing: float = Field(0.4, ge=0, le=1)
    naturalness: float = Field(0.5, ge=0, le=1)
    artifacts: float = Field(0.5, ge=0, le=1)
    edit_exponent: float = Field(0.8, ge=0, le=1)  # quality gets 1 - edit_exponent

    @model_validator(mode="after")
    def pairs_sum_to_one(self) -> RewardWeights:
        for first, second in (("success", "over_editing"), ("naturalness", "artifacts")):
            total = getattr(self, first) + getattr(self, second)
            if abs(total - 1) > 1e-6:
                raise ValueError(f"weights {first} + {second} must sum to 1, got {total:g}")
        return self


@dataclass(frozen=True)
class SpatialRewardResult:
    """One sample's reward. When `valid` is False, `reward`, `edit` and `quality` are None
    and `reason` names which answer failed and why ("edit:truncated", "quality:box", ...)."""

    valid: bool
    reward: float | None
    edit: float | None
    quality: float | None
    reason: str | None
    edit_answer: ParsedAnswer[EditAnswer]
    quality_answer: ParsedAnswer[QualityAnswer]


def combine(
    edit_answer: ParsedAnswer[EditAnswer],
    quality_answer: ParsedAnswer[QualityAnswer],
    weights: RewardWeights,
    score_range: int,
) -> SpatialRewardResult:
    """The reward of one sample from its two parsed answers."""
    for name, parsed in (("edit", edit_answer), ("quality", quality_answer)):
        if not parsed.valid:
            return SpatialRewardResult(False, None, None, None, f"{name}:{parsed.reason}",
                                       edit_answer, quality_answer)
    scale = score_range / 10  # both judgements on 0-10
    edit, quality = edit_answer.answer, quality_answer.answer
    edit_score = (weights.success * edit.success + weights.over_editing * edit.over_editing) / scale
    quality_score = (weights.naturalness * quality.naturalness
                     + weights.artifacts * quality.artifacts) / scale
    exponent = weights.edit_exponent
    reward = edit_score**exponent * quality_score ** (1 - exponent) / 10
    return SpatialRewardResult(True, reward, edit_score, quality_score, None,
                               edit_answer, quality_answer)


def invalid_counts(results: list[SpatialRewardResult]) -> Counter[str]:
    """How many samples were invalid, by reason ("edit:truncated": 3, ...)."""
    return Counter(result.reason for result in results if not result.valid)
