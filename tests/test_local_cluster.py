"""Two local Ray instances side by side (as on parallel test workers): each one's processes
find their own cluster when they look for "the" cluster, and ending one leaves the other."""

import os

import pytest
import ray

from spatialrl.actors.local_cluster import LocalRayHead, connected, processes_naming

pytestmark = pytest.mark.ray


@ray.remote
def ray_address_seen_from_a_task() -> str | None:
    """What Ray libraries that find the cluster themselves read first (Ray Train's
    placement-group cleaner calls the state API without an address; with two instances on the
    machine and no RAY_ADDRESS it fails with "Found multiple active Ray instances")."""
    return os.environ.get("RAY_ADDRESS")


def test_two_instances_side_by_side_each_see_their_own():
    other = LocalRayHead(num_cpus=1)
    try:
        other.start()
        with connected(LocalRayHead(num_cpus=1, resources={"mine": 1})) as head:
            assert ray.get(ray_address_seen_from_a_task.remote()) == head.address
            assert os.environ["RAY_ADDRESS"] == head.address  # the driver's state API too
            assert ray.cluster_resources()["mine"] == 1
            assert head.address != other.address
            temp_dir = head.temp_dir
        assert "RAY_ADDRESS" not in os.environ
        assert not processes_naming(temp_dir)
        assert processes_naming(other.temp_dir)  # the other instance lives on
    finally:
        other.shutdown()


def test_a_failed_start_is_cleaned_up_and_tried_again_then_named(monkeypatch):
    """Each attempt gets a new temp dir; a start that fails every time raises with Ray's
    output, and leaves no process or folder behind."""
    head = LocalRayHead(num_cpus=1, extra_args=("--no-such-flag",))
    temp_dirs = []
    start_once = head._start_once

    def recorded():
        started = start_once()
        temp_dirs.append(head.temp_dir)
        return started

    monkeypatch.setattr(head, "_start_once", recorded)
    with pytest.raises(RuntimeError, match=r"(?s)attempt 2 of 2.*no-such-flag"):
        head.start()
    assert len(set(temp_dirs)) == 2
    assert head.temp_dir is None and not any(os.path.exists(d) for d in temp_dirs)
