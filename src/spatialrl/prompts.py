"""Prompt sources with a resumable cursor, for both tasks.

Text-to-image: a source is either "shapes" (an endless, seeded stream of shapes-world
prompts) or a parquet file with a `prompt` column. Edit: a record is an instruction and the
source image it edits; "shapes" draws them from the shapes-world edit engine
(spatialrl.spatialreward.edit_examples), a parquet file has `instruction` and `image_source`
(PNG bytes) columns, as `spatialrl data edits` writes them (one record per distinct pair).
A file is cycled in a fresh seeded order each epoch. The cursor is the number of records
handed out so far: saving it in a checkpoint and restoring it resumes the exact sequence.

The driver hands out (index, prompt text) only; whoever samples an edit looks its source
image up by index in its own copy of the source (`condition_image`), so images never pass
through the driver.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from spatialrl.config import PromptsConfig
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


@dataclass(frozen=True)
class EditTask:
    """One edit to sample: the instruction, and the image it applies to."""

    instruction: str
    source: Image.Image


Task = str | EditTask  # a text-to-image prompt, or an edit


def _read_table(path: Path, columns: list[str]) -> pa.Table:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:  # a bad footer raises a bare OSError
        raise InputError(f"{path}: not a readable parquet file ({err})") from None
    for column in columns:
        if column not in table.column_names:
            raise ValueError(f"{path}: missing column {column!r} (has {table.column_names})")
    return table.select(columns)


def read_prompt_file(path: str | Path) -> list[str]:
    path = Path(path)
    table = _read_table(path, ["prompt"])
    prompts = [check_prompt(prompt, f"{path}: row {row}")
               for row, prompt in enumerate(table.column("prompt").to_pylist())
               if prompt and prompt.strip()]
    if not prompts:
        raise ValueError(f"{path}: no non-empty prompts")
    return prompts


def read_edit_task_file(path: str | Path) -> list[EditTask]:
    """The distinct (instruction, source image) records of a parquet file, in file order; a
    bad instruction or an image that does not decode is an InputError naming its row."""
    from spatialrl.data.pairs import decode_image

    path = Path(path)
    table = _read_table(path, ["instruction", "image_source"])
    tasks, seen = [], set()
    for row, record in enumerate(table.to_pylist()):
        instruction, source = record["instruction"], record["image_source"]
        if (instruction, source) in seen:
            continue
        seen.add((instruction, source))
        check_prompt(instruction, f"{path}: row {row}")
        try:
            image = decode_image(source)
        except Exception as err:  # PIL raises several types for a corrupt image
            raise InputError(f"{path}: row {row}: image_source is not a readable image "
                             f"({type(err).__name__}: {err})") from None
        tasks.append(EditTask(instruction, image))
    if not tasks:
        raise ValueError(f"{path}: no edit records")
    return tasks


@lru_cache(maxsize=256)
def shapes_edit_task(seed: int, split: str, index: int):
    """Shapes-world edit example `index` of `split` (spatialrl.spatialreward.edit_examples):
    its instruction and source image are the task, the rest the rule evaluator's ground truth.
    Cached: one process reads a record's instruction and then its source image (in process,
    the loop's prompts and the rollout's sources)."""
    from spatialrl.spatialreward.edit_examples import build_example

    return build_example(seed, split, index)


class PromptSource:
    def __init__(self, source: str, seed: int, split: str = "train", cursor: int = 0,
                 task: str = "text_to_image"):
        self.source = source
        self.seed = seed
        self.split = split
        self.cursor = cursor
        self.task = task
        if source == "shapes":
            self._fixed = None
        else:
            self._fixed = read_prompt_file(source) if task == "text_to_image" else \
                read_edit_task_file(source)

    @classmethod
    def for_training(cls, cfg: PromptsConfig, seed: int) -> PromptSource:
        return cls(cfg.source, seed, task=cfg.task)

    def task_at(self, index: int) -> Task:
        if self._fixed is None:
            return self._shapes_task(index)
        epoch, offset = divmod(index, len(self._fixed))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self._fixed))
        return self._fixed[order[offset]]

    def _shapes_task(self, index: int) -> Task:
        if self.task == "edit":
            example = shapes_edit_task(self.seed, self.split, index)
            return EditTask(example.instruction, example.source_image)
        from spatialrl.data.shapes import sample_prompts

        return sample_prompts(1, seed=self.seed * 1_000_003 + index, split=self.split)[0]

    def _prompt_at(self, index: int) -> str:
        task = self.task_at(index)
        return task.instruction if isinstance(task, EditTask) else task

    def condition_images(self, indices: list[int]) -> list[Image.Image] | None:
        """The source images records `indices` edit; None for text-to-image prompts."""
        if self.task != "edit":
            return None
        return [self.task_at(index).source for index in indices]

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


@dataclass
class EvalTasks:
    """The held-out set evaluated at every evaluation: prompts (edit instructions for edits),
    the source images edits apply to, and for shapes-world edits the examples whose ground
    truth the rule evaluator checks the edits against."""

    prompts: list[str]
    condition_images: list[Image.Image] | None = None
    edit_examples: list | None = None  # spatialrl.spatialreward.edit_examples.EditExample


def eval_tasks(cfg: PromptsConfig, seed: int) -> EvalTasks:
    """The same set wherever it is built (the driver, every rollout worker)."""
    if cfg.task == "text_to_image":
        return EvalTasks(eval_prompts(cfg.eval_source, cfg.num_eval_prompts, seed))
    if cfg.eval_source == "shapes":
        examples = [shapes_edit_task(seed, "test", i) for i in range(cfg.num_eval_prompts)]
        return EvalTasks([e.instruction for e in examples],
                         [e.source_image for e in examples], examples)
    tasks = read_edit_task_file(cfg.eval_source)[:cfg.num_eval_prompts]
    return EvalTasks([t.instruction for t in tasks], [t.source for t in tasks])
