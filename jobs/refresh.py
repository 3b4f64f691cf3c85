"""Nightly re-indexing: build a new version from tonight's corpus snapshot and publish it behind gates.

Reads:  the snapshot (corpus.path) and the version <output.root>/CURRENT names (the previous one).
Writes: <output.root>/versions/<version>/ (embeddings/, index/, eval/ when eval queries are set, changes/
        upserts.parquet and deletes.parquet, refresh.json last), then <output.root>/CURRENT when every gate passes.
Only changed and added documents are encoded; unchanged ones keep their vectors, shared with the earlier version.
A failing gate leaves CURRENT as it was and exits 1. --rollback NAME points CURRENT back at an earlier version.
"""
from __future__ import annotations

import logging
import sys
import time

import ray
from tqdm import tqdm

from jobs import _actors, _cli, _runtime, evaluate, index
from retrieval_core import (corpus, embeddings, encoding, indexing, publishing, refresh_index, refreshing, sharding,
                            storage, versions)
from retrieval_core.config import Config

log = logging.getLogger("jobs.refresh")
KEYS = ("corpus.path", "output.root", "refresh.retrain", "refresh.retrain_drift", "publish.min_recall",
        "publish.max_reject_fraction", "publish.max_deleted_fraction", "publish.max_added_fraction",
        "publish.max_ndcg_drop", "publish.keep_versions", "publish.lock_timeout", "eval.queries_path")


def run(cfg: Config) -> dict:
    """Refresh under the root's lock; returns the version's record (``refresh.json``), or a record saying that
    nothing changed. Raises :class:`publishing.GateError` (after writing the record) when a gate fails."""
    so = cfg.output.storage_options
    with versions.locked(cfg.output.root, so, cfg.publish.lock_timeout):
        return _refresh(cfg)


def _refresh(cfg: Config) -> dict:
    started, timings = time.perf_counter(), {}
    so = cfg.output.storage_options
    encoder = _prewarmed_encoder(cfg)
    files = corpus.inspect_corpus(cfg.corpus)
    identity = encoding.encoder_identity(cfg.model)
    rows = sum(f.num_rows for f in files)
    with _runtime.LazyRaySession(cfg.runtime) as session:  # Ray starts only for a step too big for this process
        steps = _Steps(cfg, session, inline=rows <= cfg.refresh.inline_snapshot_rows, encoder=encoder)
        p = refreshing.plan(cfg, files, identity, _rows_per_shard(cfg, session, rows))
        log.info("refresh: building %s against %s (%d snapshot rows, %d previous segments)", p.version,
                 p.previous or "nothing (first version)", p.snapshot_rows, len(p.segments))
        if versions.is_complete(cfg.output.root, p.version, so):  # a run killed after finishing it, before publishing
            return _conclude(cfg, p, storage.read_json(storage.join(p.version_root, versions.REFRESH_RECORD), so))
        if p.previous and not p.reuse:
            log.warning("refresh: the encoder fingerprint differs from %s's: every document is encoded again",
                        p.previous)
        _timed(timings, "diff", lambda: _diff(steps, p))
        diff = refreshing.diff_counts(p, so)
        counts = diff["counts"]
        if p.previous and p.reuse and not (counts["changed"] or counts["added"] or counts["deleted"]):
            return _unchanged(cfg, p, counts, timings, started)
        segments = refreshing.plan_segments(p, diff["encode_rows"])
        records = _timed(timings, "encode", lambda: _encode(steps, p, segments, identity))
        shared = _timed(timings, "tombstones", lambda: _tombstones(steps, p, diff["tombstones"]))
        dim = records[0]["dim"] if records else embeddings.read_embeddings_manifest(p.previous_root, so)["dim"]
        refreshing.write_version_manifest(cfg, p, identity, dim, counts, shared, records, time.perf_counter() - started)
        vcfg = refreshing.version_config(cfg, p.version_root)
        retrain = _timed(timings, "index", lambda: _index(steps, vcfg, p, set(diff["tombstones"])))
        evaluation = _timed(timings, "evaluate", lambda: evaluate.run(vcfg) if cfg.eval.queries_path else None)
        changes = _timed(timings, "changes", lambda: steps.call(refreshing.write_changes, p, records, so))
    return _gate_and_publish(cfg, p, counts, retrain, evaluation, changes, timings, started)


class _Steps:
    """Runs the refresh's bookkeeping steps (diff, tombstones, index, changes) in this process when the snapshot is
    small (``refresh.inline_snapshot_rows``: starting Ray would cost more than the work), else as Ray tasks."""

    def __init__(self, cfg: Config, session: _runtime.LazyRaySession, inline: bool, encoder=None):
        self.cfg, self.session, self.inline = cfg, session, inline
        self.encoder = encoder  # a Future of the job's own encoder, loading since the start (or None)

    def inline_encoder(self):
        return self.encoder.result() if self.encoder else _runtime.inline_encoder(self.cfg)

    def call(self, function, *args):
        """``function(*args)`` here, or in one Ray task (one CPU)."""
        if self.inline:
            return function(*args)
        self.session.ensure()
        return ray.get(ray.remote(function).options(num_cpus=1).remote(*args))

    def each(self, function, items: list, args: tuple, desc: str) -> list:
        """``function(item, *args)`` for every item: here one after another, or one Ray task (one CPU) per item;
        results in completion order."""
        if not items:
            return []
        bar = tqdm(total=len(items), desc=desc, disable=not self.cfg.runtime.progress, dynamic_ncols=True)
        try:
            if self.inline:
                return [_advanced(bar, function(item, *args)) for item in items]
            return self._each_in_tasks(function, items, args, bar, desc)
        finally:
            bar.close()

    def _each_in_tasks(self, function, items: list, args: tuple, bar, desc: str) -> list:
        self.session.ensure()
        remote = ray.remote(function).options(num_cpus=1, max_retries=self.cfg.runtime.max_task_retries)
        results = []
        _runtime.run_tasks({remote.remote(item, *args): item for item in items},
                           lambda item, result: results.append(_advanced(bar, result)), f"refresh: {desc}")
        return results


def _advanced(bar, result):
    bar.update(1)
    return result


def _prewarmed_encoder(cfg: Config):
    """On a root with a published version, a night usually changes few documents, which this process encodes
    itself: loading torch, sentence-transformers and the model (seconds) starts now, in a thread, while the snapshot
    is read and diffed. Returns the loading's Future, or None on a first version (everything is encoded, on actors
    when many)."""
    if not cfg.runtime.inline_rows or not versions.read_current(cfg.output.root, cfg.output.storage_options):
        return None
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="load-encoder")
    future = pool.submit(_runtime.inline_encoder, cfg)
    pool.shutdown(wait=False)  # the loading goes on; nothing else is ever submitted
    return future


def _rows_per_shard(cfg: Config, session: _runtime.LazyRaySession, total_rows: int) -> int:
    if cfg.runtime.rows_per_shard:
        return cfg.runtime.rows_per_shard
    rate = encoding.estimated_docs_per_s(cfg.model, cfg.runtime.cpus_per_worker, cfg.runtime.gpus_per_worker)
    workers = _runtime.planned_worker_count(cfg.runtime, session, max(1, total_rows))
    return sharding.auto_rows_per_shard(total_rows, workers, rate)


def _timed(timings: dict, step: str, work):
    started = time.perf_counter()
    result = work()
    timings[step] = round(time.perf_counter() - started, 3)
    return result


def _diff(steps: _Steps, p: refreshing.RefreshPlan) -> None:
    """Map the snapshot's shards and the previous version's segments into buckets, then join bucket by bucket."""
    cfg, so = steps.cfg, steps.cfg.output.storage_options
    steps.each(refreshing.map_snapshot_shard, refreshing.pending_map_shards(p, so), (p, cfg), "diff: snapshot")
    steps.each(refreshing.map_segment, refreshing.pending_map_segments(p, so), (p, so), "diff: previous")
    steps.each(refreshing.reduce_bucket, refreshing.pending_buckets(p, so), (p, so), "diff: join")


def _encode(steps: _Steps, p: refreshing.RefreshPlan, segments: list, identity: dict) -> list[dict]:
    """Encode the new segments (committed ones are skipped): here when they hold at most ``runtime.inline_rows``
    rows, else on encoder actors; returns every new segment's commit record, in segment order."""
    cfg, so = steps.cfg, steps.cfg.output.storage_options
    pending = refreshing.pending_segments(p, segments, so)
    bar = tqdm(total=sum(s.rows for s in pending), unit="doc", desc="encode", disable=not cfg.runtime.progress,
               dynamic_ncols=True)
    try:
        if sum(s.rows for s in pending) <= cfg.runtime.inline_rows:
            encoder = steps.inline_encoder() if pending else None
            records = []
            for segment in pending:
                records.append(refreshing.encode_segment(p, segment, cfg, encoder, identity))
                bar.update(records[-1]["rows"])
                bar.set_postfix(**embeddings.api_usage_progress(records), refresh=False)
        else:
            _encode_on_actors(steps, p, pending, identity, bar)
    finally:
        bar.close()
    layout = refreshing.Layout(p.version_root, so)
    return [storage.read_json(layout.record_file(s.name), so) for s in segments]


def _encode_on_actors(steps: _Steps, p: refreshing.RefreshPlan, pending: list, identity: dict, bar) -> None:
    records = []

    def done(segment, record):
        records.append(record)
        bar.update(record["rows"])
        bar.set_postfix(**embeddings.api_usage_progress(records), refresh=False)

    count = steps.session.worker_count(len(pending))
    with _runtime.released(_actors.start_encode_workers(steps.cfg, count)) as workers:
        _runtime.run_on_actors(workers, "encode_segment", pending, (p, steps.cfg, identity), done,
                               work="refresh: encode", speculation=steps.cfg.runtime.speculation)


def _tombstones(steps: _Steps, p: refreshing.RefreshPlan, tombstones: dict[str, list[int]]) -> list[dict]:
    """Tombstone files of the shared segments that lost rows; returns the shared segments' manifest entries (none
    when the encoder changed: nothing is shared then)."""
    so = steps.cfg.output.storage_options
    touched = [s for s in p.segments if s["name"] in tombstones] if p.reuse else []
    steps.each(refreshing.write_segment_tombstones, touched, (p, tombstones, so), "tombstones")
    return refreshing.shared_entries(p, tombstones, so)


def _index(steps: _Steps, vcfg: Config, p: refreshing.RefreshPlan, touched: set[str]) -> dict:
    """Build the version's index: the previous version's trained quantizer and untouched shard indexes are reused
    unless the retrain decision says otherwise; returns the decision with its numbers."""
    plan = indexing.prepare(vcfg)
    decision = refresh_index.retrain_decision(steps.cfg, vcfg, p, plan)
    if decision.get("recall", {}).get("fell"):  # decided by an earlier run's recall check
        refresh_index.drop_seeded_index(vcfg, p)
    elif not decision["retrain"] and decision.get("reusable"):
        refresh_index.seed_index(vcfg, p, plan, touched)
    index.run(vcfg, in_process=steps.inline)
    if decision["retrain"] or "growth" not in decision:
        return decision
    return _retrain_if_recall_fell(steps, vcfg, p, decision)


def _retrain_if_recall_fell(steps: _Steps, vcfg: Config, p: refreshing.RefreshPlan, decision: dict) -> dict:
    """``refresh.retrain: auto``'s second criterion: an index on the reused quantizer whose recall@10 at the stored
    nprobe fell under ``index.target_recall`` is built again on a quantizer trained anew."""
    so = vcfg.output.storage_options
    recall = refresh_index.recall_verdict(indexing.read_index_manifest(p.previous_root, so),
                                          indexing.read_index_manifest(vcfg.output.root, so),
                                          vcfg.index.target_recall)
    if not recall["fell"]:
        return {**decision, "recall": recall}
    log.info("refresh: %s: training the quantizer anew", recall["reason"])
    decision = refresh_index.mark_retrain(vcfg, {**decision, "retrain": True, "recall": recall,
                                                 "reason": recall["reason"]})
    refresh_index.drop_seeded_index(vcfg, p)
    index.run(vcfg, in_process=steps.inline)
    return decision


def _unchanged(cfg: Config, p: refreshing.RefreshPlan, counts: dict, timings: dict, started: float) -> dict:
    """The same snapshot as the published version: nothing is encoded and nothing new is published."""
    storage.remove(p.version_root, cfg.output.storage_options)
    refreshing.finish_build(cfg)
    log.info("refresh: the snapshot equals %s; nothing to publish", p.previous)
    return {"version": None, "previous": p.previous, "published": False, "unchanged": True,
            "counts": {**counts, "encoded": 0, "reused": counts["unchanged"]}, "timings_s": timings,
            "seconds": round(time.perf_counter() - started, 3)}


def _gate_and_publish(cfg: Config, p: refreshing.RefreshPlan, counts: dict, retrain: dict, evaluation: dict | None,
                      changes: dict, timings: dict, started: float) -> dict:
    so = cfg.output.storage_options
    index_manifest = indexing.read_index_manifest(p.version_root, so)
    previous_ndcg = publishing.previous_ndcg(p, so) if evaluation else None
    gates = publishing.gates(cfg, counts, index_manifest["recall"]["recall_at_10"],
                             evaluation["metrics"]["ndcg@10"] if evaluation else None, previous_ndcg,
                             first=p.previous is None)
    passed = all(g["passed"] for g in gates)
    reused = counts["unchanged"] if p.reuse else 0
    record = {"complete": True, "published": passed, "counts": {**counts, "encoded": counts["encode_rows"],
                                                                "reused": reused},
              "reencoded_all": bool(p.previous and not p.reuse),
              "retrain": retrain, "gates": gates, "changes": changes, "timings_s": timings,
              "evaluation": evaluation["metrics"] if evaluation else None}
    record["timings_s"]["total"] = round(time.perf_counter() - started, 3)
    publishing.write_refresh_record(p, record, so)
    return _conclude(cfg, p, record)


def _conclude(cfg: Config, p: refreshing.RefreshPlan, record: dict) -> dict:
    """After the version's record is written (by this run, or by a run killed before it published): the diff's
    scratch files go, then CURRENT names the version when its gates passed, else :class:`GateError`."""
    so = cfg.output.storage_options
    refreshing.cleanup_diff(p, so)
    if not record["published"]:
        refreshing.finish_build(cfg)
        failed = "; ".join(f"{g['gate']}: value {g['value']}, threshold {g['threshold']}" for g in record["gates"]
                           if not g["passed"])
        raise publishing.GateError(f"version {p.version} failed its gates ({failed}); CURRENT still names "
                                   f"{p.previous or 'nothing'}; the version stays on disk for inspection")
    versions.publish(cfg.output.root, p.version, so, previous=p.previous)
    refreshing.finish_build(cfg)  # after the publish: a run killed before it resumes this version
    record["deleted_versions"] = publishing.apply_retention(cfg)
    return {**record, "version": p.version, "previous": p.previous}


def format_summary(r: dict) -> str:
    c = r["counts"]
    if r.get("unchanged"):
        return (f"refresh: the snapshot equals the published version {r['previous']} ({c['documents']} documents); "
                f"nothing encoded, nothing published")
    return (f"refresh: published {r['version']} (previous {r['previous'] or 'none'}): {c['documents']} documents, "
            f"{c['unchanged']} unchanged, {c['changed']} changed, {c['added']} added, {c['deleted']} deleted, "
            f"{c['rejected']} rejected; encoded {c['encoded']}, reused {c['reused']}; "
            f"index {'trained' if r['retrain']['retrain'] else 'not retrained'} ({r['retrain']['reason']}); "
            f"in {r['timings_s']['total']} s")


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser(__doc__, "python -m jobs.refresh", KEYS)
    p.add_argument("--rollback", metavar="VERSION", help="point CURRENT at this earlier complete version and exit")
    args = p.parse_args(argv)
    cfg = _cli.config_from_args(args)
    if args.rollback:
        return _cli.run_guarded(cfg, lambda: versions.rollback(cfg.output.root, args.rollback,
                                                               cfg.output.storage_options),
                                lambda current: print(f"refresh: CURRENT now names {current['version']}"))
    return _cli.run_guarded(cfg, lambda: run(cfg), lambda record: print(format_summary(record)))


if __name__ == "__main__":
    sys.exit(main())
