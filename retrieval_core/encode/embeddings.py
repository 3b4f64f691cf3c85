"""The encode stage without Ray: its layout, plan, per-shard work and commit, and its manifest.

Layout under ``<root>``::

    embeddings/_plan.json              run identity (files, shard size) and shard count, written before any shard
    embeddings/shard-00000.parquet     row_id, doc_id, embedding, text_hash
    embeddings/_shards/shard-00000.json  the shard's commit record, written after its data
    embeddings/_shard_list.parquet     one entry per shard (name, path, rows ...), read in batches (io.shard_list)
    embeddings/_manifest.json          written last; its presence means the stage is complete
    rejects/encode/shard-00000.parquet rows not encoded, with the reason (only for shards that have any)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrieval_core.config import Config, CorpusConfig
from retrieval_core.encode import encoding
from retrieval_core.encode.encoding import Encoder, EncoderOutOfMemory, encode_by_length, usage_of
from retrieval_core.io import faults, storage
from retrieval_core.io.corpus import read_shard, text_hash
from retrieval_core.io.folder import Folder, StageLayout
from retrieval_core.io.manifest import (
    IncompatibleOutputError,
    check_same_identity,
    peak_memory_mb,
    read_manifest,
    stamp,
    write_streamed,
)
from retrieval_core.io.schemas import (
    EMBEDDING_TYPES,
    EMBEDDINGS_SHARD_ENTRY,
    REJECTS_SCHEMA,
    SCHEMA_VERSION,
    embeddings_schema,
)
from retrieval_core.io.shard_list import Pending, batched, check_names, pending
from retrieval_core.io.sharding import FileMeta, Shard, ShardPlan

log = logging.getLogger(__name__)


def layout_at(root: str, storage_options: dict | None = None) -> StageLayout:
    """The encode stage's files under ``root`` (see the module's docstring)."""
    return StageLayout(root, "embeddings", storage_options or {}, rejects="encode")


def layout_of(cfg: Config) -> StageLayout:
    return layout_at(cfg.output.root, cfg.output.storage_options)


@dataclasses.dataclass(frozen=True)
class ShardWork:
    """What encoding a shard reads and where it writes (no task takes the whole config): the corpus section, the
    texts per encoder call, the stored vectors' dtype, and the stage's layout."""

    corpus: CorpusConfig
    batch_size: int
    embedding_dtype: str
    out: StageLayout


def shard_work(cfg: Config) -> ShardWork:
    return ShardWork(cfg.corpus, cfg.model.batch_size, cfg.output.embedding_dtype, layout_of(cfg))


def vector_bytes_per_row(cfg: Config) -> int | None:
    """Bytes of one stored vector when the config fixes its dimension (``model.truncate_dim``), else None: the
    automatic shard size (``sharding.auto_rows_per_shard``) then assumes 768 float32."""
    if not cfg.model.truncate_dim:
        return None
    return cfg.model.truncate_dim * np.dtype(cfg.output.embedding_dtype).itemsize


def run_identity(cfg: Config, files: list[FileMeta], encoder_identity: dict, rows_per_shard: int) -> dict:
    """What fixes the output of this stage: encoder, corpus files and columns, shard size, schema."""
    return {
        "schema_version": SCHEMA_VERSION,
        "encoder": encoder_identity,
        "corpus": {
            "files": [{"url": f.url, "format": f.format, "rows": f.num_rows} for f in files],
            "id_column": cfg.corpus.id_column,
            "text_column": cfg.corpus.text_column,
            "title_column": cfg.corpus.title_column,
            **non_default_cap(cfg),
        },
        "rows_per_shard": rows_per_shard,
        "embedding_dtype": cfg.output.embedding_dtype,
    }


def non_default_cap(cfg: Config) -> dict:
    """``corpus.max_text_chars`` for a run identity when it is not the default (which rows are rejected depends on
    it; left out at the default, so identities written before it existed stay valid)."""
    default = type(cfg.corpus)().max_text_chars
    return {} if cfg.corpus.max_text_chars == default else {"max_text_chars": cfg.corpus.max_text_chars}


def existing_plan(layout: StageLayout) -> dict | None:
    return (
        storage.read_json(layout.plan, layout.storage_options)
        if storage.exists(layout.plan, layout.storage_options)
        else None
    )


def clear(layout: StageLayout) -> None:
    """Remove a previous run's embeddings and rejects (``output.overwrite``)."""
    storage.remove(layout.dir, layout.storage_options)
    storage.remove(layout.rejects_dir, layout.storage_options)


def prepare_plan(
    cfg: Config, files: list[FileMeta], encoder_identity: dict, auto_rows_per_shard: Callable[[], int]
) -> ShardPlan:
    """The shards of this run, after checking (or replacing, with overwrite) what an earlier run left.

    An earlier plan with the same identity is reused as it is; with ``runtime.rows_per_shard: 0`` (automatic)
    its shard size is kept, so a resumed run plans the same shards on any number of workers;
    ``auto_rows_per_shard()`` is called only when a new automatic plan is made. The plan file records the identity
    (files, shard size) and the shard count; the shards follow from them (:class:`ShardPlan`, made on demand).
    """
    layout = layout_of(cfg)
    previous = existing_plan(layout)
    if previous and cfg.output.overwrite:
        clear(layout)
        previous = None
    rows_per_shard = cfg.runtime.rows_per_shard
    if rows_per_shard == 0:
        rows_per_shard = previous["identity"]["rows_per_shard"] if previous else auto_rows_per_shard()
    identity = run_identity(cfg, files, encoder_identity, rows_per_shard)
    if previous:
        check_same_identity(previous["identity"], identity, layout.dir)
    elif storage.list_names(layout.dir, layout.storage_options):
        raise FileExistsError(f"'{layout.dir}' holds files but no plan; set output.overwrite=true to replace them")
    shards = ShardPlan(files, rows_per_shard)
    if not previous:
        storage.write_json_atomic(
            layout.plan,
            {**stamp(), "identity": identity, "shards": len(shards), "config": cfg.to_dict()},
            layout.storage_options,
        )
    storage.remove_temporaries(layout.dir, layout.storage_options)
    return shards


def committed_records(layout: StageLayout) -> dict[str, dict]:
    """Commit records of the shards already done, by shard name (one listing, then the records read in parallel)."""
    names = layout.committed_names()
    urls = [storage.join(layout.records_dir, f"{name}.json") for name in names]
    return dict(zip(names, storage.read_json_many(urls, layout.storage_options)))


def pending_shards(plan: ShardPlan, layout: StageLayout) -> Pending[Shard]:
    """The shards of ``plan`` not committed yet (one listing of the commit records, one pass over the plan)."""
    return pending(plan, layout.committed_set(), _shard_name, _shard_rows)


def _shard_name(shard: Shard) -> str:
    return shard.name


def _shard_rows(shard: Shard) -> int:
    return shard.num_rows


def encode_shard(
    shard: Shard,
    work: ShardWork,
    encoder: Encoder,
    encoder_identity: dict,
    worker: dict | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict:
    """Read, encode and commit one shard; returns its commit record (``worker`` describes who did it).

    Memory: the shard's texts and its (rows x dim) float32 vectors; ``runtime.rows_per_shard`` bounds both.
    """
    started = time.perf_counter()
    faults.point("encode", shard.name)
    layout = work.out
    rows = read_shard(shard, work.corpus)
    before = usage_of(encoder)
    try:
        vectors = encode_by_length(encoder, rows.texts, work.batch_size, on_progress)
    except EncoderOutOfMemory as exc:
        raise EncoderOutOfMemory(f"{shard.name} (rows {shard.row_start}-{shard.row_stop - 1}): {exc}") from None
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": encoder_identity["fingerprint"],
        "dim": encoder.dim,
        "normalized": encoder.normalized,
    }
    table = embeddings_table(
        rows.row_ids, rows.doc_ids, vectors, [text_hash(t) for t in rows.texts], work.embedding_dtype, metadata
    )
    storage.write_parquet_atomic(layout.data_file(shard.name), table, layout.storage_options)
    if rows.rejects:
        rejects = pa.Table.from_pylist(rows.rejects, schema=REJECTS_SCHEMA)
        storage.write_parquet_atomic(layout.rejects_file(shard.name), rejects, layout.storage_options)
    record = {
        "name": shard.name,
        "path": f"{shard.name}.parquet",
        "row_start": shard.row_start,
        "row_stop": shard.row_stop,
        "rows": len(rows.row_ids),
        "rejected": len(rows.rejects),
        "fingerprint": encoder_identity["fingerprint"],
        "dim": encoder.dim,
        "seconds": round(time.perf_counter() - started, 3),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **(worker or {}),
        **api_usage_since(encoder, before),
    }
    storage.write_json_atomic(layout.record_file(shard.name), record, layout.storage_options)
    return record


def api_usage_since(encoder: Encoder, before: dict | None) -> dict:
    """``{"api_usage": {...}}``: what an embedding API encoder's requests since ``before`` cost (empty for a local
    model), for a shard's commit record."""
    if before is None:
        return {}
    from retrieval_core.encode.providers import usage_between

    return {"api_usage": usage_between(before, usage_of(encoder))}


def api_usage_totals(records: list[dict]) -> dict:
    """``{"api_usage": totals}`` over commit records that have one (empty when none do)."""
    usages = [r["api_usage"] for r in records if "api_usage" in r]
    if not usages:
        return {}
    from retrieval_core.encode.providers import usage_total

    return {"api_usage": usage_total(usages)}


def api_usage_progress(records: list[dict]) -> dict:
    """Requests, retries and tokens of an embedding API so far, for a progress bar (empty for a local model)."""
    return _progress_fields(api_usage_totals(records))


def _progress_fields(usage: dict) -> dict:
    totals = usage.get("api_usage")
    return {k: totals[k] for k in ("requests", "retries", "tokens")} if totals else {}


class Tally:
    """What a driver keeps of the commit records as they come: counts and sums, not the records."""

    def __init__(self) -> None:
        self.shards = self.rows = self.rejected = 0
        self.dim: int | None = None
        self.dims: set[int] = set()  # of the shards with rows
        self.usage: dict = {}  # {"api_usage": totals} once a record has one

    def add(self, record: dict) -> None:
        self.shards += 1
        self.rows += record["rows"]
        self.rejected += record["rejected"]
        self.dim = self.dim or record["dim"]
        if record["rows"]:
            self.dims.add(record["dim"])
        if "api_usage" in record:
            self.usage = api_usage_totals([self.usage, record] if self.usage else [record])

    def progress(self) -> dict:
        """Requests, retries and tokens of an embedding API so far (empty for a local model)."""
        return _progress_fields(self.usage)


def embeddings_table(
    row_ids: list[int], doc_ids: list[str], vectors: np.ndarray, hashes: list[str], dtype: str, metadata: dict
) -> pa.Table:
    dim = vectors.shape[1]
    flat = pa.array(
        vectors.astype(np.float16 if dtype == "float16" else np.float32).reshape(-1), type=EMBEDDING_TYPES[dtype]
    )
    schema = embeddings_schema(dim, dtype, metadata)
    return pa.Table.from_arrays(
        [
            pa.array(row_ids, type=pa.int64()),
            pa.array(doc_ids, type=pa.string()),
            pa.FixedSizeListArray.from_arrays(flat, dim),
            pa.array(hashes, type=pa.string()),
        ],
        schema=schema,
    )


MANIFEST_BATCH = 1000  # commit records read (in parallel) and written into the manifest at a time


def write_manifest(cfg: Config, shards: ShardPlan, encoder_identity: dict, dim: int, seconds: float) -> dict:
    """Write ``embeddings/_manifest.json`` (and its shard table) from the commit records, every planned shard
    committed; returns the manifest without its shard list. The records are read ``MANIFEST_BATCH`` at a time and
    their entries streamed into the table, so this holds one batch, not a record per shard; a failed check leaves
    no manifest."""
    layout = layout_of(cfg)
    tally = Tally()

    def entries():
        for batch in batched(shards, MANIFEST_BATCH):
            for record in _batch_records(layout, batch, encoder_identity):
                tally.add(record)
                yield _manifest_entry(record)

    return write_streamed(
        layout.manifest,
        entries(),
        lambda: _manifest_fields(cfg, shards, encoder_identity, dim, seconds, tally),
        EMBEDDINGS_SHARD_ENTRY,
        layout.storage_options,
    )


def _batch_records(layout: StageLayout, batch: list[Shard], encoder_identity: dict) -> list[dict]:
    """The commit records of ``batch``, checked: all committed, all by this encoder."""
    urls = [layout.record_file(s.name) for s in batch]
    records = storage.map_threads(lambda url: _record_or_none(url, layout.storage_options), urls)
    missing = [s.name for s, r in zip(batch, records) if r is None]
    if missing:
        raise RuntimeError(f"cannot write the manifest: shards not committed: {missing[:10]}")
    mixed = sorted({r["fingerprint"] for r in records} - {encoder_identity["fingerprint"]})
    if mixed:
        raise RuntimeError(
            f"shards encoded with other encoder fingerprints {mixed}, expected "
            f"{encoder_identity['fingerprint']}: set output.overwrite=true and re-run"
        )
    return records


def _record_or_none(url: str, storage_options: dict) -> dict | None:
    try:
        return storage.read_json(url, storage_options)
    except FileNotFoundError:
        return None


def _manifest_entry(record: dict) -> dict:
    return {key: record[key] for key in ("name", "path", "row_start", "row_stop", "rows", "rejected")} | {
        "rejects_path": f"../rejects/encode/{record['name']}.parquet" if record["rejected"] else None
    }


def _manifest_fields(
    cfg: Config, shards: ShardPlan, encoder_identity: dict, dim: int, seconds: float, tally: Tally
) -> dict:
    """Everything of the manifest but its shard list, after the checks on the totals."""
    rows_in = shards.num_rows
    if tally.rows + tally.rejected != rows_in:
        raise RuntimeError(f"rows in ({rows_in}) != rows encoded ({tally.rows}) + rows rejected ({tally.rejected})")
    if rows_in and not tally.rows:
        raise RuntimeError(
            f"no row was encoded: all {rows_in} rows were rejected; their reasons are in "
            f"'{storage.join(cfg.output.root, 'rejects', 'encode')}'"
        )
    if tally.dims - {dim}:
        raise RuntimeError(
            f"shards of different dimensions: {sorted(tally.dims | {dim})} (expected {dim}): the encoder changed its "
            f"output during the run (an API model?); set output.overwrite=true and re-run"
        )
    return {
        **stamp(),
        "stage": "embeddings",
        "fingerprint": encoder_identity["fingerprint"],
        "encoder": encoder_identity,
        "query_encoder": encoding.query_identity(cfg.model),
        "dim": dim,
        "normalized": cfg.model.normalize,
        "embedding_dtype": cfg.output.embedding_dtype,
        "totals": {
            "rows_in": rows_in,
            "rows_encoded": tally.rows,
            "rows_rejected": tally.rejected,
            "shards": len(shards),
        },
        **tally.usage,
        "seconds": round(seconds, 3),
        "driver": {"cpu_s": round(time.process_time(), 3), "peak_memory_mb": peak_memory_mb()},
        "config": cfg.to_dict(),
    }


def read_embeddings_manifest(folder: Folder) -> dict:
    """The completed stage's manifest, its ``shards`` a :class:`ShardList` read in batches (a list for a manifest
    that holds them inline); an error when the stage is incomplete. Shard names become file names of later stages
    (index shards, records), so a name that could lead out of the output root is refused (as the table is read)."""
    url = folder.join("embeddings", "_manifest.json")
    manifest = read_manifest(url, folder.storage_options, "encode")
    if isinstance(manifest.get("shards"), list):  # a manifest holding its shards inline (a shard table checks its own)
        check_names(manifest["shards"], url)
    return manifest


def shard_url(root: str, shard: dict, key: str = "path") -> str:
    """The URL of a file named by a shard entry of the embeddings manifest. Paths are relative to
    ``<root>/embeddings``; in a refresh version a shard shared with an earlier version points there (``../..``)."""

    return storage.resolve_relative(storage.join(root, "embeddings"), shard[key])


def read_shard_table(folder: Folder, shard: dict, columns: list[str]) -> pa.Table:
    """The live rows of one shard entry (``columns`` plus ``row_id``): rows listed in the entry's tombstone file
    (``deleted_path``, written by a refresh for rows changed or deleted since) are left out."""
    wanted = list(dict.fromkeys(["row_id", *columns]))
    so = folder.storage_options
    table = storage.read_parquet(shard_url(folder.url, shard), so, columns=wanted)
    if shard.get("deleted_path"):
        gone = storage.read_parquet(shard_url(folder.url, shard, "deleted_path"), so, columns=["row_id"])
        table = table.filter(pc.invert(pc.is_in(table.column("row_id"), gone.column("row_id"))))
    return table


def read_shard_vectors(
    folder: Folder, shard: dict, dim: int, fingerprint: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(row_ids int64 (n,), vectors float32 (n x dim)) of one shard entry of the embeddings manifest.
    With ``fingerprint``, a shard whose schema metadata names another encoder is an error naming both."""
    root = folder.url
    table = read_shard_table(folder, shard, ["embedding"])
    found = (table.schema.metadata or {}).get(b"fingerprint", b"").decode()
    if fingerprint and found != fingerprint:
        raise IncompatibleOutputError(
            f"'{shard_url(root, shard)}' holds vectors of encoder "
            f"{found or '(none recorded)'}, the embeddings manifest says {fingerprint}: "
            f"the embeddings mix encoders; re-encode with output.overwrite=true"
        )
    return table.column("row_id").to_numpy(), _vectors(table, dim, f"'{shard_url(root, shard)}'")


def _vectors(table: pa.Table, dim: int, where: str = "an embeddings shard") -> np.ndarray:
    found = table.schema.field("embedding").type.list_size
    if found != dim:
        raise IncompatibleOutputError(f"{where} holds {found}-dimensional vectors, the embeddings manifest says {dim}")
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(table.num_rows, dim)


def read_doc_ids(folder: Folder, shard: dict) -> tuple[np.ndarray, list[str]]:
    """(row_ids, doc_ids) of one shard entry of the embeddings manifest."""
    table = read_shard_table(folder, shard, ["doc_id"])
    return table.column("row_id").to_numpy(), table.column("doc_id").to_pylist()


def load_embeddings(folder: Folder) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All vectors with their row ids and doc ids, in row id order (for tests and small corpora)."""
    manifest = read_embeddings_manifest(folder)
    tables = [read_shard_table(folder, s, ["doc_id", "embedding"]) for s in manifest["shards"]]
    table = pa.concat_tables(tables)
    return table.column("row_id").to_numpy(), _vectors(table, manifest["dim"]), table.column("doc_id").to_pylist()
