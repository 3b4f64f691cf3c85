"""Nightly re-indexing: build a new version from tonight's snapshot and publish it behind gates.

Reads:  the snapshot (corpus.path) and the version <output.root>/CURRENT names (the previous one).
Writes: <output.root>/versions/<version>/ (embeddings/, index/, eval/ when eval queries are set, changes/
        upserts.parquet and deletes.parquet, refresh.json last), then <output.root>/CURRENT when every gate passes.
Only changed and added documents are encoded; unchanged ones keep their vectors, shared with the earlier version.
Whatever moves CURRENT (a refresh, --rollback) holds the root's refresh lease, renewed in the background
(publish.lease_renew) and taken over only once expired (publish.lease_expiry).
Then every serving sink (serve.sinks) is brought to CURRENT, as python -m jobs.sync does (also after --rollback).
Exit status: 0 published (or nothing changed) and every sink in step; 1 a gate failed, the lease is held or was
lost, CURRENT moved under the run, or another error; 3 published, but a sink failed (named; rerun python -m
jobs.sync); 128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM), committed work kept.
--list prints every version with its state; --rollback V points CURRENT back at V.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from jobs import _cli, _metrics, _progress, evaluate, index, sync, version_admin
from jobs.ray import actors, cluster, dispatch
from retrieval_core.config import Config
from retrieval_core.encode import embeddings, encoding
from retrieval_core.index import indexing
from retrieval_core.io import corpus, leases, sharding, storage, versions
from retrieval_core.io.folder import Folder
from retrieval_core.refresh import compaction, publishing, refreshing
from retrieval_core.refresh import index_reuse as refresh_index

log = logging.getLogger("jobs.refresh")
KEYS = (
    "corpus.path",
    "output.root",
    "refresh.retrain",
    "refresh.retrain_drift",
    "publish.min_recall",
    "publish.max_reject_fraction",
    "publish.max_deleted_fraction",
    "publish.max_added_fraction",
    "publish.max_ndcg_drop",
    "publish.keep_versions",
    "publish.keep_failed",
    "publish.lease_expiry",
    "publish.lease_renew",
    "runtime.progress",
    "eval.queries_path",
    "serve.sinks",
)
PLAIN_OUTPUT = ("embeddings/_manifest.json", "embeddings/_plan.json", "index/manifest.json")


def run(cfg: Config, adopt: bool = False, wait: bool = False) -> dict:
    """Refresh holding the root's refresh lease; returns the version's record (``refresh.json``), or a record saying
    that nothing changed. Raises :class:`publishing.GateError` (after writing the record) when a gate fails,
    :class:`leases.LeaseLost` when another process took the lease over, :class:`versions.CurrentMovedError` when
    CURRENT moved under the run. ``adopt``: see :func:`check_adoption`."""
    if cfg.index.vectors != "float32":
        raise ValueError(
            f"index.vectors = {cfg.index.vectors!r}: the nightly refresh builds float32 indexes only for now (its "
            f"shared shards have no stored vectors to rescore with); set index.vectors = float32, or rebuild with "
            f"jobs.encode and jobs.index"
        )
    check_adoption(cfg, adopt)
    with version_admin.lease_of(cfg, "jobs.refresh", wait) as lease:
        return _refresh(cfg, lease, adopt)


def check_adoption(cfg: Config, adopt: bool) -> None:
    """A root without CURRENT that holds the plain jobs' output is refused unless ``adopt``: versions published
    beside that output would silently replace it for every reader of the root."""
    root, so = cfg.output.root, cfg.output.storage_options
    if versions.read_current(Folder(root, so)) is not None:
        return
    found = [f for f in PLAIN_OUTPUT if storage.exists(storage.join(root, f), so)]
    if found and not adopt:
        raise versions.VersionError(
            f"'{root}' holds the output of the plain jobs ({', '.join(found)}) and no CURRENT: a refresh there would "
            f"publish versions that every reader of the root then reads instead. Either give the refresh a root of "
            f"its own (--set output.root=<new root>), or run again with --adopt to make that output the first "
            f"version (its vectors and shard indexes are reused where the snapshot did not change)"
        )
    if adopt and not found:
        raise versions.VersionError(
            f"--adopt: '{root}' holds no plain job output to adopt (looked for "
            f"{', '.join(PLAIN_OUTPUT)}); run without --adopt"
        )


def _refresh(cfg: Config, lease: leases.Lease, adopt: bool) -> dict:
    started = time.perf_counter()
    so = cfg.output.storage_options
    encoder = _prewarmed_encoder(cfg)
    files = corpus.inspect_corpus(cfg.corpus)
    identity = encoding.encoder_identity(cfg.model)
    rows = sum(f.num_rows for f in files)
    with cluster.LazyRaySession(cfg.runtime) as session:  # Ray starts only for a step too big for this process
        steps = _Steps(
            cfg,
            session,
            inline=dispatch.runs_here(rows, cfg.refresh.inline_snapshot_rows),
            lease=lease,
            encoder=encoder,
        )
        lease.check("planning the version")
        p = refreshing.plan(cfg, files, identity, _rows_per_shard(cfg, session, rows), adopt)
        log.info(
            "refresh: building %s against %s (%d snapshot rows, %d previous segments; lease generation %d)",
            p.version,
            p.previous or ("the adopted output" if p.adopted else "nothing (first version)"),
            p.snapshot_rows,
            len(p.segments),
            lease.generation,
        )
        if versions.is_complete(
            Folder(cfg.output.root, so), p.version
        ):  # a run killed after finishing it, before publishing
            record = storage.read_json(storage.join(p.version_root, versions.REFRESH_RECORD), so)
            return _conclude(cfg, p, record, lease)
        if p.previous_root and not p.reuse:
            log.warning("refresh: the encoder fingerprint differs from %s's: every document is encoded again", p.source)
        steps.timed("diff", lambda: _diff(steps, p))
        diff = refreshing.diff_counts(p, so)
        counts = diff["counts"]
        if p.previous and p.reuse and not (counts["changed"] or counts["added"] or counts["deleted"]):
            lease.check("removing the unneeded version")
            return _unchanged(cfg, p, counts, steps.timings, started)
        segments = refreshing.plan_segments(p, diff["encode_rows"])
        records, encoded_now = steps.timed("encode", lambda: _encode(steps, p, segments, identity))
        shared = steps.timed("tombstones", lambda: _tombstones(steps, p, diff))
        dim = (
            records[0]["dim"]
            if records
            else embeddings.read_embeddings_manifest(Folder(p.previous_version_root, so))["dim"]
        )
        lease.check("writing the version's embeddings manifest")
        refreshing.write_version_manifest(cfg, p, identity, dim, counts, shared, records, time.perf_counter() - started)
        vcfg = refreshing.version_config(cfg, p.version_root)
        retrain = steps.timed("index", lambda: _index(steps, vcfg, p))
        evaluation = steps.timed("evaluate", lambda: evaluate.run(vcfg) if cfg.eval.queries_path else None)
        changes = steps.timed("changes", lambda: steps.call(refreshing.write_changes, p, records, so))
    counts = {**counts, "encoded_this_run": encoded_now}
    return _gate_and_publish(cfg, p, counts, retrain, evaluation, changes, steps.timings, started, lease)


class _Steps:
    """Runs the refresh's bookkeeping steps (diff, tombstones, index, changes) in this process when the snapshot is
    small (``refresh.inline_snapshot_rows``: starting Ray would cost more than the work), else as Ray tasks."""

    def __init__(self, cfg: Config, session: cluster.LazyRaySession, inline: bool, lease: leases.Lease, encoder=None):
        self.cfg, self.session, self.inline, self.lease = cfg, session, inline, lease
        self.encoder = encoder  # a Future of the job's own encoder, loading since the start (or None)
        self.timings: dict = {}

    def timed(self, step: str, work):
        """``work()`` after the lease's fence check, its seconds kept in ``timings[step]``."""
        self.lease.check(step)
        started = time.perf_counter()
        result = work()
        self.timings[step] = round(time.perf_counter() - started, 3)
        return result

    def bar(self, total: int, desc: str, unit: str = "it"):
        return _progress.bar(self.cfg.runtime, total, f"refresh: {desc}", unit)

    def advanced(self, bar, result, n: int = 1):
        """One item done: the bar moves, and a lost lease stops the run here (no I/O)."""
        bar.update(n)
        self.lease.ensure()
        return result

    def inline_encoder(self):
        return self.encoder.result() if self.encoder else cluster.inline_encoder(self.cfg)

    def call(self, function, *args):
        """``function(*args)`` here, or in one Ray task (one CPU)."""
        if self.inline:
            return function(*args)
        self.session.ensure()
        return dispatch.call_in_task(function, *args)

    def each(self, function, items: list, args: tuple, desc: str, unit: str) -> list:
        """``function(item, *args)`` for every item: here one after another, or one Ray task (one CPU) per item;
        results in completion order."""
        if not items:
            return []
        bar = self.bar(len(items), desc, unit)
        try:
            if self.inline:
                return [self.advanced(bar, function(item, *args)) for item in items]
            return self._each_in_tasks(function, items, args, bar, desc)
        finally:
            bar.close()

    def _each_in_tasks(self, function, items: list, args: tuple, bar, desc: str) -> list:
        self.session.ensure()
        results = []
        dispatch.each_in_tasks(
            function,
            items,
            args,
            lambda item, result: results.append(self.advanced(bar, result)),
            f"refresh: {desc}",
            self.cfg.runtime.max_task_retries,
        )
        return results


def _prewarmed_encoder(cfg: Config):
    """On a root with a published version, a night usually changes few documents, which this process encodes
    itself: loading torch, sentence-transformers and the model (seconds) starts now, in a thread, while the snapshot
    is read and diffed. Returns the loading's Future, or None on a first version (everything is encoded, on actors
    when many)."""
    if not dispatch.runs_here(1, cfg.runtime.inline_rows) or not versions.read_current(Folder.output(cfg.output)):
        return None
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="load-encoder")
    future = pool.submit(cluster.inline_encoder, cfg)
    pool.shutdown(wait=False)  # the loading goes on; nothing else is ever submitted
    return future


def _rows_per_shard(cfg: Config, session: cluster.LazyRaySession, total_rows: int) -> int:
    if cfg.runtime.rows_per_shard:
        return cfg.runtime.rows_per_shard
    rate = encoding.estimated_docs_per_s(cfg.model, cfg.runtime.cpus_per_worker, cfg.runtime.gpus_per_worker)
    workers = cluster.planned_worker_count(cfg.runtime, session, max(1, total_rows))
    return sharding.auto_rows_per_shard(total_rows, workers, rate, embeddings.vector_bytes_per_row(cfg))


def _diff(steps: _Steps, p: refreshing.RefreshPlan) -> None:
    """Map the snapshot's shards and the previous version's segments into buckets, then join bucket by bucket."""
    cfg, so = steps.cfg, steps.cfg.output.storage_options
    steps.each(refreshing.map_snapshot_shard, refreshing.pending_map_shards(p, so), (p, cfg), "diff: snapshot", "shard")
    steps.each(refreshing.map_segment, refreshing.pending_map_segments(p, so), (p, so), "diff: previous", "segment")
    steps.each(refreshing.reduce_bucket, refreshing.pending_buckets(p, so), (p, so), "diff: join", "bucket")


def _encode(steps: _Steps, p: refreshing.RefreshPlan, segments: list, identity: dict) -> tuple[list[dict], int]:
    """Encode the new segments (committed ones are skipped): here when they hold at most ``runtime.inline_rows``
    rows, else on encoder actors; returns every new segment's commit record, in segment order, and the rows this
    run encoded (the rest were committed by an earlier, stopped run)."""
    cfg, so = steps.cfg, steps.cfg.output.storage_options
    pending = refreshing.pending_segments(p, segments, so)
    bar = steps.bar(sum(s.rows for s in pending), "encode", "doc")
    try:
        if dispatch.runs_here(sum(s.rows for s in pending), cfg.runtime.inline_rows):
            records: list[dict] = []
            encoder = steps.inline_encoder() if pending else None
            for segment in pending:
                assert encoder is not None  # loaded above when any segment is pending
                records.append(refreshing.encode_segment(p, segment, cfg, encoder, identity))
                steps.advanced(bar, None, records[-1]["rows"])
                bar.set_postfix(**embeddings.api_usage_progress(records), refresh=False)
        else:
            _encode_on_actors(steps, p, pending, identity, bar)
    finally:
        bar.close()
    layout = embeddings.layout_at(p.version_root, so)
    return [storage.read_json(layout.record_file(s.name), so) for s in segments], sum(s.rows for s in pending)


def _encode_on_actors(steps: _Steps, p: refreshing.RefreshPlan, pending: list, identity: dict, bar) -> None:
    records = []

    def done(segment, record):
        records.append(record)
        steps.advanced(bar, None, record["rows"])
        bar.set_postfix(**embeddings.api_usage_progress(records), refresh=False)

    count = steps.session.worker_count(len(pending))
    with dispatch.released(actors.start_encode_workers(steps.cfg, count)) as workers:
        dispatch.run_on_actors(
            workers,
            "encode_segment",
            pending,
            (p, steps.cfg, identity),
            done,
            work="refresh: encode",
            speculation=steps.cfg.runtime.speculation,
        )


def _tombstones(steps: _Steps, p: refreshing.RefreshPlan, diff: dict) -> list[dict]:
    """Tombstone files of the shared segments that lost rows, and the compaction of the deadest of them
    (``refresh.compact_dead_fraction``, ``refresh.compact_budget``); returns the manifest entries of the segments the
    version keeps from the previous one, compacted or shared (none when the encoder changed: nothing is then)."""
    so, rf = steps.cfg.output.storage_options, steps.cfg.refresh
    tombstones = diff["tombstones"]
    plan = compaction.compaction_plan(p, diff["lost"], rf.compact_dead_fraction, rf.compact_budget)
    gone = {segment["name"] for compaction in plan for segment in compaction.segments}
    touched = [s for s in p.segments if s["name"] in tombstones and s["name"] not in gone] if p.reuse else []
    steps.each(refreshing.write_segment_tombstones, touched, (p, tombstones, so), "tombstones", "segment")
    compacted = steps.each(compaction.compact, plan, (p, tombstones, so), "compacting", "segment")
    return refreshing.shared_entries(p, tombstones, so, compacted, gone)


def _index(steps: _Steps, vcfg: Config, p: refreshing.RefreshPlan) -> dict:
    """Build the version's index: the previous version's trained quantizer and the shard indexes of every segment
    the version shares with it are reused (their dead rows left out by id at the merge) unless the retrain decision
    says otherwise, so that only the new and compacted segments are added; returns the decision with its numbers."""
    plan = indexing.prepare(vcfg)
    decision = refresh_index.retrain_decision(steps.cfg, vcfg, p, plan)
    if decision.get("recall", {}).get("fell"):  # decided by an earlier run's recall check
        refresh_index.drop_seeded_index(vcfg, p)
    elif not decision["retrain"] and decision.get("reusable"):
        refresh_index.seed_index(vcfg, p, plan)
    index.run(vcfg, in_process=steps.inline)
    if decision["retrain"] or "growth" not in decision:
        return decision
    return _retrain_if_recall_fell(steps, vcfg, p, decision)


def _retrain_if_recall_fell(steps: _Steps, vcfg: Config, p: refreshing.RefreshPlan, decision: dict) -> dict:
    """``refresh.retrain: auto``'s second criterion: an index on the reused quantizer whose recall@10 at the stored
    nprobe fell under ``index.target_recall`` is built again on a quantizer trained anew."""
    so = vcfg.output.storage_options
    recall = refresh_index.recall_verdict(
        indexing.read_index_manifest(Folder(p.previous_version_root, so)),
        indexing.read_index_manifest(Folder(vcfg.output.root, so)),
        vcfg.index.target_recall,
    )
    if not recall["fell"]:
        return {**decision, "recall": recall}
    log.info("refresh: %s: training the quantizer anew", recall["reason"])
    decision = refresh_index.mark_retrain(
        vcfg, {**decision, "retrain": True, "recall": recall, "reason": recall["reason"]}
    )
    refresh_index.drop_seeded_index(vcfg, p)
    index.run(vcfg, in_process=steps.inline)
    return decision


def _unchanged(cfg: Config, p: refreshing.RefreshPlan, counts: dict, timings: dict, started: float) -> dict:
    """The same snapshot as the published version: nothing is encoded and nothing new is published."""
    storage.remove(p.version_root, cfg.output.storage_options)
    refreshing.finish_build(cfg)
    log.info("refresh: the snapshot equals %s; nothing to publish", p.previous)
    return {
        "version": None,
        "previous": p.previous,
        "published": False,
        "unchanged": True,
        "counts": {**counts, "encoded": 0, "reused": counts["unchanged"]},
        "timings_s": timings,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _gate_and_publish(
    cfg: Config,
    p: refreshing.RefreshPlan,
    counts: dict,
    retrain: dict,
    evaluation: dict | None,
    changes: dict,
    timings: dict,
    started: float,
    lease: leases.Lease,
) -> dict:
    so = cfg.output.storage_options
    index_manifest = indexing.read_index_manifest(Folder(p.version_root, so))
    previous_ndcg = publishing.previous_ndcg(p, so) if evaluation else None
    gates = publishing.gates(
        cfg,
        counts,
        index_manifest["recall"]["recall_at_10"],
        evaluation["metrics"]["ndcg@10"] if evaluation else None,
        previous_ndcg,
        first=p.previous_root is None,
    )
    passed = all(g["passed"] for g in gates)
    reused = counts["unchanged"] if p.reuse else 0
    record: dict[str, Any] = {
        "complete": True,
        "gates_passed": passed,
        "published": False,
        "counts": {**counts, "encoded": counts["encode_rows"], "reused": reused},
        "adopted": p.adopted,
        "reencoded_all": bool(p.previous_root and not p.reuse),
        "retrain": retrain,
        "gates": gates,
        "changes": changes,
        "timings_s": timings,
        "evaluation": evaluation["metrics"] if evaluation else None,
    }
    record["timings_s"]["total"] = round(time.perf_counter() - started, 3)
    lease.check("writing refresh.json")
    publishing.write_refresh_record(p, record, so)
    return _conclude(cfg, p, record, lease)


def _conclude(cfg: Config, p: refreshing.RefreshPlan, record: dict, lease: leases.Lease) -> dict:
    """After the version's record is written (by this run, or by a run killed before it published): the diff's
    scratch files go, then CURRENT moves from the version this run started from to this one when its gates passed
    (compare-and-set, behind the lease's fence), else :class:`GateError`. Retention runs either way."""
    so = cfg.output.storage_options
    refreshing.cleanup_diff(p, so)
    passed = record.get("gates_passed", record.get("published"))
    if not passed:
        publishing.apply_retention(cfg, lease)  # older failed versions kept up to publish.keep_failed; this one
        lease.check("forgetting the build")  # is still the pending build, so it stays for inspection
        refreshing.finish_build(cfg)
        failed = "; ".join(versions.gate_text(g) for g in versions.failed_gates(record))
        raise publishing.GateError(
            f"version {p.version} failed its gates ({failed}); CURRENT still names "
            f"{p.previous or 'nothing'}; the version stays on disk for inspection "
            f"(python -m jobs.refresh --list)"
        )
    try:
        current = versions.publish(
            Folder(cfg.output.root, so), p.version, expected=p.previous, by={"action": "refresh"}, lease=lease
        )
    except versions.CurrentMovedError as exc:
        lease.check("marking the version abandoned")
        versions.mark_abandoned(Folder(cfg.output.root, so), p.version, str(exc))
        refreshing.finish_build(cfg)
        raise
    refreshing.finish_build(cfg)  # after the publish: a run killed before it resumes this version
    record = {**record, "published": True, "published_at": current["published_at"]}
    record["deleted_versions"] = publishing.apply_retention(cfg, lease)
    return {**record, "version": p.version, "previous": p.previous}


def format_summary(r: dict) -> str:
    c = r["counts"]
    if r.get("unchanged"):
        return (
            f"refresh: the snapshot equals the published version {r['previous']} ({c['documents']:,} documents);"
            f" nothing encoded, nothing published"
        )
    previous = r["previous"] or ("the adopted output" if r.get("adopted") else "none")
    return (
        f"refresh: published {r['version']} (previous {previous}): {c['documents']:,} documents, "
        f"{c['unchanged']:,} unchanged, {c['changed']:,} changed, {c['added']:,} added, {c['deleted']:,} "
        f"deleted, {c['rejected']:,} rejected; encoded this run {c.get('encoded_this_run', c['encoded']):,}, "
        f"in version {c['encoded']:,}; reused {c['reused']:,}; "
        f"index {'trained' if r['retrain']['retrain'] else 'not retrained'} ({r['retrain']['reason']}); "
        f"in {r['timings_s']['total']} s"
    )


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser(__doc__, "python -m jobs.refresh", KEYS)
    p.add_argument(
        "--rollback", metavar="VERSION", help="point CURRENT at this earlier version (under the refresh lease) and exit"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --rollback: publish a version that failed a gate or was abandoned (the warning names the gate)",
    )
    p.add_argument(
        "--wait", action="store_true", help="queue behind the refresh or rollback holding the lease instead of refusing"
    )
    p.add_argument("--list", action="store_true", help="print every version with its state, counts and date, and exit")
    p.add_argument("--json", action="store_true", help="with --list: machine-readable JSON")
    p.add_argument(
        "--adopt",
        action="store_true",
        help="on a root holding the plain jobs' output and no CURRENT: make that output the first version",
    )
    args = p.parse_args(argv)
    cfg = _cli.config_from_args(args)
    if args.list:
        return _cli.run_guarded(cfg, lambda: version_admin.list_versions(cfg, args.json), print)
    outcome: dict = {}
    started = time.perf_counter()
    job = "jobs.refresh"

    def done(record: dict, summary: str) -> None:
        _print(summary, record)
        status = "sink failed" if outcome.get("failed") else "ok"
        _metrics.report(cfg, job, status, time.perf_counter() - started, *_metrics.refresh_samples(record))

    def failed(exc: BaseException) -> None:
        summary, samples = failed_samples(cfg, exc)
        _metrics.report(cfg, job, "failed", time.perf_counter() - started, summary, samples)

    if args.rollback:
        code = _cli.run_guarded(
            cfg,
            lambda: _then_sync(cfg, version_admin.rollback(cfg, args.rollback, args.wait, args.force), outcome),
            lambda current: done(current, version_admin.rollback_summary(current)),
            failed=failed,
        )
    else:
        code = _cli.run_guarded(
            cfg,
            lambda: _then_sync(cfg, run(cfg, args.adopt, args.wait), outcome),
            lambda record: done(record, format_summary(record)),
            committed=lambda: refreshing.committed_work(cfg.output.root, cfg.output.storage_options),
            failed=failed,
        )
    return sync.SINK_FAILED if code == 0 and outcome.get("failed") else code


def failed_samples(cfg: Config, exc: BaseException) -> tuple[dict, list]:
    """A failed refresh's summary and metrics: nothing published, and after a failed gate the version's counts and
    gates (read back from its ``refresh.json``)."""
    summary: dict = {"error": _metrics.error_line(exc)}
    samples: list[_metrics.Sample] = [("retrieval_refresh_published", {}, 0.0)]
    if isinstance(exc, publishing.GateError):
        folder = Folder.output(cfg.output)
        newest = versions.list_versions(folder)[-1:]
        record = versions.read_refresh_record(folder, newest[0]) if newest else None
        if record and not record.get("published"):
            found, samples = _metrics.refresh_samples({**record, "published": False})
            summary = {**found, **summary}
    return summary, samples


def _then_sync(cfg: Config, record: dict, outcome: dict) -> dict:
    """After a published version, an unchanged night or a rollback: every serving sink brought to CURRENT (a
    sink's failure leaves the version published; ``outcome['failed']`` names the failed sinks)."""
    if not cfg.serve.sinks:
        return record
    result = sync.run(cfg)
    outcome["failed"] = sync.failed(result)
    return {**record, "sinks": result}


def _print(summary: str, record: dict) -> None:
    print(summary)
    if record.get("sinks"):
        print(sync.describe(record["sinks"]))


if __name__ == "__main__":
    sys.exit(main())
