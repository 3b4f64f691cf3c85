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

The worker that mines a part also writes that part's share of each export (``negatives/_exports/part-N.<file>``)
and its mergeable statistics (in the part's commit record); the driver concatenates the shares in part order,
streaming, and merges the statistics into the report: neither step holds more than one part.
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


def triplet_schema(with_scores: bool) -> pa.Schema:
    fields = [("anchor", pa.string()), ("positive", pa.string()), ("negative", pa.string())]
    return pa.schema(fields + ([("scores", pa.list_(pa.float64()))] if with_scores else []))


def ntuple_schema(num_negatives: int, with_scores: bool) -> pa.Schema:
    fields = [("anchor", pa.string()), ("positive", pa.string())]
    fields += [(f"negative_{i}", pa.string()) for i in range(1, num_negatives + 1)]
    return pa.schema(fields + ([("scores", pa.list_(pa.float64()))] if with_scores else []))


def part_export_name(number: int, fmt: str) -> str:
    return f"part-{number:05d}.{EXPORT_FILES[fmt]}"


def write_part_exports(out_dir: str, number: int, part: pa.Table, texts: dict[str, str], formats: list[str],
                       num_negatives: int, with_scores: bool, storage_options: dict | None = None) -> dict:
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
            table = (triplet_table(part, texts, with_scores) if fmt == "triplet"
                     else ntuple_table(part, texts, num_negatives, with_scores))
            schema = triplet_schema(with_scores) if fmt == "triplet" else ntuple_schema(num_negatives, with_scores)
            storage.write_parquet_atomic(url, table.cast(schema), storage_options)
            rows[fmt] = table.num_rows
    return {"formats": list(formats), "scores": with_scores, "rows": rows}


def has_part_exports(record: dict, formats: list[str], with_scores: bool) -> bool:
    """Whether a part's commit record says it wrote every one of ``formats`` with these score settings."""
    written = record.get("exports") or {}
    return written.get("scores") == with_scores and set(formats) <= set(written.get("formats", []))


def combine_exports(out_dir: str, part_dir: str, numbers: list[int], formats: list[str], num_negatives: int,
                    with_scores: bool, storage_options: dict | None = None) -> dict[str, dict]:
    """Concatenate the parts' exports (``part_dir``) into ``out_dir`` in part order, streaming: one part in memory
    at a time. Returns {format: {"path", "rows"}}."""
    written = {}
    for fmt in formats:
        url = storage.join(out_dir, EXPORT_FILES[fmt])
        pieces = [storage.join(part_dir, part_export_name(n, fmt)) for n in numbers]
        if fmt == "flag-jsonl":
            rows = _concat_bytes(url, pieces, storage_options)
        else:
            schema = triplet_schema(with_scores) if fmt == "triplet" else ntuple_schema(num_negatives, with_scores)
            rows = storage.concat_parquet_atomic(url, pieces, schema, storage_options)
        written[fmt] = {"path": f"exports/{EXPORT_FILES[fmt]}", "rows": rows}
    return written


def _concat_bytes(url: str, pieces: list[str], storage_options: dict | None) -> int:
    rows = 0
    with storage.open_atomic(url, storage_options) as out:
        for piece in pieces:
            data = storage.read_bytes(piece, storage_options)
            rows += data.count(b"\n")
            out.write(data)
    return rows


# ------------------------------------------------------------------------------------------------------ report

SCORE_BIN = 0.01  # width of the score histograms' bins (report.json, report.png)
SERIES = ("positive_scores", "negative_scores", "positive_minus_negative", "negative_ranks")


def part_stats(part: pa.Table) -> dict:
    """Mergeable statistics of one part: per series (positive and negative scores, lowest positive score minus each
    negative's, negative ranks) the count, sum, sum of squares, min, max and sparse histogram bins (``SCORE_BIN``
    wide for scores, one per rank)."""
    floors = [min(p) for p in part.column("positive_scores").to_pylist()]
    margins = [f - n for f, negs in zip(floors, part.column("negative_scores").to_pylist()) for n in negs]
    values = {"positive_scores": _flat(part, "positive_scores"), "negative_scores": _flat(part, "negative_scores"),
              "positive_minus_negative": np.asarray(margins, dtype=np.float64),
              "negative_ranks": _flat(part, "negative_ranks")}
    return {name: _series_stats(v, 1.0 if name == "negative_ranks" else SCORE_BIN) for name, v in values.items()}


def _series_stats(values: np.ndarray, width: float) -> dict:
    if len(values) == 0:
        return {"count": 0, "width": width}
    keys, counts = np.unique(np.floor(values / width + 1e-9).astype(np.int64), return_counts=True)
    return {"count": int(len(values)), "sum": float(values.sum()), "sumsq": float((values ** 2).sum()),
            "min": float(values.min()), "max": float(values.max()), "width": width,
            "bins": {str(k): int(c) for k, c in zip(keys, counts)}}


def merge_stats(total: dict | None, part: dict) -> dict:
    """``total`` with one more part's :func:`part_stats` folded in (exact: counts, sums, extremes and bins add)."""
    if total is None:
        return {name: {**part[name], "bins": dict(part[name].get("bins", {}))} for name in SERIES}
    for name in SERIES:
        a, b = total[name], part[name]
        if not b["count"]:
            continue
        if not a["count"]:
            total[name] = {**b, "bins": dict(b["bins"])}
            continue
        a.update(count=a["count"] + b["count"], sum=a["sum"] + b["sum"], sumsq=a["sumsq"] + b["sumsq"],
                 min=min(a["min"], b["min"]), max=max(a["max"], b["max"]))
        for key, count in b["bins"].items():
            a["bins"][key] = a["bins"].get(key, 0) + count
    return total


def distribution(stats: dict) -> dict:
    """count, mean, std, min and max (exact), quartiles (to within one bin: linear within the bin that holds them)
    and the histogram (``edges``, ``counts``) of merged series statistics."""
    if not stats.get("count"):
        return {"count": 0}
    n, width = stats["count"], stats["width"]
    mean = stats["sum"] / n
    keys = sorted(int(k) for k in stats["bins"])
    span = list(range(keys[0], keys[-1] + 1))
    dense = [stats["bins"].get(str(k), 0) for k in span]
    q = {name: _quantile(span, dense, width, n, share, stats) for name, share in
         (("p25", 0.25), ("median", 0.5), ("p75", 0.75))}
    return {"count": n, "mean": mean, "std": float(np.sqrt(max(0.0, stats["sumsq"] / n - mean ** 2))),
            "min": stats["min"], **q, "max": stats["max"], "bin_width": width,
            "histogram": {"edges": [round(k * width, 6) for k in span + [span[-1] + 1]], "counts": dense}}


def _quantile(span: list[int], dense: list[int], width: float, n: int, share: float, stats: dict) -> float:
    target, seen = share * (n - 1), 0
    for key, count in zip(span, dense):
        if seen + count > target:
            if width == 1.0:  # integer series (ranks): one value per bin, exact
                return float(key)
            value = (key + (target - seen + 0.5) / count) * width
            return float(min(max(value, stats["min"]), stats["max"]))
        seen += count
    return stats["max"]


def report(stats: dict | None, manifest_counts: dict) -> dict:
    """Score distributions of positives and chosen negatives, positive - negative differences, the rank
    distribution of chosen negatives (from the parts' merged :func:`part_stats`), and the candidates removed by
    each filter."""
    stats = stats or {name: {"count": 0} for name in SERIES}
    return {**{name: distribution(stats[name]) for name in SERIES}, **manifest_counts}


def _flat(parts: pa.Table, column: str) -> np.ndarray:
    return np.asarray(parts.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False),
                      dtype=np.float64) if parts.num_rows else np.zeros(0)


def report_figure(summary: dict) -> bytes:
    """A PNG with three panels: score histograms (positives vs negatives), positive - negative score, and the
    ranks the negatives were taken from; the filter counts go in the title."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, label in (("positive_scores", "positives"), ("negative_scores", "negatives")):
        _stairs(axes[0], summary[name], f"{label} ({summary[name]['count']})")
    axes[0].set(xlabel="score (query . document)", ylabel="count", title="scores")
    if summary["positive_scores"]["count"] or summary["negative_scores"]["count"]:
        axes[0].legend()
    _stairs(axes[1], summary["positive_minus_negative"], None)
    axes[1].set(xlabel="lowest positive score - negative score", title="margin of chosen negatives")
    _stairs(axes[2], summary["negative_ranks"], None)
    axes[2].set(xlabel="rank in the search results", title="ranks of chosen negatives")
    filtered = ", ".join(f"{k} {v}" for k, v in summary.get("filtered", {}).items() if v)
    fig.suptitle(f"removed candidates: {filtered or 'none'}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _stairs(axis, series: dict, label: str | None) -> None:
    if series.get("count"):
        h = series["histogram"]
        axis.stairs(h["counts"], h["edges"], fill=True, alpha=0.6, label=label)
