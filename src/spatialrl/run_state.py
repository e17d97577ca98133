"""What a trainer checkpoint needs beyond the weights and optimiser state, and where the files
of a run live.

output_dir is a local path or a URI (file://, s3://, gs://; see spatialrl.storage). A
checkpoint folder output_dir/checkpoints/iteration-NNNNNN holds the learner's files and
run_state.json, written last (with storage.write_bytes, which never leaves half a file): a
folder without it is incomplete and never resumed from. On a URI the learner's files are
uploaded before run_state.json is written, so the same rule holds there.

RNG: every random draw of a run is a function of (seed, iteration, prompt, sample index) for
rollouts and of (seed, version, rank) for updates, so the iteration and version restore it.
The data cursor is next_iteration * prompts_per_iteration (iteration i reads prompts
[i * P, (i + 1) * P)); it is stored as well so that a changed P on resume is caught.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, Field

from spatialrl import storage
from spatialrl.config import ConfigError

STATE_FILE = "run_state.json"
CHECKPOINT_PREFIX = "iteration-"
# What a run writes into output_dir; a fresh run refuses a folder holding either.
CHECKPOINTS_FOLDER = "checkpoints"
LEDGER_FOLDER = "ledger"
RUN_FOLDERS = (CHECKPOINTS_FOLDER, LEDGER_FOLDER)


class RunState(BaseModel):
    next_iteration: int = Field(ge=0)
    version: int = Field(ge=0)
    prompt_cursor: int = Field(ge=0)
    mlflow_run_id: str
    counters: dict[str, float] = Field(default_factory=dict)


def prepare_output_dir(output_dir: str | os.PathLike, resume: bool = False) -> str:
    """output_dir as every process can use it (a local path made absolute, a URI as it is),
    created; an unsupported scheme or a filesystem that cannot be reached (no such bucket, no
    network, no permission) is a ConfigError naming it. A fresh run (not `resume`) into an
    output_dir that already holds a run's checkpoints or ledger is a ConfigError too: it would
    write over them. Call it before starting any actor."""
    output_dir = os.fspath(output_dir)
    try:
        storage.makedirs(output_dir)
        earlier = [name for name in RUN_FOLDERS if storage.exists(storage.join(output_dir, name))]
    except (OSError, ValueError) as error:  # pyarrow.ArrowInvalid is a ValueError
        raise ConfigError(f"output_dir {output_dir}: cannot be used: {error}") from error
    if earlier and not resume:
        raise ConfigError(
            f"output_dir {output_dir} already holds a run ({' and '.join(earlier)}): continue "
            "it with --resume or choose another output_dir"
        )
    return output_dir if storage.is_uri(output_dir) else os.path.abspath(output_dir)


def checkpoint_name(iteration: int) -> str:
    return f"{CHECKPOINT_PREFIX}{iteration:06d}"


def checkpoint_dir(output_dir: str | os.PathLike, iteration: int) -> str:
    return storage.join(output_dir, CHECKPOINTS_FOLDER, checkpoint_name(iteration))


def save_run_state(folder: str | os.PathLike, state: RunState) -> None:
    """The completion marker: write it after every other file of the checkpoint."""
    storage.write_bytes(storage.join(folder, STATE_FILE),
                        (state.model_dump_json(indent=2) + "\n").encode())


def load_run_state(folder: str | os.PathLike) -> RunState:
    path = storage.join(folder, STATE_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"not a complete checkpoint (no {STATE_FILE}): {folder}")
    return RunState.model_validate_json(storage.read_bytes(path))


def latest_checkpoint(output_dir: str | os.PathLike) -> str:
    """The newest complete checkpoint under output_dir/checkpoints."""
    root = storage.join(output_dir, CHECKPOINTS_FOLDER)
    files = storage.list_files(root) if storage.exists(root) else []
    complete = sorted(
        name.removesuffix(f"/{STATE_FILE}") for name in files
        if name.startswith(CHECKPOINT_PREFIX) and name.count("/") == 1
        and name.endswith(f"/{STATE_FILE}")
    )
    if not complete:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {root}")
    return storage.join(root, complete[-1])
