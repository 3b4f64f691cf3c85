"""Queries and relevance judgements (qrels) as BEIR ships them, read from any fsspec URL.

Queries are JSONL (one object a line) or Parquet; qrels are TSV (``query-id corpus-id score``, with or without the
header) or Parquet. Every error is an :class:`EvaluationDataError` naming the file and, where it applies, the line
or field. The evaluate and mine stages read their inputs with these.
"""

from __future__ import annotations

import json
import logging
import zlib
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from retrieval_core.io import storage

log = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")
QRELS_HEADER = ("query-id", "corpus-id", "score")


class EvaluationDataError(ValueError):
    """Queries or qrels cannot be read; the message names the file and, where it applies, the line or field."""


def read_queries(
    url: str,
    storage_options: dict | None = None,
    id_field: str = "_id",
    text_field: str = "text",
    keep: Callable[[str], bool] | None = None,
) -> dict[str, str]:
    """Queries as ``{query id: text}`` from JSONL (one object a line, blank lines skipped) or Parquet.

    The format follows the extension: ``.parquet`` / ``.pq`` is Parquet, anything else JSONL (``.gz`` and other
    compressions fsspec infers are read transparently). Integer ids are turned into strings. Raises
    :class:`EvaluationDataError` naming the file and line (or row) for invalid JSON, a missing field (listing the
    fields present), a bad id or text, and a duplicate query id. With ``keep``, only the queries whose id it
    accepts are returned (every line is still checked).
    """
    queries: dict[str, str] = {}
    for where, query_id, text in query_records(url, storage_options, id_field, text_field):
        if keep is None or keep(query_id):
            add_query(queries, url, where, query_id, text)
    log.info("read %d queries from %s", len(queries), url)
    return queries


def query_records(
    url: str, storage_options: dict | None = None, id_field: str = "_id", text_field: str = "text"
) -> Iterator[tuple[str, str, str]]:
    """(where, query id, text) of every query of a queries file, in file order, each checked as
    :func:`read_queries` says (duplicates aside); an error when the file holds none."""
    records = (
        parquet_records(url, storage_options, (id_field, text_field))
        if _is_parquet(url)
        else jsonl_records(url, storage_options)
    )
    rows = 0
    for where, record in records:
        yield (where, *_query_from_record(url, where, record, id_field, text_field))
        rows += 1
    if not rows:
        raise EvaluationDataError(f"'{url}': no queries in the file")


def read_qrels(
    url: str, storage_options: dict | None = None, keep: Callable[[str], bool] | None = None
) -> dict[str, dict[str, int]]:
    """Relevance judgements as ``{query id: {doc id: score}}`` from a BEIR qrels TSV.

    The first line is the header ``query-id<TAB>corpus-id<TAB>score``; it may be left out only when the first line's
    third field is an integer. Rows with a score <= 0 are kept (their gain is 0), as BEIR does. A pair repeated with
    the same score is read once. Raises :class:`EvaluationDataError` naming the file and line for a malformed line
    (wrong field count, empty id, non-integer score), a pair repeated with another score, or a bad header. With
    ``keep``, only the judgements of the queries whose id it accepts are returned (every line is still checked).
    """
    qrels: dict[str, dict[str, int]] = {}
    rows = 0
    for line_no, query_id, doc_id, score in qrels_records(url, storage_options):
        rows += 1
        if keep is not None and not keep(query_id):
            continue
        add_judgement(qrels, url, f"line {line_no}", query_id, doc_id, score)
    log.info("read %d qrels rows for %d queries from %s", rows, len(qrels), url)
    return qrels


def qrels_records(url: str, storage_options: dict | None = None) -> Iterator[tuple[int, str, str, int]]:
    """(line number, query id, doc id, score) of every row of a qrels TSV, in file order, each checked as
    :func:`read_qrels` says (repeated pairs aside); an error when the file holds none."""
    rows = 0
    for index, (line_no, fields) in enumerate(_tsv_lines(url, storage_options)):
        if index == 0 and _is_header(url, line_no, fields):
            continue
        yield (line_no, *_qrels_row(url, line_no, fields))
        rows += 1
    if not rows:
        raise EvaluationDataError(f"'{url}': no qrels rows in the file")


def add_query(queries: dict[str, str], url: str, where: str, query_id: str, text: str) -> None:
    """Add one query; a query id seen before is an error naming ``where``."""
    if query_id in queries:
        raise EvaluationDataError(f"'{url}' {where}: duplicate query id '{query_id}'")
    queries[query_id] = text


def add_judgement(
    qrels: dict[str, dict[str, int]], url: str, where: str, query_id: str, doc_id: str, score: int
) -> None:
    """Add one qrels row; a pair judged again with another score is an error naming ``where``."""
    previous = qrels.setdefault(query_id, {}).setdefault(doc_id, score)
    if previous != score:
        raise EvaluationDataError(
            f"'{url}' {where}: query '{query_id}', document '{doc_id}' is judged "
            f"again with score {score} (earlier {previous})"
        )


def _is_parquet(url: str) -> bool:
    return url.lower().endswith(PARQUET_SUFFIXES)


def _open_text_lines(url: str, storage_options: dict | None) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its line ending) for every line, blank ones included."""
    fs, path = storage.filesystem(url, storage_options)
    line_no = 0
    try:
        with fs.open(path, "rb", compression="infer") as handle:
            for line_no, raw in enumerate(handle, start=1):
                try:
                    yield line_no, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    raise EvaluationDataError(f"'{url}' line {line_no}: not UTF-8 text: {exc}") from None
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as exc:  # gzip that is not gzip, or cut short
        raise EvaluationDataError(
            f"'{url}' could not be read after line {line_no}: {type(exc).__name__}: {exc}"
        ) from None


def jsonl_records(url: str, storage_options: dict | None) -> Iterator[tuple[str, object]]:
    for line_no, line in _open_text_lines(url, storage_options):
        if not line.strip():
            continue
        try:
            yield f"line {line_no}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluationDataError(f"'{url}' line {line_no}: invalid JSON: {exc}") from None


def parquet_records(url: str, storage_options: dict | None, fields: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    fs, path = storage.filesystem(url, storage_options)
    try:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            present = parquet.schema_arrow.names
            for name in fields:
                if name not in present:
                    raise EvaluationDataError(f"'{url}': missing field '{name}'; fields present: {present}")
            row_no = 0
            for batch in parquet.iter_batches(batch_size=65_536, columns=list(fields)):  # memory: one batch
                for record in batch.to_pylist():
                    row_no += 1
                    yield f"row {row_no}", record
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise EvaluationDataError(f"'{url}' is not a readable Parquet file: {exc}") from None


def _query_from_record(url: str, where: str, record: object, id_field: str, text_field: str) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise EvaluationDataError(f"'{url}' {where}: expected a JSON object, got {type(record).__name__}")
    for name in (id_field, text_field):
        if name not in record:
            raise EvaluationDataError(f"'{url}' {where}: missing field '{name}'; fields present: {list(record)}")
    query_id, text = record[id_field], record[text_field]
    if isinstance(query_id, int) and not isinstance(query_id, bool):
        query_id = str(query_id)
    if not isinstance(query_id, str) or not query_id:
        raise EvaluationDataError(
            f"'{url}' {where}: field '{id_field}' must be a non-empty string or an integer, got {query_id!r}"
        )
    if not isinstance(text, str) or not text.strip():
        raise EvaluationDataError(
            f"'{url}' {where}: field '{text_field}' of query '{query_id}' must be a non-empty string, got {text!r}"
        )
    return query_id, text


def _tsv_lines(url: str, storage_options: dict | None) -> Iterator[tuple[int, list[str]]]:
    for line_no, line in _open_text_lines(url, storage_options):
        if line.strip():
            yield line_no, [field.strip() for field in line.split("\t")]


def _is_header(url: str, line_no: int, fields: list[str]) -> bool:
    """Whether the first line is the header; an error when it is neither the header nor a data row."""
    if len(fields) == 3 and _parse_int(fields[2]) is not None:
        return False
    if tuple(f.lower() for f in fields) == QRELS_HEADER:
        return True
    raise EvaluationDataError(
        f"'{url}' line {line_no}: expected the header '{chr(9).join(QRELS_HEADER)}' "
        f"(tab-separated) or a row with an integer score, got {fields}"
    )


def _qrels_row(url: str, line_no: int, fields: list[str]) -> tuple[str, str, int]:
    if len(fields) != 3:
        raise EvaluationDataError(
            f"'{url}' line {line_no}: expected 3 tab-separated fields "
            f"(query-id, corpus-id, score), got {len(fields)}: {fields}"
        )
    query_id, doc_id, raw_score = fields
    if not query_id or not doc_id:
        raise EvaluationDataError(f"'{url}' line {line_no}: empty query-id or corpus-id: {fields}")
    score = _parse_int(raw_score)
    if score is None:
        raise EvaluationDataError(f"'{url}' line {line_no}: score must be an integer, got '{raw_score}'")
    return query_id, doc_id, score


def _parse_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None
