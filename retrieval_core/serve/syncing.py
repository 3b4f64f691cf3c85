"""Bringing a serving store to a published version, from the versions' own files, one batch at a time.

The store holds version H (its own record, else ``sinks/<name>.json`` under the root); the target is T. The plan:

- ``apply V`` for each version from H's successor to T when T's chain of ``previous`` versions reaches H: V's
  ``changes/deletes.parquet`` and ``changes/upserts.parquet``, streamed;
- ``undo V`` for each version from H back to T's successor when H's chain reaches T (a rollback): the doc ids of
  V's upserts are deleted, then the rows of V's previous version that V no longer holds (found segment by segment
  from the row ids both versions keep) are upserted with their earlier vectors;
- ``load T`` otherwise (an empty store, no chain between them, a step's files gone by retention, or a version on the
  way that encoded everything anew, with another encoder): every live row of T, as one replacement;
- a store that keeps its own history (LanceDB's tagged table versions) checks T out instead when it can.

Every step is idempotent: an in-place step is recorded in ``sinks/<name>.json`` (``toward``) before it starts, and
a run that finds it there does it again before going on, so a sync killed half way and run again ends equal to T.
Memory: one batch of rows (``batch_size``) and, in an undo, one segment's row ids.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from datetime import datetime, timezone
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retrieval_core.encode.embeddings import read_embeddings_manifest, read_shard_table, shard_url
from retrieval_core.io import storage, versions
from retrieval_core.io.folder import Folder
from retrieval_core.serve.sinks import Sink, vectors_of

log = logging.getLogger("retrieval_core.serve")
STATE_DIR = "sinks"
MAX_HOPS = 64  # versions a chain is followed back before a whole load is cheaper to reason about


@dataclasses.dataclass(frozen=True)
class Step:
    """One move of a store: ``load`` (the whole of ``version``), ``apply`` (``version``'s changes on its previous),
    ``undo`` (back from ``version`` to its previous) or ``restore`` (the store's own copy of ``version``);
    ``reaches``: the version the store holds after it."""

    kind: str
    version: str
    reaches: str


# ------------------------------------------------------------------------------------------------------ state


def state_url(root: str, name: str) -> str:
    return storage.join(root, STATE_DIR, f"{name}.json")


def read_state(folder: Folder, name: str) -> dict:
    url = state_url(folder.url, name)
    return storage.read_json(url, folder.storage_options) if storage.exists(url, folder.storage_options) else {}


def _state_of(folder: Folder, sink: Sink) -> dict:
    """The sink's record, if it was written for this very store: a sink renamed onto another store's record (or a
    store moved under an old name) starts from what the store itself says."""
    state = read_state(folder, sink.name)
    if state and state.get("store") != sink.where():
        log.warning(
            "sink %s: %s records another store (%s); ignored",
            sink.name,
            state_url(folder.url, sink.name),
            state.get("store"),
        )
        return {}
    return state


def _write_state(folder: Folder, sink: Sink, state: dict) -> dict:
    state = {**state, "sink": sink.name, "kind": sink.spec["kind"], "store": sink.where(), "updated": _now()}
    storage.write_json_atomic(state_url(folder.url, sink.name), state, folder.storage_options)
    return state


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------------------ plan


def previous_of(folder: Folder, name: str) -> str | None:
    record = versions.read_refresh_record(folder, name) or {}
    return record.get("previous")


def chain(folder: Folder, name: str, stop: str | None, hops: int = MAX_HOPS) -> list[str] | None:
    """``name`` and its previous versions, newest first, down to ``stop`` (included); None when ``stop`` is not
    among the first ``hops`` of them."""
    found: list[str] = []
    at: str | None = name
    while at and len(found) <= hops:
        found.append(at)
        if at == stop:
            return found
        at = previous_of(folder, at)
    return None


def plan(folder: Folder, held: str | None, target: str) -> list[Step]:
    """The steps from ``held`` (None: nothing known) to ``target``: see the module's description."""
    if held == target:
        return []
    if held is not None:
        forward = chain(folder, target, held)
        if forward and all(_in_place(folder, v) for v in forward[:-1]):
            return [Step("apply", v, v) for v in reversed(forward[:-1])]
        backward = chain(folder, held, target)
        if backward and all(_in_place(folder, v, undo=True) for v in backward[:-1]):
            return [Step("undo", v, backward[i + 1]) for i, v in enumerate(backward[:-1])]
    return [Step("load", target, target)]


def _in_place(folder: Folder, name: str, undo: bool = False) -> bool:
    """Whether version ``name`` can be applied (or undone) in place: its change files are there (and, to undo it,
    its and its previous version's embeddings), and it kept its previous version's encoder: a version that encoded
    everything anew is loaded whole instead, so a store never mixes two encoders' vectors (or dimensions)."""
    record = versions.read_refresh_record(folder, name) or {}
    if record.get("reencoded_all") or not _has_changes(folder, name):
        return False
    if not undo:
        return True
    previous = record.get("previous")
    roots = [versions.version_root(folder.url, v) for v in (name, previous) if v]
    manifests = [storage.join(r, "embeddings", "_manifest.json") for r in roots]
    return bool(previous) and all(storage.exists(m, folder.storage_options) for m in manifests)


def _has_changes(folder: Folder, name: str) -> bool:
    root = versions.version_root(folder.url, name)
    return all(storage.exists(storage.join(root, "changes", f), folder.storage_options) for f in CHANGE_FILES)


CHANGE_FILES = ("upserts.parquet", "deletes.parquet")


# ------------------------------------------------------------------------------------------------------ rows


def version_folder(folder: Folder, name: str) -> Folder:
    return Folder(versions.version_root(folder.url, name), folder.storage_options)


def parquet_batches(url: str, so: dict, columns: list[str], rows: int) -> Iterator[pa.RecordBatch]:
    """The file's rows ``rows`` at a time, read as they are consumed (never the whole file)."""
    fs, path = storage.filesystem(url, so)
    with fs.open(path, "rb") as handle:
        yield from pq.ParquetFile(handle).iter_batches(batch_size=rows, columns=columns)


def version_rows(version: Folder, rows: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """Every live row of a version (doc ids, float32 vectors), ``rows`` at a time, one segment read at a time."""
    for entry in read_embeddings_manifest(version)["shards"]:
        yield from _sliced(read_shard_table(version, entry, ["doc_id", "embedding"]), rows)


def _sliced(table: pa.Table, rows: int) -> Iterator[tuple[list[str], np.ndarray]]:
    for start in range(0, table.num_rows, rows):
        part = table.slice(start, rows)
        yield part.column("doc_id").to_pylist(), vectors_of(part)


def lost_rows(previous: Folder, version: Folder, rows: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """The rows live in ``previous`` that ``version`` (built on it) no longer holds, with their vectors in
    ``previous``: per segment of ``previous``, its live rows whose row id no segment of ``version`` keeps live.
    Row ids are kept by shared and compacted segments and never reused, and a version's segments cover disjoint row
    ranges, so only the segments of ``version`` overlapping a segment's range are read; a segment ``version``
    shares with the same tombstones is skipped unread."""
    later = _Window(version)
    for entry in read_embeddings_manifest(previous)["shards"]:
        if later.shares_unchanged(previous, entry):
            continue
        table = read_shard_table(previous, entry, ["doc_id", "embedding"])
        kept = later.live_ids(entry["row_start"], entry["row_stop"])
        yield from _sliced(table.filter(pc.invert(pc.is_in(table.column("row_id"), pa.array(kept)))), rows)


class _Window:
    """The later version's segments overlapping a row range, walked once in row order alongside the earlier
    version's (both manifests list segments by ``row_start``); holds the live row ids of the segments in reach."""

    def __init__(self, version: Folder):
        self.version = version
        self.entries = iter(read_embeddings_manifest(version)["shards"])
        self.held: list[tuple[dict, np.ndarray | None]] = []
        self.done = False

    def _reach(self, stop: int) -> None:
        while not self.done and (not self.held or self.held[-1][0]["row_start"] < stop):
            entry = next(self.entries, None)
            if entry is None:
                self.done = True
                return
            self.held.append((entry, None))

    def _overlapping(self, start: int, stop: int) -> list[int]:
        self.held = [(e, ids) for e, ids in self.held if e["row_stop"] > start]
        self._reach(stop)
        return [i for i, (e, _) in enumerate(self.held) if e["row_start"] < stop and e["row_stop"] > start]

    def shares_unchanged(self, previous: Folder, entry: dict) -> bool:
        for i in self._overlapping(entry["row_start"], entry["row_stop"]):
            other = self.held[i][0]
            if other["name"] == entry["name"]:
                return _same(previous, entry, self.version, other, "path") and _same(
                    previous, entry, self.version, other, "deleted_path"
                )
        return False

    def live_ids(self, start: int, stop: int) -> np.ndarray:
        parts = []
        for i in self._overlapping(start, stop):
            entry, ids = self.held[i]
            if ids is None:
                ids = read_shard_table(self.version, entry, []).column("row_id").to_numpy()
                self.held[i] = (entry, ids)
            parts.append(ids[(ids >= start) & (ids < stop)])
        return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _same(a: Folder, entry_a: dict, b: Folder, entry_b: dict, key: str) -> bool:
    if not entry_a.get(key) or not entry_b.get(key):
        return not entry_a.get(key) and not entry_b.get(key)
    return shard_url(a.url, entry_a, key) == shard_url(b.url, entry_b, key)


# ------------------------------------------------------------------------------------------------------ sync


@dataclasses.dataclass
class Tally:
    upserted: int = 0
    deleted: int = 0
    progress: Callable[[int], None] | None = None

    def count(self, kind: str, n: int) -> None:
        setattr(self, kind, getattr(self, kind) + n)
        if self.progress:
            self.progress(n)

    def rows(self, batches: Iterator[tuple[list[str], np.ndarray]]) -> Iterator[tuple[list[str], np.ndarray]]:
        """The (doc ids, vectors) batches as they go to the store, counted as upserted."""
        for doc_ids, vectors in batches:
            self.count("upserted", len(doc_ids))
            yield doc_ids, vectors

    def ids(self, kind: str, batches: Iterator[pa.RecordBatch]) -> Iterator[list[str]]:
        """The doc ids of each batch as they go to the store, counted under ``kind``."""
        for batch in batches:
            self.count(kind, batch.num_rows)
            yield batch.column("doc_id").to_pylist()


def sync(sink: Sink, folder: Folder, target: str, progress: Callable[[int], None] | None = None) -> dict:
    """Bring ``sink`` to version ``target`` of the root ``folder``; returns the record also written to
    ``sinks/<name>.json``. Raises whatever the store raised (the record then keeps where it stood)."""
    started, tally = time.perf_counter(), Tally(progress=progress)
    state = _state_of(folder, sink)
    held, steps = _steps(sink, folder, state, target)
    log.info("sink %s: holds %s; to %s: %s", sink.name, held or "nothing", target, [s.kind for s in steps] or "none")
    done: list[dict] = []
    with reading(folder, _read_by(steps)):
        state = _run_steps(sink, folder, state, steps, tally, done)
    sink.forget(set(versions.list_versions(folder)))
    record = {
        "holds": target,
        "toward": None,
        "last_sync": {
            "from": held,
            "to": target,
            "steps": done,
            "upserted": tally.upserted,
            "deleted": tally.deleted,
            "seconds": round(time.perf_counter() - started, 3),
            **sink.stats(),
        },
    }
    return _write_state(folder, sink, record)


def _run_steps(sink: Sink, folder: Folder, state: dict, steps: list[Step], tally: Tally, done: list[dict]) -> dict:
    for step in steps:
        step_started = time.perf_counter()
        before = (tally.upserted, tally.deleted)
        _run_step(sink, folder, state, step, tally)
        state = _write_state(folder, sink, {"holds": step.reaches, "toward": None})
        done.append(
            {
                **dataclasses.asdict(step),
                "upserted": tally.upserted - before[0],
                "deleted": tally.deleted - before[1],
                "seconds": round(time.perf_counter() - step_started, 3),
            }
        )
    return state


def _steps(sink: Sink, folder: Folder, state: dict, target: str) -> tuple[str | None, list[Step]]:
    """(the version the store holds, the steps to ``target``): a step a killed run left unfinished comes first
    (unless the store says it finished, or retention removed its files: the store's content is then unknown, and
    ``target`` is loaded whole); a store that can check ``target`` out of its own history does so."""
    exists = sink.exists()
    said = sink.holds() if exists else None
    held = (said or state.get("holds")) if exists else None
    pending = Step(**state["toward"]) if exists and state.get("toward") else None
    if pending and said == pending.reaches:
        held, pending = said, None  # it finished; only its record did not
    unknown = False
    if pending is not None and not _runnable(folder, pending):
        what = f"the unfinished {pending.kind} of {pending.version}"
        log.warning("sink %s: %s cannot be done again (its files are gone): its content is unknown", sink.name, what)
        unknown, pending = True, None
    start = None if unknown else pending.reaches if pending else held
    if (start != target or pending) and exists and sink.can_restore(target):
        return held, [Step("restore", target, target)]
    return held, ([pending] if pending else []) + plan(folder, start, target)


def _runnable(folder: Folder, step: Step) -> bool:
    if step.kind in ("apply", "undo"):
        return _in_place(folder, step.version, undo=step.kind == "undo")
    return storage.exists(versions.version_root(folder.url, step.version), folder.storage_options)


@contextlib.contextmanager
def reading(folder: Folder, names: set[str], renew_s: float = 600.0):
    """Each version a sync reads registered as read (retention spares it) and renewed, for the ``with`` block."""
    held = []
    try:
        for name in sorted(names):
            url = versions.register_reader(folder, name)
            held.append((url, versions.keep_reader_renewed(url, folder.storage_options, name, renew_s)))
        yield
    finally:
        for url, renewing in held:
            versions.release_reader(url, folder.storage_options, renewing)


def _read_by(steps: list[Step]) -> set[str]:
    """The versions whose files the steps read: the one applied or loaded, and an undone one's previous too."""
    return {s.version for s in steps if s.kind != "restore"} | {s.reaches for s in steps if s.kind == "undo"}


def _run_step(sink: Sink, folder: Folder, state: dict, step: Step, tally: Tally) -> None:
    so, rows = folder.storage_options, sink.spec["batch_size"]
    _write_state(folder, sink, {**state, "toward": dataclasses.asdict(step)})  # a kill from here on: done again
    if step.kind == "restore":
        if not sink.restore(step.version):
            raise RuntimeError(f"sink {sink.name}: could not check out {step.version} from the store's history")
        return
    if step.kind == "load":
        sink.replace(step.version, tally.rows(version_rows(version_folder(folder, step.version), rows)))
        return
    changes = storage.join(versions.version_root(folder.url, step.version), "changes")
    upserts, deletes = storage.join(changes, "upserts.parquet"), storage.join(changes, "deletes.parquet")
    if step.kind == "apply":
        sink.delete_all(tally.ids("deleted", parquet_batches(deletes, so, ["doc_id"], rows)))
        sink.upsert_all(tally.rows(_pairs(parquet_batches(upserts, so, ["doc_id", "embedding"], rows))))
    else:  # undo: what the version added or changed goes, then what it removed or changed comes back
        sink.delete_all(tally.ids("deleted", parquet_batches(upserts, so, ["doc_id"], rows)))
        sink.upsert_all(
            tally.rows(lost_rows(version_folder(folder, step.reaches), version_folder(folder, step.version), rows))
        )
    sink.mark(step.reaches)


def _pairs(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[list[str], np.ndarray]]:
    for batch in batches:
        yield batch.column("doc_id").to_pylist(), vectors_of(batch)
