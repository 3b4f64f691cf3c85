"""Planning the mining input without holding it in one place: hash buckets of queries, planned by workers.

The input (pairs, or BEIR queries + qrels) is split by a hash of the query id into ``buckets`` buckets, as many as
its size calls for (``mine.input_mb_per_bucket`` of input each). The shuffle of :mod:`mine.shuffle` reads each
input file once, sends its rows to their buckets and finds the row ids of their positives by a join partitioned by
doc id. The task that plans bucket ``b`` then merges its rows into queries (rows of one query always share a
bucket), attaches their positives' row ids, orders them by their first positive's row, and writes them as part
inputs of ``mine.queries_per_part`` queries, with its rejects and, last, its commit record. An input of one small
bucket is planned in the job's own process without the shuffle. The driver only plans the tasks from the input
files' sizes and the embeddings manifest, and sums the records.

Layout under ``<root>/negatives/_input/``::

    b00000-00000.parquet   part input: query_id, query, positive_ids, positive_rows
    b00000-rejects.parquet positives of the bucket's queries that are not in the corpus
    b00000.json            the bucket's commit record: counts, parts, largest number of positives, examples
    split/, corpus/, rows/ the shuffle's files (see ``mine.shuffle``), until every bucket is planned
"""

from __future__ import annotations

import dataclasses
import math

import pyarrow as pa

from retrieval_core.config import MineConfig
from retrieval_core.index import lookup
from retrieval_core.io import storage
from retrieval_core.io.folder import Folder
from retrieval_core.mine import shuffle as mine_shuffle
from retrieval_core.mine.inputs import REJECTS_SCHEMA, MiningQuery, PairsError, load_queries, resolve_positives
from retrieval_core.mine.mining import MineWork
from retrieval_core.mine.shuffle import INPUT

PART_INPUT_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("query", pa.string()),
        ("positive_ids", pa.list_(pa.string())),
        ("positive_rows", pa.list_(pa.int64())),
    ]
)


INLINE_INPUT_BYTES = 4 * 2**20  # an input up to this size may be planned in the job's own process


def input_plan(mi: MineConfig) -> dict:
    """The input files with their size and version (modification time or ETag: a changed file is another input),
    and the number of buckets (1 for an input of at most ``mine.input_mb_per_bucket`` MB)."""
    keys = ("queries_path", "qrels_path") if mi.queries_path else ("pairs_path",)
    described = [_describe(key, getattr(mi, key), mi.storage_options) for key in keys]
    size = sum(f["size"] for f in described)
    buckets = max(1, math.ceil(size / (mi.input_mb_per_bucket * 2**20)))
    return {"files": described, "bytes": size, "buckets": buckets}


def _describe(key: str, url: str, storage_options: dict) -> dict:
    fs, path = storage.filesystem(url, storage_options)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise PairsError(f"mine.{key} '{url}' does not exist") from None
    version = next(
        (
            str(info[k])
            for k in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created")
            if info.get(k) is not None
        ),
        "",
    )
    return {"url": url, "size": int(info.get("size") or 0), "version": version}


def bucket_file(work: MineWork, name: str) -> str:
    return work.out.file(INPUT, name)


def plan_bucket(work: MineWork, bucket: int, shuffle: dict | None = None, emb: dict | None = None) -> dict:
    """Plan query bucket ``bucket`` (see the module): write its part inputs, rejects and commit record; returns the
    record. With ``shuffle`` (the plan of :mod:`mine.shuffle`, whose first waves ran) its queries and their
    positives' row ids come from the shuffle (memory: the bucket's queries); without, the input is one bucket,
    read here, and its positives are found by one pass over the embedding shards' ``doc_id`` columns (memory: the
    input's queries and one shard's column)."""
    mi, so = work.mine, work.root.storage_options
    if shuffle:
        queries, rows = mine_shuffle.bucket_input(work, bucket, shuffle)
    else:
        queries = load_queries(mi)
        rows = lookup.rows_for_doc_ids(Folder(work.root.url, so), {d for q in queries for d in q.positive_doc_ids}, emb)
    kept, rejects = resolve_positives(queries, rows)
    kept.sort(key=lambda q: min(q.positive_rows))  # a part's positives then lie in few embedding shards
    parts = [kept[i : i + mi.queries_per_part] for i in range(0, len(kept), mi.queries_per_part)]
    for number, part in enumerate(parts):
        storage.write_parquet_atomic(bucket_file(work, f"b{bucket:05d}-{number:05d}.parquet"), _part_table(part), so)
    storage.write_parquet_atomic(
        bucket_file(work, f"b{bucket:05d}-rejects.parquet"), pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), so
    )
    record = {
        "bucket": bucket,
        "input_queries": len(queries),
        "kept": len(kept),
        "rejected": len(rejects),
        "parts": len(parts),
        "max_positives": max((len(q.positive_rows) for q in kept), default=0),
        "rejected_examples": [r["doc_id"] for r in rejects[:3]],
    }
    storage.write_json_atomic(bucket_file(work, f"b{bucket:05d}.json"), record, so)
    return record


def _part_table(part: list[MiningQuery]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "query_id": q.query_id,
                "query": q.text,
                "positive_ids": q.positive_doc_ids,
                "positive_rows": q.positive_rows,
            }
            for q in part
        ],
        schema=PART_INPUT_SCHEMA,
    )


def bucket_record(work: MineWork, bucket: int) -> dict | None:
    """The bucket's commit record, or None when it is not planned yet."""
    url = bucket_file(work, f"b{bucket:05d}.json")
    return storage.read_json(url, work.root.storage_options) if storage.exists(url, work.root.storage_options) else None


@dataclasses.dataclass(frozen=True)
class PartInput:
    """Part ``number`` of the run: part ``index`` of bucket ``bucket``, with ``queries`` queries."""

    number: int
    bucket: int
    index: int
    queries: int


def part_inputs(records: list[dict], queries_per_part: int) -> list[PartInput]:
    """The run's parts, numbered bucket by bucket."""
    out: list[PartInput] = []
    for record in records:
        for index in range(record["parts"]):
            size = min(queries_per_part, record["kept"] - index * queries_per_part)
            out.append(PartInput(len(out), record["bucket"], index, size))
    return out


def read_part_input(work: MineWork, part: PartInput) -> list[MiningQuery]:
    table = storage.read_parquet(
        bucket_file(work, f"b{part.bucket:05d}-{part.index:05d}.parquet"), work.root.storage_options
    )
    return [MiningQuery(r["query_id"], r["query"], r["positive_ids"], r["positive_rows"]) for r in table.to_pylist()]


def write_rejects(work: MineWork, buckets: int) -> int:
    """``negatives/rejects.parquet``: the buckets' rejects concatenated, one bucket in memory at a time."""
    pieces = [bucket_file(work, f"b{bucket:05d}-rejects.parquet") for bucket in range(buckets)]
    return storage.concat_parquet_atomic(
        work.out.file("rejects.parquet"), pieces, REJECTS_SCHEMA, work.root.storage_options
    )
