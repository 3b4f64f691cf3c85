"""The refresh stage without Ray: plan a new version from tonight's snapshot and the published one, the steps that
build it (diff, encode the changed and added documents, tombstones, the version's embeddings manifest, the index
reuse), the changes files, the gates and ``refresh.json``.

A version shares every segment (embedding shard) of the previous version that still holds live rows: its
manifest entry points at the earlier file (``path: ../../<version>/embeddings/...``) and names a tombstone file
with the rows of that segment that are no longer live (changed or deleted documents). Only the changed and added
documents are encoded, into new segments with fresh row ids (above every id used before). So a night costs reading
and hashing the snapshot, encoding the change, and writing the change plus the tombstones; no vector is copied.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import diffing, storage, versions
from .config import Config
from .embeddings import Layout, embeddings_table, read_embeddings_manifest, read_shard_table, shard_url
from .encoding import Encoder, encode_by_length
from .manifest import stamp
from .schemas import SCHEMA_VERSION
from .sharding import FileMeta, Shard, plan_shards

BUILD_RECORD = "_refresh/build.json"


class GateError(RuntimeError):
    """A new version failed a publish gate; CURRENT was left where it was."""


@dataclasses.dataclass(frozen=True)
class RefreshPlan:
    """One refresh: where it builds, what it compares against, how the snapshot is cut."""
    version: str
    root: str                      # the output root holding CURRENT and versions/
    version_root: str
    previous: str | None           # the published version compared against (None: the first version)
    previous_root: str | None
    reuse: bool                    # the previous version's vectors may be reused (same encoder fingerprint)
    buckets: int
    rows_per_shard: int
    snapshot_rows: int
    next_row_id: int               # the first row id of this version's new segments
    shards: tuple                  # the snapshot's shards (map tasks)
    segments: tuple                # the previous version's live segments (manifest entries)
    identity: dict

    @property
    def diff(self) -> diffing.DiffLayout:
        return diffing.DiffLayout(storage.join(self.version_root, "_diff"))

    @property
    def tag(self) -> str:
        return self.version.split("-")[0]


def snapshot_identity(cfg: Config, files: list[FileMeta], encoder_identity: dict) -> dict:
    """What fixes a build: the snapshot's files and row counts, the columns, the encoder, the refresh settings."""
    return {"schema_version": SCHEMA_VERSION, "fingerprint": encoder_identity["fingerprint"],
            "corpus": {"files": [{"url": f.url, "rows": f.num_rows, "blocks": len(f.block_rows)} for f in files],
                       "id_column": cfg.corpus.id_column, "text_column": cfg.corpus.text_column,
                       "title_column": cfg.corpus.title_column},
            "embedding_dtype": cfg.output.embedding_dtype, "index": {"type": cfg.index.type,
                                                                      "metric": cfg.index.metric}}


def plan(cfg: Config, files: list[FileMeta], encoder_identity: dict, rows_per_shard: int) -> RefreshPlan:
    """The build of this run: the unfinished one of an earlier run on the same snapshot (resumed), else a new
    version compared against the one CURRENT names."""
    so = cfg.output.storage_options
    current = versions.read_current(cfg.output.root, so)
    previous = current["version"] if current else None
    previous_root = versions.version_root(cfg.output.root, previous) if previous else None
    identity = {**snapshot_identity(cfg, files, encoder_identity), "previous": previous,
                "rows_per_shard": rows_per_shard, "diff_buckets": cfg.refresh.diff_buckets}
    version = _resume_or_start(cfg, identity)
    prev_manifest = read_embeddings_manifest(previous_root, so) if previous_root else None
    reuse = bool(prev_manifest) and prev_manifest["fingerprint"] == encoder_identity["fingerprint"]
    rows = sum(f.num_rows for f in files)
    return RefreshPlan(
        version=version, root=cfg.output.root, version_root=versions.version_root(cfg.output.root, version),
        previous=previous, previous_root=previous_root, reuse=reuse,
        buckets=diffing.bucket_count(rows, cfg.refresh.diff_buckets), rows_per_shard=rows_per_shard,
        snapshot_rows=rows, next_row_id=_next_row_id(prev_manifest), shards=tuple(plan_shards(files, rows_per_shard)),
        segments=tuple(s for s in prev_manifest["shards"] if s["rows"] > 0) if reuse else (), identity=identity)


def _resume_or_start(cfg: Config, identity: dict) -> str:
    """The version an unfinished build of the same identity was making, or a new name (an unfinished build of
    another snapshot is abandoned: its directory, never published, is removed)."""
    so = cfg.output.storage_options
    url = storage.join(cfg.output.root, BUILD_RECORD)
    if storage.exists(url, so):
        build = storage.read_json(url, so)
        if build["identity"] == identity:
            return build["version"]
        storage.remove(versions.version_root(cfg.output.root, build["version"]), so)
    version = versions.new_version_name(cfg.output.root, so)
    storage.write_json_atomic(url, {**stamp(), "version": version, "identity": identity}, so)
    return version


def finish_build(cfg: Config) -> None:
    """The build is over (published, refused by a gate, or nothing to publish): forget it."""
    storage.remove(storage.join(cfg.output.root, BUILD_RECORD), cfg.output.storage_options)


def _next_row_id(manifest: dict | None) -> int:
    """One past every row id the previous version's segments ever held (ids are never reused)."""
    if not manifest:
        return 0
    return max([manifest.get("next_row_id", 0)] + [s["row_stop"] for s in manifest["shards"]])


def version_config(cfg: Config, version_root: str) -> Config:
    """The config the stages run with inside a version: the same settings, ``output.root`` = the version."""
    return dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, root=version_root, version="",
                                                               overwrite=False))


# ------------------------------------------------------------------------------------------------------ diff

def rejects_url(p: RefreshPlan, shard: Shard) -> str:
    return storage.join(p.version_root, "rejects", "encode", f"{shard.name}.parquet")


def pending_map_shards(p: RefreshPlan, so: dict) -> list[Shard]:
    layout = dataclasses.replace(p.diff, storage_options=so)
    return [s for s in p.shards if not storage.exists(layout.map_record("new", s.name), so)]


def pending_map_segments(p: RefreshPlan, so: dict) -> list[dict]:
    layout = dataclasses.replace(p.diff, storage_options=so)
    return [s for s in p.segments if not storage.exists(layout.map_record("old", s["name"]), so)]


def map_segment(p: RefreshPlan, segment: dict, so: dict) -> dict:
    """Map one live segment of the previous version (its tombstones applied) into the diff's buckets."""
    table = read_shard_table(p.previous_root, segment, ["doc_id", "text_hash"], so)
    return diffing.map_previous_segment(segment["name"], table, p.buckets,
                                        dataclasses.replace(p.diff, storage_options=so))


def pending_buckets(p: RefreshPlan, so: dict) -> list[int]:
    layout = dataclasses.replace(p.diff, storage_options=so)
    return [b for b in range(p.buckets) if not storage.exists(layout.bucket_record(b), so)]


def reduce_bucket(p: RefreshPlan, bucket: int, so: dict) -> dict:
    return diffing.reduce_bucket(bucket, [s.name for s in p.shards], [s["name"] for s in p.segments],
                                 dataclasses.replace(p.diff, storage_options=so))


def diff_counts(p: RefreshPlan, so: dict) -> dict:
    """Counts over the snapshot and the previous version, from the buckets' and maps' commit records."""
    layout = dataclasses.replace(p.diff, storage_options=so)
    buckets = diffing.read_bucket_records(layout, p.buckets)
    maps = [storage.read_json(layout.map_record("new", s.name), so) for s in p.shards]
    counts = {key: sum(b[key] for b in buckets) for key in ("documents", *diffing.STATUSES, "encode_rows")}
    counts["rejected"] = sum(m["rejected"] for m in maps)
    counts["snapshot_rows"] = p.snapshot_rows
    return {"counts": counts, "encode_rows": [b["encode_rows"] for b in buckets],
            "tombstones": _tombstones_by_segment(buckets)}


def _tombstones_by_segment(buckets: list[dict]) -> dict[str, list[int]]:
    """Segment -> the buckets that removed rows from it."""
    out: dict[str, list[int]] = {}
    for record in buckets:
        for segment in record["tombstones"]:
            out.setdefault(segment, []).append(record["bucket"])
    return out


# ------------------------------------------------------------------------------------------------------ segments

@dataclasses.dataclass(frozen=True)
class NewSegment:
    name: str
    row_start: int
    slices: tuple

    @property
    def rows(self) -> int:
        return sum(s.stop - s.start for s in self.slices)


def plan_segments(p: RefreshPlan, encode_rows: list[int]) -> list[NewSegment]:
    """The new segments (changed and added documents), with consecutive fresh row ids."""
    out, start = [], p.next_row_id
    for i, slices in enumerate(diffing.plan_new_segments(encode_rows, p.rows_per_shard)):
        segment = NewSegment(f"{p.tag}-shard-{i:05d}", start, tuple(slices))
        out.append(segment)
        start += segment.rows
    return out


def pending_segments(p: RefreshPlan, segments: list[NewSegment], so: dict) -> list[NewSegment]:
    layout = Layout(p.version_root, so)
    return [s for s in segments if not storage.exists(layout.record_file(s.name), so)]


def encode_segment(p: RefreshPlan, segment: NewSegment, cfg: Config, encoder: Encoder, encoder_identity: dict,
                   worker: dict | None = None) -> dict:
    """Encode one new segment and commit it (the data, then its record); returns the record.
    Memory: the segment's texts and vectors (``runtime.rows_per_shard`` rows at most)."""
    started = time.perf_counter()
    so = cfg.output.storage_options
    rows = diffing.read_encode_slices(dataclasses.replace(p.diff, storage_options=so), list(segment.slices))
    texts = rows.column("text").to_pylist()
    vectors = encode_by_length(encoder, texts, cfg.model.batch_size)
    metadata = {"schema_version": SCHEMA_VERSION, "fingerprint": encoder_identity["fingerprint"],
                "dim": encoder.dim, "normalized": encoder.normalized}
    ids = list(range(segment.row_start, segment.row_start + len(texts)))
    table = embeddings_table(ids, rows.column("doc_id").to_pylist(), vectors, rows.column("text_hash").to_pylist(),
                             cfg.output.embedding_dtype, metadata)
    layout = Layout(p.version_root, so)
    storage.write_parquet_atomic(layout.shard_file(segment.name), table, so)
    record = {"name": segment.name, "path": f"{segment.name}.parquet", "row_start": segment.row_start,
              "row_stop": segment.row_start + len(texts), "rows": len(texts), "rejected": 0,
              "fingerprint": encoder_identity["fingerprint"], "dim": encoder.dim,
              "seconds": round(time.perf_counter() - started, 3), **(worker or {})}
    storage.write_json_atomic(layout.record_file(segment.name), record, so)
    return record


def tombstone_path(segment: str) -> str:
    return f"_deleted/{segment}.parquet"


def write_segment_tombstones(p: RefreshPlan, segment: dict, buckets: list[int], so: dict) -> int:
    """The rows of a shared segment that are not live in this version (earlier tombstones plus this diff's), in
    ``embeddings/_deleted/<segment>.parquet`` of this version; returns how many."""
    new = diffing.read_tombstones(dataclasses.replace(p.diff, storage_options=so), segment["name"], buckets)
    if segment.get("deleted_path"):
        old = storage.read_parquet(shard_url(p.previous_root, segment, "deleted_path"), so).column("row_id")
        new = np.union1d(new, old.to_numpy())
    table = pa.table({"row_id": pa.array(np.sort(new), pa.int64())})
    storage.write_parquet_atomic(storage.join(p.version_root, "embeddings", tombstone_path(segment["name"])), table,
                                 so)
    return len(new)


def shared_entries(p: RefreshPlan, tombstones: dict[str, list[int]], so: dict) -> list[dict]:
    """The previous version's segments as entries of this version's manifest: pointing at the earlier files,
    with this version's tombstone file where the diff removed rows, and the live row count."""
    here = storage.join(p.version_root, "embeddings")
    entries = []
    for segment in p.segments:
        entry = {**segment, "path": versions.relative_to(here, shard_url(p.previous_root, segment)),
                 "shared_from": segment.get("shared_from") or p.previous}
        if segment["name"] in tombstones:
            entry["deleted_path"] = tombstone_path(segment["name"])
            gone = storage.read_parquet(storage.join(here, entry["deleted_path"]), so).num_rows
            entry["rows"] = segment["rows"] + segment.get("deleted", 0) - gone
            entry["deleted"] = gone
        elif segment.get("deleted_path"):
            entry["deleted_path"] = versions.relative_to(here, shard_url(p.previous_root, segment, "deleted_path"))
        if entry["rows"] > 0:
            entries.append(entry)
    return entries


def write_version_manifest(cfg: Config, p: RefreshPlan, encoder_identity: dict, dim: int, counts: dict,
                           shared: list[dict], records: list[dict], seconds: float) -> dict:
    """``embeddings/_manifest.json`` of the version (and ``_plan.json`` for the readers that re-read texts), in
    row id order: shared segments first, then the new ones."""
    so = cfg.output.storage_options
    layout = Layout(p.version_root, so)
    new = [{key: r[key] for key in ("name", "path", "row_start", "row_stop", "rows", "rejected")} for r in records]
    entries = shared + new
    live = sum(e["rows"] for e in entries)
    if live + counts["rejected"] != p.snapshot_rows:
        raise RuntimeError(f"version {p.version}: {live} live rows + {counts['rejected']} rejected != "
                           f"{p.snapshot_rows} snapshot rows")
    storage.write_json_atomic(layout.plan, {**stamp(), "identity": {**p.identity, "rows_per_shard": p.rows_per_shard},
                                            "config": cfg.to_dict()}, so)
    manifest = {
        **stamp(), "stage": "embeddings", "fingerprint": encoder_identity["fingerprint"],
        "encoder": encoder_identity, "dim": dim, "normalized": cfg.model.normalize,
        "embedding_dtype": cfg.output.embedding_dtype, "version": p.version, "previous_version": p.previous,
        "totals": {"rows_in": p.snapshot_rows, "rows_encoded": live, "rows_rejected": counts["rejected"],
                   "shards": len(entries), "shards_shared": len(shared), "rows_shared": sum(e["rows"] for e in shared),
                   "rows_encoded_now": sum(r["rows"] for r in records)},
        "next_row_id": max([p.next_row_id] + [r["row_stop"] for r in records]),
        "docmap": {"dir": "../_diff/docmap", "buckets": p.buckets},
        "shards": sorted(entries, key=lambda e: e["row_start"]), "seconds": round(seconds, 3),
        "config": cfg.to_dict(),
    }
    storage.write_json_atomic(layout.manifest, manifest, so)
    return manifest


# ------------------------------------------------------------------------------------------------------ changes

def write_changes(p: RefreshPlan, records: list[dict], so: dict) -> dict:
    """``changes/upserts.parquet`` (doc_id, embedding, text_hash of the changed and added documents) and
    ``changes/deletes.parquet`` (doc_id of the documents gone), streamed one segment or bucket at a time."""
    changes = storage.join(p.version_root, "changes")
    layout = Layout(p.version_root, so)
    upserts = _stream(storage.join(changes, "upserts.parquet"), so, (
        storage.read_parquet(layout.shard_file(r["name"]), so, columns=["doc_id", "embedding", "text_hash"])
        for r in records), None)
    deletes = _stream(storage.join(changes, "deletes.parquet"), so, (
        storage.read_parquet(p.diff.bucket_file("deletes", b), so) for b in range(p.buckets)),
        diffing.DELETES_SCHEMA)
    return {"upserts": upserts, "deletes": deletes}


def _stream(url: str, so: dict, tables, schema: pa.Schema | None) -> int:
    """Concatenate ``tables`` into one Parquet file, holding one at a time; returns the rows written."""
    sink, writer, rows = pa.BufferOutputStream(), None, 0
    for table in tables:
        table = table.replace_schema_metadata(None)
        if writer is None:
            writer = pq.ParquetWriter(sink, table.schema, compression="zstd")
        writer.write_table(table)
        rows += table.num_rows
    if writer is None:
        if schema is None:  # no upserts: an empty file with the embeddings columns' names
            schema = pa.schema([("doc_id", pa.string()), ("embedding", pa.list_(pa.float32())),
                                ("text_hash", pa.string())])
        writer = pq.ParquetWriter(sink, schema, compression="zstd")
    writer.close()
    storage.write_bytes_atomic(url, sink.getvalue().to_pybytes(), so)
    return rows


# ------------------------------------------------------------------------------------------------------ gates

def gates(cfg: Config, counts: dict, recall: float | None, ndcg: float | None, previous_ndcg: float | None,
          first: bool) -> list[dict]:
    """Each publish gate with its threshold, value and verdict. The deleted and added fractions apply from the
    second version on (the first adds everything); the nDCG drop when both versions were evaluated."""
    pu = cfg.publish
    documents = max(1, counts["unchanged"] + counts["changed"] + counts["deleted"])
    rows = [("min_recall", pu.min_recall, recall, lambda v, t: v >= t),
            ("max_reject_fraction", pu.max_reject_fraction, counts["rejected"] / max(1, counts["snapshot_rows"]),
             lambda v, t: v <= t)]
    if not first:
        rows += [("max_deleted_fraction", pu.max_deleted_fraction, counts["deleted"] / documents, lambda v, t: v <= t),
                 ("max_added_fraction", pu.max_added_fraction, counts["added"] / documents, lambda v, t: v <= t)]
    if ndcg is not None and previous_ndcg is not None:
        rows.append(("max_ndcg_drop", pu.max_ndcg_drop, round(previous_ndcg - ndcg, 6), lambda v, t: v <= t))
    return [{"gate": f"publish.{name}", "threshold": threshold, "value": None if value is None else round(value, 6),
             "passed": value is None or check(value, threshold)} for name, threshold, value, check in rows]


def write_refresh_record(p: RefreshPlan, record: dict, so: dict) -> None:
    """``refresh.json``, written last in a version."""
    storage.write_json_atomic(storage.join(p.version_root, "refresh.json"),
                              {**stamp(), "version": p.version, "previous": p.previous, **record}, so)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def map_snapshot_shard(p: RefreshPlan, shard: Shard, cfg: Config) -> dict:
    layout = dataclasses.replace(p.diff, storage_options=cfg.output.storage_options)
    return diffing.map_snapshot_shard(shard, cfg.corpus, p.buckets, layout, rejects_url(p, shard))


# ------------------------------------------------------------------------------------------------------ index

DRIFT_SAMPLE = 10_000


def retrain_decision(cfg: Config, vcfg: Config, p: RefreshPlan, plan) -> dict:
    """Whether the version's index trains anew or reuses the previous version's trained quantizer, with the
    numbers: ``refresh.retrain`` always / never / auto (auto: retrain when the mean distance of this version's
    vectors to their nearest centroid grew by more than ``refresh.retrain_drift`` since training)."""
    from . import faiss_index, indexing

    so = cfg.output.storage_options
    if not faiss_index.needs_training(plan.factory, plan.dim):
        return {"retrain": False, "reusable": _previous_index_matches(p, plan, so),
                "reason": f"{plan.factory} needs no training"}
    if not _previous_index_matches(p, plan, so):
        return {"retrain": True, "reusable": False, "reason": "no previous index of this type and encoder"}
    mode = cfg.refresh.retrain
    if mode != "auto":
        return {"retrain": mode == "always", "reusable": True, "reason": f"refresh.retrain = {mode}"}
    previous = indexing.IndexLayout(storage.join(p.previous_root), so)
    baseline = indexing.read_training_record(indexing.IndexLayout(p.previous_root, so)).get("mean_coarse_distance")
    trained = faiss_index.deserialize(storage.read_bytes(previous.file("trained.faiss"), so))
    _, sample = indexing.read_sample(vcfg, plan, indexing.sample_positions(plan.ntotal, DRIFT_SAMPLE, plan.seed + 2))
    now = faiss_index.coarse_distance(trained, sample)
    if not baseline or now is None:
        return {"retrain": True, "reusable": True, "reason": "no training baseline recorded", "now": now}
    growth = now / baseline - 1
    return {"retrain": growth > cfg.refresh.retrain_drift, "reusable": True, "baseline": round(baseline, 6),
            "now": round(now, 6), "growth": round(growth, 6), "threshold": cfg.refresh.retrain_drift,
            "reason": f"mean distance to the nearest centroid {'grew' if growth > 0 else 'changed'} by "
                      f"{growth:.1%} (retrain above {cfg.refresh.retrain_drift:.0%})"}


def _previous_index_matches(p: RefreshPlan, plan, so: dict) -> bool:
    """The previous version has a complete index of the same type, metric and encoder."""
    from .indexing import read_index_manifest

    if not (p.previous_root and p.reuse) or not storage.exists(storage.join(p.previous_root, "index",
                                                                          "manifest.json"), so):
        return False
    manifest = read_index_manifest(p.previous_root, so)
    return (manifest["type"], manifest["metric"], manifest["fingerprint"]) == (
        plan.factory, plan.metric, plan.identity["fingerprint"]) and manifest["mergeable"] == plan.mergeable


def seed_index(vcfg: Config, p: RefreshPlan, plan, touched: set[str]) -> int:
    """Before the index stage runs in the version: copy the previous trained index (a quantizer, small) and commit
    every shared segment whose rows did not change as a shard index that points at the previous version's file.
    Returns the shard indexes shared."""
    from . import indexing

    so = vcfg.output.storage_options
    previous = indexing.IndexLayout(p.previous_root, so)
    here = indexing.layout_of(vcfg)
    for name in ("trained.json", "trained.faiss"):  # the quantizer's record first: trained.faiss marks it done
        if storage.exists(previous.file(name), so):
            storage.write_bytes_atomic(here.file(name), storage.read_bytes(previous.file(name), so), so)
    entries = {e["name"]: e for e in indexing.read_index_manifest(p.previous_root, so)["shards"]}
    shared = 0
    for shard in plan.shards:
        entry = entries.get(shard["name"])
        if entry is None or shard["name"] in touched or not plan.mergeable:
            continue
        target = indexing.shard_index_url(previous.dir, entry)
        record = {"name": shard["name"], "ntotal": entry["ntotal"], "seconds": 0.0, "peak_memory_mb": 0.0,
                  "path": versions.relative_to(here.dir, target), "shared_from": p.previous}
        storage.write_json_atomic(here.record_file(shard["name"]), record, so)
        shared += 1
    return shared


def previous_ndcg(p: RefreshPlan, so: dict) -> float | None:
    url = storage.join(p.previous_root or "", "eval", "metrics.json")
    if not p.previous_root or not storage.exists(url, so):
        return None
    return storage.read_json(url, so)["metrics"]["ndcg@10"]


# ------------------------------------------------------------------------------------------------------ after

def cleanup_diff(p: RefreshPlan, so: dict) -> None:
    """Remove the diff's scratch files (the snapshot's texts among them); keep the doc map the text lookups use
    and the buckets' records."""
    for kind in ("new", "old", "encode", "tombstones", "deletes"):
        storage.remove(storage.join(p.diff.dir, kind), so)


def referenced_files(root: str, name: str, so: dict) -> set[str]:
    """Files of other versions that version ``name`` reads: shared segments, tombstones, shard indexes."""
    from .indexing import read_index_manifest, shard_index_url

    base = versions.version_root(root, name)
    out = set()
    if storage.exists(storage.join(base, "embeddings", "_manifest.json"), so):
        for shard in read_embeddings_manifest(base, so)["shards"]:
            out.add(shard_url(base, shard))
            if shard.get("deleted_path"):
                out.add(shard_url(base, shard, "deleted_path"))
    if storage.exists(storage.join(base, "index", "manifest.json"), so):
        out |= {shard_index_url(storage.join(base, "index"), s) for s in read_index_manifest(base, so)["shards"]}
    return out


def apply_retention(cfg: Config) -> list[str]:
    """Delete the versions older than the newest ``publish.keep_versions`` (never CURRENT's, never one a reader
    holds a fresh lease on), keeping the files that kept versions still share; returns the versions deleted."""
    root, so = cfg.output.root, cfg.output.storage_options
    names = versions.list_versions(root, so)
    current = (versions.read_current(root, so) or {}).get("version")
    doomed = versions.versions_to_delete(names, current, cfg.publish.keep_versions,
                                         versions.readers_in_use(root, so, cfg.publish.lock_timeout))
    kept = [n for n in names if n not in doomed]
    referenced = set().union(*(referenced_files(root, n, so) for n in kept)) if kept else set()
    for name in doomed:
        versions.delete_version_files(root, name, so, referenced)
    return doomed
