"""Column names and pyarrow schemas of the files the jobs write."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1


class IncompatibleOutputError(RuntimeError):
    """Existing output was made with other settings, or not by these jobs; the message says what differs."""


ROW_ID = "row_id"
DOC_ID = "doc_id"
EMBEDDING = "embedding"
TEXT_HASH = "text_hash"

REJECT_REASON = "reason"
REJECT_SOURCE = "source"

EMBEDDING_TYPES = {"float32": pa.float32(), "float16": pa.float16()}


def embeddings_schema(dim: int, dtype: str = "float32", metadata: dict | None = None) -> pa.Schema:
    """``row_id int64, doc_id string, embedding fixed_size_list<dtype>[dim], text_hash string``."""
    schema = pa.schema(
        [
            pa.field(ROW_ID, pa.int64(), nullable=False),
            pa.field(DOC_ID, pa.string(), nullable=False),
            pa.field(EMBEDDING, pa.list_(EMBEDDING_TYPES[dtype], dim), nullable=False),
            pa.field(TEXT_HASH, pa.string(), nullable=False),
        ]
    )
    if metadata:
        schema = schema.with_metadata({k: str(v) for k, v in metadata.items()})
    return schema


REJECTS_SCHEMA = pa.schema(
    [
        pa.field(ROW_ID, pa.int64(), nullable=False),
        pa.field(DOC_ID, pa.string()),
        pa.field(REJECT_SOURCE, pa.string(), nullable=False),
        pa.field(REJECT_REASON, pa.string(), nullable=False),
    ]
)

# One entry per shard of the embeddings manifest (the shard table beside it, see io.shard_list). A refresh's version
# adds shared_from, deleted_path and deleted to the segments it shares with an earlier version, compacted_from to the
# segments it rewrote (their live rows copied into a file of its own).
EMBEDDINGS_SHARD_ENTRY = pa.schema(
    [
        pa.field("name", pa.string()),
        pa.field("path", pa.string()),
        pa.field("row_start", pa.int64()),
        pa.field("row_stop", pa.int64()),
        pa.field("rows", pa.int64()),
        pa.field("rejected", pa.int64()),
        pa.field("rejects_path", pa.string()),
        pa.field("shared_from", pa.string()),
        pa.field("deleted_path", pa.string()),
        pa.field("deleted", pa.int64()),
        pa.field("compacted_from", pa.string()),
    ]
)

# One entry per shard index of the index manifest (``path`` for one a refresh shares with an earlier version).
INDEX_SHARD_ENTRY = pa.schema(
    [
        pa.field("name", pa.string()),
        pa.field("ntotal", pa.int64()),
        pa.field("seconds", pa.float64()),
        pa.field("peak_memory_mb", pa.float64()),
        pa.field("file", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("path", pa.string()),
        pa.field("deleted_path", pa.string()),
    ]
)
