"""The Ray trainer on a local autoscaling cluster (Ray's fake multi-node provider): the run
starts with the head node alone, the trainer's placement groups make the autoscaler add one
node per role, idle nodes are removed, and the run survives a lost rollout node, a lost
learner rank and a lost learner node. The scenarios are spatialrl.actors.fault_rehearsal's
(bench/fault_tolerance.py records them in bench/results/fault_tolerance.json); here they are
asserted."""

import pytest
from mlflow.tracking import MlflowClient

from spatialrl.actors import fault_rehearsal as rehearsal

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.slow]

IDLE_REMOVAL_S = 120  # idle timeout 6 s, plus autoscaler rounds on a loaded machine


@pytest.fixture
def cluster():
    """A fresh cluster per test: the head node alone at the start."""
    with rehearsal.autoscaling_cluster() as cluster:
        yield cluster


def assert_nothing_lost(record):
    assert record["worker_nodes_at_start"] == {}  # the head alone: every node was autoscaled
    assert record["lost"] == {"groups_twice": 0, "groups_partial": 0, "groups_missing": 0,
                              "groups_wrong_kept": 0, "foreign_rows": 0}


def test_a_lost_rollout_node_is_replaced_and_its_groups_redone(cluster, tiny_flux_path,
                                                               tmp_path):
    record = rehearsal.rollout_node_lost(cluster, tiny_flux_path, tmp_path)
    killed = record["killed"]
    assert killed["at_learner_version"] >= 1
    # The replacement is a second rollout node; nothing else was added.
    assert record["node_types_launched"] == {"rollout": 2, "reward": 1, "learner": 1}
    assert record["iterations"] == 3 and record["final_version"] == 3.0
    faults = record["faults_logged"]
    # Both actors were on the node: one death each, however many of their calls failed.
    assert faults["faults/rollout_actor_failures"] == 2
    assert faults["faults/redone_groups"] >= 1
    assert faults.get("faults/learner_restarts", 0) == 0
    assert_nothing_lost(record)


def test_samples_lost_with_their_node_before_learning_are_sampled_again(
        cluster, tiny_flux_path, tmp_path):
    record = rehearsal.samples_lost(cluster, tiny_flux_path, tmp_path)
    assert record["killed"]["at_learner_version"] == 0  # before the first update
    assert record["node_types_launched"] == {"rollout": 2, "reward": 1, "learner": 1}
    assert record["iterations"] == 3 and record["final_version"] == 3.0
    faults = record["faults_logged"]
    # The next iteration's rollouts may have been on the killed node too (max_staleness 1).
    assert faults["faults/resampled_iterations"] in (1, 2)
    assert faults["faults/redone_groups"] >= rehearsal.PROMPTS_PER_ITERATION  # the lost ones
    assert faults.get("faults/learner_restarts", 0) == 0
    assert_nothing_lost(record)


def assert_resumed_from_the_checkpoint_of_iteration_1(record, tmp_path):
    assert record["iterations"] == 4 and record["final_version"] == 4.0
    faults = record["faults_logged"]
    assert faults["faults/learner_restarts"] == 1
    # Iteration 2 came after the checkpoint of iteration 1: redone, and logged twice.
    assert faults["faults/redone_iterations"] == 1
    assert record["policy_version_history"] == [(0, 1.0), (1, 2.0), (2, 3.0), (2, 3.0),
                                                (3, 4.0)]
    assert_nothing_lost(record)
    metrics = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(
        record["run_id"]).data.metrics
    assert metrics["policy/version"] == 4.0


def test_a_lost_learner_rank_resumes_from_the_last_checkpoint(cluster, tiny_flux_path,
                                                              tmp_path):
    record = rehearsal.learner_rank_lost(cluster, tiny_flux_path, tmp_path)
    assert record["killed"]["after_iteration"] == 2
    # One node per role, as the trainer's placement groups asked: the rebuilt group takes
    # the old group's freed room, so no second learner node is started.
    assert record["node_types_launched"] == {"rollout": 1, "reward": 1, "learner": 1}
    assert_resumed_from_the_checkpoint_of_iteration_1(record, tmp_path)


def test_a_lost_learner_node_is_replaced_and_the_run_resumes_from_the_last_checkpoint(
        cluster, tiny_flux_path, tmp_path):
    record = rehearsal.learner_node_lost(cluster, tiny_flux_path, tmp_path)
    assert record["killed"]["what"] == "learner node: SIGKILL of its raylet and workers"
    # Both ranks were on the killed node; the rebuilt group is on a second learner node.
    assert record["node_types_launched"] == {"rollout": 1, "reward": 1, "learner": 2}
    assert_resumed_from_the_checkpoint_of_iteration_1(record, tmp_path)
    # Idle nodes are removed: nothing of the lost group (its placement group, objects its
    # ranks borrowed) keeps a node busy once the run is over.
    cluster.wait_until_only_the_head_is_left(IDLE_REMOVAL_S)
