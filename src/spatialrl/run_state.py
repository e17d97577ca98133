"""What a trainer checkpoint needs beyond the weights and optimiser state.

A checkpoint folder output_dir/checkpoints/iteration-NNNNNN holds the learner's files and
run_state.json, written last: a folder without it is incomplete and never resumed from.

RNG: every random draw of a run is a function of (seed, iteration, prompt, sample index) for
rollouts and of (seed, version, rank) for updates, so the iteration and version restore it.
The data cursor is next_iteration * prompts_per_iteration (iteration i reads prompts
[i * P, (i + 1) * P)); it is stored as well so that a changed P on resume is caught.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, Field

STATE_FILE = "run_state.json"
CHECKPOINT_PREFIX = "iteration-"


class RunState(BaseModel):
    next_iteration: int = Field(ge=0)
    version: int = Field(ge=0)
    prompt_cursor: int = Field(ge=0)
    mlflow_run_id: str
    counters: dict[str, float] = Field(default_factory=dict)


def checkpoint_dir(output_dir: str | Path, iteration: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{iteration:06d}"


def save_run_state(folder: Path, state: RunState) -> None:
    """Written to a temporary name and renamed, so a crash never leaves half a state file."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{STATE_FILE}.partial"
    partial.write_text(state.model_dump_json(indent=2) + "\n")
    os.replace(partial, folder / STATE_FILE)


def load_run_state(folder: Path) -> RunState:
    path = folder / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not a complete checkpoint (no {STATE_FILE}): {folder}")
    return RunState.model_validate(json.loads(path.read_text()))


def latest_checkpoint(output_dir: str | Path) -> Path:
    """The newest complete checkpoint under output_dir/checkpoints."""
    root = Path(output_dir) / "checkpoints"
    complete = sorted(
        path for path in root.glob(f"{CHECKPOINT_PREFIX}*") if (path / STATE_FILE).is_file()
    )
    if not complete:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {root}")
    return complete[-1]
