"""A part of the mining stage, mined in two halves around the join of its candidates (see ``jobs.mine``).

1. :func:`search_part` encodes the part's queries, searches, and writes the results and the requests of every
   candidate and positive row under ``negatives/_candidates/``.
2. The join (:func:`mine.texts.resolve_group`, one call per text group) looks those rows up once per group.
3. :func:`select_part` reads the joined values (and texts, for a cross-encoder), rescores, selects the negatives
   (:func:`mine_part`) and commits the part (:func:`mining.commit_part`).

No part looks its candidates up across the corpus. Layout, commit records, exports and the manifest: ``mining``.
"""

from __future__ import annotations

import dataclasses
import io
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from retrieval_core.index import lookup
from retrieval_core.io import storage
from retrieval_core.io.manifest import peak_memory_mb
from retrieval_core.mine import mining, negatives, rescoring
from retrieval_core.mine import report as mine_report
from retrieval_core.mine import texts as mine_texts
from retrieval_core.mine.inputs import MiningQuery
from retrieval_core.mine.mining import MineWork


@dataclasses.dataclass
class Candidates:
    """A part's search results with the values the selection needs: (doc id, text hash) of each candidate row,
    the candidates' text hashes (n x depth, "" where none), and (vector, text hash) of each positive row."""

    values: dict[int, tuple[str, str]]
    hashes: np.ndarray
    positives: dict[int, tuple[np.ndarray, str]]

    @classmethod
    def joined(
        cls, joined: pa.Table, rows: lookup.RowLookup, queries: list[MiningQuery], ids: np.ndarray
    ) -> "Candidates":
        """From the rows the join found for the part (:func:`mine.texts.part_rows`); the positives' vectors from
        the embedding shards holding them (a part's positives lie in few shards)."""
        values = dict(
            zip(
                joined.column("row").to_pylist(),
                zip(joined.column("doc_id").to_pylist(), joined.column("text_hash").to_pylist()),
            )
        )
        return cls(values, lookup.text_hashes(values, ids), positive_vectors(queries, rows))

    def positive_hashes(self) -> dict[int, str]:
        return {row: text_hash for row, (_, text_hash) in self.positives.items()}


def positive_vectors(queries: list[MiningQuery], rows: lookup.RowLookup) -> dict[int, tuple[np.ndarray, str]]:
    """Row id -> (vector, text hash) of every positive of ``queries``."""
    values = rows.vectors({r for q in queries for r in q.positive_rows})
    return {row: (np.asarray(vector, dtype=np.float32), text_hash) for row, (vector, text_hash) in values.items()}


def search_part(
    work: MineWork,
    number: int,
    queries: list[MiningQuery],
    encode: Callable,
    search: Callable,
    depth: int,
    text_starts: list[int],
) -> dict:
    """The first half of part ``number``: encode its queries (``encode(texts)``), search (``search(vectors,
    depth)`` -> scores, row ids), write the results (``_candidates/part-NNNNN.npz``) and the requests of every
    candidate and positive row (text groups starting at rows ``text_starts``, see :mod:`mine.texts`), whose doc
    ids, text hashes and, for a cross-encoder, texts the join of the candidates finds; last, its record
    (``part-NNNNN.json``: the groups asked, seconds per step), which :func:`select_part` reads. Returns it."""
    so, clock = work.root.storage_options, _Clock()
    vectors = clock.step("encode", encode, [q.text for q in queries])
    scores, ids = clock.step("search", search, vectors, depth)
    wanted = np.concatenate([ids.ravel(), np.array([r for q in queries for r in q.positive_rows], dtype=np.int64)])
    groups = clock.step(
        "text_requests", mine_texts.write_requests, candidates_dir(work), number, wanted, text_starts, so
    )
    buffer = io.BytesIO()
    np.savez(buffer, vectors=vectors, scores=scores, ids=ids)
    storage.write_bytes_atomic(_candidates_file(work, number, "npz"), buffer.getvalue(), so)
    record = {"part": number, "text_groups": groups, "steps_s": clock.seconds}
    storage.write_json_atomic(_candidates_file(work, number, "json"), record, so)
    return record


def candidates_dir(work: MineWork) -> str:
    """Where the parts' search results and the join of their candidates are kept (see :mod:`mine.texts`)."""
    return work.out.file(mining.CANDIDATES)


def _candidates_file(work: MineWork, number: int, suffix: str) -> str:
    return storage.join(candidates_dir(work), f"part-{number:05d}.{suffix}")


def searched(work: MineWork, number: int) -> bool:
    """Whether :func:`search_part` finished part ``number``."""
    return storage.exists(_candidates_file(work, number, "json"), work.root.storage_options)


def search_record(work: MineWork, number: int) -> dict:
    """The record :func:`search_part` wrote for part ``number``."""
    return storage.read_json(_candidates_file(work, number, "json"), work.root.storage_options)


def select_part(
    work: MineWork,
    rows: lookup.RowLookup,
    number: int,
    queries: list[MiningQuery],
    range_max: int,
    text_starts: list[int],
    rescore: Callable | None = None,
) -> dict:
    """The second half of part ``number`` (searched by :func:`search_part`, its candidates joined): with a
    cross-encoder, rescore the candidates (``rescore(pairs)`` -> scores) with the joined texts; select the
    negatives; write the part's statistics, its exports when a cross-encoder rescored (the texts are at hand), and
    the text requests of the documents it names (the join after the selection finds their texts for the exports
    still to write, see :func:`mining.export_part`); commit it. ``rows`` gives the positives' vectors only.
    Memory: the values (and texts) of the part's candidates. Returns its commit record."""
    so = work.root.storage_options
    record = search_record(work, number)
    clock = _Clock(record["steps_s"])
    with np.load(io.BytesIO(storage.read_bytes(_candidates_file(work, number, "npz"), so))) as arrays:
        vectors, scores, ids = arrays["vectors"], arrays["scores"], arrays["ids"]
    joined = clock.step("select", mine_texts.part_rows, candidates_dir(work), number, record["text_groups"], so)
    found = clock.step("select", Candidates.joined, joined, rows, queries, ids)
    rescored = None
    if rescore:
        by_row = dict(zip(joined.column("row").to_pylist(), joined.column("text").to_pylist()))
        rescored = clock.step(
            "rescore",
            rescoring.rescore_part,
            lambda wanted: {r: by_row[r] for r in wanted},
            queries,
            ids,
            found.hashes,
            found.positive_hashes(),
            rescore,
        )
    table, counts, named, agreement = clock.step(
        "select", mine_part, work, found, queries, vectors, scores, ids, range_max, rescored
    )
    if rescore:
        texts = dict(zip(joined.column("doc_id").to_pylist(), joined.column("text").to_pylist()))
        counts["exports"] = clock.step("exports", mining.part_exports, work, number, table, texts)
    # with exports written, the requests serve a rerun asking for other formats before the manifest
    counts["text_groups"] = clock.step(
        "text_requests", mine_texts.write_requests, mining.texts_dir(work), number, named.values(), text_starts, so
    )
    return mining.commit_part(
        work,
        number,
        table,
        {
            **counts,
            "stats": mine_report.part_stats(table, agreement),
            "peak_memory_mb": peak_memory_mb(),
            "steps_s": clock.seconds,
            "seconds": round(sum(clock.seconds.values()), 3),
        },
    )


class _Clock:
    """Seconds spent in each named step (added to ``seconds``, when given)."""

    def __init__(self, seconds: dict[str, float] | None = None):
        self.seconds: dict[str, float] = dict(seconds or {})

    def step(self, name: str, function: Callable, *args):
        started = time.perf_counter()
        result = function(*args)
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 4)
        return result


def mine_part(
    work: MineWork,
    found: Candidates,
    queries: list[MiningQuery],
    query_vectors: np.ndarray,
    scores: np.ndarray,
    ids: np.ndarray,
    range_max: int,
    rescored: rescoring.Rescored | None = None,
) -> tuple[pa.Table, dict, dict[str, int], dict | None]:
    """Select the negatives of one part from its search results (scores / ids: n x depth, best first), by the
    cross-encoder's scores when ``rescored``. Returns the part's table (kept queries), its counts, the row id of
    every document the table names, and the agreement statistics of the two models (None without rescoring)."""
    rules = mining.rules_of(work.mine)
    positives, candidates = found.positives, found.values
    rows: list[dict] = []
    named: dict[str, int] = {}
    counts: dict[str, Any] = {
        "queries": len(queries),
        "complete": 0,
        "incomplete": 0,
        "without_negatives": 0,
        "written": 0,
        "filtered": dict.fromkeys(negatives.FILTERS, 0),
    }
    together = {"chosen": 0, "shared": 0}
    for i, (query, vector) in enumerate(zip(queries, query_vectors)):
        pos_scores = [float(vector @ positives[r][0]) for r in query.positive_rows]
        ce_row, ce_positive = (rescored.candidates[i], rescored.positives[i]) if rescored else (None, None)
        chosen, shared = _choose(
            rules,
            range_max,
            query,
            (scores[i], ids[i], found.hashes[i]),
            pos_scores,
            {positives[r][1] for r in query.positive_rows},
            ce_row,
            ce_positive,
        )
        for rule, n in chosen.filtered.items():
            counts["filtered"][rule] += n
        complete = len(chosen.ids) == rules.num_negatives
        counts["complete" if complete else ("incomplete" if chosen.ids else "without_negatives")] += 1
        if complete or (work.mine.keep_incomplete and chosen.ids):
            together["chosen"] += len(chosen.ids)
            together["shared"] += shared or 0
            named.update(zip(query.positive_doc_ids, query.positive_rows))
            named.update((candidates[r][0], r) for r in chosen.ids)
            rows.append(
                {
                    "query_id": query.query_id,
                    "query": query.text,
                    "positive_ids": query.positive_doc_ids,
                    "positive_scores": pos_scores,
                    "negative_ids": [candidates[r][0] for r in chosen.ids],
                    "negative_scores": [float(scores[i][rank - 1]) for rank in chosen.ranks],
                    "negative_ranks": chosen.ranks,
                    "complete": complete,
                    "positive_ce_scores": ce_positive,
                    "negative_ce_scores": chosen.scores if rescored else None,
                }
            )
    counts["written"] = len(rows)
    agreement = (
        mine_report.agreement_stats(scores[rescored.scored], rescored.candidates[rescored.scored], **together)
        if rescored
        else None
    )
    return pa.Table.from_pylist(rows, schema=mining.PART_SCHEMA), counts, named, agreement


def _choose(
    rules: negatives.Rules,
    range_max: int,
    query: MiningQuery,
    results: tuple,
    positive_scores: list,
    positive_hashes: set,
    ce_row: np.ndarray | None,
    ce_positive: list | None,
):
    """(the query's negatives, by the cross-encoder's scores when given, else the bi-encoder's; how many of them
    the bi-encoder's scores alone would have chosen, None without a cross-encoder). ``results``: the bi-encoder's
    scores, the row ids and text hashes of the candidates."""
    bi_row, id_row, hashes = results

    def by(scores, positive):
        return negatives.select(
            scores,
            id_row,
            hashes,
            set(query.positive_rows),
            positive,
            positive_hashes,
            rules,
            range_max,
            query.query_id,
        )

    if ce_row is None:
        return by(bi_row, positive_scores), None
    chosen = by(ce_row, ce_positive)
    return chosen, len(set(chosen.ids) & set(by(bi_row, positive_scores).ids))
