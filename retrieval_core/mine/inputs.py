"""The mining input: query/positive pairs (JSONL or Parquet) or BEIR queries + qrels, read into one entry per
query, and positives resolved to corpus rows (absent ones become rejects)."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Iterable, Iterator, cast

import pyarrow as pa

from retrieval_core.config import MineConfig
from retrieval_core.io.judgements import (
    EvaluationDataError,
    add_judgement,
    add_query,
    jsonl_records,
    parquet_records,
    qrels_records,
    query_records,
)

REJECTS_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("reason", pa.string())])


class PairsError(ValueError):
    """The query/positive input cannot be read; the message names the file, the row and the column."""


@dataclasses.dataclass
class MiningQuery:
    query_id: str
    text: str
    positive_doc_ids: list[str]
    positive_rows: list[int] = dataclasses.field(default_factory=list)


def text_query_id(text: str) -> str:
    """A query id derived from the query text (when the input has no id column): 16 hex digits of BLAKE2b."""
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


# An input row: (query id, query text or None for a qrels row, doc ids, qrels score or None, where in its file).
Row = tuple[str, "str | None", list[str], "int | None", str]


def input_files(mi: MineConfig) -> list[tuple[str, str]]:
    """(kind, url) of each input file: ``pairs``, or ``queries`` and ``qrels`` (BEIR)."""
    return [("queries", mi.queries_path), ("qrels", mi.qrels_path)] if mi.queries_path else [("pairs", mi.pairs_path)]


def load_queries(mi: MineConfig, keep: Callable[[str], bool] | None = None) -> list[MiningQuery]:
    """Queries with their positive doc ids, from pairs or from BEIR queries + qrels; one entry per query (rows of
    the same query are merged, positives in first-seen order). With ``keep``, only the queries whose id it accepts
    (every row is still checked)."""
    return queries_of(
        mi,
        {
            kind: (row for row in input_rows(mi, kind, url) if keep is None or keep(row[0]))
            for kind, url in input_files(mi)
        },
    )


def input_rows(mi: MineConfig, kind: str, url: str) -> Iterator[Row]:
    """Every row of one input file in file order, each checked (errors name the file and the line or row)."""
    if kind == "pairs":
        return _pair_rows(mi, url)
    if kind == "queries":
        return ((query_id, text, [], None, where) for where, query_id, text in query_records(url, mi.storage_options))
    return (
        (query_id, None, [doc_id], score, f"line {line_no}")
        for line_no, query_id, doc_id, score in qrels_records(url, mi.storage_options)
    )


def queries_of(mi: MineConfig, rows: dict[str, Iterable[Row]]) -> list[MiningQuery]:
    """One entry per query, in the order queries first appear (in the qrels, for BEIR), from the rows of each kind
    of input file (see :func:`input_files`), each in file order: the rows of a query merged, positives in
    first-seen order; a query text that differs between rows, a query id repeated in the queries file, a pair
    judged twice with other scores, and a judged query without a text are errors naming the file and line."""
    if mi.queries_path:
        return _beir_queries(mi, rows["queries"], rows["qrels"])
    return _pair_queries(mi, rows["pairs"])


def _beir_queries(mi: MineConfig, query_rows: Iterable[Row], qrels_rows: Iterable[Row]) -> list[MiningQuery]:
    qrels: dict[str, dict[str, int]] = {}
    for query_id, _, (doc_id,), score, where in qrels_rows:
        add_judgement(qrels, mi.qrels_path, where, query_id, doc_id, cast(int, score))  # qrels rows have scores
    texts: dict[str, str] = {}
    for query_id, text, _, _, where in query_rows:
        add_query(texts, mi.queries_path, where, query_id, cast(str, text))  # query rows have texts
    out = []
    for query_id, judged in qrels.items():
        positives = [doc for doc, score in judged.items() if score > 0]
        if not positives:
            continue
        if query_id not in texts:
            raise EvaluationDataError(f"'{mi.qrels_path}': query '{query_id}' has no text in '{mi.queries_path}'")
        out.append(MiningQuery(query_id, texts[query_id], positives))
    return out


def _pair_queries(mi: MineConfig, rows: Iterable[Row]) -> list[MiningQuery]:
    by_id: dict[str, MiningQuery] = {}
    for query_id, text, positives, _, where in rows:
        entry = by_id.setdefault(query_id, MiningQuery(query_id, cast(str, text), []))  # pair rows have texts
        if entry.text != text:
            raise PairsError(f"'{mi.pairs_path}' {where}: query id '{query_id}' has two different query texts")
        entry.positive_doc_ids.extend(p for p in positives if p not in entry.positive_doc_ids)
    return list(by_id.values())


def _pair_rows(mi: MineConfig, url: str) -> Iterator[Row]:
    columns = tuple(c for c in (mi.query_id_column, mi.query_column, mi.positive_column) if c)
    parquet = mi.format == "parquet" or (not mi.format and url.lower().endswith((".parquet", ".pq")))
    rows = 0
    try:
        records = (
            parquet_records(url, mi.storage_options, columns) if parquet else jsonl_records(url, mi.storage_options)
        )
        for where, record in records:
            query_id, text, positives = _pair_fields(url, where, record, mi)
            rows += 1
            yield query_id, text, positives, None, where
    except EvaluationDataError as exc:
        raise PairsError(str(exc)) from None
    except FileNotFoundError:
        raise PairsError(f"mine.pairs_path '{url}' does not exist") from None
    if not rows:
        raise PairsError(f"'{url}': no query/positive pairs")


def _pair_fields(url: str, where: str, record, mi: MineConfig) -> tuple[str, str, list[str]]:
    if not isinstance(record, dict):
        raise PairsError(f"'{url}' {where}: expected a JSON object, got {type(record).__name__}")
    for column in (mi.query_column, mi.positive_column, mi.query_id_column):
        if column and column not in record:
            raise PairsError(f"'{url}' {where}: missing column '{column}'; columns present: {sorted(record)}")
    text = record[mi.query_column]
    if not isinstance(text, str) or not text.strip():
        raise PairsError(f"'{url}' {where}: '{mi.query_column}' must be a non-empty string, got {text!r}")
    positives = record[mi.positive_column]
    positives = positives if isinstance(positives, list) else [positives]
    if not positives or any(not _is_id(p) for p in positives):
        raise PairsError(
            f"'{url}' {where}: '{mi.positive_column}' must hold a doc id or a non-empty list of "
            f"doc ids, got {record[mi.positive_column]!r}"
        )
    query_id = str(record[mi.query_id_column]) if mi.query_id_column else text_query_id(text)
    return query_id, text, [str(p) for p in positives]


def _is_id(value) -> bool:
    """A doc id as corpora hold them: a non-empty string or an integer (not a float such as 1.0, whose string
    would not match the corpus id "1", nor an object)."""
    return (isinstance(value, str) and value != "") or (isinstance(value, int) and not isinstance(value, bool))


def resolve_positives(queries: list[MiningQuery], doc_rows: dict[str, int]) -> tuple[list[MiningQuery], list[dict]]:
    """Attach corpus row ids to positives. A positive absent from the corpus is a reject; a query left without
    positives is dropped (its positives are all in the rejects)."""
    kept, rejects = [], []
    for query in queries:
        present = [d for d in query.positive_doc_ids if d in doc_rows]
        rejects += [
            {"query_id": query.query_id, "doc_id": d, "reason": "positive not in corpus"}
            for d in query.positive_doc_ids
            if d not in doc_rows
        ]
        if present:
            kept.append(MiningQuery(query.query_id, query.text, present, [doc_rows[d] for d in present]))
    return kept, rejects
