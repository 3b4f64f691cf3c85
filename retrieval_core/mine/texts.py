"""Values of mined rows (doc id, text hash, text), joined by range of rows instead of looked up part by part.

A part's candidates and chosen documents lie in every corner of the corpus. Looked up part by part, the embedding
shards' id columns and the corpus blocks holding them add up to about the whole corpus for every part. So they are
joined instead, twice in a run:

- before the selection (``negatives/_candidates/``): every candidate and positive row of the part's search results,
  for their doc ids and text hashes (and their texts, which a cross-encoder rescores);
- after it (``negatives/_texts/``, without a cross-encoder): the rows the part's exports name, for their texts.

1. A part writes its requests: the (group, row id) of every row it needs, sorted by group, one Parquet row group per
   group (``req-NNNNN.parquet``). A group is a range of about ``TEXT_GROUP_ROWS`` rows of the embeddings (whole
   shards): :func:`group_starts`.
2. A group's call (on a mine worker, or a Ray task) reads its row group of each requesting part's file (the others
   are skipped by their statistics), looks those rows up once (texts read from the corpus once), and writes (part,
   row, doc id, text hash, text) part by part, one row group per part (``g-NNNNN.parquet``), then its commit
   record (``g-NNNNN.json``).
3. A part reads its row group of each of its groups' files.

The corpus is read once per join, whatever the number of parts. Memory: a group's call holds the rows requested from
its group and their values, each once (at most ``TEXT_GROUP_ROWS`` of them); a part, the values of its own rows.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from retrieval_core.index import lookup
from retrieval_core.io import storage
from retrieval_core.io.manifest import peak_memory_mb

TEXT_GROUP_ROWS = 1_000_000  # rows of the embeddings per text group: bounds what a group's call reads and holds
REQUEST_SCHEMA = pa.schema([("group", pa.int32()), ("row", pa.int64())])
TEXT_SCHEMA = pa.schema(
    [
        ("part", pa.int32()),
        ("row", pa.int64()),
        ("doc_id", pa.string()),
        ("text_hash", pa.string()),
        ("text", pa.string()),
    ]
)


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


def write_requests(
    directory: str, part: int, rows, starts: list[int], storage_options: dict | None = None
) -> list[int]:
    """Write part ``part``'s requests for the row ids ``rows`` (-1, no result, is left out; each row once); returns
    their groups."""
    wanted = np.unique(np.asarray(list(rows), dtype=np.int64))
    wanted = wanted[wanted >= 0]
    if not len(wanted):
        return []
    groups = (np.searchsorted(np.asarray(starts, dtype=np.int64), wanted, side="right") - 1).astype(np.int32)
    storage.write_parquet_by_value(
        request_file(directory, part), pa.table([groups, wanted], schema=REQUEST_SCHEMA), "group", storage_options
    )
    return sorted(set(groups.tolist()))


def resolve_group(
    directory: str,
    group: int,
    parts: list[int],
    rows: lookup.RowLookup,
    storage_options: dict | None = None,
    texts: bool = True,
) -> dict:
    """Join group ``group``: the doc ids, text hashes and (with ``texts``) texts of the rows its requesting
    ``parts`` asked for, each looked up once (the texts read once from the corpus), written part by part (one row
    group each, streaming); then its commit record, which is returned. Memory: the requested rows and their values,
    each once."""
    requests = [
        storage.read_parquet_where(request_file(directory, p), "group", group, storage_options)
        .column("row")
        .to_pylist()
        for p in parts
    ]
    wanted = {r for asked in requests for r in asked}
    values = rows.values(wanted)
    found = rows.texts_of(values) if texts else {}
    written = 0
    with storage.parquet_writer_atomic(group_file(directory, group), TEXT_SCHEMA, storage_options) as write:
        for part, asked in zip(parts, requests):
            asked = [r for r in asked if r in values]
            write(
                pa.table(
                    [
                        pa.array([part] * len(asked), pa.int32()),
                        pa.array(asked, pa.int64()),
                        pa.array([values[r][0] for r in asked], pa.string()),
                        pa.array([values[r][1] for r in asked], pa.string()),
                        pa.array([found.get(r) for r in asked], pa.string()),
                    ],
                    schema=TEXT_SCHEMA,
                )
            )
            written += len(asked)
    record = {
        "group": group,
        "parts": len(parts),
        "texts": written if texts else 0,
        "values": written,
        "read": len(found),
        "peak_memory_mb": peak_memory_mb(),
    }
    storage.write_json_atomic(group_file(directory, group, "json"), record, storage_options)
    return record


def group_done(directory: str, group: int, storage_options: dict | None = None) -> bool:
    return storage.exists(group_file(directory, group, "json"), storage_options)


def groups_to_join(
    directory: str, requests: list[tuple[int, list[int]]], storage_options: dict | None = None
) -> dict[int, list[int]]:
    """Group -> the parts asking it, in group order, for the groups of ``requests`` ((part, the groups it asks))
    whose texts are not committed yet."""
    asking: dict[int, list[int]] = {}
    for part, groups in requests:
        for group in groups:
            asking.setdefault(group, []).append(part)
    return {g: asking[g] for g in sorted(asking) if not group_done(directory, g, storage_options)}


def part_rows(directory: str, part: int, groups: list[int], storage_options: dict | None = None) -> pa.Table:
    """(part, row, doc_id, text_hash, text) of every row part ``part`` requested, from its ``groups``' files."""
    tables = [storage.read_parquet_where(group_file(directory, g), "part", part, storage_options) for g in groups]
    return pa.concat_tables(tables) if tables else TEXT_SCHEMA.empty_table()


def part_texts(directory: str, part: int, groups: list[int], storage_options: dict | None = None) -> dict[str, str]:
    """Doc id -> text of every document part ``part`` requested, from its ``groups``' files."""
    table = part_rows(directory, part, groups, storage_options)
    return dict(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()))
