"""The mining input planned by a shuffle: each input file read once, its rows sent to their query buckets, and the
positives resolved to row ids by a join with the embedding shards' doc ids, partitioned by a hash of the doc id.

Three waves of tasks; each task commits its files and then its record, and a rerun skips what is committed:

1. ``split_input`` (one task per input file: pairs, or BEIR queries and qrels) reads the file once, checks every
   row, and streams each row to its query bucket's file and each positive (doc id, query bucket) to its doc
   bucket's file. ``partition_corpus`` (one task per group of embedding shards, ``DOC_ROWS_PER_TASK`` rows at
   most) writes the group's (doc id, row id), one row group per doc bucket.
2. ``join_positives`` (one task per doc bucket) joins the bucket's positives with its doc ids of every group and
   writes the positives found, one row group per query bucket.
3. ``bucket_input`` (called by ``mine.plan.plan_bucket``, one task per query bucket) merges the bucket's rows into
   queries (``mine.inputs.queries_of``) and reads the row ids of their positives from its row group of each doc
   bucket.

No task reads the input or the corpus's doc ids more than once, and none holds more than a query bucket, a doc
bucket, a shard group, or a batch of rows per open file.

Layout under ``<root>/negatives/_input/``::

    split/i0-b00003.parquet   the rows of input file 0 in query bucket 3 (query_id, query, doc_ids, score, where)
    split/i0-d00001.parquet   its positives in doc bucket 1 (doc_id, bucket: the query bucket asking)
    split/i0.json             the file's record (rows)
    corpus/g00000.parquet     doc_id, row_id, doc_bucket of shard group 0, one row group per doc bucket (and .json)
    rows/d00000.parquet       bucket, doc_id, row_id of the positives found in doc bucket 0, one row group per query
                              bucket (and .json: positives asked, found)

These are scratch: they are removed once every query bucket is planned.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import numpy as np
import pyarrow as pa

from retrieval_core.encode.embeddings import read_shard_table
from retrieval_core.io import storage
from retrieval_core.io.folder import Folder
from retrieval_core.io.shard_list import batched
from retrieval_core.io.sharding import buckets_of
from retrieval_core.mine.inputs import MiningQuery, Row, input_files, input_rows, queries_of
from retrieval_core.mine.mining import MineWork

INPUT = "_input"
DOC_ROWS_PER_TASK = 4_000_000  # corpus doc ids per doc bucket and per shard group (about 300 MB in Arrow)
BATCH_ROWS = 65_536  # input rows buffered per write: memory of a split task, whatever the input's size
SCRATCH = ("split", "corpus", "rows")
ROW_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("query", pa.string()),
        ("doc_ids", pa.list_(pa.string())),
        ("score", pa.int64()),
        ("where", pa.string()),
    ]
)
ASKED_SCHEMA = pa.schema([("doc_id", pa.string()), ("bucket", pa.int32())])
FOUND_SCHEMA = pa.schema([("bucket", pa.int32()), ("doc_id", pa.string()), ("row_id", pa.int64())])


def shuffle_plan(buckets: int, emb: dict) -> dict:
    """The tasks of the shuffle: ``buckets`` query buckets, the doc buckets and the shard groups (lists of shard
    positions in the embeddings manifest ``emb``) for its corpus."""
    shards = emb["shards"]
    rows = sum(s["row_stop"] - s["row_start"] for s in shards)
    groups: list[list[int]] = []
    size = 0
    for i, shard in enumerate(shards):
        if not groups or size + shard["row_stop"] - shard["row_start"] > DOC_ROWS_PER_TASK:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += shard["row_stop"] - shard["row_start"]
    return {"buckets": buckets, "doc_buckets": max(1, math.ceil(rows / DOC_ROWS_PER_TASK)), "groups": groups}


def _file(work: MineWork, *parts: str) -> str:
    return work.out.file(INPUT, *parts)


def _done(work: MineWork, *parts: str) -> bool:
    return storage.exists(_file(work, *parts), work.root.storage_options)


def inputs_to_split(work: MineWork) -> list[int]:
    return [i for i in range(len(input_files(work.mine))) if not _done(work, "split", f"i{i}.json")]


def groups_to_partition(work: MineWork, plan: dict) -> list[int]:
    return [g for g in range(len(plan["groups"])) if not _done(work, "corpus", f"g{g:05d}.json")]


def doc_buckets_to_join(work: MineWork, plan: dict) -> list[int]:
    return [d for d in range(plan["doc_buckets"]) if not _done(work, "rows", f"d{d:05d}.json")]


def split_input(work: MineWork, number: int, plan: dict) -> dict:
    """Read input file ``number`` once (every row checked) and stream its rows to their query buckets' files and
    its positives to their doc buckets' files; returns its record. Memory: a batch of rows per open file."""
    so, (kind, url) = work.root.storage_options, input_files(work.mine)[number]
    rows = 0
    with contextlib.ExitStack() as files:
        to_buckets = [
            files.enter_context(
                storage.parquet_writer_atomic(_file(work, "split", f"i{number}-b{b:05d}.parquet"), ROW_SCHEMA, so)
            )
            for b in range(plan["buckets"])
        ]
        to_docs = (
            []
            if kind == "queries"
            else [
                files.enter_context(
                    storage.parquet_writer_atomic(_file(work, "split", f"i{number}-d{d:05d}.parquet"), ASKED_SCHEMA, so)
                )
                for d in range(plan["doc_buckets"])
            ]
        )
        for batch in batched(input_rows(work.mine, kind, url), BATCH_ROWS):
            rows += len(batch)
            _write_split(batch, plan, to_buckets, to_docs)
    record = {"input": number, "kind": kind, "rows": rows}
    storage.write_json_atomic(_file(work, "split", f"i{number}.json"), record, so)
    return record


def _write_split(batch: list[Row], plan: dict, to_buckets: list, to_docs: list) -> None:
    """Write a batch of rows to their query buckets and their positives (a qrels row: score > 0) to their doc
    buckets, each in input order."""
    bucket = buckets_of([row[0] for row in batch], plan["buckets"])
    columns = [pa.array(column, type=field.type) for column, field in zip(zip(*batch), ROW_SCHEMA)]
    table = pa.Table.from_arrays(columns, schema=ROW_SCHEMA)
    _write_by(table, bucket, to_buckets)
    if to_docs:
        asked = [(doc, b) for row, b in zip(batch, bucket.tolist()) if row[3] is None or row[3] > 0 for doc in row[2]]
        docs = pa.Table.from_arrays(
            [pa.array([a[0] for a in asked], pa.string()), pa.array([a[1] for a in asked], pa.int32())],
            schema=ASKED_SCHEMA,
        )
        _write_by(docs, buckets_of([a[0] for a in asked], plan["doc_buckets"]), to_docs)


def _write_by(table: pa.Table, key: np.ndarray, writers: list) -> None:
    for value in np.unique(key).tolist():
        writers[value](table.filter(pa.array(key == value)))


def partition_corpus(work: MineWork, group: int, plan: dict, emb: dict) -> dict:
    """Write the (doc id, row id) of shard group ``group`` by doc bucket (one row group each); returns its record.
    Memory: the group's doc ids."""
    so = work.root.storage_options
    table = pa.concat_tables(
        [
            read_shard_table(Folder(work.root.url, so), emb["shards"][i], ["doc_id"]).select(["doc_id", "row_id"])
            for i in plan["groups"][group]
        ]
    )
    doc_ids = table.column("doc_id").to_pylist()
    table = table.append_column("doc_bucket", pa.array(buckets_of(doc_ids, plan["doc_buckets"]), pa.int32()))
    storage.write_parquet_by_value(_file(work, "corpus", f"g{group:05d}.parquet"), table, "doc_bucket", so)
    record = {"group": group, "rows": table.num_rows}
    storage.write_json_atomic(_file(work, "corpus", f"g{group:05d}.json"), record, so)
    return record


def join_positives(work: MineWork, doc_bucket: int, plan: dict) -> dict:
    """Join the positives of doc bucket ``doc_bucket`` (each once per query bucket asking) with the bucket's doc ids
    of every shard group, and write those found by query bucket; returns its record. Memory: the doc bucket's doc
    ids and positives."""
    so = work.root.storage_options
    asked = (
        pa.concat_tables(
            [
                storage.read_parquet(_file(work, "split", f"i{i}-d{doc_bucket:05d}.parquet"), so)
                for i, (kind, _) in enumerate(input_files(work.mine))
                if kind != "queries"
            ]
        )
        .group_by(["doc_id", "bucket"])
        .aggregate([])
    )
    corpus = [
        storage.read_parquet_where(_file(work, "corpus", f"g{g:05d}.parquet"), "doc_bucket", doc_bucket, so).select(
            ["doc_id", "row_id"]
        )
        for g in range(len(plan["groups"]))
    ]
    found = asked.join(pa.concat_tables(corpus), "doc_id", join_type="inner") if corpus else asked.slice(0, 0)
    found = found.select(FOUND_SCHEMA.names).cast(FOUND_SCHEMA) if found.num_rows else FOUND_SCHEMA.empty_table()
    storage.write_parquet_by_value(_file(work, "rows", f"d{doc_bucket:05d}.parquet"), found, "bucket", so)
    record = {"doc_bucket": doc_bucket, "asked": asked.num_rows, "found": found.num_rows}
    storage.write_json_atomic(_file(work, "rows", f"d{doc_bucket:05d}.json"), record, so)
    return record


def bucket_input(work: MineWork, bucket: int, plan: dict) -> tuple[list[MiningQuery], dict[str, int]]:
    """(the queries of query bucket ``bucket``, merged from its rows of every input file; doc id -> row id of
    their positives found in the corpus)."""
    so = work.root.storage_options
    rows = {
        kind: _rows_of(storage.read_parquet(_file(work, "split", f"i{i}-b{bucket:05d}.parquet"), so))
        for i, (kind, _) in enumerate(input_files(work.mine))
    }
    queries = queries_of(work.mine, rows)
    doc_rows: dict[str, int] = {}
    for d in range(plan["doc_buckets"]):
        found = storage.read_parquet_where(_file(work, "rows", f"d{d:05d}.parquet"), "bucket", bucket, so)
        doc_rows.update(zip(found.column("doc_id").to_pylist(), found.column("row_id").to_pylist()))
    return queries, doc_rows


def _rows_of(table: pa.Table) -> Iterable[Row]:
    return zip(*(table.column(name).to_pylist() for name in ROW_SCHEMA.names))


def remove_scratch(work: MineWork) -> None:
    """Drop the shuffle's files once every query bucket is planned."""
    for name in SCRATCH:
        storage.remove(_file(work, name), work.root.storage_options)
