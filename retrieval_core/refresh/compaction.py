"""Compaction of a refresh version's shared segments: which runs of them a night rewrites, and the rewrite.

With churn spread over the corpus, every shared segment loses a few rows every night. A night rewrites runs of
consecutive shared segments (in row-id order) whose share of dead rows passes ``refresh.compact_dead_fraction``, or
small ones next to each other, into one segment of the new version: their live rows are copied with their row ids
and vectors (no encoding), and that segment's shard index is built. The row ranges of a run join into one, so the
row bounds of a version's segments stay disjoint. ``refresh.compact_budget`` caps the rows a night copies.
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.compute as pc

from retrieval_core.encode.embeddings import layout_at, shard_url
from retrieval_core.io import storage
from retrieval_core.refresh.refreshing import RefreshPlan, dead_rows


@dataclasses.dataclass(frozen=True)
class Compaction:
    """Shared segments, consecutive in row order, whose live rows a night copies into one segment of its own
    (``name``): their row ranges join into one, so the row bounds of the version's segments stay disjoint."""

    name: str
    segments: tuple  # the previous version's manifest entries, in row order


def compaction_plan(p: RefreshPlan, lost: dict[str, int], dead_fraction: float, budget: float) -> list[Compaction]:
    """What a night compacts (``refresh.compact_dead_fraction``, ``refresh.compact_budget``): runs of consecutive
    shared segments holding at most ``runtime.rows_per_shard`` live rows together, each with a segment whose share of
    dead rows after tonight passes ``dead_fraction`` or joining small segments (under half a shard of live rows), the
    deadest runs first, as long as the live rows copied stay within ``budget`` x the snapshot's rows."""
    if not p.reuse or budget <= 0:
        return []
    chosen, copied = [], 0
    for _, run, live in sorted(_compaction_runs(p, lost, dead_fraction), key=lambda r: (r[0], r[1][0]["row_start"])):
        if copied + live > budget * p.snapshot_rows:
            continue  # a smaller run further down may still fit
        chosen.append(run)
        copied += live
    chosen.sort(key=lambda run: run[0]["row_start"])
    return [Compaction(f"{p.tag}-compact-{i:05d}", tuple(run)) for i, run in enumerate(chosen)]


def _compaction_runs(p: RefreshPlan, lost: dict[str, int], dead_fraction: float) -> list[tuple[float, list, int]]:
    """(minus the run's dead share, its segments, its live rows) of every run worth rewriting."""
    runs: list[tuple[float, list, int]] = []
    current: list[dict] = []
    live_in = dead_in = written_in = 0

    def close() -> None:
        dead_past = any(_dead_share(s, lost) > dead_fraction for s in current)
        if current and (dead_past or len(current) > 1):
            runs.append((-dead_in / written_in, list(current), live_in))

    for segment in sorted(p.segments, key=lambda s: s["row_start"]):
        written = segment["rows"] + segment.get("deleted", 0)
        live = written - segment.get("deleted", 0) - lost.get(segment["name"], 0)
        if live <= 0:
            continue  # gone whole tonight: left out of the version, it parts no run
        wanted = _dead_share(segment, lost) > dead_fraction or live < p.rows_per_shard / 2
        if not wanted or live_in + live > p.rows_per_shard:
            close()
            current, live_in, dead_in, written_in = [], 0, 0, 0
        if wanted:
            current.append(segment)
            live_in, dead_in, written_in = live_in + live, dead_in + written - live, written_in + written
    close()
    return runs


def _dead_share(segment: dict, lost: dict[str, int]) -> float:
    written = segment["rows"] + segment.get("deleted", 0)
    return (segment.get("deleted", 0) + lost.get(segment["name"], 0)) / written if written else 0.0


def compact(compaction: Compaction, p: RefreshPlan, tombstones: dict[str, list[int]], so: dict) -> dict:
    """Copy the live rows of the compaction's segments (their earlier tombstones and tonight's left out) into one
    file of this version, with their row ids and vectors as they were: no encoding. Returns its manifest entry.
    Memory: the segments' rows (at most ``runtime.rows_per_shard`` live ones)."""
    tables = []
    for segment in compaction.segments:
        gone = dead_rows(segment, p, tombstones, so)
        table = storage.read_parquet(shard_url(p.previous_version_root, segment), so)
        tables.append(table.filter(pc.invert(pc.is_in(table.column("row_id"), pa.array(gone, pa.int64())))))
    live = pa.concat_tables(tables)
    storage.write_parquet_atomic(layout_at(p.version_root, so).data_file(compaction.name), live, so)
    first, last = compaction.segments[0], compaction.segments[-1]
    return {
        "name": compaction.name,
        "path": f"{compaction.name}.parquet",
        "row_start": first["row_start"],
        "row_stop": last["row_stop"],
        "rows": live.num_rows,
        "rejected": 0,
        "compacted_from": p.source,
    }
