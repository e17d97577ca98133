"""A benchmark's result file: its numbers, plus the command, machine and versions that
produced them (benchmarks import this as a sibling module: `python bench/NAME.py`)."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch


def write_result(result: dict, out: str | Path) -> None:
    result.update(
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        # The machine may be shared: a load above its cores slows every number.
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
                f"torch threads, load average {os.getloadavg()[0]:.1f} at the end",
        torch=torch.__version__,
    )
    try:
        import ray

        result["ray"] = ray.__version__
    except ImportError:  # the core runs without Ray
        pass
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
