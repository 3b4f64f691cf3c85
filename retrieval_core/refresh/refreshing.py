"""The refresh stage without Ray: plan a new version from tonight's snapshot and the published one, and the steps
that build it (diff, encode the changed and added documents, tombstones, the version's embeddings manifest, the
changes files). ``refresh.index_reuse`` builds its index; ``publishing`` has the gates, ``refresh.json`` and retention.

A version shares every segment (embedding shard) of the previous version that still holds live rows: its
manifest entry points at the earlier file (``path: ../../<version>/embeddings/...``) and names a tombstone file
with the rows of that segment that are no longer live (changed or deleted documents). Only the changed and added
documents are encoded, into new segments with fresh row ids (above every id used before). So a night costs reading
and hashing the snapshot, encoding the change, and writing the change plus the tombstones; no vector is copied.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence, Set

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval_core.config import Config
from retrieval_core.encode import encoding
from retrieval_core.encode.embeddings import (
    api_usage_since,
    api_usage_totals,
    embeddings_table,
    layout_at,
    non_default_cap,
    read_embeddings_manifest,
    read_shard_table,
    shard_url,
)
from retrieval_core.encode.encoding import Encoder, encode_by_length, usage_of
from retrieval_core.io import manifest, storage, versions
from retrieval_core.io.folder import Folder, StageLayout
from retrieval_core.io.manifest import stamp
from retrieval_core.io.schemas import EMBEDDINGS_SHARD_ENTRY, SCHEMA_VERSION
from retrieval_core.io.sharding import FileMeta, Shard, plan_shards
from retrieval_core.refresh import diffing

BUILD_RECORD = versions.BUILD_RECORD


@dataclasses.dataclass(frozen=True)
class RefreshPlan:
    """One refresh: where it builds, what it compares against, how the snapshot is cut."""

    version: str
    root: str  # the output root holding CURRENT and versions/
    version_root: str
    previous: str | None  # the published version compared against (None: the first version)
    previous_root: str | None
    reuse: bool  # the previous version's vectors may be reused (same encoder fingerprint); when
    # not, every document is encoded again (the diff still counts the change)
    buckets: int
    rows_per_shard: int
    snapshot_rows: int
    next_row_id: int  # the first row id of this version's new segments
    shards: tuple  # the snapshot's shards (map tasks)
    segments: tuple  # the previous version's live segments (manifest entries)
    identity: dict
    adopted: bool = False  # the first version, built on the root's own plain-job output (--adopt)

    @property
    def previous_version_root(self) -> str:
        """The previous version's root, for the steps that only run when there is one."""
        if self.previous_root is None:
            raise ValueError(f"version {self.version} has no previous version to read from")
        return self.previous_root

    @property
    def diff(self) -> StageLayout:
        return diffing.layout_at(self.version_root)

    def diff_layout(self, storage_options: dict | None) -> StageLayout:
        """The diff's files, read and written with the output's storage options."""
        return dataclasses.replace(self.diff, storage_options=storage_options or {})

    @property
    def source(self) -> str:
        """What shared segments and shard indexes come from: the previous version, or the adopted root output."""
        return self.previous or "adopted"

    @property
    def tag(self) -> str:
        return self.version.split("-")[0]


def snapshot_identity(cfg: Config, files: list[FileMeta], encoder_identity: dict) -> dict:
    """What fixes a build: the snapshot's files and row counts, the columns, the encoder, the refresh settings."""
    return {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": encoder_identity["fingerprint"],
        "corpus": {
            "files": [{"url": f.url, "rows": f.num_rows, "blocks": len(f.block_rows)} for f in files],
            "id_column": cfg.corpus.id_column,
            "text_column": cfg.corpus.text_column,
            "title_column": cfg.corpus.title_column,
            **non_default_cap(cfg),
        },
        "embedding_dtype": cfg.output.embedding_dtype,
        "index": {"type": cfg.index.type, "metric": cfg.index.metric},
        # what the night compacts follows from these: a rerun with others would write another version
        "compaction": {"dead_fraction": cfg.refresh.compact_dead_fraction, "budget": cfg.refresh.compact_budget},
    }


def plan(
    cfg: Config, files: list[FileMeta], encoder_identity: dict, rows_per_shard: int, adopt: bool = False
) -> RefreshPlan:
    """The build of this run: the unfinished one of an earlier run on the same snapshot (resumed), else a new
    version compared against the one CURRENT names. ``adopt`` (a root without CURRENT that holds the plain jobs'
    output): the first version is compared against that output, sharing its segments and shard indexes."""
    so = cfg.output.storage_options
    current = versions.read_current(Folder(cfg.output.root, so))
    previous = current["version"] if current else None
    adopted = adopt and previous is None
    previous_root = (
        versions.version_root(cfg.output.root, previous) if previous else (cfg.output.root if adopted else None)
    )
    identity = {
        **snapshot_identity(cfg, files, encoder_identity),
        "previous": previous,
        "rows_per_shard": rows_per_shard,
        "diff_buckets": cfg.refresh.diff_buckets,
        **({"adopted": True} if adopted else {}),
    }
    version = _resume_or_start(cfg, identity)
    prev_manifest = read_embeddings_manifest(Folder(previous_root, so)) if previous_root else None
    reuse = prev_manifest is not None and prev_manifest["fingerprint"] == encoder_identity["fingerprint"]
    rows = sum(f.num_rows for f in files)
    return RefreshPlan(
        version=version,
        root=cfg.output.root,
        version_root=versions.version_root(cfg.output.root, version),
        previous=previous,
        previous_root=previous_root,
        reuse=reuse,
        buckets=diffing.bucket_count(rows, cfg.refresh.diff_buckets),
        rows_per_shard=rows_per_shard,
        snapshot_rows=rows,
        next_row_id=_next_row_id(prev_manifest),
        shards=tuple(plan_shards(files, rows_per_shard)),
        segments=tuple(s for s in prev_manifest["shards"] if s["rows"] > 0) if prev_manifest else (),
        identity=identity,
        adopted=adopted,
    )


def _resume_or_start(cfg: Config, identity: dict) -> str:
    """The version an unfinished build of the same identity was making, or a new name (an unfinished build of
    another snapshot is abandoned: its directory is removed unless CURRENT names it, i.e. the run was killed
    between its publish and forgetting the build)."""
    so = cfg.output.storage_options
    url = storage.join(cfg.output.root, BUILD_RECORD)
    if storage.exists(url, so):
        build = storage.read_json(url, so)
        if build["identity"] == identity:
            return build["version"]
        if (versions.read_current(Folder(cfg.output.root, so)) or {}).get("version") != build["version"]:
            storage.remove(versions.version_root(cfg.output.root, build["version"]), so)  # never published
    version = versions.new_version_name(Folder(cfg.output.root, so))
    storage.write_json_atomic(url, {**stamp(), "version": version, "identity": identity}, so)
    return version


def committed_work(root: str, so: dict | None) -> str:
    """What a stopped refresh has committed in the version it is building, e.g. ``'version v000002-... (diff 4
    buckets joined, 3 new segments encoded, index 2 of 5 shards)'``; '' when no build is pending."""
    name = versions.building_version(Folder(root, so))
    if not name:
        return ""
    base = versions.version_root(root, name)
    buckets_dir = diffing.layout_at(base).records_dir
    joined = manifest.count_records(buckets_dir, so)
    encoded = manifest.count_records(layout_at(base, so).records_dir, so)
    rest = manifest.committed_work(base, so)
    parts = [f"diff {joined} buckets joined", f"{encoded} new segments encoded"] + ([rest] if rest else [])
    return f"version {name} ({', '.join(parts)})"


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
    return dataclasses.replace(
        cfg, output=dataclasses.replace(cfg.output, root=version_root, version="", overwrite=False)
    )


# ------------------------------------------------------------------------------------------------------ diff


def rejects_url(p: RefreshPlan, shard: Shard) -> str:
    return storage.join(p.version_root, "rejects", "encode", f"{shard.name}.parquet")


def pending_map_shards(p: RefreshPlan, so: dict) -> list[Shard]:
    layout = p.diff_layout(so)
    return [s for s in p.shards if not storage.exists(diffing.map_record(layout, "new", s.name), so)]


def pending_map_segments(p: RefreshPlan, so: dict) -> list[dict]:
    layout = p.diff_layout(so)
    return [s for s in p.segments if not storage.exists(diffing.map_record(layout, "old", s["name"]), so)]


def map_segment(segment: dict, p: RefreshPlan, so: dict) -> dict:
    """Map one live segment of the previous version (its tombstones applied) into the diff's buckets."""
    table = read_shard_table(Folder(p.previous_version_root, so), segment, ["doc_id", "text_hash"])
    return diffing.map_previous_segment(segment["name"], table, p.buckets, p.diff_layout(so))


def pending_buckets(p: RefreshPlan, so: dict) -> list[int]:
    layout = p.diff_layout(so)
    return [b for b in range(p.buckets) if not storage.exists(layout.record_file(b), so)]


def reduce_bucket(bucket: int, p: RefreshPlan, so: dict) -> dict:
    return diffing.reduce_bucket(
        bucket, [s.name for s in p.shards], [s["name"] for s in p.segments], p.diff_layout(so), encode_all=not p.reuse
    )


def diff_counts(p: RefreshPlan, so: dict) -> dict:
    """Counts over the snapshot and the previous version, from the buckets' and maps' commit records."""
    layout = p.diff_layout(so)
    buckets = diffing.read_bucket_records(layout, p.buckets)
    maps = [storage.read_json(diffing.map_record(layout, "new", s.name), so) for s in p.shards]
    counts = {key: sum(b[key] for b in buckets) for key in ("documents", *diffing.STATUSES, "encode_rows")}
    counts["rejected"] = sum(m["rejected"] for m in maps)
    counts["snapshot_rows"] = p.snapshot_rows
    lost: dict[str, int] = {}
    for record in buckets:
        for segment, rows in record["tombstones"].items():
            lost[segment] = lost.get(segment, 0) + rows
    return {
        "counts": counts,
        "encode_rows": [b["encode_rows"] for b in buckets],
        "tombstones": _tombstones_by_segment(buckets),
        "lost": lost,
    }


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
    layout = layout_at(p.version_root, so)
    return [s for s in segments if not storage.exists(layout.record_file(s.name), so)]


def encode_segment(
    p: RefreshPlan,
    segment: NewSegment,
    cfg: Config,
    encoder: Encoder,
    encoder_identity: dict,
    worker: dict | None = None,
) -> dict:
    """Encode one new segment and commit it (the data, then its record); returns the record.
    Memory: the segment's texts and vectors (``runtime.rows_per_shard`` rows at most)."""
    started = time.perf_counter()
    so = cfg.output.storage_options
    rows = diffing.read_encode_slices(p.diff_layout(so), list(segment.slices))
    texts = rows.column("text").to_pylist()
    before = usage_of(encoder)
    vectors = encode_by_length(encoder, texts, cfg.model.batch_size)
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": encoder_identity["fingerprint"],
        "dim": encoder.dim,
        "normalized": encoder.normalized,
    }
    ids = list(range(segment.row_start, segment.row_start + len(texts)))
    table = embeddings_table(
        ids,
        rows.column("doc_id").to_pylist(),
        vectors,
        rows.column("text_hash").to_pylist(),
        cfg.output.embedding_dtype,
        metadata,
    )
    layout = layout_at(p.version_root, so)
    storage.write_parquet_atomic(layout.data_file(segment.name), table, so)
    record = {
        "name": segment.name,
        "path": f"{segment.name}.parquet",
        "row_start": segment.row_start,
        "row_stop": segment.row_start + len(texts),
        "rows": len(texts),
        "rejected": 0,
        "fingerprint": encoder_identity["fingerprint"],
        "dim": encoder.dim,
        "seconds": round(time.perf_counter() - started, 3),
        **(worker or {}),
        **api_usage_since(encoder, before),
    }
    storage.write_json_atomic(layout.record_file(segment.name), record, so)
    return record


def tombstone_path(segment: str) -> str:
    return f"_deleted/{segment}.parquet"


def dead_rows(segment: dict, p: RefreshPlan, tombstones: dict[str, list[int]], so: dict) -> np.ndarray:
    """The row ids of a shared segment that are not live in this version: its earlier tombstones plus this diff's
    (``tombstones``: segment -> the diff's buckets that removed rows of it), sorted."""
    gone = diffing.read_tombstones(p.diff_layout(so), segment["name"], tombstones.get(segment["name"], []))
    if segment.get("deleted_path"):
        old = storage.read_parquet(shard_url(p.previous_version_root, segment, "deleted_path"), so).column("row_id")
        gone = np.union1d(gone, old.to_numpy())
    return np.sort(gone)


def write_segment_tombstones(segment: dict, p: RefreshPlan, tombstones: dict[str, list[int]], so: dict) -> int:
    """The rows of a shared segment that are not live in this version (:func:`dead_rows`), in
    ``embeddings/_deleted/<segment>.parquet`` of this version; returns how many."""
    new = dead_rows(segment, p, tombstones, so)
    table = pa.table({"row_id": pa.array(new, pa.int64())})
    storage.write_parquet_atomic(storage.join(p.version_root, "embeddings", tombstone_path(segment["name"])), table, so)
    return len(new)


def shared_entries(
    p: RefreshPlan,
    tombstones: dict[str, list[int]],
    so: dict,
    compacted: Sequence[dict] = (),
    rewritten: Set[str] = frozenset(),
) -> list[dict]:
    """The previous version's segments as entries of this version's manifest: pointing at the earlier files,
    with this version's tombstone file where the diff removed rows, and the live row count; the segments compacted
    tonight (``rewritten``) are replaced by their compactions' entries (``compacted``: files of this version)."""
    here = storage.join(p.version_root, "embeddings")
    entries = [entry for entry in compacted if entry["rows"] > 0]
    for segment in p.segments if p.reuse else ():
        if segment["name"] in rewritten:
            continue
        entry = {
            **segment,
            "path": storage.relative_to(here, shard_url(p.previous_version_root, segment)),
            "shared_from": segment.get("shared_from") or p.source,
        }
        if segment["name"] in tombstones:
            entry["deleted_path"] = tombstone_path(segment["name"])
            gone = storage.read_parquet(storage.join(here, entry["deleted_path"]), so).num_rows
            entry["rows"] = segment["rows"] + segment.get("deleted", 0) - gone
            entry["deleted"] = gone
        elif segment.get("deleted_path"):
            entry["deleted_path"] = storage.relative_to(
                here, shard_url(p.previous_version_root, segment, "deleted_path")
            )
        if entry["rows"] > 0:
            entries.append(entry)
    return entries


def write_version_manifest(
    cfg: Config,
    p: RefreshPlan,
    encoder_identity: dict,
    dim: int,
    counts: dict,
    shared: list[dict],
    records: list[dict],
    seconds: float,
) -> dict:
    """``embeddings/_manifest.json`` of the version (and ``_plan.json`` for the readers that re-read texts), in
    row id order: shared segments first, then the new ones."""
    so = cfg.output.storage_options
    layout = layout_at(p.version_root, so)
    new = [{key: r[key] for key in ("name", "path", "row_start", "row_stop", "rows", "rejected")} for r in records]
    entries = shared + new
    live = sum(e["rows"] for e in entries)
    if live + counts["rejected"] != p.snapshot_rows:
        raise RuntimeError(
            f"version {p.version}: {live} live rows + {counts['rejected']} rejected != {p.snapshot_rows} snapshot rows"
        )
    storage.write_json_atomic(
        layout.plan,
        {**stamp(), "identity": {**p.identity, "rows_per_shard": p.rows_per_shard}, "config": cfg.to_dict()},
        so,
    )
    fields = {
        **stamp(),
        "stage": "embeddings",
        "fingerprint": encoder_identity["fingerprint"],
        "encoder": encoder_identity,
        "query_encoder": encoding.query_identity(cfg.model),
        "dim": dim,
        "normalized": cfg.model.normalize,
        "embedding_dtype": cfg.output.embedding_dtype,
        "version": p.version,
        "previous_version": p.previous,
        "totals": {
            "rows_in": p.snapshot_rows,
            "rows_encoded": live,
            "rows_rejected": counts["rejected"],
            "shards": len(entries),
            "shards_shared": sum(1 for e in shared if e.get("shared_from")),
            "rows_shared": sum(e["rows"] for e in shared if e.get("shared_from")),
            "rows_encoded_now": sum(r["rows"] for r in records),
            "shards_compacted": sum(1 for e in shared if _compacted_here(e)),
            "rows_compacted": sum(e["rows"] for e in shared if _compacted_here(e)),
            "rows_dead": sum(e.get("deleted", 0) for e in shared),
        },
        "next_row_id": max([p.next_row_id] + [r["row_stop"] for r in records]),
        "docmap": {"dir": "../_diff/docmap", "buckets": p.buckets},
        **api_usage_totals(records),
        "seconds": round(seconds, 3),
        "config": cfg.to_dict(),
    }
    ordered = sorted(entries, key=lambda e: e["row_start"])
    return manifest.write_streamed(layout.manifest, ordered, lambda: fields, EMBEDDINGS_SHARD_ENTRY, so)


def _compacted_here(entry: dict) -> bool:
    """A segment this version compacted (its own file; a later version sharing it adds ``shared_from``)."""
    return bool(entry.get("compacted_from")) and not entry.get("shared_from")


# ------------------------------------------------------------------------------------------------------ changes


def write_changes(p: RefreshPlan, records: list[dict], so: dict) -> dict:
    """``changes/upserts.parquet`` (doc_id, embedding, text_hash of the changed and added documents) and
    ``changes/deletes.parquet`` (doc_id of the documents gone), streamed one segment or bucket at a time."""
    changes = storage.join(p.version_root, "changes")
    layout = layout_at(p.version_root, so)
    upserts = _stream(
        storage.join(changes, "upserts.parquet"),
        so,
        (
            storage.read_parquet(layout.data_file(r["name"]), so, columns=["doc_id", "embedding", "text_hash"])
            for r in records
        ),
        None,
    )
    deletes = _stream(
        storage.join(changes, "deletes.parquet"),
        so,
        (storage.read_parquet(diffing.bucket_file(p.diff, "deletes", b), so) for b in range(p.buckets)),
        diffing.DELETES_SCHEMA,
    )
    return {"upserts": upserts, "deletes": deletes}


def _stream(url: str, so: dict, tables, schema: pa.Schema | None) -> int:
    """Concatenate ``tables`` into one Parquet file, one row group (or more) per table as it comes, streamed to
    its place (on object storage a multipart upload, see ``storage.open_atomic``): this holds one table, never the
    file. Returns the rows written."""
    rows, writer = 0, None
    with storage.open_atomic(url, so) as out:
        try:
            for table in tables:
                table = table.replace_schema_metadata(None)
                if writer is None:
                    writer = pq.ParquetWriter(out, table.schema, compression="zstd")
                writer.write_table(table)
                rows += table.num_rows
            if writer is None:
                if schema is None:  # no upserts: an empty file with the embeddings columns' names
                    schema = pa.schema(
                        [("doc_id", pa.string()), ("embedding", pa.list_(pa.float32())), ("text_hash", pa.string())]
                    )
                writer = pq.ParquetWriter(out, schema, compression="zstd")
        finally:
            if writer is not None:
                writer.close()  # on an error too, before the file is discarded
    return rows


def map_snapshot_shard(shard: Shard, p: RefreshPlan, cfg: Config) -> dict:
    layout = p.diff_layout(cfg.output.storage_options)
    return diffing.map_snapshot_shard(shard, cfg.corpus, p.buckets, layout, rejects_url(p, shard))


def cleanup_diff(p: RefreshPlan, so: dict) -> None:
    """Remove the diff's scratch files (the snapshot's texts among them); keep the doc map the text lookups use
    and the buckets' records."""
    for kind in ("new", "old", "encode", "tombstones", "deletes"):
        storage.remove(storage.join(p.diff.dir, kind), so)
