"""sha256 lists that make a checkpoint's files verifiable: whoever writes the files records
their digests, and a resume checks every file against them before anything is loaded, so a
changed, missing or planted file stops it with an error naming the file. Used by the policy
trainer's completion marker (run_state) and the reward trainer's per-rank lists."""

from __future__ import annotations

import os
from collections.abc import Iterable

from spatialrl import storage
from spatialrl.errors import InputError


class CheckpointError(InputError):
    """A checkpoint whose marker does not parse or whose files do not match it."""


def digests(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """Path (relative to `folder`) -> sha256, for each of `names`."""
    return {name: storage.sha256(storage.join(folder, name)) for name in names}


def verify(folder: str | os.PathLike, recorded: dict[str, str], found: list[str],
           listing: str) -> None:
    """The files `found` below `folder` against `recorded` (what `listing` holds):
    CheckpointError naming the first one that is unlisted, missing or changed."""
    if unknown := sorted(set(found) - recorded.keys()):
        raise CheckpointError(f"{storage.join(folder, unknown[0])}: not listed in {listing}")
    for name, digest in recorded.items():
        if name not in found:
            raise CheckpointError(f"{storage.join(folder, name)}: listed in {listing}, missing")
        if storage.sha256(storage.join(folder, name)) != digest:
            raise CheckpointError(
                f"{storage.join(folder, name)}: sha256 differs from the one in {listing}")
