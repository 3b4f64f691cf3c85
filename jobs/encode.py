"""Encode a corpus into embedding shards, in parallel Ray actors.

Reads:  the corpus (corpus.path: Parquet or JSONL files, a directory, a glob or a list; any fsspec URL).
Writes: <output.root>/embeddings/ (shard-*.parquet: row_id, doc_id, embedding, text_hash; _manifest.json last)
        and <output.root>/rejects/encode/ (every row not encoded, with the reason).
A rerun skips committed shards; other settings on the same output.root are refused unless output.overwrite=true.
"""

from __future__ import annotations

import logging
import sys
import time

from jobs import _cli, _progress
from jobs.ray import actors, cluster, dispatch
from retrieval_core.config import Config
from retrieval_core.encode import embeddings, encoding
from retrieval_core.io import corpus, id_check, sharding, storage
from retrieval_core.io.folder import Folder
from retrieval_core.io.shard_list import Pending

log = logging.getLogger("jobs.encode")
KEYS = (
    "corpus.path",
    "corpus.id_column",
    "corpus.text_column",
    "corpus.title_column",
    "model.name",
    "model.precision",
    "model.batch_size",
    "model.document_prompt",
    "output.root",
    "output.overwrite",
    "runtime.address",
    "runtime.num_workers",
    "runtime.rows_per_shard",
)  # shown with their defaults by --help


def run(cfg: Config, on_shard_done=None) -> dict:
    """Run the encode stage; returns a summary dict. ``on_shard_done(record)`` is called as shards commit."""
    started = time.perf_counter()
    layout = embeddings.layout_of(cfg)
    files = corpus.inspect_corpus(cfg.corpus)
    total_rows = sum(f.num_rows for f in files)
    if not total_rows:
        raise corpus.CorpusError(f"corpus.path = {cfg.corpus.path!r} holds no rows ({len(files)} file(s), all empty)")
    identity = encoding.encoder_identity(cfg.model)
    with cluster.LazyRaySession(cfg.runtime) as session:
        _check_unique_ids(cfg, session, files, total_rows)
        shards = embeddings.prepare_plan(
            cfg,
            files,
            identity,
            lambda: sharding.auto_rows_per_shard(
                total_rows,
                cluster.planned_worker_count(cfg.runtime, session, total_rows),
                encoding.estimated_docs_per_s(cfg.model, cfg.runtime.cpus_per_worker, cfg.runtime.gpus_per_worker),
                embeddings.vector_bytes_per_row(cfg),
            ),
        )
        pending = embeddings.pending_shards(shards, layout)
        tally = _encode_pending(cfg, session, pending, identity, on_shard_done) if pending else embeddings.Tally()
    if not pending and storage.exists(layout.manifest, layout.storage_options):
        manifest = embeddings.read_embeddings_manifest(Folder.output(cfg.output))
    else:
        dim = tally.dim or _committed_dim(layout, shards)
        manifest = embeddings.write_manifest(cfg, shards, identity, dim, time.perf_counter() - started)
    return _summary(manifest, tally, time.perf_counter() - started, layout.dir)


def _check_unique_ids(cfg: Config, session, files: list, total_rows: int) -> None:
    """Duplicate ids are an error naming examples. The check is the map/reduce of ``io.id_check`` (a map step per
    ``id_check.ID_CHECK_ROWS`` rows, a reduce step per hash partition), exchanging hashes through a scratch folder
    inside the embeddings folder that is removed when it ends. A corpus of at most ``id_check.ID_CHECK_DRIVER_ROWS``
    rows is checked in this process (one step at a time); a larger one by Ray tasks, so that this process holds
    nothing per document."""
    scratch = embeddings.layout_of(cfg).folder.sub(id_check.SCRATCH)
    if total_rows <= id_check.ID_CHECK_DRIVER_ROWS:
        duplicates = id_check.find_duplicate_ids(files, cfg.corpus, scratch)
    else:
        partitions = id_check.id_check_partitions(total_rows)
        log.info("checking %d ids for duplicates: %d map and %d reduce task(s)", total_rows, partitions, partitions)
        session.ensure()
        duplicates = actors.duplicate_ids(cfg, files, scratch)
    if duplicates:
        raise corpus.CorpusError(f"duplicate values in id column '{cfg.corpus.id_column}', e.g. {duplicates}")


def _encode_pending(cfg: Config, session, pending: Pending, identity: dict, on_shard_done) -> embeddings.Tally:
    """Encode the pending shards, here when they hold at most ``runtime.inline_rows`` rows (starting Ray and
    loading the model in actors would cost more), else on actors; returns the tally of their commit records (the
    records themselves are not kept: the driver holds counts, not one record per shard)."""
    rows = pending.num_rows
    bar = _progress.bar(cfg.runtime, rows, "encode", "doc")
    tally = embeddings.Tally()

    def done(shard, record):
        tally.add(record)
        bar.update(shard.num_rows)
        bar.set_postfix(
            shards=f"{tally.shards}/{len(pending)}",
            rejected=record["rejected"],
            **tally.progress(),
            refresh=False,
        )
        if on_shard_done:
            on_shard_done(record)

    try:
        if dispatch.runs_here(rows, cfg.runtime.inline_rows):
            log.info("encoding %d shard(s) (%d rows) in this process", len(pending), rows)
            encoder, work = cluster.inline_encoder(cfg), embeddings.shard_work(cfg)
            for shard in pending:
                done(shard, embeddings.encode_shard(shard, work, encoder, identity, {"worker": "driver"}))
        else:
            _encode_on_actors(cfg, session, pending, identity, done)
    finally:
        bar.close()
    return tally


def _encode_on_actors(cfg: Config, session, pending: Pending, identity: dict, done) -> None:
    count = session.worker_count(len(pending))
    log.info("encoding %d shard(s) on %d worker(s)", len(pending), count)
    with dispatch.released(actors.start_encode_workers(cfg, count)) as workers:
        dispatch.run_on_actors(
            workers,
            "encode_shard",
            pending,
            (embeddings.shard_work(cfg), identity),
            done,
            work="encode",
            speculation=cfg.runtime.speculation,
        )


def _committed_dim(layout, shards) -> int:
    """The vectors' dimension when this run encoded nothing: from the first shard's commit record (one read)."""
    url = layout.record_file(shards[0].name) if len(shards) else ""
    return (
        storage.read_json(url, layout.storage_options)["dim"]
        if url and storage.exists(url, layout.storage_options)
        else 0
    )


def _summary(manifest: dict, tally: embeddings.Tally, seconds: float, where: str) -> dict:
    """The stage's figures; the rate counts the rows this run encoded (not those committed before)."""
    totals = manifest["totals"]
    encoded_now = tally.rows
    return {
        "rows_in": totals["rows_in"],
        "rows_encoded": totals["rows_encoded"],
        "rows_rejected": totals["rows_rejected"],
        "shards": totals["shards"],
        "shards_run": tally.shards,
        "shards_skipped": totals["shards"] - tally.shards,
        "rows_encoded_now": encoded_now,
        "seconds": round(seconds, 2),
        "docs_per_s": round(encoded_now / seconds, 1) if tally.shards else None,
        "reused": not tally.shards,
        "output": where,
        "fingerprint": manifest["fingerprint"],
        **tally.usage,
    }


def format_summary(s: dict) -> str:
    rate = f", {s['docs_per_s']} docs/s over the {s['rows_encoded_now']} rows encoded now" if s["docs_per_s"] else ""
    return (
        f"encode: {s['rows_in']} rows in, {s['rows_encoded']} encoded, {s['rows_rejected']} rejected; "
        f"{s['shards']} shards ({s['shards_run']} run, {s['shards_skipped']} already committed) "
        f"in {s['seconds']} s{rate}{_api_cost(s.get('api_usage'))} -> {s['output']}"
    )


def _api_cost(usage: dict | None) -> str:
    if not usage:
        return ""
    cut = f", {usage['truncated']} texts cut to model.max_input_chars" if usage["truncated"] else ""
    return f"; API: {usage['requests']} requests ({usage['retries']} retries), {usage['tokens']} tokens{cut}"


def main(argv: list[str] | None = None) -> int:
    return _cli.run_job(__doc__, run, format_summary, argv, KEYS)


if __name__ == "__main__":
    sys.exit(main())
