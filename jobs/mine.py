"""Mine hard negatives for query/positive pairs.

Reads:  <output.root>/index/ and embeddings/, and mine.pairs_path (query/positive pairs) or mine.queries_path +
        mine.qrels_path (BEIR).
Writes: <output.root>/negatives/: part-*.parquet, rejects.parquet, exports/ (triplet, n-tuple, flag-jsonl),
        report.json and report.png, _manifest.json last.
The input is planned in hash buckets of queries by a shuffle (retrieval_core.mine.shuffle): each input file is read
once and its rows sent to their buckets, the positives are joined with the corpus's doc ids by doc bucket, and a
task per bucket merges its queries and writes its part inputs. The parts are mined by the mine workers in two halves
around a join of their candidates (retrieval_core.mine.texts): a worker encodes a part's queries with the index's
encoder, searches (mine.mode: replicated or sharded) and requests its candidate rows; one call per text group looks
those rows up once (doc ids, text hashes, and texts for a cross-encoder); a worker then selects the part's negatives
per query with the false-negative filters (on a cross-encoder's scores with mine.cross_encoder), writes the requests
of its exports' documents (or, with a cross-encoder, its exports) and commits. The exports' texts are then joined
the same way and each part's share of the exports is written from them, by the same workers (by Ray tasks for
parts committed by an earlier run); a Ray task per format concatenates the shares into the export. The driver
plans, counts and merges the report statistics one part at a time. A rerun skips searched parts, committed parts,
text groups and part exports.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import cast

from jobs import _cli, _progress
from jobs.ray import actors, cluster, dispatch, query_encoding
from retrieval_core.config import Config
from retrieval_core.encode.embeddings import read_embeddings_manifest
from retrieval_core.index import indexing, lookup
from retrieval_core.io import storage
from retrieval_core.io.folder import Folder
from retrieval_core.mine import mining, negatives
from retrieval_core.mine import parts as mine_parts
from retrieval_core.mine import plan as mine_plan
from retrieval_core.mine import report as mine_report
from retrieval_core.mine import shuffle as mine_shuffle
from retrieval_core.mine import texts as mine_texts

log = logging.getLogger("jobs.mine")
# shown with their defaults by --help
KEYS = (
    "output.root",
    "mine.pairs_path",
    "mine.queries_path",
    "mine.qrels_path",
    "mine.num_negatives",
    "mine.relative_margin",
    "mine.absolute_margin",
    "mine.range_min",
    "mine.range_max",
    "mine.sampling",
    "mine.mode",
    "mine.formats",
    "mine.queries_per_part",
    "mine.cross_encoder",
)


def run(cfg: Config) -> dict:
    """Run the mining stage; returns a summary dict."""
    mine_work = mining.work_of(cfg)
    cfg = cluster.read_version(cfg)
    started = time.perf_counter()
    index_manifest = indexing.read_index_manifest(Folder.output(cfg.output))
    if index_manifest["metric"] != "ip":
        raise ValueError(
            f"mining scores by similarity and needs an inner-product index; the index under "
            f"'{cfg.output.root}' uses metric {index_manifest['metric']}: rebuild with index.metric=ip"
        )
    query_encoding.check_encoder(cfg, index_manifest)
    emb = read_embeddings_manifest(Folder.output(cfg.output))
    plan = mine_plan.input_plan(cfg.mine)
    identity = mining.mining_identity(cfg, index_manifest, plan)
    mining.prepare(mine_work, identity)
    layout = mining.layout_of(cfg)
    if storage.exists(layout.file("_manifest.json"), layout.storage_options):
        mining.remove_part_exports(mine_work)  # left by a run killed after its manifest
        return _summary(mining.read_mine_manifest(Folder.output(cfg.output)), True)
    with cluster.LazyRaySession(cfg.runtime) as session:
        buckets, shuffle = _plan_buckets(cfg, session, emb, plan)
        counts = {k: sum(b[k] for b in buckets) for k in ("input_queries", "kept", "rejected")}
        if not counts["kept"]:
            examples = [d for b in buckets for d in b["rejected_examples"]][:3]
            raise ValueError(
                f"none of the {counts['input_queries']} queries has a positive in the corpus "
                f"(e.g. {examples}): check mine.positive_column and the corpus ids"
            )
        range_max, depth = _search_window(cfg, max(b["max_positives"] for b in buckets), index_manifest["ntotal"])
        parts = mine_plan.part_inputs(buckets, cfg.mine.queries_per_part)
        mining.record_parts(mine_work, len(parts))
        pending = [parts[i] for i in mining.pending_parts(mine_work, len(parts))]
        timings, text_join = {"plan": time.perf_counter() - started}, {}
        if pending:  # workers on Ray join the texts once their parts are committed
            _mine_pending(
                cfg,
                session,
                emb,
                index_manifest,
                pending,
                (range_max, depth),
                timings,
                lambda workers, run: text_join.update(_join_texts(cfg, session, len(parts), workers, run)),
            )
        if not text_join:  # every part was committed by an earlier run
            text_join = _join_texts(cfg, session, len(parts))
        timings["texts"] = text_join["seconds"]
        timings["parts"] = time.perf_counter() - started - timings["plan"] - timings["texts"]
        combining = time.perf_counter()
        records, stats = mining.part_records(mine_work, len(parts))
        rejected = mine_plan.write_rejects(mine_work, len(buckets))
        extra = _exports_and_report(cfg, session, records, stats, counts["input_queries"], rejected)
        timings["exports_and_report"] = time.perf_counter() - combining
    manifest = mining.write_manifest(
        mine_work,
        identity,
        records,
        counts["input_queries"],
        rejected,
        {
            **extra,
            "range_max": range_max,
            "search_depth": depth,
            "input_buckets": len(buckets),
            "input_shuffle": shuffle,
            "text_join": text_join,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    mining.remove_part_exports(mine_work)
    return _summary(manifest, False)


def _plan_buckets(cfg: Config, session, emb: dict, plan: dict) -> tuple[list[dict], dict | None]:
    """Plan the input's buckets not planned yet: an input of one bucket and at most
    ``mine.plan.INLINE_INPUT_BYTES`` in this process (``runtime.inline_rows`` > 0), where starting Ray would cost
    more; else by the shuffle of ``mine.shuffle`` on Ray tasks, in three waves (split the input files and partition
    the corpus's doc ids, join the positives by doc bucket, plan the query buckets), skipping committed steps.
    Returns (every bucket's record, the shuffle's doc buckets and shard groups, None when there was none)."""
    mine_work = mining.work_of(cfg)
    buckets = plan["buckets"]
    records: dict[int, dict | None] = {b: mine_plan.bucket_record(mine_work, b) for b in range(buckets)}
    todo = [b for b, record in records.items() if record is None]
    here = (
        buckets == 1
        and dispatch.runs_here(1, cfg.runtime.inline_rows)
        and dispatch.runs_here(plan["bytes"], mine_plan.INLINE_INPUT_BYTES)
    )
    shuffled = None
    if here and todo:
        records[0] = mine_plan.plan_bucket(mine_work, 0, emb=emb)
    elif todo:
        session.ensure()
        shuffle = mine_shuffle.shuffle_plan(buckets, emb)
        waves = [
            [("split", i) for i in mine_shuffle.inputs_to_split(mine_work)]
            + [("partition", g) for g in mine_shuffle.groups_to_partition(mine_work, shuffle)],
            [("join", d) for d in mine_shuffle.doc_buckets_to_join(mine_work, shuffle)],
            [("plan", b) for b in todo],
        ]
        records.update(actors.shuffle_input(cfg, shuffle, emb, waves))
        shuffled = {"doc_buckets": shuffle["doc_buckets"], "shard_groups": len(shuffle["groups"])}
    mine_shuffle.remove_scratch(mine_work)
    return [cast(dict, records[b]) for b in range(buckets)], shuffled  # every bucket is planned by now


def _search_window(cfg: Config, max_positives: int, ntotal: int) -> tuple[int, int]:
    """(range_max, search depth) with sentence-transformers' defaults; no cap from the distribution itself."""
    rules = mining.rules_of(cfg.mine)
    range_max = negatives.effective_range_max(rules, max_positives, rescored=bool(cfg.mine.cross_encoder))
    if rules.num_negatives > range_max - rules.range_min:
        raise ValueError(
            f"mine.num_negatives = {rules.num_negatives} does not fit the {range_max - rules.range_min} "
            f"candidates between mine.range_min and mine.range_max = {range_max}"
        )
    return range_max, min(negatives.search_depth(range_max, max_positives), ntotal)


def _mine_pending(
    cfg: Config,
    session,
    emb: dict,
    index_manifest: dict,
    pending: list,
    window: tuple[int, int],
    timings: dict,
    join_texts,
) -> None:
    """Mine the pending parts in two halves around the join of their candidates (:mod:`retrieval_core.mine.texts`):
    search each part, join the candidates' values by text group, then select each part (and, with a cross-encoder,
    rescore it first). In this process when few queries are left (replicated mode, no cross-encoder), else on mine
    workers while the driver only counts. ``window``: (range_max, search depth). The text groups are chosen, with
    at least one per worker, when the run's first parts are mined. ``timings``: ``workers_start`` (Ray, the model
    and the index in each worker) and ``candidates_join``, in seconds. ``join_texts(workers, run)`` is called once
    every part is committed, while the workers (on Ray) are still up."""
    mine_work = mining.work_of(cfg)
    inline = cfg.mine.mode == "replicated" and not cfg.mine.cross_encoder
    if inline and dispatch.runs_here(sum(p.queries for p in pending), cfg.runtime.inline_rows):
        # few queries: starting Ray and worker actors would cost more than mining them here
        text_starts = mining.text_starts(mine_work, lambda: mine_texts.group_starts(emb))
        worker = actors.MineWorker.here(cfg, emb)
        timings["candidates_join"] = _in_halves(cfg, [worker], pending, window, text_starts, [], _here)
        return  # the texts are joined after, as for parts committed by an earlier run
    started = time.perf_counter()
    groups = _worker_groups(cfg, session, index_manifest, len(pending))
    text_starts = mining.text_starts(mine_work, lambda: mine_texts.group_starts(emb, len(groups)))
    with dispatch.released(actors.start_mine_workers(cfg, groups)) as workers:
        dispatch.wait_ready(workers)  # models and indexes loaded
        timings["workers_start"] = time.perf_counter() - started
        peers = workers if cfg.mine.mode == "sharded" else []
        run = _on_actors(cfg.runtime.speculation)
        timings["candidates_join"] = _in_halves(cfg, workers, pending, window, text_starts, peers, run)
        join_texts(workers, run)


def _here(workers, method, items, args, on_done, work):
    """A wave of :func:`_in_halves` in this process, on its one worker."""
    for item in items:
        on_done(item, getattr(workers[0], method)(item, *args))


def _on_actors(speculation: float):
    """A wave of :func:`_in_halves` on the mine workers (see ``dispatch.run_on_actors``)."""

    def run(workers, method, items, args, on_done, work):
        dispatch.run_on_actors(workers, method, items, args, on_done, work=work, speculation=speculation)

    return run


def _in_halves(
    cfg: Config, workers: list, pending: list, window: tuple[int, int], text_starts: list[int], peers: list, run
) -> float:
    """Search every pending part not searched yet, join their candidates (one call per text group), then select
    each part, each wave through ``run(workers, method, items, args, on_done, work)`` on ``MineWorker``s, with a
    progress bar each. Returns the join's seconds."""
    mine_work = mining.work_of(cfg)
    range_max, depth = window
    unsearched = [p for p in pending if not mine_parts.searched(mine_work, p.number)]
    with _bar(cfg, "search", sum(p.queries for p in unsearched), "query") as bar:
        run(
            workers,
            "search_part",
            unsearched,
            (mine_work, depth, text_starts, peers),
            lambda part, _: bar.update(part.queries),
            "searching part",
        )
    started = time.perf_counter()
    asked = [(p.number, mine_parts.search_record(mine_work, p.number)["text_groups"]) for p in pending]
    groups = mine_texts.groups_to_join(mine_parts.candidates_dir(mine_work), asked, cfg.output.storage_options)
    with _bar(cfg, "join", len(groups), "group") as bar:
        run(
            workers,
            "join_group",
            [{"name": f"text group {g}", "group": g, "parts": parts} for g, parts in groups.items()],
            (mine_work,),
            lambda *_: bar.update(1),
            "joining the candidates of",
        )
    seconds = time.perf_counter() - started
    with _bar(cfg, "select", sum(p.queries for p in pending), "query") as bar:
        run(
            workers,
            "select_part",
            pending,
            (mine_work, range_max, text_starts),
            lambda part, _: bar.update(part.queries),
            "selecting part",
        )
    return seconds


def _bar(cfg: Config, desc: str, total: int, unit: str):
    return _progress.bar(cfg.runtime, total, desc, unit)


def _join_texts(cfg: Config, session, parts: int, workers: list | None = None, run=None) -> dict:
    """Join the texts of the committed parts without exports and write their exports (see
    :mod:`retrieval_core.mine.texts`), the groups first, then the parts: on the mine ``workers`` through ``run``
    (as :func:`_in_halves` does) when they are given, else in this process when those parts hold at most
    ``runtime.inline_rows`` queries, else on Ray tasks. Returns what the manifest records of it."""
    mine_work = mining.work_of(cfg)
    started = time.perf_counter()
    todo = mining.parts_to_export(mine_work, parts)
    directory, so = mining.texts_dir(mine_work), cfg.output.storage_options
    groups = mine_texts.groups_to_join(directory, [(number, asked) for number, _, asked in todo], so)
    bar = _bar(cfg, "exports", len(todo), "part")
    with bar:
        if workers:
            records = []
            run(
                workers,
                "join_texts",
                [{"name": f"text group {g}", "group": g, "parts": numbers} for g, numbers in groups.items()],
                (mine_work,),
                lambda _, record: records.append(record),
                "joining the texts of",
            )
            run(
                workers,
                "export_part",
                [number for number, _, _ in todo],
                (mine_work,),
                lambda *_: bar.update(1),
                "writing the exports of part",
            )
        elif dispatch.runs_here(sum(queries for _, queries, _ in todo), cfg.runtime.inline_rows):
            rows = lookup.RowLookup(Folder(cfg.output.root, so), cfg.corpus.storage_options)
            records = [mining.join_export_texts(mine_work, g, numbers, rows) for g, numbers in groups.items()]
            for number, _, _ in todo:
                mining.export_part(mine_work, number)
                bar.update(1)
        else:
            session.ensure()
            records = actors.join_texts(cfg, groups, [number for number, _, _ in todo], lambda _: bar.update(1))
    return {
        "groups": len(groups),
        "parts": len(todo),
        "seconds": round(time.perf_counter() - started, 3),
        "peak_memory_mb": max((r["peak_memory_mb"] for r in records), default=0.0),
    }


def _worker_groups(cfg: Config, session, index_manifest: dict, pending: int) -> list:
    """Replicated: one merged index per worker, as many workers as the cluster holds (at most one per pending
    part); sharded: the shard indexes spread over the workers (each part searched by all of them)."""
    if cfg.mine.mode == "replicated":
        return [None] * session.worker_count(pending)
    names = [s["name"] for s in index_manifest["shards"]]
    if not names:
        raise ValueError(f"index type {index_manifest['type']} has no shard indexes: use mine.mode = replicated")
    count = min(len(names), session.worker_count(len(names)))
    return [names[g::count] for g in range(count)]


def _exports_and_report(
    cfg: Config, session, records: list, stats: dict | None, input_queries: int, rejected: int
) -> dict:
    mine_work = mining.work_of(cfg)
    layout = mining.layout_of(cfg)
    written = _combine_exports(cfg, session, mine_work, records)
    totals, filtered = mining.count_totals(records)
    counts = {"queries": totals, "filtered": filtered, "input_queries": input_queries, "rejected_positives": rejected}
    summary = mine_report.report(stats, counts)
    storage.write_json_atomic(layout.file("report.json"), summary, layout.storage_options)
    storage.write_bytes_atomic(layout.file("report.png"), mine_report.report_figure(summary), layout.storage_options)
    return {"exports": written, "report": {"json": "report.json", "png": "report.png"}}


def _combine_exports(cfg: Config, session, mine_work, records: list) -> dict:
    """The exports, each format concatenated by a Ray task of its own when this run uses Ray (the bytes go from
    the workers straight to the output, not through this process), else here."""
    if not session.opened:
        return mining.combine_exports(mine_work, records)
    written: dict = {}
    dispatch.each_in_tasks(
        mining.combine_export,
        list(cfg.mine.formats),
        (mine_work, [r["part"] for r in records]),
        lambda fmt, result: written.update({fmt: result}),
        "mine: writing the export",
        cfg.runtime.max_task_retries,
    )
    return {fmt: written[fmt] for fmt in cfg.mine.formats}


def _summary(manifest: dict, reused: bool) -> dict:
    t = manifest["totals"]
    return {
        "input_queries": manifest["input_queries"],
        "written": t["written"],
        "complete": t["complete"],
        "incomplete": t["incomplete"],
        "without_negatives": t["without_negatives"],
        "rejected_positives": manifest["rejected_positives"],
        "filtered": manifest["filtered"],
        "exports": manifest["exports"],
        "seconds": manifest["seconds"],
        "reused": reused,
        "cross_encoder": (manifest["identity"].get("cross_encoder") or {}).get("model", ""),
    }


def format_summary(s: dict) -> str:
    filtered = ", ".join(f"{k} {v}" for k, v in s["filtered"].items() if v and k != "missing")
    state = "already mined" if s["reused"] else f"in {s['seconds']} s"
    rescored = f", rescored by {s['cross_encoder']}" if s.get("cross_encoder") else ""
    return (
        f"mine{rescored}: {s['input_queries']} queries, {s['written']} written ({s['complete']} complete, "
        f"{s['incomplete']} incomplete), {s['without_negatives']} without negatives, "
        f"{s['rejected_positives']} positives not in the corpus; removed: {filtered or 'none'}; {state}"
    )


def main(argv: list[str] | None = None) -> int:
    return _cli.run_job(__doc__, run, format_summary, argv, KEYS)


if __name__ == "__main__":
    sys.exit(main())
