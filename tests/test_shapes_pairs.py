import logging
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spatialrl.data.pairs import (
    PAIR_SCHEMA,
    PairFileError,
    PreferencePair,
    decode_image,
    iter_pairs,
    png_bytes,
    read_pairs,
    write_pairs,
)


def _pair(i, **changes):
    fields = dict(
        prompt=f"a red circle to the left of a blue square {i}",
        perturbed_prompt="a red circle to the right of a blue square",
        image_preferred=png_bytes(Image.new("RGB", (8, 8), (i, 0, 0))),
        image_rejected=png_bytes(Image.new("RGB", (8, 8), (0, i, 0))),
        num_perturbed=1 + i % 3,
        source="shapes",
        split="train" if i % 4 else "test",
        pair_id=f"p{i}",
    )
    return PreferencePair(**(fields | changes))


def test_parquet_round_trip(tmp_path):
    pairs = [_pair(i) for i in range(10)]
    path = tmp_path / "pairs.parquet"
    assert write_pairs(path, pairs, batch_size=3) == 10
    assert pq.read_schema(path).remove_metadata() == PAIR_SCHEMA
    result = read_pairs(path, batch_size=4)
    assert result.pairs == pairs and result.skipped == {}
    assert decode_image(result.pairs[5].image_rejected).getpixel((0, 0)) == (0, 5, 0)


def test_iterator_streams_one_split(tmp_path):
    path = tmp_path / "pairs.parquet"
    write_pairs(path, (_pair(i) for i in range(12)))
    test_ids = [p.pair_id for p in iter_pairs(path, batch_size=5, split="test")]
    assert test_ids == ["p0", "p4", "p8"]
    assert len(read_pairs(path, split="train").pairs) == 9


@pytest.mark.parametrize("column", PAIR_SCHEMA.names)
def test_missing_column_error_names_it(tmp_path, column):
    path = tmp_path / "pairs.parquet"
    write_pairs(path, [_pair(1)])
    pq.write_table(pq.read_table(path).drop_columns([column]), path)
    with pytest.raises(PairFileError, match=f"missing column '{column}'"):
        read_pairs(path)


def test_bad_rows_are_skipped_counted_and_logged(tmp_path, caplog):
    rows = [
        _pair(0),
        _pair(1, image_preferred=b"\x89PNG\r\n\x1a\n not really a png"),
        _pair(2, image_rejected=png_bytes(Image.new("RGB", (8, 8)))[:40]),  # truncated
        _pair(3, prompt=""),
        _pair(4, prompt="   "),
        _pair(5, perturbed_prompt=""),
        _pair(6, num_perturbed=4),
        _pair(7, split="validation"),
        _pair(8),
    ]
    # Written by plain pyarrow (nullable columns, int64), as another tool might: this also
    # allows a null prompt, which a PreferencePair cannot carry.
    records = [asdict(r) for r in rows] + [asdict(_pair(9)) | {"prompt": None}]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    with caplog.at_level(logging.WARNING, logger="spatialrl.data.pairs"):
        result = read_pairs(path)
    assert [p.pair_id for p in result.pairs] == ["p0", "p8"]
    assert result.skipped == {
        "corrupt_image_preferred": 1,
        "corrupt_image_rejected": 1,
        "empty_prompt": 3,
        "empty_perturbed_prompt": 1,
        "bad_num_perturbed": 1,
        "bad_split": 1,
    }
    assert "skipped 8 invalid rows" in caplog.text


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_pairs(tmp_path / "nope.parquet")
