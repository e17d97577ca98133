"""Tiny random models of the production classes, saved in from_pretrained format for CPU tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path


def save_atomically(out_dir: Path, parts: Iterable) -> Path:
    """`save_pretrained` every part into a staging folder beside `out_dir`, then rename it
    into place (replacing an old folder), so a reader never sees a half-written model."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private to this user
    for part in parts:
        part.save_pretrained(staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir
