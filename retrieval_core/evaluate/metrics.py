"""Retrieval evaluation: nDCG / recall / MRR at a cut-off (queries and qrels: ``retrieval_core.io.judgements``).

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

import logging
import math
from collections import Counter
from typing import Iterable

from retrieval_core.io.judgements import EvaluationDataError

log = logging.getLogger(__name__)

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


def per_query_metrics(
    run: dict[str, list],  # query id -> ranked doc ids (strings, or row ids: any hashable the qrels use)
    qrels: dict[str, dict],  # query id -> {doc id: score}
    ndcg_ks: Iterable[int] = (10,),
    recall_ks: Iterable[int] = (10, 100),
    mrr_ks: Iterable[int] = (10,),
) -> dict[str, dict[str, float]]:
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


def evaluate_run(
    run: dict[str, list],  # query id -> ranked doc ids (strings, or row ids: any hashable the qrels use)
    qrels: dict[str, dict],  # query id -> {doc id: score}
    ndcg_ks: Iterable[int] = (10,),
    recall_ks: Iterable[int] = (10, 100),
    mrr_ks: Iterable[int] = (10,),
) -> dict[str, float | int]:
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
    log.info(
        "evaluated %d queries (%d skipped without a relevant document): %s",
        len(per_query),
        len(qrels) - len(per_query),
        {key: round(summary[key], 4) for key in keys},
    )
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
