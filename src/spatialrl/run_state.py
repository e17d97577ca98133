"""What a trainer checkpoint needs beyond the weights and optimiser state, and where the files
of a run live.

output_dir is a local path or a URI (file://, s3://, gs://; see spatialrl.storage). A
checkpoint folder output_dir/checkpoints/iteration-NNNNNN holds the learner's files and
run_state.json, written last (with storage.write_bytes, which never leaves half a file): a
folder without it is incomplete and never resumed from. On a URI the learner's files are
uploaded before run_state.json is written, so the same rule holds there.

The marker records the sha256 of every other file of the checkpoint; a resume checks them
before anything is loaded. A newest checkpoint whose marker does not parse, or whose files
do not match it, is skipped with a warning naming it and why, and the previous complete one
is used; a new checkpoint never writes into an existing folder (it takes the name with the
next `.N` suffix), so the skipped one stays as it is. Reading the checksums back costs one
read of the checkpoint (from the bucket, for a URI).

RNG: every random draw of a run is a function of (seed, iteration, prompt, sample index) for
rollouts and of (seed, version, rank) for updates, so the iteration and version restore it.
The data cursor is next_iteration * prompts_per_iteration (iteration i reads prompts
[i * P, (i + 1) * P)); it is stored as well so that a changed P on resume is caught.
"""

from __future__ import annotations

import logging
import os
import re

from pydantic import BaseModel, Field, ValidationError

from spatialrl import checkpoint_digests, storage
from spatialrl.checkpoint_digests import CheckpointError
from spatialrl.config import ConfigError

log = logging.getLogger(__name__)

STATE_FILE = "run_state.json"
CHECKPOINT_PREFIX = "iteration-"
# iteration-NNNNNN, or iteration-NNNNNN.K when K folders of that iteration already existed.
CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)(?:\.(\d+))?")
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
    # Path (relative to the checkpoint folder) -> sha256 of every other file; None in markers
    # written before checksums were recorded.
    files: dict[str, str] | None = None


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


def checkpoint_name(iteration: int, attempt: int = 0) -> str:
    return f"{CHECKPOINT_PREFIX}{iteration:06d}" + (f".{attempt}" if attempt else "")


def checkpoint_dir(output_dir: str | os.PathLike, iteration: int, attempt: int = 0) -> str:
    return storage.join(output_dir, CHECKPOINTS_FOLDER, checkpoint_name(iteration, attempt))


def new_checkpoint_dir(output_dir: str | os.PathLike, iteration: int) -> str:
    """The folder for a new checkpoint of `iteration`: never one that exists (a damaged
    checkpoint a resume skipped, or one a crash left half-written)."""
    attempt = 0
    while storage.exists(folder := checkpoint_dir(output_dir, iteration, attempt)):
        attempt += 1
    return folder


def _checkpoint_files(folder: str | os.PathLike) -> list[str]:
    """Every file of a checkpoint but its marker (and a marker write's temporary file)."""
    names = storage.list_files(folder) if storage.exists(folder) else []
    return [name for name in names if not name.startswith(STATE_FILE)]


def save_run_state(folder: str | os.PathLike, state: RunState) -> None:
    """The completion marker, with the sha256 of every other file: write it after them."""
    files = checkpoint_digests.digests(folder, _checkpoint_files(folder))
    marker = state.model_copy(update={"files": files})
    storage.write_bytes(storage.join(folder, STATE_FILE),
                        (marker.model_dump_json(indent=2) + "\n").encode())


def load_run_state(folder: str | os.PathLike) -> RunState:
    """The marker of a checkpoint, after checking every file against its sha256 there;
    CheckpointError naming the file otherwise."""
    path = storage.join(folder, STATE_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"not a complete checkpoint (no {STATE_FILE}): {folder}")
    try:
        state = RunState.model_validate_json(storage.read_bytes(path))
    except ValidationError as err:
        raise CheckpointError(f"{path}: not a valid marker ({err.errors()[0]['msg']})") from None
    if state.files is None:
        log.warning("%s: written before checksums were recorded; files not verified", path)
    else:
        checkpoint_digests.verify(folder, state.files, _checkpoint_files(folder), STATE_FILE)
    return state


def latest_checkpoint(output_dir: str | os.PathLike) -> tuple[str, RunState]:
    """The newest checkpoint under output_dir/checkpoints that is complete and intact, and its
    state. A newer one that is damaged is skipped with a warning saying why."""
    root = storage.join(output_dir, CHECKPOINTS_FOLDER)
    files = storage.list_files(root) if storage.exists(root) else []
    markers = [name.removesuffix(f"/{STATE_FILE}") for name in files
               if name.count("/") == 1 and name.endswith(f"/{STATE_FILE}")]
    named = [(CHECKPOINT_NAME.fullmatch(name), name) for name in markers]
    order = sorted((int(m[1]), int(m[2] or 0), name) for m, name in named if m)
    damaged = []
    for *_, name in reversed(order):
        folder = storage.join(root, name)
        try:
            return folder, load_run_state(folder)
        except CheckpointError as err:
            log.warning("skipping checkpoint %s: %s; trying the previous one", name, err)
            damaged.append(str(err))
    if damaged:
        raise CheckpointError(f"--resume: no intact checkpoint under {root}: {'; '.join(damaged)}")
    raise FileNotFoundError(f"--resume: no complete checkpoint under {root}")
