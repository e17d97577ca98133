"""Preference pairs on disk: one parquet row per (prompt, preferred image, rejected image).

Columns (PAIR_SCHEMA):
    prompt            string   the clean prompt; image_preferred shows it
    perturbed_prompt  string   the prompt with num_perturbed relations reversed; image_rejected
                               shows it
    image_preferred   binary   PNG bytes
    image_rejected    binary   PNG bytes
    num_perturbed     int8     1..3
    source            string   where the images came from: "shapes" or a model id
    split             string   "train" or "test"
    pair_id           string   unique id

Reading validates every row: a file without one of these columns is an error naming it; a
row with an empty prompt, a prompt holding special tokens (spatialrl.prompts), an
undecodable image or an out-of-range value is skipped and counted by reason, and the counts
are logged.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from spatialrl.errors import InputError
from spatialrl.images import upright_rgb
from spatialrl.prompts import prompt_problem

log = logging.getLogger(__name__)

PAIR_SCHEMA = pa.schema(
    [
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("perturbed_prompt", pa.string(), nullable=False),
        pa.field("image_preferred", pa.binary(), nullable=False),
        pa.field("image_rejected", pa.binary(), nullable=False),
        pa.field("num_perturbed", pa.int8(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("pair_id", pa.string(), nullable=False),
    ]
)
SPLITS = ("train", "test")


class PairFileError(InputError):
    """A pairs file that cannot be read as a whole (for example a missing column)."""


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    perturbed_prompt: str
    image_preferred: bytes  # PNG
    image_rejected: bytes  # PNG
    num_perturbed: int
    source: str
    split: str
    pair_id: str


@dataclass
class PairReadResult:
    pairs: list[PreferencePair]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows skipped


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return upright_rgb(image)


def write_pairs(path: str | Path, records: Iterable[PreferencePair], batch_size: int = 256) -> int:
    """Stream records into a parquet file; returns the number written."""
    return write_records(path, records, PAIR_SCHEMA, batch_size)


def write_records(
    path: str | Path, records: Iterable, schema: pa.Schema, batch_size: int = 256
) -> int:
    """Stream dataclass records, one row each in `schema`, into a parquet file; returns the
    number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with pq.ParquetWriter(path, schema) as writer:
        batch: list = []
        for record in records:
            batch.append(record)
            if len(batch) == batch_size:
                writer.write_table(_to_table(batch, schema))
                written, batch = written + len(batch), []
        if batch:
            writer.write_table(_to_table(batch, schema))
            written += len(batch)
    return written


def _to_table(records: list, schema: pa.Schema) -> pa.Table:
    rows = [asdict(r) for r in records]
    return pa.Table.from_pylist(rows, schema=schema)


def iter_pairs(
    path: str | Path,
    batch_size: int = 256,
    split: str | None = None,
    skipped: Counter[str] | None = None,
) -> Iterator[PreferencePair]:
    """Valid pairs, streamed batch by batch; invalid rows are counted into `skipped` by
    reason and logged once the file is exhausted. `split` keeps only that split."""
    file = open_checked(path)
    skipped = skipped if skipped is not None else Counter()
    for batch in file.iter_batches(batch_size=batch_size, columns=PAIR_SCHEMA.names):
        for row in batch.to_pylist():
            problem = _row_problem(row)
            if problem:
                skipped[problem] += 1
            elif split is None or row["split"] == split:
                yield PreferencePair(**row)
    if skipped:
        log.warning("%s: skipped %d invalid rows: %s", path, sum(skipped.values()), dict(skipped))


def read_pairs(path: str | Path, split: str | None = None, batch_size: int = 256) -> PairReadResult:
    skipped: Counter[str] = Counter()
    pairs = list(iter_pairs(path, batch_size=batch_size, split=split, skipped=skipped))
    return PairReadResult(pairs=pairs, skipped=dict(skipped))


def open_checked(
    path: str | Path, schema: pa.Schema = PAIR_SCHEMA, kind: str = "pairs"
) -> pq.ParquetFile:
    """The parquet file at `path`, refused (PairFileError) unless it has `schema`'s columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file not found: {path}")
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:  # a bad footer raises a bare OSError
        raise PairFileError(f"{path}: not a readable parquet file ({err})") from err
    present = set(file.schema_arrow.names)
    for column in schema.names:
        if column not in present:
            raise PairFileError(f"{path}: missing column {column!r} (has {sorted(present)})")
    return file


def _row_problem(row: dict) -> str | None:
    """Reason to skip a row, or None if it is valid."""
    for column in ("prompt", "perturbed_prompt", "source", "pair_id"):
        if not (row[column] or "").strip():
            return f"empty_{column}"
    for column in ("prompt", "perturbed_prompt"):
        if prompt_problem(row[column]):  # special tokens, broken Unicode
            return f"bad_{column}"
    for column in ("image_preferred", "image_rejected"):
        if not _is_image(row[column]):
            return f"corrupt_{column}"
    if row["num_perturbed"] not in (1, 2, 3):
        return "bad_num_perturbed"
    if row["split"] not in SPLITS:
        return "bad_split"
    return None


def _is_image(data: bytes | None) -> bool:
    if not data:
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:  # PIL raises many types for malformed files
        return False
    return True
