"""Two local Ray instances side by side (as on parallel test workers): each one's processes
find their own cluster when they look for "the" cluster, and ending one leaves the other."""

import pytest
import ray

from spatialrl.actors.local_cluster import LocalRayHead, connected, processes_naming

pytestmark = pytest.mark.ray


@ray.remote
def cluster_seen_from_a_task() -> list[str]:
    """What Ray libraries that find the cluster themselves see (Ray Train's placement-group
    cleaner calls the state API without an address; the state API needs the dashboard)."""
    from ray.util.state import list_nodes

    return [node.node_id for node in list_nodes()]


def test_two_instances_side_by_side_each_see_their_own():
    other = LocalRayHead(num_cpus=1)
    try:
        other.start()
        with connected(LocalRayHead(num_cpus=1, resources={"mine": 1}, dashboard=True)) as head:
            own_nodes = [node["NodeID"] for node in ray.nodes()]
            assert ray.get(cluster_seen_from_a_task.remote()) == own_nodes
            assert ray.cluster_resources()["mine"] == 1
            temp_dir = head.temp_dir
        assert not processes_naming(temp_dir)
        assert processes_naming(other.temp_dir)  # the other instance lives on
    finally:
        other.shutdown()
