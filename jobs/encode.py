"""Encode a corpus into embedding shards: ``python -m jobs.encode --config F [--set key=value ...]``."""
from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

from jobs import _actors, _cli, _runtime
from retrieval_core import corpus, embeddings, encoding, sharding, storage
from retrieval_core.config import Config

log = logging.getLogger("jobs.encode")


def run(cfg: Config, on_shard_done=None) -> dict:
    """Run the encode stage; returns a summary dict. ``on_shard_done(record)`` is called as shards commit."""
    started = time.perf_counter()
    layout = embeddings.layout_of(cfg)
    files = corpus.inspect_corpus(cfg.corpus)
    total_rows = sum(f.num_rows for f in files)
    duplicates = corpus.find_duplicate_ids(files, cfg.corpus)
    if duplicates:
        raise corpus.CorpusError(f"duplicate values in id column '{cfg.corpus.id_column}', e.g. {duplicates}")
    identity = encoding.encoder_identity(cfg.model)
    with _runtime.LazyRaySession(cfg.runtime) as session:
        shards = embeddings.prepare_plan(cfg, files, identity, lambda: sharding.auto_rows_per_shard(
            total_rows, session.worker_count(total_rows)))
        pending = embeddings.pending_shards(shards, layout)
        dim = _encode_pending(cfg, session, pending, identity, on_shard_done) if pending else None
    if not pending and storage.exists(layout.manifest, layout.storage_options):
        manifest = embeddings.read_embeddings_manifest(cfg.output.root, cfg.output.storage_options)
    else:
        dim = dim or _committed_dim(layout)
        manifest = embeddings.write_manifest(cfg, shards, identity, dim, time.perf_counter() - started)
    return _summary(manifest, len(pending), time.perf_counter() - started, layout.dir)


def _encode_pending(cfg: Config, session, pending: list, identity: dict, on_shard_done) -> int:
    count = session.worker_count(len(pending))
    log.info("encoding %d shard(s) on %d worker(s)", len(pending), count)
    workers = _actors.start_encode_workers(cfg, count)
    bar = tqdm(total=sum(s.num_rows for s in pending), unit="doc", desc="encode", disable=not cfg.runtime.progress,
               dynamic_ncols=True)
    dims = []

    def done(shard, record):
        dims.append(record["dim"])
        bar.update(shard.num_rows)
        bar.set_postfix(shards=f"{len(dims)}/{len(pending)}", rejected=record["rejected"], refresh=False)
        if on_shard_done:
            on_shard_done(record)

    try:
        _runtime.run_on_actors(workers, "encode_shard", pending, (cfg, identity), done)
    finally:
        bar.close()
    return dims[0]


def _committed_dim(layout) -> int:
    records = embeddings.committed_records(layout)
    return next(iter(records.values()))["dim"] if records else 0


def _summary(manifest: dict, shards_run: int, seconds: float, where: str) -> dict:
    totals = manifest["totals"]
    return {
        "rows_in": totals["rows_in"], "rows_encoded": totals["rows_encoded"],
        "rows_rejected": totals["rows_rejected"], "shards": totals["shards"], "shards_run": shards_run,
        "shards_skipped": totals["shards"] - shards_run, "seconds": round(seconds, 2),
        "docs_per_s": round(totals["rows_encoded"] / seconds, 1) if shards_run else None,
        "output": where, "fingerprint": manifest["fingerprint"],
    }


def format_summary(s: dict) -> str:
    rate = f", {s['docs_per_s']} docs/s" if s["docs_per_s"] else ""
    return (f"encode: {s['rows_in']} rows in, {s['rows_encoded']} encoded, {s['rows_rejected']} rejected; "
            f"{s['shards']} shards ({s['shards_run']} run, {s['shards_skipped']} already committed) "
            f"in {s['seconds']} s{rate} -> {s['output']}")


def main(argv: list[str] | None = None) -> int:
    return _cli.run_job(__doc__, run, format_summary, argv)


if __name__ == "__main__":
    sys.exit(main())
