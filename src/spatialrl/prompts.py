"""Prompt sources with a resumable cursor.

A source is either "shapes" (an endless, seeded stream of shapes-world prompts) or a parquet
file with a `prompt` column, cycled in a fresh seeded order each epoch. The cursor is the
number of prompts handed out so far: saving it in a checkpoint and restoring it resumes the
exact sequence.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spatialrl.errors import InputError

# Chat-control markup of Qwen-style tokenizers (<|im_start|>, <|vision_start|>, <|Reward|>):
# a tokenizer reads it inside text as the control token itself, so a prompt holding it could
# rewrite the chat or plant the token whose hidden state the reward head reads.
SPECIAL_TOKEN = re.compile(r"<\|\w+\|>")


def prompt_problem(prompt: object) -> str | None:
    """Why `prompt` cannot be a prompt, or None. Every prompt that enters (HTTP, the CLI,
    pair files, RL prompt files) goes through this one check: prompts are plain text, never
    markup, so special tokens are refused rather than escaped."""
    if not isinstance(prompt, str) or not prompt.strip():
        return f"empty prompt {prompt!r}"
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"not valid Unicode text (a lone surrogate at character {err.start})"
    if token := SPECIAL_TOKEN.search(prompt):
        return f"holds {token.group()[:40]!r}: special tokens are refused, prompts are plain text"
    return None


def check_prompt(prompt: object, where: str) -> str:
    """`prompt` itself, or an InputError naming `where` and the problem."""
    if problem := prompt_problem(prompt):
        raise InputError(f"{where}: {problem}")
    return prompt


def read_prompt_file(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:  # a bad footer raises a bare OSError
        raise InputError(f"{path}: not a readable parquet file ({err})") from None
    if "prompt" not in table.column_names:
        raise ValueError(f"{path}: missing column 'prompt' (has {table.column_names})")
    prompts = [check_prompt(prompt, f"{path}: row {row}")
               for row, prompt in enumerate(table.column("prompt").to_pylist())
               if prompt and prompt.strip()]
    if not prompts:
        raise ValueError(f"{path}: no non-empty prompts")
    return prompts


class PromptSource:
    def __init__(self, source: str, seed: int, split: str = "train", cursor: int = 0):
        self.source = source
        self.seed = seed
        self.split = split
        self.cursor = cursor
        self._fixed = None if source == "shapes" else read_prompt_file(source)

    def _prompt_at(self, index: int) -> str:
        if self._fixed is None:
            from spatialrl.data.shapes import sample_prompts

            return sample_prompts(1, seed=self.seed * 1_000_003 + index, split=self.split)[0]
        epoch, offset = divmod(index, len(self._fixed))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self._fixed))
        return self._fixed[order[offset]]

    def take(self, count: int) -> list[tuple[int, str]]:
        """The next `count` (global index, prompt) pairs; the index doubles as a group id."""
        taken = self.slice(self.cursor, count)
        self.cursor += count
        return taken

    def slice(self, start: int, count: int) -> list[tuple[int, str]]:
        """(global index, prompt) pairs at positions [start, start + count), without moving the
        cursor: iteration i of a run with P prompts per iteration reads slice(i * P, P)."""
        return [(i, self._prompt_at(i)) for i in range(start, start + count)]


def eval_prompts(source: str, count: int, seed: int) -> list[str]:
    """A fixed held-out prompt set: the same prompts at every evaluation."""
    if source == "shapes":
        from spatialrl.data.shapes import sample_prompts

        return sample_prompts(count, seed=seed, split="test")
    return read_prompt_file(source)[:count]
