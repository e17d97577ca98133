"""The reward/rule-evaluator agreement and the reward-hacking watch of every evaluation."""

import logging

import numpy as np
import pytest

from spatialrl.policy_evaluation import RewardHackingWatch, pairwise_agreement


def test_agreement_counts_only_pairs_the_rule_tells_apart():
    rule = np.array([0.0, 0.0, 1.0])
    assert pairwise_agreement(np.array([1.0, 5.0, 9.0]), rule) == 1.0
    assert pairwise_agreement(np.array([9.0, 5.0, 1.0]), rule) == 0.0
    # (0, 2) agrees, (1, 2) is a reward tie: one half.
    assert pairwise_agreement(np.array([0.0, 3.0, 3.0]), rule) == pytest.approx(0.75)
    assert np.isnan(pairwise_agreement(np.array([1.0, 2.0]), np.array([0.5, 0.5])))


def evaluation(reward: float, accuracy: float, se: float = 0.01) -> dict[str, float]:
    return {"eval/reward_mean": reward, "eval/relation_accuracy": accuracy,
            "eval/relation_accuracy_se": se, "eval/all_relations_correct": accuracy / 2,
            "eval/readable_objects": 0.5 + accuracy}


def test_watch_flags_reward_rising_while_rule_accuracy_falls(caplog):
    watch = RewardHackingWatch()
    assert watch.update(evaluation(1.0, 0.30), 0) == {"eval/reward_hacking_suspected": 0.0}
    assert watch.update(evaluation(2.0, 0.40), 9)["eval/reward_hacking_suspected"] == 0.0
    with caplog.at_level(logging.WARNING):
        assert watch.update(evaluation(3.0, 0.20), 19)["eval/reward_hacking_suspected"] == 1.0
    assert "possible reward hacking" in caplog.text
    assert watch.tags() == {"reward_hacking_suspected": "true"}
    summary = watch.summary()
    assert "relation_accuracy 0.3 -> 0.2" in summary and "iterations [20]" in summary
    assert "readable_objects 0.8 -> 0.7" in summary


def test_watch_tolerates_noise_and_a_falling_reward():
    watch = RewardHackingWatch()
    watch.update(evaluation(1.0, 0.30, se=0.05), 0)
    # Lower accuracy but within two standard errors of the difference: not flagged.
    assert watch.update(evaluation(2.0, 0.20, se=0.05), 9)["eval/reward_hacking_suspected"] == 0
    # Both fall: a worse policy, not hacking.
    assert watch.update(evaluation(0.5, 0.05), 19)["eval/reward_hacking_suspected"] == 0
    assert watch.tags() == {"reward_hacking_suspected": "false"}
    assert watch.summary().endswith("no reward hacking seen")


def test_watch_ignores_evaluations_without_the_rule_evaluator():
    watch = RewardHackingWatch()
    assert watch.update({"eval/reward_mean": 1.0}, 0) == {}
    assert watch.summary() == "no shapes-world evaluation ran"


def test_watch_on_edits_follows_the_rule_evaluators_edit_success(caplog):
    watch = RewardHackingWatch("eval/edit_success")

    def edits(reward: float, success: float) -> dict[str, float]:
        return {"eval/reward_mean": reward, "eval/edit_success": success,
                "eval/edit_success_se": 0.02, "eval/edits_done": success + 0.1}

    # A text-to-image evaluation carries no edit success: not watched.
    assert watch.update(evaluation(1.0, 0.3), 0) == {}
    watch.update(edits(0.4, 0.30), 0)
    with caplog.at_level(logging.WARNING):
        assert watch.update(edits(0.6, 0.10), 9)["eval/reward_hacking_suspected"] == 1.0
    assert "held-out edit_success fell (0.300 -> 0.100)" in caplog.text
    assert "edit_success 0.3 -> 0.1" in watch.summary()
