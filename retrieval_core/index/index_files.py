"""The files of the index stage: an index file read (or memory-mapped) and written, a shard's index file, and the
shards' commit records. The plan's steps (``indexing``) and the merge (``merging``) both use them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, cast

import numpy as np

from retrieval_core.index import faiss_index
from retrieval_core.io import faults, file_cache, shard_list, storage

RECORDS_AT_ONCE = 1000  # commit records read (in parallel) and held at a time


def shard_records(plan) -> Iterator[dict]:
    """The commit records of the plan's shards, in shard order, read in parallel ``RECORDS_AT_ONCE`` at a time."""
    layout = plan.out
    for batch in shard_list.batched(plan.shards, RECORDS_AT_ONCE):
        yield from storage.read_json_many([layout.record_file(s["name"]) for s in batch], layout.storage_options)


def shard_index_url(index_dir: str, record: dict) -> str:
    """A shard index file in this index directory (the record's ``file``: ``<name>.lists`` or ``<name>.faiss``),
    or, for a shard a refresh shares with an earlier version, the record's ``path`` (relative to this directory)."""

    return storage.resolve_relative(index_dir, record.get("path") or record.get("file") or f"{record['name']}.faiss")


def tombstone_url(index_dir: str, record: dict) -> str | None:
    """The tombstone file of a shard index a refresh shares (its record's or manifest entry's ``deleted_path``,
    relative to this directory: the rows of the shard dead in this version), or None."""
    path = record.get("deleted_path")
    return storage.resolve_relative(index_dir, path) if path else None


def dead_ids(url: str | None, storage_options: dict | None = None) -> np.ndarray | None:
    """The sorted row ids of a tombstone file (None for none): what a merge or a shard group leaves out."""
    if url is None:
        return None
    return np.sort(storage.read_parquet(url, storage_options, columns=["row_id"]).column("row_id").to_numpy())


def without_dead(index, dead: np.ndarray | None):
    """A whole shard index (flat codes, fast-scan IVF) less the ids ``dead`` (in place); returns it."""
    import faiss

    if dead is not None and len(dead):
        index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(dead, dtype=np.int64)))
    return index


def read_index_file(url: str, storage_options: dict | None = None, mmap: bool = False):
    """An index file read into memory, or with ``mmap`` memory-mapped in place (from this node's copy when the
    file is on object storage, see ``file_cache.local_copy``)."""
    import faiss

    if mmap:
        return faiss.read_index(file_cache.local_copy(url, storage_options), faiss_index.MMAP_FLAG)
    local = storage.local_path(url, storage_options)
    if local:
        return faiss.read_index(local)
    return faiss_index.deserialize(storage.read_bytes(url, storage_options))


def write_index_file(index, url: str, storage_options: dict) -> int:
    """Write an index without extra copies (FAISS writes local files itself; other URLs get one serialized
    buffer); returns its size in bytes."""
    local = storage.local_path(url, storage_options)
    if local:
        import faiss

        tmp = storage.temporary_name(local)
        storage.filesystem(url, storage_options)[0].makedirs(os.path.dirname(local), exist_ok=True)
        faiss.write_index(index, tmp)
        faults.point("write", url)
        os.replace(tmp, local)
        return os.path.getsize(local)
    data = faiss_index.serialize_array(index)
    storage.write_bytes_atomic(url, memoryview(cast(Any, data)), storage_options)
    return int(data.size)
