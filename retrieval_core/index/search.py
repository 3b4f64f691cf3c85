"""Batched exact search over embedding shards, k-way merge of per-shard top-k, and recall against exact results."""

from __future__ import annotations

from typing import Iterable

import faiss
import numpy as np

from retrieval_core.index import gpu
from retrieval_core.index.faiss_index import faiss_metric

MISSING = -1


def _sort_keys(scores: np.ndarray, ids: np.ndarray, metric: str) -> np.ndarray:
    """Smaller is better: negated inner products, L2 distances; missing results (id -1) last."""
    keys = -scores.astype(np.float64) if metric == "ip" else scores.astype(np.float64)
    return np.where(ids == MISSING, np.inf, keys)


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard results (scores, ids), each (n x k_i), into the global top k per row.

    Ties in score are broken by the smaller id, so the merge does not depend on shard order.
    Rows with fewer than k results overall are padded with id -1 (score -inf for ip, +inf for l2).
    """
    scores = np.hstack([p[0] for p in parts]).astype(np.float32)
    ids = np.hstack([p[1] for p in parts]).astype(np.int64)
    keys = _sort_keys(scores, ids, metric)
    order = np.lexsort((ids, keys), axis=-1)[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_scores[top_ids == MISSING] = -np.inf if metric == "ip" else np.inf
    if top_ids.shape[1] < k:
        pad = k - top_ids.shape[1]
        top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=MISSING)
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf if metric == "ip" else np.inf)
    return top_scores, top_ids


def exact_search(
    shards: Iterable[tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int, metric: str, gpus: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``queries`` (n x dim float32) over shards given as (row_ids, vectors) pairs, streamed:
    memory is one shard plus (n x 2k) results; brute force on a GPU with ``gpus`` (see ``index.gpu``). Returns
    (scores, global row ids), best first."""
    knn = gpu.knn if gpus else faiss.knn
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best = (np.full((len(queries), 0), 0, np.float32), np.full((len(queries), 0), MISSING, np.int64))
    for row_ids, vectors in shards:
        if len(row_ids) == 0:
            continue
        scores, local = knn(
            queries, np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(row_ids)), metric=faiss_metric(metric)
        )
        found = np.where(local >= 0, np.asarray(row_ids, dtype=np.int64)[np.maximum(local, 0)], MISSING)
        best = merge_topk([best, (scores, found)], k, metric)
    return merge_topk([best], k, metric)


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over queries of |found top-k ∩ exact top-k| / |exact top-k| (ids of -1 ignored)."""
    hits, total = 0, 0
    for got, want in zip(found[:, :k], exact[:, :k]):
        wanted = set(want[want != MISSING].tolist())
        hits += len(wanted & set(got.tolist()))
        total += len(wanted)
    return hits / total if total else 1.0


def drop_ids(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row of ``ids`` without the id ``own[row]``, cut to k columns (padded with -1 if short)."""
    out = np.full((len(ids), k), MISSING, dtype=np.int64)
    for row, (found, skip) in enumerate(zip(ids, own)):
        kept = found[found != skip][:k]
        out[row, : len(kept)] = kept
    return out
