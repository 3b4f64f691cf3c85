"""Training-data exports of mined negatives.

Exports (under ``negatives/exports/``), built from the canonical parts:
  * ``triplet.parquet``: ``anchor, positive, negative``, one row per (query, positive, negative), as
    sentence-transformers' ``output_format="triplet"``; with ``mine.output_scores`` a ``scores`` column
    ``[positive score, negative score]``.
  * ``n-tuple.parquet``: ``anchor, positive, negative_1 .. negative_n``, one row per (query, positive), complete
    queries only (as ``output_format="n-tuple"``); with scores: ``scores`` = ``[positive, negative_1 .. n]``.
  * ``flag.jsonl``: ``{"query", "pos": [...], "neg": [...]}`` per query, FlagEmbedding's format; with scores also
    ``pos_scores`` and ``neg_scores``.
Both Parquet files load with ``datasets.load_dataset("parquet", data_files=...)``. The scores are the
cross-encoder's when one rescored the part (``mine.cross_encoder``), else the bi-encoder's.

Once the texts of a part's documents are joined (``mine.texts``), a task writes that part's share of each export
(``negatives/_exports/part-N.<file>``); the shares are then concatenated in part order, streaming (one part in
memory), by a Ray task per format when the job runs on Ray, else by the job's process.
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa

from retrieval_core.io import storage

log = logging.getLogger(__name__)
# rows per row group of the n-tuple export (closed at the next change of query): training reads it a row group at a
# time, and every reader holds its footer, about 2 KB a row group without statistics (12k row groups at 100M rows)
NTUPLE_GROUP_ROWS = 8192
EXPORT_FILES = {"triplet": "triplet.parquet", "n-tuple": "n-tuple.parquet", "flag-jsonl": "flag.jsonl"}


def scores_of(row: dict) -> tuple[list[float], list[float]]:
    """(positive scores, negative scores) of a part row: the cross-encoder's when it rescored, else the
    bi-encoder's."""
    if row.get("negative_ce_scores") is not None:
        return row["positive_ce_scores"], row["negative_ce_scores"]
    return row["positive_scores"], row["negative_scores"]


def triplet_table(parts: pa.Table, texts: dict[str, str], with_scores: bool) -> pa.Table:
    columns: dict[str, list] = {"anchor": [], "positive": [], "negative": []}
    scores = []
    for row in parts.to_pylist():
        positive_scores, negative_scores = scores_of(row)
        for pos_id, pos_score in zip(row["positive_ids"], positive_scores):
            for neg_id, neg_score in zip(row["negative_ids"], negative_scores):
                columns["anchor"].append(row["query"])
                columns["positive"].append(texts[pos_id])
                columns["negative"].append(texts[neg_id])
                scores.append([pos_score, neg_score])
    if with_scores:
        columns["scores"] = scores
    return pa.table(columns)


def ntuple_table(parts: pa.Table, texts: dict[str, str], num_negatives: int, with_scores: bool) -> pa.Table:
    columns: dict[str, list] = {
        "anchor": [],
        "positive": [],
        **{f"negative_{i}": [] for i in range(1, num_negatives + 1)},
    }
    scores = []
    for row in parts.to_pylist():
        if not row["complete"]:
            continue
        positive_scores, negative_scores = scores_of(row)
        for pos_id, pos_score in zip(row["positive_ids"], positive_scores):
            columns["anchor"].append(row["query"])
            columns["positive"].append(texts[pos_id])
            for i, neg_id in enumerate(row["negative_ids"], start=1):
                columns[f"negative_{i}"].append(texts[neg_id])
            scores.append([pos_score, *negative_scores])
    if with_scores:
        columns["scores"] = scores
    return pa.table(columns)


def flag_lines(parts: pa.Table, texts: dict[str, str], with_scores: bool) -> bytes:
    lines = []
    for row in parts.to_pylist():
        record = {
            "query": row["query"],
            "pos": [texts[d] for d in row["positive_ids"]],
            "neg": [texts[d] for d in row["negative_ids"]],
        }
        if with_scores:
            positive_scores, negative_scores = scores_of(row)
            record |= {"pos_scores": positive_scores, "neg_scores": negative_scores}
        lines.append(json.dumps(record, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode() if lines else b""


def triplet_schema(with_scores: bool) -> pa.Schema:
    fields = [("anchor", pa.string()), ("positive", pa.string()), ("negative", pa.string())]
    return pa.schema(fields + ([("scores", pa.list_(pa.float64()))] if with_scores else []))


def ntuple_schema(num_negatives: int, with_scores: bool) -> pa.Schema:
    fields = [("anchor", pa.string()), ("positive", pa.string())]
    fields += [(f"negative_{i}", pa.string()) for i in range(1, num_negatives + 1)]
    return pa.schema(fields + ([("scores", pa.list_(pa.float64()))] if with_scores else []))


def part_export_name(number: int, fmt: str) -> str:
    return f"part-{number:05d}.{EXPORT_FILES[fmt]}"


def write_part_exports(
    out_dir: str,
    number: int,
    part: pa.Table,
    texts: dict[str, str],
    formats: list[str],
    num_negatives: int,
    with_scores: bool,
    storage_options: dict | None = None,
) -> dict:
    """One part's share of each export in ``formats``, under ``out_dir`` (``negatives/_exports``); returns the
    record ``{"formats", "scores", "rows": {format: rows}}`` that :func:`combine_exports` checks."""
    rows = {}
    for fmt in formats:
        url = storage.join(out_dir, part_export_name(number, fmt))
        if fmt == "flag-jsonl":
            data = flag_lines(part, texts, with_scores)
            storage.write_bytes_atomic(url, data, storage_options)
            rows[fmt] = data.count(b"\n")
        else:
            table = (
                triplet_table(part, texts, with_scores)
                if fmt == "triplet"
                else ntuple_table(part, texts, num_negatives, with_scores)
            )
            schema = triplet_schema(with_scores) if fmt == "triplet" else ntuple_schema(num_negatives, with_scores)
            storage.write_parquet_atomic(url, table.cast(schema), storage_options)
            rows[fmt] = table.num_rows
    return {"formats": list(formats), "scores": with_scores, "rows": rows}


def has_part_exports(record: dict, formats: list[str], with_scores: bool) -> bool:
    """Whether a part's commit record says it wrote every one of ``formats`` with these score settings."""
    written = record.get("exports") or {}
    return written.get("scores") == with_scores and set(formats) <= set(written.get("formats", []))


def combine_exports(
    out_dir: str,
    part_dir: str,
    numbers: list[int],
    formats: list[str],
    num_negatives: int,
    with_scores: bool,
    storage_options: dict | None = None,
) -> dict[str, dict]:
    """Concatenate the parts' exports (``part_dir``) into ``out_dir`` in part order, streaming: one part in memory
    at a time. Returns {format: {"path", "rows"}}."""
    return {
        fmt: combine_export(out_dir, part_dir, numbers, fmt, num_negatives, with_scores, storage_options)
        for fmt in formats
    }


def combine_export(
    out_dir: str,
    part_dir: str,
    numbers: list[int],
    fmt: str,
    num_negatives: int,
    with_scores: bool,
    storage_options: dict | None = None,
) -> dict:
    """One export of :func:`combine_exports`: ``{"path", "rows"}``. Whoever runs it streams the parts' shares
    straight to the output (one part in memory; on object storage a multipart upload), so the job's driver need
    not: the mine job runs each format in a Ray task of its own when Ray is up."""
    url = storage.join(out_dir, EXPORT_FILES[fmt])
    pieces = [storage.join(part_dir, part_export_name(n, fmt)) for n in numbers]
    if fmt == "flag-jsonl":
        rows = _concat_bytes(url, pieces, storage_options)
    elif fmt == "triplet":
        rows = storage.concat_parquet_atomic(url, pieces, triplet_schema(with_scores), storage_options)
    else:
        rows = _concat_by_query(url, pieces, ntuple_schema(num_negatives, with_scores), storage_options)
    return {"path": f"exports/{EXPORT_FILES[fmt]}", "rows": rows}


def _concat_by_query(url: str, pieces: list[str], schema: pa.Schema, storage_options: dict | None) -> int:
    """Concatenate n-tuple shares in row groups of about ``NTUPLE_GROUP_ROWS`` rows that never split a query's
    rows (training reads the file row group by row group, and scores a held-out query with all its positives),
    without column statistics (min and max texts would make the footer, held whole by every reader, 3x larger)."""
    rows = 0
    with storage.parquet_writer_atomic(url, schema, storage_options, statistics=False) as write_row_group:
        for piece in pieces:
            table = storage.read_parquet(piece, storage_options).cast(schema)
            for start, stop in query_groups(table.column("anchor").to_pylist(), NTUPLE_GROUP_ROWS):
                write_row_group(table.slice(start, stop - start))
            rows += table.num_rows
    return rows


def query_groups(anchors: list[str], rows: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive row groups over ``anchors``: each closes at the first change of query at or
    after ``rows`` rows (a query with more rows than that is one group of its own)."""
    groups, start = [], 0
    for at in range(1, len(anchors) + 1):
        if at == len(anchors) or (at - start >= rows and anchors[at] != anchors[at - 1]):
            groups.append((start, at))
            start = at
    return groups


def _concat_bytes(url: str, pieces: list[str], storage_options: dict | None) -> int:
    rows = 0
    with storage.open_atomic(url, storage_options) as out:
        for piece in pieces:
            data = storage.read_bytes(piece, storage_options)
            rows += data.count(b"\n")
            out.write(data)
    return rows
