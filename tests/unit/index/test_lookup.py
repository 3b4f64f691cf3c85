"""RowLookup (a mine worker's cached lookups) against the uncached lookups it replaces."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import config

from jobs import encode
from retrieval_core.index import lookup
from retrieval_core.io.folder import Folder


def _rows(n: int) -> list[dict]:
    return [
        {
            "id": f"d{i}",
            "title": f"title {i % 7}" if i % 3 else None,
            "text": "" if i % 97 == 5 else f"document {i} about topic {i % 13}",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module", params=["jsonl", "parquet"])
def encoded(request, tiny_model, tmp_path_factory):
    """2,500 documents (some rejected for an empty text) in JSONL blocks of 1,000 lines with blank lines between,
    or Parquet row groups of 100 rows; encoded in this process."""
    folder = tmp_path_factory.mktemp(request.param)
    rows = _rows(2500)
    if request.param == "jsonl":
        path = folder / "corpus.jsonl"
        path.write_text("".join(json.dumps(r) + ("\n\n" if i % 400 == 0 else "\n") for i, r in enumerate(rows)))
    else:
        path = folder / "corpus.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=100)
    cfg = config(
        path,
        folder / "out",
        tiny_model,
        corpus__title_column="title",
        runtime__inline_rows=5000,
        runtime__rows_per_shard=600,
    )
    encode.run(cfg)
    return str(cfg.output.root)


def test_row_lookups_equal_the_direct_ones(encoded, monkeypatch):
    rows = lookup.RowLookup(Folder(encoded))
    wanted = sorted(set(np.random.default_rng(0).integers(0, 2500, 300).tolist()) | {0, 5, 999, 1000, 2499, -1})
    for _ in range(2):  # the second round with the corpus already planned
        assert rows.values(wanted) == {
            r: tuple(v) for r, v in lookup.row_values(Folder(encoded), wanted, ["doc_id", "text_hash"]).items()
        }
        texts = rows.texts(wanted)
        assert texts == lookup.texts_for_rows(Folder(encoded), wanted)
        values = rows.values(wanted)
        with monkeypatch.context() as patch:  # texts of found values: no embedding shard is read again
            patch.setattr(lookup, "read_shard_table", lambda *a, **k: pytest.fail("an embedding shard was read"))
            assert rows.texts_of(values) == texts
    assert 5 not in texts and texts[1000] == "title 6 document 1000 about topic 12"
    assert texts[999] == "document 999 about topic 11"  # no title on every third row
