"""The texts of mined documents, joined by range of rows instead of read part by part.

A part names documents from every corner of the corpus (its positives and negatives). Read part by part, the corpus
blocks holding them add up to about the whole text column for every part. So the texts are joined instead:

1. A part, when it commits, writes its requests: the (group, row id, doc id) of every document its exports name,
   sorted by group, one Parquet row group per group (``_texts/req-NNNNN.parquet``). A group is a range of about
   ``TEXT_GROUP_ROWS`` rows of the embeddings (whole shards): :func:`group_starts`.
2. A group's task reads its row group of each requesting part's file (the others are skipped by their statistics),
   reads those texts from the corpus once, and writes (part, doc id, text) part by part, one row group per part
   (``_texts/g-NNNNN.parquet``), then its commit record (``g-NNNNN.json``).
3. A part's exports are written from its row group of each of its groups' files.

The corpus is read once in all, whatever the number of parts. Memory: a group task holds the ids requested from its
group and their texts, each text once (at most ``TEXT_GROUP_ROWS`` of them); a part's export, the texts of its own
documents.
"""
from __future__ import annotations

import bisect
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import lookup, storage
from .manifest import peak_memory_mb

TEXT_GROUP_ROWS = 1_000_000  # rows of the embeddings per text group: bounds what a group's task reads and holds
REQUEST_SCHEMA = pa.schema([("group", pa.int32()), ("row", pa.int64()), ("doc_id", pa.string())])
TEXT_SCHEMA = pa.schema([("part", pa.int32()), ("doc_id", pa.string()), ("text", pa.string())])


def group_starts(manifest: dict, workers: int = 1, rows_per_group: int | None = None) -> list[int]:
    """First row id of each text group: consecutive shards of the embeddings ``manifest`` holding at least
    ``rows_per_group`` rows each (default: ``TEXT_GROUP_ROWS``, or fewer so that each of ``workers`` gets a
    group), the last group what is left."""
    total = sum(s["row_stop"] - s["row_start"] for s in manifest["shards"])
    limit = rows_per_group or max(1, min(TEXT_GROUP_ROWS, math.ceil(total / max(1, workers))))
    starts, held = [], limit
    for shard in sorted(manifest["shards"], key=lambda s: s["row_start"]):
        if held >= limit:
            starts.append(shard["row_start"])
            held = 0
        held += shard["row_stop"] - shard["row_start"]
    return starts or [0]


def request_file(directory: str, part: int) -> str:
    return storage.join(directory, f"req-{part:05d}.parquet")


def group_file(directory: str, group: int, suffix: str = "parquet") -> str:
    return storage.join(directory, f"g-{group:05d}.{suffix}")


def write_requests(directory: str, part: int, named: dict[str, int], starts: list[int],
                   storage_options: dict | None = None) -> list[int]:
    """Write part ``part``'s requests for the documents ``named`` (doc id -> row id); returns their groups."""
    if not named:
        return []
    doc_ids = sorted(named, key=lambda d: named[d])
    rows = np.array([named[d] for d in doc_ids], dtype=np.int64)
    groups = np.array([bisect.bisect_right(starts, r) - 1 for r in rows.tolist()], dtype=np.int32)
    table = pa.table([groups, rows, doc_ids], schema=REQUEST_SCHEMA)
    storage.write_parquet_by_value(request_file(directory, part), table, "group", storage_options)
    return sorted(set(groups.tolist()))


def resolve_group(directory: str, group: int, parts: list[int], rows: lookup.RowLookup,
                  storage_options: dict | None = None) -> dict:
    """Join group ``group``: the texts its requesting ``parts`` asked for, read once from the corpus and written
    part by part (one row group each, streaming); then its commit record, which is returned. Memory: the requests'
    ids and the group's requested texts, each once."""
    requests = [_only(storage.read_parquet_where(request_file(directory, p), "group", group, storage_options),
                      "group", group) for p in parts]
    texts = rows.texts({r for table in requests for r in table.column("row").to_pylist()})
    written = 0
    with storage.parquet_writer_atomic(group_file(directory, group), TEXT_SCHEMA, storage_options) as write:
        for part, table in zip(parts, requests):
            write(pa.table([pa.array([part] * table.num_rows, pa.int32()), table.column("doc_id"),
                            pa.array([texts[r] for r in table.column("row").to_pylist()], pa.string())],
                           schema=TEXT_SCHEMA))
            written += table.num_rows
    record = {"group": group, "parts": len(parts), "texts": written, "read": len(texts),
              "peak_memory_mb": peak_memory_mb()}
    storage.write_json_atomic(group_file(directory, group, "json"), record, storage_options)
    return record


def group_done(directory: str, group: int, storage_options: dict | None = None) -> bool:
    return storage.exists(group_file(directory, group, "json"), storage_options)


def groups_to_join(directory: str, requests: list[tuple[int, list[int]]],
                   storage_options: dict | None = None) -> dict[int, list[int]]:
    """Group -> the parts asking it, in group order, for the groups of ``requests`` ((part, the groups it asks))
    whose texts are not committed yet."""
    asking: dict[int, list[int]] = {}
    for part, groups in requests:
        for group in groups:
            asking.setdefault(group, []).append(part)
    return {g: asking[g] for g in sorted(asking) if not group_done(directory, g, storage_options)}


def part_texts(directory: str, part: int, groups: list[int], storage_options: dict | None = None) -> dict[str, str]:
    """Doc id -> text of every document part ``part`` requested, from its ``groups``' files."""
    out: dict[str, str] = {}
    for group in groups:
        table = _only(storage.read_parquet_where(group_file(directory, group), "part", part, storage_options),
                      "part", part)
        out.update(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()))
    return out


def _only(table: pa.Table, column: str, value: int) -> pa.Table:
    return table.filter(pc.equal(table.column(column), value))
