"""The staleness rule: samples more than max_staleness versions old are dropped, never trained."""

from dataclasses import dataclass

import pytest

from spatialrl.staleness import dispatch_horizon, split_by_staleness, staleness


@dataclass
class Group:
    version: int


def test_stale_groups_are_split_off_and_fresh_ones_kept_in_order():
    groups = [Group(5), Group(3), Group(4), Group(2)]
    fresh, stale = split_by_staleness(groups, learner_version=5, max_staleness=1)
    assert [g.version for g in fresh] == [5, 4]
    assert [g.version for g in stale] == [3, 2]
    fresh, stale = split_by_staleness(groups, learner_version=5, max_staleness=0)
    assert [g.version for g in fresh] == [5] and len(stale) == 3


def test_a_sample_newer_than_the_learner_is_an_error():
    with pytest.raises(ValueError, match="newer than the learner"):
        staleness(learner_version=2, sample_version=3)
    with pytest.raises(ValueError, match="newer than the learner"):
        split_by_staleness([Group(3)], learner_version=2, max_staleness=5)


def test_dispatch_horizon_is_synchronous_at_zero_and_capped_by_the_run():
    assert dispatch_horizon(4, max_staleness=0, iterations=10) == 5
    assert dispatch_horizon(4, max_staleness=2, iterations=10) == 7
    assert dispatch_horizon(9, max_staleness=2, iterations=10) == 10
