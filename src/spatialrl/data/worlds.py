"""The prompt worlds by name, as the CLI and configs name them."""

from __future__ import annotations

from spatialrl.data.real_world import REAL_WORLD
from spatialrl.data.shapes import SHAPES_WORLD, PromptWorld

WORLDS: dict[str, PromptWorld] = {"shapes": SHAPES_WORLD, "real": REAL_WORLD}
