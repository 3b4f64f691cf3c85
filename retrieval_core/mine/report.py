"""The mining report (``negatives/report.json`` and ``report.png``) from mergeable per-part statistics.

The worker that mines a part computes its statistics (:func:`part_stats`, kept in the part's commit record); the
driver folds them together one part at a time (:func:`merge_stats`) and writes the report: it never holds the parts.

Series: the bi-encoder's scores of positives and chosen negatives, the lowest positive score minus each negative's,
the ranks the negatives were taken from and, with a cross-encoder (``mine.cross_encoder``), its scores of positives
and chosen negatives. With a cross-encoder the report also gives the agreement of the two models over every
candidate rescored: Pearson's r, a 2-D histogram (bi-encoder score x cross-encoder score), and the share of the
chosen negatives that the bi-encoder's scores alone would have chosen.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SCORE_BIN = 0.01  # width of the score histograms' bins (report.json, report.png)
AGREEMENT_BIN = 0.02  # width of the agreement grid's cells, on both axes
SERIES = ("positive_scores", "negative_scores", "positive_minus_negative", "negative_ranks")
CE_SERIES = ("positive_ce_scores", "negative_ce_scores")
MOMENTS = ("n", "sx", "sy", "sxx", "syy", "sxy", "chosen", "shared")


def part_stats(part: pa.Table, agreement: dict | None = None) -> dict:
    """Mergeable statistics of one part: per series the count, sum, sum of squares, min, max and sparse histogram
    bins (``SCORE_BIN`` wide for scores, one per rank); ``agreement`` (:func:`agreement_stats`) when rescored."""
    floors = [min(p) for p in part.column("positive_scores").to_pylist()]
    margins = [f - n for f, negs in zip(floors, part.column("negative_scores").to_pylist()) for n in negs]
    values = {
        "positive_scores": _flat(part, "positive_scores"),
        "negative_scores": _flat(part, "negative_scores"),
        "positive_minus_negative": np.asarray(margins, dtype=np.float64),
        "negative_ranks": _flat(part, "negative_ranks"),
        **{name: _flat(part, name) for name in CE_SERIES},
    }
    stats = {name: _series_stats(v, 1.0 if name == "negative_ranks" else SCORE_BIN) for name, v in values.items()}
    return {**stats, "agreement": agreement} if agreement else stats


def agreement_stats(bi: np.ndarray, ce: np.ndarray, chosen: int, shared: int) -> dict:
    """Mergeable agreement of the two models over the candidates rescored (``bi`` and ``ce``: their scores of the
    same candidates): moments for Pearson's r and a sparse grid of ``AGREEMENT_BIN`` cells; ``chosen`` negatives
    of which ``shared`` are also what the bi-encoder's scores alone would have chosen."""
    bi, ce = np.asarray(bi, dtype=np.float64), np.asarray(ce, dtype=np.float64)
    cells = np.floor(np.stack([bi, ce], axis=1) / AGREEMENT_BIN + 1e-9).astype(np.int64)
    keys, counts = np.unique(cells, axis=0, return_counts=True) if len(bi) else (np.zeros((0, 2), int), [])
    return {
        "n": len(bi),
        "sx": float(bi.sum()),
        "sy": float(ce.sum()),
        "sxx": float((bi**2).sum()),
        "syy": float((ce**2).sum()),
        "sxy": float((bi * ce).sum()),
        "chosen": int(chosen),
        "shared": int(shared),
        "grid": {f"{a},{b}": int(c) for (a, b), c in zip(keys.tolist(), np.asarray(counts).tolist())},
    }


def _series_stats(values: np.ndarray, width: float) -> dict:
    if len(values) == 0:
        return {"count": 0, "width": width}
    keys, counts = np.unique(np.floor(values / width + 1e-9).astype(np.int64), return_counts=True)
    return {
        "count": int(len(values)),
        "sum": float(values.sum()),
        "sumsq": float((values**2).sum()),
        "min": float(values.min()),
        "max": float(values.max()),
        "width": width,
        "bins": {str(k): int(c) for k, c in zip(keys, counts)},
    }


def merge_stats(total: dict | None, part: dict) -> dict:
    """``total`` with one more part's :func:`part_stats` folded in (exact: counts, sums, extremes and bins add).
    A part recorded before the cross-encoder series existed counts as empty there."""
    total = total or {name: {"count": 0, "width": SCORE_BIN} for name in SERIES + CE_SERIES}
    for name in SERIES + CE_SERIES:
        a, b = total[name], part.get(name, {"count": 0})
        if not b["count"]:
            continue
        if not a["count"]:
            total[name] = {**b, "bins": dict(b["bins"])}
            continue
        a.update(
            count=a["count"] + b["count"],
            sum=a["sum"] + b["sum"],
            sumsq=a["sumsq"] + b["sumsq"],
            min=min(a["min"], b["min"]),
            max=max(a["max"], b["max"]),
        )
        _add_counts(a["bins"], b["bins"])
    if part.get("agreement"):
        mine, theirs = total.setdefault("agreement", {**dict.fromkeys(MOMENTS, 0), "grid": {}}), part["agreement"]
        for key in MOMENTS:
            mine[key] += theirs[key]
        _add_counts(mine["grid"], theirs["grid"])
    return total


def _add_counts(into: dict, more: dict) -> None:
    for key, count in more.items():
        into[key] = into.get(key, 0) + count


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
    q = {
        name: _quantile(span, dense, width, n, share, stats)
        for name, share in (("p25", 0.25), ("median", 0.5), ("p75", 0.75))
    }
    return {
        "count": n,
        "mean": mean,
        "std": float(np.sqrt(max(0.0, stats["sumsq"] / n - mean**2))),
        "min": stats["min"],
        **q,
        "max": stats["max"],
        "bin_width": width,
        "histogram": {"edges": [round(k * width, 6) for k in span + [span[-1] + 1]], "counts": dense},
    }


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


def agreement(merged: dict) -> dict:
    """Pearson's r of the two models' scores over the candidates rescored, the share of chosen negatives the
    bi-encoder alone would have chosen, and the dense grid (``bi_edges`` x ``ce_edges`` cells, ``counts`` by
    bi-encoder bin, then cross-encoder bin)."""
    n = merged["n"]
    if not n:
        return {"candidates": 0}
    cov = merged["sxy"] / n - merged["sx"] * merged["sy"] / n**2
    var = (merged["sxx"] / n - (merged["sx"] / n) ** 2) * (merged["syy"] / n - (merged["sy"] / n) ** 2)
    cells = {tuple(int(v) for v in key.split(",")): count for key, count in merged["grid"].items()}
    xs, ys = (
        range(min(a for a, _ in cells), max(a for a, _ in cells) + 1),
        range(min(b for _, b in cells), max(b for _, b in cells) + 1),
    )
    return {
        "candidates": n,
        "pearson": float(cov / np.sqrt(var)) if var > 0 else None,
        "negatives_chosen": merged["chosen"],
        "shared_with_bi_encoder": merged["shared"] / merged["chosen"] if merged["chosen"] else None,
        "grid": {
            "bi_edges": [round(x * AGREEMENT_BIN, 6) for x in [*xs, xs[-1] + 1]],
            "ce_edges": [round(y * AGREEMENT_BIN, 6) for y in [*ys, ys[-1] + 1]],
            "counts": [[cells.get((x, y), 0) for y in ys] for x in xs],
        },
    }


def report(stats: dict | None, manifest_counts: dict) -> dict:
    """Score distributions of positives and chosen negatives, positive - negative differences, the rank
    distribution of chosen negatives, and with a cross-encoder its score distributions and the models' agreement
    (from the parts' merged :func:`part_stats`); the candidates removed by each filter."""
    stats = stats or {name: {"count": 0} for name in SERIES}
    out = {name: distribution(stats[name]) for name in SERIES}
    if stats.get("agreement"):
        out |= {name: distribution(stats[name]) for name in CE_SERIES}
        out["agreement"] = agreement(stats["agreement"])
    return {**out, **manifest_counts}


def _flat(parts: pa.Table, column: str) -> np.ndarray:
    if not parts.num_rows or column not in parts.column_names:
        return np.zeros(0)
    values = parts.column(column).combine_chunks().flatten()
    return np.asarray(values.drop_null().to_numpy(zero_copy_only=False), dtype=np.float64)


def report_figure(summary: dict) -> bytes:
    """A PNG: score histograms (positives vs negatives), positive - negative score, the ranks the negatives were
    taken from; with a cross-encoder a second row with its score histograms and the agreement grid. The filter
    counts go in the title."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rescored = "agreement" in summary
    fig, axes = plt.subplots(2 if rescored else 1, 3, figsize=(15, 8 if rescored else 4), squeeze=False)
    _score_panel(axes[0][0], summary, "", "score (query . document)", "bi-encoder scores")
    _stairs(axes[0][1], summary["positive_minus_negative"], None)
    axes[0][1].set(xlabel="lowest positive score - negative score", title="margin of chosen negatives")
    _stairs(axes[0][2], summary["negative_ranks"], None)
    axes[0][2].set(xlabel="rank in the search results", title="ranks of chosen negatives")
    if rescored:
        _score_panel(axes[1][0], summary, "_ce", "cross-encoder score", "cross-encoder scores")
        _agreement_panel(axes[1][1], summary["agreement"])
        axes[1][2].axis("off")
    filtered = ", ".join(f"{k} {v}" for k, v in summary.get("filtered", {}).items() if v)
    fig.suptitle(f"removed candidates: {filtered or 'none'}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _score_panel(axis, summary: dict, suffix: str, xlabel: str, title: str) -> None:
    names = [(f"positive{suffix}_scores", "positives"), (f"negative{suffix}_scores", "negatives")]
    for name, label in names:
        _stairs(axis, summary[name], f"{label} ({summary[name]['count']})")
    axis.set(xlabel=xlabel, ylabel="count", title=title)
    if any(summary[name]["count"] for name, _ in names):
        axis.legend()


def _agreement_panel(axis, agreement_summary: dict) -> None:
    if not agreement_summary.get("candidates"):
        axis.set(title="agreement: no candidate rescored")
        return
    grid = agreement_summary["grid"]
    axis.pcolormesh(grid["bi_edges"], grid["ce_edges"], np.asarray(grid["counts"]).T, cmap="viridis")
    pearson, shared = agreement_summary["pearson"], agreement_summary["shared_with_bi_encoder"]
    title = "candidates rescored" + (f": r = {pearson:.2f}" if pearson is not None else "")
    title += f"\n{shared:.0%} of the negatives are the bi-encoder's choice" if shared is not None else ""
    axis.set(xlabel="bi-encoder score", ylabel="cross-encoder score", title=title)


def _stairs(axis, series: dict, label: str | None) -> None:
    if series.get("count"):
        h = series["histogram"]
        axis.stairs(h["counts"], h["edges"], fill=True, alpha=0.6, label=label)
