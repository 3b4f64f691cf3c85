"""The changes files of a version are written as their tables come, never gathered in one buffer."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval_core.refresh import refreshing


def upsert_tables(count: int, rows: int = 50, dim: int = 8):
    for number in range(count):
        ids = [f"d{number}-{i}" for i in range(rows)]
        vectors = np.random.default_rng(number).random((rows, dim), dtype=np.float32)
        yield pa.table(
            {
                "doc_id": ids,
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
                "text_hash": [f"{i:016x}" for i in range(rows)],
            }
        ).replace_schema_metadata({"fingerprint": "f" * 32})


def test_the_tables_are_written_in_order_one_row_group_each(tmp_path):
    url = str(tmp_path / "upserts.parquet")
    assert refreshing._stream(url, {}, upsert_tables(7), None) == 350
    written = pq.ParquetFile(url)
    assert written.metadata.num_row_groups == 7 and written.schema_arrow.metadata is None
    assert written.read().equals(pa.concat_tables(t.replace_schema_metadata(None) for t in upsert_tables(7)))


def test_no_tables_give_an_empty_file_with_the_columns(tmp_path):
    url = str(tmp_path / "deletes.parquet")
    schema = pa.schema([("doc_id", pa.string())])
    assert refreshing._stream(url, {}, iter(()), schema) == 0
    assert pq.read_table(url).schema.names == ["doc_id"] and pq.read_table(url).num_rows == 0


def test_a_failure_on_the_way_leaves_no_file(tmp_path):
    url = tmp_path / "upserts.parquet"

    def failing():
        yield from upsert_tables(2)
        raise OSError("a segment could not be read")

    with pytest.raises(OSError, match="could not be read"):
        refreshing._stream(str(url), {}, failing(), None)
    assert not url.exists() and not list(tmp_path.iterdir())
