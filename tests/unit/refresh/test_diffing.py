"""The refresh's hash-partitioned diff against a reference computed with plain dicts."""

import numpy as np
import pyarrow as pa
import pytest
from helpers import make_docs, write_parquet

from retrieval_core.config import CorpusConfig
from retrieval_core.io import sharding
from retrieval_core.io.corpus import assemble_text, inspect_corpus, text_hash
from retrieval_core.io.sharding import plan_shards
from retrieval_core.refresh import diffing


def previous_segments(docs: list[dict], per_segment: int) -> dict[str, pa.Table]:
    """Segments of a previous version holding ``docs`` (row ids 1000, 1001, ...)."""
    out = {}
    for start in range(0, len(docs), per_segment):
        part = docs[start : start + per_segment]
        out[f"v1-shard-{start // per_segment:05d}"] = pa.table(
            {
                "row_id": pa.array(range(1000 + start, 1000 + start + len(part)), pa.int64()),
                "doc_id": [d["id"] for d in part],
                "text_hash": [text_hash(assemble_text(d["title"], d["text"])) for d in part],
            }
        )
    return out


def run_diff(tmp_path, snapshot: list[dict], previous: dict[str, pa.Table], buckets: int):
    path = write_parquet(tmp_path / "snap" / "c.parquet", snapshot, row_group_size=7)
    cfg = CorpusConfig(path=str(path), title_column="title")
    shards = plan_shards(inspect_corpus(cfg), 11)
    layout = diffing.layout_at(str(tmp_path))
    for shard in shards:
        diffing.map_snapshot_shard(shard, cfg, buckets, layout, str(tmp_path / "rejects" / f"{shard.name}.parquet"))
    for name, table in previous.items():
        diffing.map_previous_segment(name, table, buckets, layout)
    records = [diffing.reduce_bucket(b, [s.name for s in shards], sorted(previous), layout) for b in range(buckets)]
    return layout, records


@pytest.mark.parametrize("buckets", [1, 3, 8])
def test_diff_classifies_every_document_like_a_dict_join(tmp_path, buckets):
    day1 = make_docs(60, seed=1)
    day2 = [dict(d) for d in day1 if int(d["id"][3:]) % 10 != 3]  # 6 deleted
    for d in day2[::9]:
        d["text"] = d["text"] + " changed"  # 6 changed
    day2 += make_docs(5, seed=2, prefix="new")  # 5 added
    day2.append({"id": "bad", "title": "t", "text": "  "})  # rejected: blank text
    previous = previous_segments(day1, 16)
    layout, records = run_diff(tmp_path, day2, previous, buckets)

    old = {d["id"]: text_hash(assemble_text(d["title"], d["text"])) for d in day1}
    new = {d["id"]: text_hash(assemble_text(d["title"], d["text"])) for d in day2 if d["text"].strip()}
    expected = {
        "unchanged": sum(1 for i in new if old.get(i) == new[i]),
        "changed": sum(1 for i in new if i in old and old[i] != new[i]),
        "added": sum(1 for i in new if i not in old),
        "deleted": sum(1 for i in old if i not in new),
    }
    assert expected == {"unchanged": 48, "changed": 6, "added": 5, "deleted": 6}
    assert {k: sum(r[k] for r in records) for k in expected} == expected

    encode = pa.concat_tables([pa.parquet.read_table(diffing.bucket_file(layout, "encode", b)) for b in range(buckets)])
    assert sorted(encode.column("doc_id").to_pylist()) == sorted(i for i in new if old.get(i) != new[i])
    positions = {d["id"]: n for n, d in enumerate(day2)}
    assert all(
        positions[d] == r for d, r in zip(encode.column("doc_id").to_pylist(), encode.column("corpus_row").to_pylist())
    )
    deletes = pa.concat_tables(
        [pa.parquet.read_table(diffing.bucket_file(layout, "deletes", b)) for b in range(buckets)]
    )
    assert sorted(deletes.column("doc_id").to_pylist()) == sorted(i for i in old if i not in new)
    docmap = pa.concat_tables([pa.parquet.read_table(diffing.bucket_file(layout, "docmap", b)) for b in range(buckets)])
    assert dict(zip(docmap.column("doc_id").to_pylist(), docmap.column("corpus_row").to_pylist())) == {
        i: positions[i] for i in new
    }

    row_of = {
        i: r for t in previous.values() for i, r in zip(t.column("doc_id").to_pylist(), t.column("row_id").to_pylist())
    }
    gone = sorted(row_of[i] for i in old if new.get(i) != old[i])
    found = []
    for segment in previous:
        touched = [r["bucket"] for r in records if segment in r["tombstones"]]
        found += diffing.read_tombstones(layout, segment, touched).tolist()
    assert sorted(found) == gone


def test_duplicate_doc_ids_in_the_snapshot_are_an_error(tmp_path):
    docs = make_docs(10)
    docs[7]["id"] = docs[2]["id"]
    with pytest.raises(diffing.DuplicateIdError, match="doc00002"):
        run_diff(tmp_path, docs, {}, 2)


def test_new_segments_cover_every_row_once_in_bucket_order_in_even_sizes():
    segments = diffing.plan_new_segments([5, 0, 12, 3], 6)
    assert [sum(s.stop - s.start for s in seg) for seg in segments] == [5, 5, 5, 5]  # 20 rows: 4 of 5, not 6,6,6,2
    flat = [(s.bucket, r) for seg in segments for s in seg for r in range(s.start, s.stop)]
    assert flat == [(b, r) for b, n in enumerate([5, 0, 12, 3]) for r in range(n)]
    assert diffing.plan_new_segments([0, 0], 6) == []
    assert [sum(s.stop - s.start for s in seg) for seg in diffing.plan_new_segments([7, 6], 6)] == [5, 4, 4]


def test_bucket_of_an_id_is_stable_and_spread():
    ids = [f"doc{i}" for i in range(4000)]
    b = sharding.buckets_of(ids, 8)
    assert np.array_equal(b, sharding.buckets_of(ids, 8))
    assert np.bincount(b, minlength=8).min() > 400
