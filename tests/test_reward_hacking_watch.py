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


def evaluation(reward: float, accuracy: float, se: float = 0.01,
               agreement: float = 0.8) -> dict[str, float]:
    return {"eval/reward_mean": reward, "eval/relation_accuracy": accuracy,
            "eval/relation_accuracy_se": se, "eval/all_relations_correct": accuracy / 2,
            "eval/readable_objects": 0.5 + accuracy, "eval/reward_rule_agreement": agreement}


def test_watch_flags_reward_rising_while_rule_accuracy_falls(caplog):
    watch = RewardHackingWatch()
    assert watch.update(evaluation(1.0, 0.30), 0) == {"eval/reward_hacking_suspected": 0.0,
                                                      "eval/reward_decoupled": 0.0}
    assert watch.update(evaluation(2.0, 0.40), 9)["eval/reward_hacking_suspected"] == 0.0
    with caplog.at_level(logging.WARNING):
        assert watch.update(evaluation(3.0, 0.20), 19)["eval/reward_hacking_suspected"] == 1.0
    assert "possible reward hacking" in caplog.text
    assert watch.tags() == {"reward_hacking_suspected": "true", "reward_decoupled": "false"}
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
    assert watch.tags()["reward_hacking_suspected"] == "false"
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


def test_watch_flags_a_reward_that_rises_while_it_stops_following_the_rule_evaluator(caplog):
    """Issue 20's 150-iteration run: mu rose, relation accuracy stayed flat (no hacking by the
    first rule), and the reward's agreement with the rule evaluator fell to chance."""
    watch = RewardHackingWatch()
    assert watch.update(evaluation(1.0, 0.25, agreement=0.665), 0)["eval/reward_decoupled"] == 0
    # Agreement falling but still above chance: not flagged.
    assert watch.update(evaluation(3.0, 0.25, agreement=0.6), 49)["eval/reward_decoupled"] == 0
    with caplog.at_level(logging.WARNING):
        flags = watch.update(evaluation(6.7, 0.25, agreement=0.493), 149)
    assert flags == {"eval/reward_hacking_suspected": 0.0, "eval/reward_decoupled": 1.0}
    assert "only 0.493 of the time" in caplog.text
    assert watch.tags() == {"reward_hacking_suspected": "false", "reward_decoupled": "true"}
    summary = watch.summary()
    assert "reward_rule_agreement 0.665 -> 0.493" in summary
    assert summary.endswith("reward decoupled from the rule evaluator at iterations [150]")


def test_agreement_at_chance_with_a_falling_reward_or_unknown_is_not_flagged():
    watch = RewardHackingWatch()
    watch.update(evaluation(2.0, 0.3, agreement=0.5), 0)
    # The reward fell: the policy got worse for it, whatever the agreement.
    assert watch.update(evaluation(1.0, 0.3, agreement=0.4), 9)["eval/reward_decoupled"] == 0
    # No pair told apart by the rule evaluator: agreement NaN, nothing to say.
    assert "eval/reward_decoupled" not in watch.update(
        evaluation(3.0, 0.3, agreement=float("nan")), 19)
    assert watch.tags()["reward_decoupled"] == "false"
