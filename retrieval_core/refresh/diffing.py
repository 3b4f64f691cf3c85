"""The refresh's diff of tonight's corpus snapshot against the previous version: a join by doc id, partitioned by
a hash of the id, so that no process holds one entry per document of the corpus.

Map (one task per snapshot shard, and one per segment of the previous version): read the rows, and write them to one
file sorted by bucket (``hash(doc_id) % buckets``), one Parquet row group per bucket; the file's metadata says which
row group holds which bucket. Reduce (one task per bucket): read that bucket's row group of every map file, join by
doc id, and write what the refresh needs next:

    encode/bNNNNN.parquet      doc_id, corpus_row, text_hash, text  (changed and added documents: to encode)
    docmap/bNNNNN.parquet      doc_id, corpus_row                   (every document of the snapshot: text lookup)
    deletes/bNNNNN.parquet     doc_id                               (documents gone since the previous version)
    tombstones/<segment>/bNNNNN.parquet  row_id                     (previous rows no longer live: changed, deleted)
    _buckets/bNNNNN.json       the bucket's counts; written last (the bucket's commit record)

A document is unchanged when its doc id and text hash equal the previous version's; its row keeps its id and vector.
Memory per task: one snapshot shard (map) or one bucket of both sides (reduce).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retrieval_core.config import CorpusConfig
from retrieval_core.io import storage
from retrieval_core.io.corpus import read_shard, text_hash
from retrieval_core.io.folder import StageLayout
from retrieval_core.io.schemas import REJECTS_SCHEMA
from retrieval_core.io.sharding import Shard, buckets_of

BUCKET_ROWS = 1_000_000  # automatic bucket count: about this many snapshot rows per bucket
STATUSES = ("unchanged", "changed", "added", "deleted")

NEW_SCHEMA = pa.schema(
    [
        ("bucket", pa.int32()),
        ("doc_id", pa.string()),
        ("text_hash", pa.string()),
        ("corpus_row", pa.int64()),
        ("text", pa.string()),
    ]
)
OLD_SCHEMA = pa.schema(
    [
        ("bucket", pa.int32()),
        ("doc_id", pa.string()),
        ("text_hash", pa.string()),
        ("row_id", pa.int64()),
        ("segment", pa.string()),
    ]
)
ENCODE_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("corpus_row", pa.int64()), ("text_hash", pa.string()), ("text", pa.string())]
)
DOCMAP_SCHEMA = pa.schema([("doc_id", pa.string()), ("corpus_row", pa.int64())])
DELETES_SCHEMA = pa.schema([("doc_id", pa.string())])
TOMBSTONE_SCHEMA = pa.schema([("row_id", pa.int64())])


class DuplicateIdError(ValueError):
    """The snapshot holds a doc id twice."""


def bucket_count(total_rows: int, configured: int = 0) -> int:
    return configured if configured > 0 else max(1, math.ceil(total_rows / BUCKET_ROWS))


def layout_at(version_root: str, storage_options: dict | None = None) -> StageLayout:
    """The diff's files under ``<version_root>/_diff/`` (a scratch folder of the refresh): the map outputs per side,
    the bucket files, the tombstones, and a commit record per bucket (``_buckets/b00000.json``)."""
    return StageLayout(version_root, "_diff", storage_options or {}, records="_buckets", unit="b")


def map_file(layout: StageLayout, side: str, source: str) -> str:
    return layout.file(side, f"{source}.parquet")


def map_record(layout: StageLayout, side: str, source: str) -> str:
    return layout.file(side, "_done", f"{source}.json")


def bucket_file(layout: StageLayout, kind: str, bucket: int) -> str:
    return layout.file(kind, f"b{bucket:05d}.parquet")


def tombstone_file(layout: StageLayout, segment: str, bucket: int) -> str:
    return layout.file("tombstones", segment, f"b{bucket:05d}.parquet")


# ------------------------------------------------------------------------------------------------------ map


def write_partitioned(url: str, table: pa.Table, storage_options: dict | None = None) -> dict[int, int]:
    """Write ``table`` (with a ``bucket`` column) sorted by bucket, one row group per bucket; the file's metadata
    maps bucket -> row group. Returns rows per bucket."""
    table = table.sort_by([("bucket", "ascending")])
    values, starts = np.unique(table.column("bucket").to_numpy(), return_index=True)
    stops = list(starts[1:]) + [table.num_rows]
    groups = {int(b): i for i, b in enumerate(values)}
    schema = table.schema.with_metadata({"buckets": json.dumps(groups)})
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        for start, stop in zip(starts, stops):
            writer.write_table(
                table.slice(int(start), int(stop - start)).replace_schema_metadata(schema.metadata),
                row_group_size=int(stop - start) or 1,
            )
        if not groups:
            writer.write_table(table.replace_schema_metadata(schema.metadata))
    storage.write_bytes_atomic(url, sink.getvalue().to_pybytes(), storage_options)
    return {int(b): int(stop - start) for b, start, stop in zip(values, starts, stops)}


def read_bucket(url: str, bucket: int, storage_options: dict | None = None) -> pa.Table | None:
    """The rows of ``bucket`` in a file written by :func:`write_partitioned` (None when it has none)."""
    fs, path = storage.filesystem(url, storage_options)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        groups = json.loads(parquet.schema_arrow.metadata[b"buckets"])
        group = groups.get(str(bucket))
        return None if group is None else parquet.read_row_group(group).replace_schema_metadata(None)


def map_snapshot_shard(
    shard: Shard, corpus_cfg: CorpusConfig, buckets: int, layout: StageLayout, rejects_url: str
) -> dict:
    """Map one shard of the snapshot: its accepted rows (doc id, text hash, corpus row, text) partitioned by
    bucket, its rejects written to ``rejects_url``; returns and commits the shard's counts."""
    rows = read_shard(shard, corpus_cfg)
    table = pa.Table.from_arrays(
        [
            pa.array(buckets_of(rows.doc_ids, buckets), pa.int32()),
            pa.array(rows.doc_ids, pa.string()),
            pa.array([text_hash(t) for t in rows.texts], pa.string()),
            pa.array(rows.row_ids, pa.int64()),
            pa.array(rows.texts, pa.string()),
        ],
        schema=NEW_SCHEMA,
    )
    write_partitioned(map_file(layout, "new", shard.name), table, layout.storage_options)
    if rows.rejects:
        storage.write_parquet_atomic(
            rejects_url, pa.Table.from_pylist(rows.rejects, schema=REJECTS_SCHEMA), layout.storage_options
        )
    record = {
        "source": shard.name,
        "rows": len(rows.doc_ids),
        "rejected": len(rows.rejects),
        "rejects": rejects_url if rows.rejects else None,
    }
    storage.write_json_atomic(map_record(layout, "new", shard.name), record, layout.storage_options)
    return record


def map_previous_segment(segment: str, table: pa.Table, buckets: int, layout: StageLayout) -> dict:
    """Map one live segment of the previous version (``table``: row_id, doc_id, text_hash, tombstones applied)."""
    doc_ids = table.column("doc_id").to_pylist()
    out = pa.Table.from_arrays(
        [
            pa.array(buckets_of(doc_ids, buckets), pa.int32()),
            table.column("doc_id"),
            table.column("text_hash"),
            table.column("row_id"),
            pa.array([segment] * table.num_rows, pa.string()),
        ],
        schema=OLD_SCHEMA,
    )
    write_partitioned(map_file(layout, "old", segment), out, layout.storage_options)
    record = {"source": segment, "rows": table.num_rows}
    storage.write_json_atomic(map_record(layout, "old", segment), record, layout.storage_options)
    return record


# ------------------------------------------------------------------------------------------------------ reduce


def _side(layout: StageLayout, side: str, sources: list[str], bucket: int, schema: pa.Schema) -> pa.Table:
    parts = [read_bucket(map_file(layout, side, s), bucket, layout.storage_options) for s in sources]
    parts = [p.select(schema.names).cast(schema) for p in parts if p is not None]
    return pa.concat_tables(parts) if parts else schema.empty_table()


def reduce_bucket(
    bucket: int, new_sources: list[str], old_sources: list[str], layout: StageLayout, encode_all: bool = False
) -> dict:
    """Join one bucket of the snapshot with the same bucket of the previous version; write its outputs and
    commit record; returns the counts (and the rows each previous segment loses). ``encode_all`` (the encoder
    changed, so no vector can be reused): every live document goes to ``encode``, unchanged ones too."""
    new = _side(layout, "new", new_sources, bucket, NEW_SCHEMA)
    old = _side(layout, "old", old_sources, bucket, OLD_SCHEMA)
    _check_unique(new, bucket)
    joined = new.join(
        old.rename_columns(["old_bucket", "doc_id", "old_hash", "row_id", "segment"]),
        keys="doc_id",
        join_type="full outer",
    )
    status = _status(joined)
    so = layout.storage_options
    encode = joined.filter(
        pc.is_in(status, pa.array(["unchanged", "changed", "added"] if encode_all else ["changed", "added"]))
    )
    encode = encode.select(ENCODE_SCHEMA.names).sort_by([("corpus_row", "ascending")])
    storage.write_parquet_atomic(bucket_file(layout, "encode", bucket), encode.cast(ENCODE_SCHEMA), so)
    live = joined.filter(pc.invert(pc.equal(status, "deleted")))
    docmap = live.select(DOCMAP_SCHEMA.names).sort_by([("doc_id", "ascending")])
    storage.write_parquet_atomic(bucket_file(layout, "docmap", bucket), docmap.cast(DOCMAP_SCHEMA), so)
    deleted = joined.filter(pc.equal(status, "deleted")).select(["doc_id"]).sort_by([("doc_id", "ascending")])
    storage.write_parquet_atomic(bucket_file(layout, "deletes", bucket), deleted.cast(DELETES_SCHEMA), so)
    lost = _write_tombstones(joined.filter(pc.is_in(status, pa.array(["changed", "deleted"]))), bucket, layout)
    counts = {name: int(pc.sum(pc.equal(status, name)).as_py() or 0) for name in STATUSES}
    record = {"bucket": bucket, **counts, "documents": new.num_rows, "encode_rows": encode.num_rows, "tombstones": lost}
    storage.write_json_atomic(layout.record_file(bucket), record, so)
    return record


def _check_unique(new: pa.Table, bucket: int) -> None:
    counts = new.group_by("doc_id").aggregate([("doc_id", "count")])
    repeated = counts.filter(pc.greater(counts.column("doc_id_count"), 1)).column("doc_id").to_pylist()
    if repeated:
        raise DuplicateIdError(f"the snapshot holds these doc ids more than once: {sorted(repeated)[:5]}")


def _status(joined: pa.Table) -> pa.Array:
    in_new = pc.is_valid(joined.column("corpus_row"))
    in_old = pc.is_valid(joined.column("row_id"))
    same = pc.fill_null(pc.equal(joined.column("text_hash"), joined.column("old_hash")), False)
    status = pc.if_else(
        pc.and_(in_new, in_old), pc.if_else(same, "unchanged", "changed"), pc.if_else(in_new, "added", "deleted")
    )
    return status.combine_chunks() if isinstance(status, pa.ChunkedArray) else status


def _write_tombstones(gone: pa.Table, bucket: int, layout: StageLayout) -> dict[str, int]:
    """Previous rows no longer live, one file per segment that lost rows; returns rows lost per segment."""
    lost = {}
    for segment in sorted(set(gone.column("segment").to_pylist())):
        rows = gone.filter(pc.equal(gone.column("segment"), segment)).select(["row_id"])
        rows = rows.sort_by([("row_id", "ascending")]).cast(TOMBSTONE_SCHEMA)
        storage.write_parquet_atomic(tombstone_file(layout, segment, bucket), rows, layout.storage_options)
        lost[segment] = rows.num_rows
    return lost


def read_bucket_records(layout: StageLayout, buckets: int) -> list[dict]:
    return [storage.read_json(layout.record_file(b), layout.storage_options) for b in range(buckets)]


# ------------------------------------------------------------------------------------------------------ after


@dataclasses.dataclass(frozen=True)
class Slice:
    """Rows ``[start, stop)`` of one bucket's ``encode`` file."""

    bucket: int
    start: int
    stop: int


def plan_new_segments(encode_rows: list[int], rows_per_segment: int) -> list[list[Slice]]:
    """Cut the to-encode rows of every bucket (``encode_rows[b]`` rows each, in bucket order) into as few segments
    of at most ``rows_per_segment`` rows as hold them, of even sizes (no small tail: a night's change of 120 rows in
    segments of 100 gives two of 60, not 100 and 20, so that small segments do not pile up night after night); a
    segment is a list of bucket slices. Memory: one entry per slice."""
    total = sum(encode_rows)
    count = -(-total // rows_per_segment) if total else 0
    sizes = [total // count + (i < total % count) for i in range(count)] if count else []
    segments: list[list[Slice]] = []
    current: list[Slice] = []
    size = 0
    for bucket, rows in enumerate(encode_rows):
        start = 0
        while start < rows:
            take = min(rows - start, sizes[len(segments)] - size)
            current.append(Slice(bucket, start, start + take))
            size += take
            start += take
            if size == sizes[len(segments)]:
                segments.append(current)
                current, size = [], 0
    return segments


def read_encode_slices(layout: StageLayout, slices: list[Slice]) -> pa.Table:
    """The to-encode rows (doc_id, corpus_row, text_hash, text) of one new segment, in slice order."""
    parts = [
        storage.read_parquet(bucket_file(layout, "encode", s.bucket), layout.storage_options).slice(
            s.start, s.stop - s.start
        )
        for s in slices
    ]
    return pa.concat_tables(parts) if parts else ENCODE_SCHEMA.empty_table()


def read_tombstones(layout: StageLayout, segment: str, buckets: list[int]) -> np.ndarray:
    """Row ids ``segment`` loses in this diff (from the buckets that reported losses for it), sorted."""
    parts = [
        storage.read_parquet(tombstone_file(layout, segment, b), layout.storage_options).column("row_id").to_numpy()
        for b in buckets
    ]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
