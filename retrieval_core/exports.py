"""Training-data exports of mined negatives, and the mining report.

Exports (under ``negatives/exports/``), built from the canonical parts:
  * ``triplet.parquet``: ``anchor, positive, negative``, one row per (query, positive, negative), as
    sentence-transformers' ``output_format="triplet"``; with ``mine.output_scores`` a ``scores`` column
    ``[positive score, negative score]``.
  * ``n-tuple.parquet``: ``anchor, positive, negative_1 .. negative_n``, one row per (query, positive), complete
    queries only (as ``output_format="n-tuple"``); with scores: ``scores`` = ``[positive, negative_1 .. n]``.
  * ``flag.jsonl``: ``{"query", "pos": [...], "neg": [...]}`` per query, FlagEmbedding's format; with scores also
    ``pos_scores`` and ``neg_scores``.
Both Parquet files load with ``datasets.load_dataset("parquet", data_files=...)``.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa

from . import storage

log = logging.getLogger(__name__)
EXPORT_FILES = {"triplet": "triplet.parquet", "n-tuple": "n-tuple.parquet", "flag-jsonl": "flag.jsonl"}


def triplet_table(parts: pa.Table, texts: dict[str, str], with_scores: bool) -> pa.Table:
    columns = {"anchor": [], "positive": [], "negative": []}
    scores = []
    for row in parts.to_pylist():
        for pos_id, pos_score in zip(row["positive_ids"], row["positive_scores"]):
            for neg_id, neg_score in zip(row["negative_ids"], row["negative_scores"]):
                columns["anchor"].append(row["query"])
                columns["positive"].append(texts[pos_id])
                columns["negative"].append(texts[neg_id])
                scores.append([pos_score, neg_score])
    if with_scores:
        columns["scores"] = scores
    return pa.table(columns)


def ntuple_table(parts: pa.Table, texts: dict[str, str], num_negatives: int, with_scores: bool) -> pa.Table:
    columns = {"anchor": [], "positive": [], **{f"negative_{i}": [] for i in range(1, num_negatives + 1)}}
    scores = []
    for row in parts.to_pylist():
        if not row["complete"]:
            continue
        for pos_id, pos_score in zip(row["positive_ids"], row["positive_scores"]):
            columns["anchor"].append(row["query"])
            columns["positive"].append(texts[pos_id])
            for i, neg_id in enumerate(row["negative_ids"], start=1):
                columns[f"negative_{i}"].append(texts[neg_id])
            scores.append([pos_score, *row["negative_scores"]])
    if with_scores:
        columns["scores"] = scores
    return pa.table(columns)


def flag_lines(parts: pa.Table, texts: dict[str, str], with_scores: bool) -> bytes:
    lines = []
    for row in parts.to_pylist():
        record = {"query": row["query"], "pos": [texts[d] for d in row["positive_ids"]],
                  "neg": [texts[d] for d in row["negative_ids"]]}
        if with_scores:
            record |= {"pos_scores": row["positive_scores"], "neg_scores": row["negative_scores"]}
        lines.append(json.dumps(record, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode() if lines else b""


def write_exports(out_dir: str, parts: pa.Table, texts: dict[str, str], formats: list[str], num_negatives: int,
                  with_scores: bool, storage_options: dict | None = None) -> dict[str, dict]:
    """Write each export in ``formats``; returns {format: {"path", "rows"}}."""
    written = {}
    for fmt in formats:
        url = storage.join(out_dir, EXPORT_FILES[fmt])
        if fmt == "flag-jsonl":
            data = flag_lines(parts, texts, with_scores)
            storage.write_bytes_atomic(url, data, storage_options)
            rows = data.count(b"\n")
        else:
            table = (triplet_table(parts, texts, with_scores) if fmt == "triplet"
                     else ntuple_table(parts, texts, num_negatives, with_scores))
            storage.write_parquet_atomic(url, table, storage_options)
            rows = table.num_rows
        written[fmt] = {"path": f"exports/{EXPORT_FILES[fmt]}", "rows": rows}
    return written


# ------------------------------------------------------------------------------------------------------ report

def distribution(values: np.ndarray, bins: int | np.ndarray = 20) -> dict:
    if len(values) == 0:
        return {"count": 0}
    counts, edges = np.histogram(values, bins=bins)
    q = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {"count": int(len(values)), "mean": float(values.mean()), "std": float(values.std()),
            "min": float(q[0]), "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]), "max": float(q[4]),
            "histogram": {"edges": edges.round(6).tolist(), "counts": counts.tolist()}}


def report(parts: pa.Table, manifest_counts: dict) -> dict:
    """Score distributions of positives and chosen negatives, positive - negative differences, the rank
    distribution of chosen negatives, and the candidates removed by each filter."""
    pos = _flat(parts, "positive_scores")
    neg = _flat(parts, "negative_scores")
    ranks = _flat(parts, "negative_ranks")
    floor = np.array([min(p) for p in parts.column("positive_scores").to_pylist()], dtype=np.float64)
    per_query_neg = parts.column("negative_scores").to_pylist()
    margins = np.array([f - n for f, negs in zip(floor, per_query_neg) for n in negs], dtype=np.float64)
    max_rank = int(ranks.max()) if len(ranks) else 1
    return {"positive_scores": distribution(pos), "negative_scores": distribution(neg),
            "positive_minus_negative": distribution(margins),
            "negative_ranks": distribution(ranks, np.arange(0.5, max_rank + 1.5)),
            **manifest_counts}


def _flat(parts: pa.Table, column: str) -> np.ndarray:
    return np.asarray(parts.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False),
                      dtype=np.float64) if parts.num_rows else np.zeros(0)


def report_figure(parts: pa.Table, summary: dict) -> bytes:
    """A PNG with three panels: score histograms (positives vs negatives), positive - negative score, and the
    ranks the negatives were taken from; the filter counts go in the title."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos, neg, ranks = _flat(parts, "positive_scores"), _flat(parts, "negative_scores"), _flat(parts, "negative_ranks")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    bins = np.linspace(min(pos.min(initial=0), neg.min(initial=0)), max(pos.max(initial=1), neg.max(initial=1)), 40)
    axes[0].hist(pos, bins=bins, alpha=0.6, label=f"positives ({len(pos)})")
    axes[0].hist(neg, bins=bins, alpha=0.6, label=f"negatives ({len(neg)})")
    axes[0].set(xlabel="score (query . document)", ylabel="count", title="scores")
    axes[0].legend()
    margins = summary["positive_minus_negative"]
    if margins.get("count"):
        h = margins["histogram"]
        axes[1].stairs(h["counts"], h["edges"], fill=True)
    axes[1].set(xlabel="lowest positive score - negative score", title="margin of chosen negatives")
    if len(ranks):
        axes[2].hist(ranks, bins=np.arange(0.5, ranks.max() + 1.5))
    axes[2].set(xlabel="rank in the search results", title="ranks of chosen negatives")
    filtered = ", ".join(f"{k} {v}" for k, v in summary.get("filtered", {}).items() if v)
    fig.suptitle(f"removed candidates: {filtered or 'none'}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
