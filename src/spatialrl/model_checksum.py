"""Checksums of model files, so that an answer names the exact weights that made it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

CHUNK_BYTES = 1 << 20


def files_checksum(paths: Iterable[Path]) -> str:
    """sha256 over each file's name and bytes, in name order: equal iff the files are (a
    moved folder keeps its checksum). The first 16 hex digits."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(f"{path.name}|{path.stat().st_size}|".encode())
        with path.open("rb") as stream:
            while chunk := stream.read(CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()[:16]
