"""Safety checks of the Ray loop that need no running cluster."""

import pytest

from spatialrl.learners.weight_sync import Published, verify_load


def test_a_weight_sync_checksum_mismatch_stops_the_run():
    published = Published(version=3, state=None, checksum="abc")
    assert verify_load(1, published, {"checksum": "abc", "seconds": 0.25}) == 0.25
    with pytest.raises(RuntimeError, match="rollout actor 1 holds weights xyz after loading "
                                           "version 3 \\(abc\\)"):
        verify_load(1, published, {"checksum": "xyz", "seconds": 0.25})
