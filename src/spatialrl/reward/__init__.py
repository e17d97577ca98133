"""SpatialScore, the learned spatial reward model: Qwen2.5-VL + LoRA + a Gaussian head."""

from spatialrl.reward.config import RewardLoraConfig, SpatialScoreConfig
from spatialrl.reward.inputs import REWARD_TOKEN, SpatialScoreProcessor
from spatialrl.reward.loss import gaussian_bt_loss, pairwise_accuracy
from spatialrl.reward.model import HeadOutput, ScoreOutput, SpatialScore

__all__ = [
    "REWARD_TOKEN",
    "HeadOutput",
    "RewardLoraConfig",
    "ScoreOutput",
    "SpatialScore",
    "SpatialScoreConfig",
    "SpatialScoreProcessor",
    "gaussian_bt_loss",
    "pairwise_accuracy",
]
