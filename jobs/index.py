"""Build the FAISS index from the embeddings.

Reads:  <output.root>/embeddings/ (its manifest).
Writes: <output.root>/index/: trained.faiss (once), one file per embedding shard (shard-*.lists: its IVF lists, codes
        and global row ids; shard-*.faiss for flat-code types), merged.faiss, and manifest.json last (type, metric,
        recall@10 against exact search, the tuned nprobe / efSearch, timings).
Trains once (in a task), adds each embedding shard (one task per shard, a bounded window of them in flight), merges
IVF lists by ranges (one task per range of index.merge_memory bytes) and writes merged.faiss, which searchers
memory-map.
"""

from __future__ import annotations

import logging
import sys
import time

from jobs import _cli, _progress
from jobs.ray import actors, cluster, dispatch
from retrieval_core.config import Config
from retrieval_core.encode import encoding
from retrieval_core.index import indexing
from retrieval_core.io import storage
from retrieval_core.io.folder import Folder

log = logging.getLogger("jobs.index")
KEYS = (
    "output.root",
    "index.type",
    "index.metric",
    "index.max_memory",
    "index.train_size",
    "index.merge_memory",
    "index.target_recall",
    "index.recall_queries",
    "index.nprobe",
    "index.ef_search",
    "runtime.address",
)  # shown with their defaults by --help


def run(cfg: Config, in_process: bool = False) -> dict:
    """Run the index stage; returns a summary dict (the manifest's main figures). ``in_process``: every step in
    this process, with FAISS on all its cores (a caller's small build, where starting Ray would cost more); so
    is a build of at most ``runtime.inline_rows`` vectors."""
    started = time.perf_counter()
    plan = indexing.prepare(cfg)
    layout = indexing.layout_of(cfg)
    if storage.exists(layout.file("manifest.json"), layout.storage_options):
        return _summary(indexing.read_index_manifest(Folder.output(cfg.output)), reused=True)
    if in_process or dispatch.runs_here(plan.ntotal, cfg.runtime.inline_rows):
        actors.faiss_threads(encoding.cpu_count())
        return _summary(indexing.build_in_process(cfg), reused=False)
    log.info(
        "index %s (%s) over %d vectors of dim %d in %d shard(s)",
        plan.factory,
        plan.metric,
        plan.ntotal,
        plan.dim,
        len(plan.shards),
    )
    with cluster.LazyRaySession(cfg.runtime) as session:
        session.ensure()
        node_cpus = dispatch.largest_node_cpus()
        tasks = actors.index_tasks(cfg, node_cpus)
        plan_ref = dispatch.put(plan)  # once: every task gets a reference
        trained, train_info = dispatch.call(tasks["train"], plan_ref, node_cpus)
        trained_ref, add_s, merge = dispatch.put(trained), 0.0, None
        if plan.mergeable:
            add_s = _add_pending(cfg, plan, tasks["add"], trained_ref)
            merge = _merge_ranges(cfg, plan_ref, tasks) if plan.lists else None
        result = dispatch.call(tasks["finish"], plan_ref, trained_ref, merge, node_cpus)
    return _summary(indexing.complete(plan, train_info, add_s, result, started, in_tasks=True), reused=False)


def _add_pending(cfg: Config, plan, add_task, trained_ref) -> float:
    """One add task per pending shard, a window of them in flight; each gets the plan without its shard list."""
    started = time.perf_counter()
    pending = indexing.pending_shards(plan)
    bar = _progress.bar(cfg.runtime, len(plan.shards), "index", "shard", initial=len(plan.shards) - len(pending))
    task_plan, cpus = dispatch.put(indexing.task_plan(plan)), cfg.runtime.cpus_per_worker
    try:
        dispatch.run_tasks(
            lambda shard: add_task.remote(task_plan, shard, trained_ref, cpus),
            pending,
            lambda shard, record: bar.update(1),
            "index: adding embeddings",
            dispatch.window_size(cpus),
        )
    finally:
        bar.close()
    return time.perf_counter() - started


def _merge_ranges(cfg: Config, plan_ref, tasks: dict):
    """The merge plan (one task), then one task per range of lists; returns the plan for the finish."""
    merge = dispatch.call(tasks["plan_merge"], plan_ref)
    log.info("merging %d vectors in %d range(s) of lists", merge.ntotal, len(merge.ranges))
    merge_ref, cpus = dispatch.put(merge), cfg.runtime.cpus_per_worker
    bar = _progress.bar(cfg.runtime, len(merge.ranges), "merge", "range")
    try:
        dispatch.run_tasks(
            lambda number: tasks["merge_range"].remote(plan_ref, merge_ref, number, cpus),
            range(len(merge.ranges)),
            lambda number, record: bar.update(1),
            "index: merging the lists of range",
            dispatch.window_size(cpus),
        )
    finally:
        bar.close()
    return merge


def _summary(manifest: dict, reused: bool) -> dict:
    recall = manifest["recall"]
    return {
        "type": manifest["type"],
        "metric": manifest["metric"],
        "ntotal": manifest["ntotal"],
        "shards": manifest["shard_count"] if "shard_count" in manifest else len(manifest["shards"]),
        "recall_at_10": recall["recall_at_10"],
        "search_parameters": manifest["search_parameters"],
        "rescore_factor": manifest.get("rescore_factor", 0),
        "seconds": manifest["timings_s"]["total"],
        "reused": reused,
    }


def format_summary(s: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in s["search_parameters"].items())
    recall = "not measured" if s["recall_at_10"] is None else f"{s['recall_at_10']:.4f}"
    state = "already built" if s["reused"] else f"built in {s['seconds']} s"
    rescored = f", rescoring {s['rescore_factor']} x k candidates" if s["rescore_factor"] else ""
    return (
        f"index: {s['type']} ({s['metric']}), {s['ntotal']} vectors from {s['shards']} shard(s), "
        f"recall@10 vs exact {recall}{' with ' + params if params else ''}{rescored}; {state}"
    )


def main(argv: list[str] | None = None) -> int:
    return _cli.run_job(__doc__, run, format_summary, argv, KEYS)


if __name__ == "__main__":
    sys.exit(main())
