"""Retrieval evaluation: BEIR-style queries and qrels readers, and nDCG / recall / MRR at a cut-off.

Definitions follow BEIR, which computes them with pytrec_eval (trec_eval):

* ``ndcg@k`` (trec_eval ``ndcg_cut``): DCG = sum over ranks i = 1..k of gain_i / log2(i + 1), with the linear gain
  gain = the qrels score (0 for unjudged documents and for scores <= 0). The ideal DCG uses the query's positive
  qrels scores sorted in descending order, truncated at k. 0 when the ideal DCG is 0.
* ``recall@k``: relevant documents in the top k / relevant documents, relevant meaning score > 0.
* ``mrr@k``: 1 / rank of the first relevant document within the top k, else 0.

A run maps a query id to its document ids in rank order, best first. Averages are taken over the queries in the
qrels that have at least one relevant document; a query of those that is missing from the run counts with every
metric 0.
"""
from __future__ import annotations

import json
import logging
import math
import zlib
from collections import Counter
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

log = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")
QRELS_HEADER = ("query-id", "corpus-id", "score")


class EvaluationDataError(ValueError):
    """Queries or qrels cannot be read; the message names the file and, where it applies, the line or field."""


# ----------------------------------------------------------------------------------------------------------- readers

def read_queries(url: str, storage_options: dict | None = None, id_field: str = "_id",
                 text_field: str = "text", keep: Callable[[str], bool] | None = None) -> dict[str, str]:
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


def query_records(url: str, storage_options: dict | None = None, id_field: str = "_id",
                  text_field: str = "text") -> Iterator[tuple[str, str, str]]:
    """(where, query id, text) of every query of a queries file, in file order, each checked as
    :func:`read_queries` says (duplicates aside); an error when the file holds none."""
    records = parquet_records(url, storage_options, (id_field, text_field)) if _is_parquet(url) \
        else jsonl_records(url, storage_options)
    rows = 0
    for where, record in records:
        yield (where, *_query_from_record(url, where, record, id_field, text_field))
        rows += 1
    if not rows:
        raise EvaluationDataError(f"'{url}': no queries in the file")


def read_qrels(url: str, storage_options: dict | None = None,
               keep: Callable[[str], bool] | None = None) -> dict[str, dict[str, int]]:
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


def add_judgement(qrels: dict[str, dict[str, int]], url: str, where: str, query_id: str, doc_id: str,
                  score: int) -> None:
    """Add one qrels row; a pair judged again with another score is an error naming ``where``."""
    previous = qrels.setdefault(query_id, {}).setdefault(doc_id, score)
    if previous != score:
        raise EvaluationDataError(f"'{url}' {where}: query '{query_id}', document '{doc_id}' is judged "
                                  f"again with score {score} (earlier {previous})")


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
        raise EvaluationDataError(f"'{url}' could not be read after line {line_no}: {type(exc).__name__}: "
                                  f"{exc}") from None


def jsonl_records(url: str, storage_options: dict | None) -> Iterator[tuple[str, object]]:
    for line_no, line in _open_text_lines(url, storage_options):
        if not line.strip():
            continue
        try:
            yield f"line {line_no}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluationDataError(f"'{url}' line {line_no}: invalid JSON: {exc}") from None


def parquet_records(url: str, storage_options: dict | None,
                     fields: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
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
        raise EvaluationDataError(f"'{url}' {where}: field '{id_field}' must be a non-empty string or an integer, "
                                  f"got {query_id!r}")
    if not isinstance(text, str) or not text.strip():
        raise EvaluationDataError(f"'{url}' {where}: field '{text_field}' of query '{query_id}' must be a non-empty "
                                  f"string, got {text!r}")
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
    raise EvaluationDataError(f"'{url}' line {line_no}: expected the header '{chr(9).join(QRELS_HEADER)}' "
                              f"(tab-separated) or a row with an integer score, got {fields}")


def _qrels_row(url: str, line_no: int, fields: list[str]) -> tuple[str, str, int]:
    if len(fields) != 3:
        raise EvaluationDataError(f"'{url}' line {line_no}: expected 3 tab-separated fields "
                                  f"(query-id, corpus-id, score), got {len(fields)}: {fields}")
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


# ----------------------------------------------------------------------------------------------------------- metrics

def ndcg_at_k(ranked_ids: list[str], qrels: dict[str, int], k: int) -> float:
    """nDCG@k of one ranked list (trec_eval ``ndcg_cut``: linear gain = qrels score, scores <= 0 gain 0)."""
    _check_ranking(ranked_ids, k)
    return _ndcg(ranked_ids, qrels, k)


def recall_at_k(ranked_ids: list[str], qrels: dict[str, int], k: int) -> float:
    """Relevant documents (score > 0) in the top k over all relevant documents; 0.0 when none is relevant."""
    _check_ranking(ranked_ids, k)
    return _recall(ranked_ids, qrels, k)


def mrr_at_k(ranked_ids: list[str], qrels: dict[str, int], k: int) -> float:
    """1 / rank of the first relevant document (score > 0) within the top k, else 0.0."""
    _check_ranking(ranked_ids, k)
    return _mrr(ranked_ids, qrels, k)


def per_query_metrics(run: dict[str, list[str]], qrels: dict[str, dict[str, int]],
                      ndcg_ks: Iterable[int] = (10,), recall_ks: Iterable[int] = (10, 100),
                      mrr_ks: Iterable[int] = (10,)) -> dict[str, dict[str, float]]:
    """``{query id: {"ndcg@10": ..., ...}}`` for every query in ``qrels`` with at least one relevant document.

    Queries without a relevant document (no score > 0) are left out. A query missing from ``run`` gets every metric
    0.0. Queries in ``run`` but not in ``qrels`` are ignored. Raises ValueError naming the query when a ranked list
    holds a document id twice, and for a cut-off below 1.
    """
    cutoffs = _cutoffs(ndcg_ks, recall_ks, mrr_ks)
    results: dict[str, dict[str, float]] = {}
    for query_id, judged in qrels.items():
        if not any(score > 0 for score in judged.values()):
            continue
        ranked = run.get(query_id, [])
        _check_unique(ranked, f"query '{query_id}'")
        results[query_id] = {f"{name}@{k}": METRICS[name](ranked, judged, k) for name, k in cutoffs}
    return results


def evaluate_run(run: dict[str, list[str]], qrels: dict[str, dict[str, int]],
                 ndcg_ks: Iterable[int] = (10,), recall_ks: Iterable[int] = (10, 100),
                 mrr_ks: Iterable[int] = (10,)) -> dict[str, float | int]:
    """Mean metrics over the evaluated queries, e.g. ``{"ndcg@10": ..., "recall@10": ..., "recall@100": ...,
    "mrr@10": ..., "queries": n}``.

    The evaluated queries are those in ``qrels`` with at least one relevant document (score > 0), as BEIR averages;
    such a query missing from ``run`` counts with every metric 0 (so an incomplete run scores lower, it is not
    averaged over the queries it happens to cover). ``queries`` is the number evaluated. Raises ValueError for a
    ranked list holding an id twice (naming the query) and :class:`EvaluationDataError` when no query has a
    relevant document.
    """
    ndcg_ks, recall_ks, mrr_ks = tuple(ndcg_ks), tuple(recall_ks), tuple(mrr_ks)
    per_query = per_query_metrics(run, qrels, ndcg_ks, recall_ks, mrr_ks)
    if not per_query:
        raise EvaluationDataError("no query in the qrels has a relevant document (score > 0); nothing to evaluate")
    missing = sum(1 for query_id in per_query if query_id not in run)
    if missing:
        log.warning("%d of %d evaluated queries are missing from the run; they count as 0", missing, len(per_query))
    keys = [f"{name}@{k}" for name, k in _cutoffs(ndcg_ks, recall_ks, mrr_ks)]
    mean = MeanOf()
    for values in per_query.values():
        mean.add(values)
    summary: dict[str, float | int] = {**mean.means(), "queries": mean.count}
    log.info("evaluated %d queries (%d skipped without a relevant document): %s", len(per_query),
             len(qrels) - len(per_query), {key: round(summary[key], 4) for key in keys})
    return summary


class MeanOf:
    """Means of named values added one query at a time, exactly as ``math.fsum`` over all of them would give, while
    holding a few partial sums per name instead of the values (Shewchuk's exact summation, as ``fsum`` does)."""

    def __init__(self):
        self.partials: dict[str, list[float]] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.partials[name] = _exact_add(self.partials.get(name, []), value)
        self.count += 1

    def means(self) -> dict[str, float]:
        return {name: math.fsum(partials) / self.count for name, partials in self.partials.items()}


def _exact_add(partials: list[float], x: float) -> list[float]:
    """Non-overlapping partial sums whose exact total is that of ``partials`` plus ``x``."""
    out = []
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        high = x + y
        low = y - (high - x)
        if low:
            out.append(low)
        x = high
    out.append(x)
    return out


def _ndcg(ranked_ids: list[str], qrels: dict[str, int], k: int) -> float:
    ideal = sorted((score for score in qrels.values() if score > 0), reverse=True)[:k]
    idcg = _dcg(ideal)
    if idcg == 0:
        return 0.0
    return _dcg([max(qrels.get(doc_id, 0), 0) for doc_id in ranked_ids[:k]]) / idcg


def _dcg(gains: list[int]) -> float:
    return math.fsum(gain / math.log2(rank + 1) for rank, gain in enumerate(gains, start=1))


def _recall(ranked_ids: list[str], qrels: dict[str, int], k: int) -> float:
    relevant = {doc_id for doc_id, score in qrels.items() if score > 0}
    if not relevant:
        return 0.0
    return sum(1 for doc_id in ranked_ids[:k] if doc_id in relevant) / len(relevant)


def _mrr(ranked_ids: list[str], qrels: dict[str, int], k: int) -> float:
    for rank, doc_id in enumerate(ranked_ids[:k], start=1):
        if qrels.get(doc_id, 0) > 0:
            return 1.0 / rank
    return 0.0


METRICS = {"ndcg": _ndcg, "recall": _recall, "mrr": _mrr}


def _cutoffs(ndcg_ks: Iterable[int], recall_ks: Iterable[int], mrr_ks: Iterable[int]) -> list[tuple[str, int]]:
    cutoffs = [("ndcg", k) for k in ndcg_ks] + [("recall", k) for k in recall_ks] + [("mrr", k) for k in mrr_ks]
    for name, k in cutoffs:
        _check_k(k, name)
    return list(dict.fromkeys(cutoffs))


def _check_ranking(ranked_ids: list[str], k: int) -> None:
    _check_k(k, "k")
    _check_unique(ranked_ids, "the ranked list")


def _check_k(k: int, name: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"cut-off for {name} must be an integer >= 1, got {k!r}")


def _check_unique(ranked_ids: list[str], what: str) -> None:
    if len(set(ranked_ids)) != len(ranked_ids):
        repeated = sorted(doc_id for doc_id, count in Counter(ranked_ids).items() if count > 1)
        raise ValueError(f"{what} ranks document(s) more than once: {repeated[:5]}")
