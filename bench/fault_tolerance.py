"""Fault tolerance of the Ray trainer on a local autoscaling cluster: the four scenarios of
spatialrl.actors.fault_rehearsal (a lost rollout node while sampling, a lost rollout node
holding samples not yet learned from, a lost learner rank, a lost learner node), recorded in
a result file. tests/test_autoscaling_cluster.py asserts the same
scenarios.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fault_tolerance.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from results_file import write_result

from spatialrl.actors.fault_rehearsal import (
    NODE_TYPES,
    autoscaling_cluster,
    learner_node_lost,
    learner_rank_lost,
    rollout_node_lost,
    samples_lost,
)
from spatialrl.commands.tiny_models import write_tiny_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/fault_tolerance.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tiny_flux = write_tiny_models(workdir / "models")["flux"]
        with autoscaling_cluster() as cluster:
            result = {"node_types": NODE_TYPES}
            result["rollout_node_lost"] = rollout_node_lost(cluster, tiny_flux,
                                                            workdir / "rollout")
            for name, scenario in [("samples_lost", samples_lost),
                                   ("learner_lost", learner_rank_lost),
                                   ("learner_node_lost", learner_node_lost)]:
                cluster.wait_until_only_the_head_is_left(120)
                result[name] = scenario(cluster, tiny_flux, workdir / name)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
