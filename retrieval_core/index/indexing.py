"""The index stage without Ray: plan, training sample, per-shard indexes, merge, recall measurement, manifest.

Layout under ``<root>/index/``::

    _plan.json            identity of the build (embeddings, type, metric, training) + shard count
    trained.faiss         the trained, empty index every shard index starts from (stored once)
    shard-00000.lists     IVF types: one embedding shard's inverted lists (codes and global row ids only)
    shard-00000.faiss     flat-code types: one embedding shard's index with its global row ids
    _shards/shard-00000.json  the shard's commit record, written after its index
    _merge/               IVF types, while merging: the list counts and one file per range of lists
    merged.faiss          all shards, in FAISS's format; searchers memory-map it
    _shard_list.parquet   one entry per shard index (name, file, vectors ...), read in batches (io.shard_list)
    manifest.json         written last; its presence means the stage is complete
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from retrieval_core.config import Config, IndexConfig
from retrieval_core.config.rules import gpu_setting, parse_memory
from retrieval_core.encode.embeddings import read_embeddings_manifest, read_shard_vectors
from retrieval_core.index import compact, faiss_index, gpu, ivf_lists, merging, search
from retrieval_core.index.index_files import (
    dead_ids,
    read_index_file,
    shard_index_url,
    tombstone_url,
    without_dead,
    write_index_file,
)
from retrieval_core.io import shard_list, storage
from retrieval_core.io.folder import Folder, StageLayout
from retrieval_core.io.manifest import (
    IncompatibleOutputError,
    claim_stage_dir,
    digest,
    peak_memory_mb,
    read_manifest,
    stamp,
    write_streamed,
)
from retrieval_core.io.schemas import INDEX_SHARD_ENTRY

log = logging.getLogger(__name__)
RECALL_K = 10


@dataclasses.dataclass(frozen=True)
class IndexPlan:
    """What one build makes, and all its steps read: the stage's config section and folders travel in the plan, so no
    step takes the whole config. ``shards`` are the embeddings manifest's shard entries with rows (name, path,
    rows ...), read in batches from its shard table: the plan is small at any number of shards."""

    factory: str
    metric: str
    dim: int
    ntotal: int
    train_size: int
    seed: int
    mergeable: bool
    lists: bool  # shard indexes are inverted lists only, merged by ranges of lists (see ivf_lists)
    shards: Sequence[dict]
    identity: dict
    ix: IndexConfig  # the stage's own config section
    out: StageLayout  # where the stage writes: <root>/index/
    source: Folder  # the output root it reads the embeddings from
    config: dict  # the run's config as the manifest records it (storage options redacted)
    encoders: dict  # the embeddings manifest's encoder and query_encoder identities


def layout_at(root: str, storage_options: dict | None = None) -> StageLayout:
    """The index stage's files under ``root`` (see the module's docstring)."""
    return StageLayout(root, "index", storage_options or {}, manifest_name="manifest.json")


def layout_of(cfg: Config) -> StageLayout:
    return layout_at(cfg.output.root, cfg.output.storage_options)


def embeddings_id(manifest: dict) -> str:
    """A digest of the embeddings a build reads (fingerprint, shards, totals): re-encoded data is a new id."""
    content = {key: manifest[key] for key in ("fingerprint", "totals", "dim")}
    content["shards"] = shard_list.content_id(manifest["shards"])
    return digest(content)


def plan_index(cfg: Config, emb: dict) -> IndexPlan:
    """Resolve ``index.type`` (``auto``), check the metric against the embeddings, fix the training size."""
    ix = cfg.index
    if ix.metric == "ip" and not emb["normalized"]:
        raise ValueError(
            f"index.metric = ip needs unit-length vectors, but the embeddings under "
            f"'{cfg.output.root}' were written with model.normalize = false: set index.metric = l2 "
            f"or re-encode with model.normalize = true"
        )
    dim, ntotal = emb["dim"], emb["totals"]["rows_encoded"]
    factory = ix.type.strip()
    if ix.type == "auto":
        factory = faiss_index.choose_index_type(ntotal, dim, parse_memory(ix.max_memory))
        if ix.vectors != "float32":  # the code asked for, in auto's structure (float32 keeps auto's own code)
            factory = compact.with_vectors(factory, ix.vectors)
    faiss_index.new_index(factory, dim, ix.metric)  # fails early, naming the type, when FAISS cannot build it
    train_size = min(ix.train_size, ntotal) if ix.train_size else faiss_index.default_train_size(factory, dim, ntotal)
    if not faiss_index.needs_training(factory, dim):
        train_size = 0
    lists = faiss_index.ivf_lists(factory)
    if lists and train_size < lists:
        raise faiss_index.IndexTypeError(
            f"index.type = {factory!r} has {lists} IVF lists but only {train_size} training vectors "
            f"({ntotal} encoded, index.train_size = {ix.train_size}): use fewer lists (about sqrt(N), e.g. "
            f"IVF{max(1, int(ntotal**0.5))}), more training vectors, or Flat"
        )
    if ix.on_disk:
        log.warning(
            "index.on_disk is no longer needed and is ignored: searchers memory-map merged.faiss, IVF lists included"
        )
    mergeable = faiss_index.is_mergeable(factory)
    lists = mergeable and ivf_lists.streamable(faiss_index.new_index(factory, dim, ix.metric))
    identity = {
        "embeddings": embeddings_id(emb),
        "fingerprint": emb["fingerprint"],
        "type": factory,
        "metric": ix.metric,
        "train_size": train_size,
        "seed": ix.seed,
        "shard_format": "lists" if lists else "index",
    }
    if ix.vectors != "float32":  # only then: the identities of float32 builds stay what they were
        rescore = compact.rescore_factor(ix.vectors, ix.rescore_factor)
        identity |= {"vectors": ix.vectors, "rescore_factor": rescore}
        if rescore:
            identity["stored_dtype"] = emb.get("embedding_dtype", "float32")
    return IndexPlan(
        factory,
        ix.metric,
        dim,
        ntotal,
        train_size,
        ix.seed,
        mergeable,
        lists,
        shard_list.NonEmpty(emb["shards"]),
        identity,
        ix,
        layout_of(cfg),
        Folder.output(cfg.output),
        cfg.to_dict(),
        {"encoder": emb["encoder"], "query_encoder": emb.get("query_encoder")},
    )


def prepare(cfg: Config) -> IndexPlan:
    """Read the embeddings manifest, plan, and check (or, with ``output.overwrite``, clear) an earlier build."""
    emb = read_embeddings_manifest(Folder.output(cfg.output))
    plan = plan_index(cfg, emb)
    layout = layout_of(cfg)
    claim_stage_dir(
        layout.dir,
        plan.identity,
        {"config": cfg.to_dict(), "shards": len(plan.shards)},
        cfg.output.overwrite,
        layout.storage_options,
    )
    return plan


def sample_positions(ntotal: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct positions in [0, ntotal), sorted, drawn with ``seed`` (the same on every run)."""
    return np.sort(np.random.default_rng(seed).choice(ntotal, size=min(size, ntotal), replace=False))


def read_sample(plan: IndexPlan, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, vectors) at the given positions of the encoded rows (in shard order), streamed shard by shard:
    memory is one shard plus the sample."""
    ids, parts, start = [], [], 0
    for shard in plan.shards:
        stop = start + shard["rows"]
        local = positions[(positions >= start) & (positions < stop)] - start
        if len(local):
            row_ids, vectors = read_shard_vectors(plan.source, shard, plan.dim)
            ids.append(row_ids[local])
            parts.append(vectors[local])
        start = stop
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, plan.dim), np.float32)
    return np.concatenate(ids), np.vstack(parts)


def trained_index(plan: IndexPlan) -> tuple[bytes, dict]:
    """The serialized trained (empty) index: read from ``trained.faiss`` when an earlier run (or a refresh that
    reuses an earlier version's quantizer) put it there. ``trained.json`` beside it records the training points and
    their mean distance to the nearest centroid (the baseline of the refresh's drift check)."""
    layout = plan.out
    url = layout.file("trained.faiss")
    if storage.exists(url, layout.storage_options):
        return storage.read_bytes(url, layout.storage_options), {
            "seconds": 0.0,
            "reused": True,
            **read_training_record(layout),
        }
    started = time.perf_counter()
    _, sample = read_sample(plan, sample_positions(plan.ntotal, plan.train_size, plan.seed))
    index = faiss_index.train(plan.factory, plan.dim, plan.metric, sample, plan.seed, uses_gpus(plan))
    data = faiss_index.serialize(index)
    record = {"points": len(sample), "mean_coarse_distance": faiss_index.coarse_distance(index, sample)}
    storage.write_json_atomic(layout.file("trained.json"), record, layout.storage_options)
    storage.write_bytes_atomic(url, data, layout.storage_options)
    return data, {"seconds": round(time.perf_counter() - started, 3), "reused": False, **record}


def read_training_record(layout: StageLayout) -> dict:
    url = layout.file("trained.json")
    return storage.read_json(url, layout.storage_options) if storage.exists(url, layout.storage_options) else {}


def pending_shards(plan: IndexPlan) -> shard_list.Pending[dict]:
    """The shards without a commit record (one listing of the records folder, not a request per shard; one pass
    over the shard list)."""
    return shard_list.pending(plan.shards, plan.out.committed_set(), _entry_name, _entry_rows)


def _entry_name(entry: dict) -> str:
    return entry["name"]


def _entry_rows(entry: dict) -> int:
    return entry["rows"]


def shard_file_name(plan: IndexPlan, name: str) -> str:
    return f"{name}.lists" if plan.lists else f"{name}.faiss"


def add_shard(plan: IndexPlan, shard: dict, trained: bytes, worker: dict | None = None) -> dict:
    """Add one embedding shard to a copy of the trained index and commit its file (``shard-XXXXX.lists``: the
    lists alone, for IVF types; else ``shard-XXXXX.faiss``); returns the commit record. Memory: the shard's vectors
    plus the trained index and the shard's codes. Takes a plan without its shard list (:func:`task_plan`)."""
    started = time.perf_counter()
    layout = plan.out
    row_ids, vectors = read_shard_vectors(plan.source, shard, plan.dim, plan.identity["fingerprint"])
    store_for_rescoring(plan, shard, row_ids, vectors)
    index = faiss_index.deserialize(trained)
    faiss_index.add(index, vectors, row_ids, uses_gpus(plan))
    file = shard_file_name(plan, shard["name"])
    if plan.lists:
        size = ivf_lists.write_shard(index, layout.file(file), layout.storage_options)
    else:
        size = write_index_file(index, layout.file(file), layout.storage_options)
    record = {
        "name": shard["name"],
        "file": file,
        "bytes": size,
        "ntotal": int(index.ntotal),
        "seconds": round(time.perf_counter() - started, 3),
        "peak_memory_mb": peak_memory_mb(),
        "pid": os.getpid(),
        **(worker or {}),
    }
    storage.write_json_atomic(layout.record_file(shard["name"]), record, layout.storage_options)
    return record


def store_for_rescoring(plan: IndexPlan, shard: dict, row_ids: np.ndarray, vectors: np.ndarray) -> None:
    """Compact ``index.vectors`` with rescoring: store the shard's vectors beside the index (see ``compact``)."""
    if plan.identity.get("rescore_factor"):
        dtype = plan.identity["stored_dtype"]
        compact.write_shard_vectors(plan.out.dir, shard, row_ids, vectors, dtype, plan.out.storage_options)


def uses_gpus(plan: IndexPlan) -> bool:
    """Whether this process runs FAISS on GPUs (``index.gpu`` and what it finds: a task sees the GPUs Ray gave it)."""
    return gpu.wanted(gpu_setting(plan.ix))


def task_plan(plan: IndexPlan) -> IndexPlan:
    """The plan without its shard list: what a shard's add task needs (each task gets its own shard), so that S
    tasks do not carry S shards each."""
    return dataclasses.replace(plan, shards=())


def build_whole(plan: IndexPlan, trained: bytes):
    """For types that cannot merge (HNSW, NSG): stream every shard into one index and write ``merged.faiss``.
    Memory: the whole index."""
    layout = plan.out
    index = faiss_index.deserialize(trained)
    for shard in plan.shards:
        row_ids, vectors = read_shard_vectors(plan.source, shard, plan.dim, plan.identity["fingerprint"])
        store_for_rescoring(plan, shard, row_ids, vectors)
        faiss_index.add(index, vectors, row_ids, uses_gpus(plan))
    write_index_file(index, layout.file("merged.faiss"), layout.storage_options)
    return index


def measure_recall(plan: IndexPlan, index) -> dict:
    """Recall@10 of ``index`` against exact search, on ``index.recall_queries`` corpus vectors drawn with
    ``index.seed + 1``, each query's own vector left out of both result lists (it would be a free hit); for IVF
    (nprobe) and HNSW (efSearch) the smallest setting reaching ``index.target_recall`` is chosen, unless the config
    fixes it. Memory: the queries plus one shard."""
    ix = plan.ix
    parameter = faiss_index.tunable_parameter(index)
    fixed = {"nprobe": ix.nprobe, "ef_search": ix.ef_search}.get(parameter or "", 0)
    first, index = (
        index,
        compact.rescored(
            index,
            plan.out.dir,
            plan.out.storage_options,
            plan.identity | {"dim": plan.dim, "metric": plan.metric},
            getattr(plan.shards, "shards", plan.shards),  # the whole list: indexed without walking it
        ),
    )
    if not ix.recall_queries:
        if parameter and fixed:
            faiss_index.set_search_parameters(first, **{parameter: fixed})
        return {"recall_at_10": None, "parameter": parameter, "value": fixed or None, "tried": []}
    query_ids, queries = read_sample(plan, sample_positions(plan.ntotal, ix.recall_queries, ix.seed + 1))
    shards = (read_shard_vectors(plan.source, s, plan.dim) for s in plan.shards)
    _, exact = search.exact_search(shards, queries, RECALL_K + 1, plan.metric, uses_gpus(plan))
    exact = search.drop_ids(exact, query_ids, RECALL_K)
    values = [fixed] if (fixed or not parameter) else faiss_index.candidate_values(index, parameter)
    tried: list[dict[str, Any]] = []
    for value in values:
        if parameter:
            faiss_index.set_search_parameters(first, **{parameter: value})
        _, found = faiss_index.search(index, queries, RECALL_K + 1)
        found = search.drop_ids(found, query_ids, RECALL_K)
        tried.append(
            {
                "value": value if parameter else None,
                "recall_at_10": round(search.recall_at_k(found, exact, RECALL_K), 5),
            }
        )
        if tried[-1]["recall_at_10"] >= ix.target_recall:
            break
    best = tried[-1]
    if best["recall_at_10"] < ix.target_recall:
        log.warning(
            "recall@10 %.4f is below index.target_recall %.3f with %s = %s",
            best["recall_at_10"],
            ix.target_recall,
            parameter,
            best["value"],
        )
    return {
        "recall_at_10": best["recall_at_10"],
        "parameter": parameter,
        "value": best["value"],
        "queries": len(queries),
        "tried": tried,
    }


def finish(plan: IndexPlan, trained: bytes, merge: merging.MergePlan | None = None) -> dict:
    """Write ``merged.faiss`` (from the range files of ``merge`` when given, else by every merge step here, or by
    building it whole for graph types) and measure recall on it, memory-mapped; returns what the manifest needs."""
    started = time.perf_counter()
    if not plan.mergeable:
        index = build_whole(plan, trained)
    else:
        if merge is not None:
            merging.assemble(plan, merge, trained)
        else:
            merging.merge_all(plan, trained)
        index = read_index_file(plan.out.file("merged.faiss"), plan.out.storage_options, mmap=True)
    merged_s = time.perf_counter() - started
    recall = measure_recall(plan, index)
    return {
        "ntotal": int(index.ntotal),
        "merge_s": round(merged_s, 3),
        "recall_s": round(time.perf_counter() - started - merged_s, 3),
        "recall": recall,
        "peak_memory_mb": peak_memory_mb(),
    }


def write_manifest(plan: IndexPlan, ntotal: int, timings: dict, recall: dict, memory: dict, training: dict) -> dict:
    """Write ``index/manifest.json``; returns it without its shard list. The shards' commit records are read
    ``MANIFEST_BATCH`` at a time and their entries streamed into the file: this holds one batch, not a record per
    shard. ``memory`` gains ``add_tasks_max`` (the largest add task's peak) when it has that key."""
    if ntotal != plan.ntotal:
        raise RuntimeError(f"merged index holds {ntotal} vectors, the embeddings {plan.ntotal}")
    layout, largest = plan.out, [0.0]

    def entries():
        for batch in shard_list.batched(plan.shards if plan.mergeable else (), MANIFEST_BATCH):
            urls = [layout.record_file(s["name"]) for s in batch]
            for r in storage.read_json_many(urls, layout.storage_options):
                largest[0] = max(largest[0], r["peak_memory_mb"])
                yield {key: r[key] for key in SHARD_ENTRY if r.get(key) is not None}

    def fields() -> dict:
        if "add_tasks_max" in memory:
            memory["add_tasks_max"] = largest[0] or None
        return {
            **stamp(),
            "stage": "index",
            "type": plan.factory,
            "metric": plan.metric,
            "dim": plan.dim,
            "ntotal": ntotal,
            "shard_count": len(plan.shards) if plan.mergeable else 0,
            "mergeable": plan.mergeable,
            "vectors": plan.identity.get("vectors", "float32"),
            "rescore_factor": plan.identity.get("rescore_factor", 0),
            "on_disk": False,
            "shard_format": plan.identity["shard_format"],
            "fingerprint": plan.identity["fingerprint"],
            "encoder": plan.encoders["encoder"],
            "query_encoder": plan.encoders.get("query_encoder"),
            "identity": plan.identity,
            "search_parameters": {recall["parameter"]: recall["value"]} if recall["parameter"] else {},
            "recall": recall,
            "timings_s": timings,
            "peak_memory_mb": memory,
            "training": training,
            "files": {"merged": "merged.faiss", "trained": "trained.faiss"},
            "config": plan.config,
        }

    return write_streamed(layout.file("manifest.json"), entries(), fields, INDEX_SHARD_ENTRY, layout.storage_options)


SHARD_ENTRY = tuple(INDEX_SHARD_ENTRY.names)
MANIFEST_BATCH = 1000  # commit records read (in parallel) and written into the manifest at a time


def read_index_manifest(folder: Folder) -> dict:
    return read_manifest(folder.join("index", "manifest.json"), folder.storage_options, "index")


def load_index(folder: Folder, mmap: bool = False):
    """(merged index with its tuned search parameters applied, index manifest). ``mmap`` memory-maps the file in
    place (on object storage: this node's one copy of it, shared by its processes), so that a searcher holds the
    quantizer and the pages of the lists it probes; without, the index is read into memory. (An index of an
    earlier release built with ``index.on_disk`` keeps its lists in merged.ivfdata, which FAISS maps itself.)"""
    import faiss

    storage_options = folder.storage_options
    manifest = read_index_manifest(folder)
    url = folder.join("index", manifest["files"]["merged"])
    if manifest["on_disk"]:
        index = faiss.read_index(storage.local_file(url, storage_options))
    else:
        index = read_index_file(url, storage_options, mmap)
    faiss_index.set_search_parameters(index, **manifest["search_parameters"])
    return searched(index, folder, manifest), manifest


def searched(index, folder: Folder, manifest: dict):
    """``index`` as searchers use it: rescored with the stored vectors when the manifest says so (``compact``)."""
    if not manifest.get("rescore_factor"):
        return index
    shards = read_embeddings_manifest(folder)["shards"]
    return compact.rescored(index, folder.join("index"), folder.storage_options, manifest, shards)


def check_query_encoder(manifest: dict, identity: dict) -> None:
    """Queries must be encoded by the encoder that made the index; the error names both fingerprints."""
    if identity["fingerprint"] != manifest["fingerprint"]:
        from retrieval_core.io.manifest import identity_differences

        lines = identity_differences(manifest["encoder"], identity)
        raise IncompatibleOutputError(
            f"the index was built from vectors of encoder {manifest['fingerprint']}, but this run's model "
            f"settings give encoder {identity['fingerprint']}:\n  "
            + "\n  ".join(lines)
            + "\nuse the model settings the index was built with, or re-encode and re-index"
        )


def complete(plan: IndexPlan, train_info: dict, add_s: float, result: dict, started: float, in_tasks: bool) -> dict:
    """Write the manifest of a finished build from the reports of its steps (``finish`` gives ``result``); with
    ``in_tasks`` the peak memory of the train, add and merge tasks is recorded next to the driver's."""
    timings = {
        "train": train_info["seconds"],
        "add": round(add_s, 3),
        "merge": result["merge_s"],
        "recall": result["recall_s"],
        "total": round(time.perf_counter() - started, 3),
        "driver_cpu": round(time.process_time(), 3),  # this process's CPU so far (all its threads, Ray's included)
    }
    memory: dict[str, Any] = {"driver": peak_memory_mb()}
    if in_tasks:
        memory |= {
            "train_task": train_info["peak_memory_mb"],
            "add_tasks_max": None,  # filled from the commit records as the manifest is written
            "merge_task": result["peak_memory_mb"],
        }
    training = {key: train_info.get(key) for key in ("reused", "points", "mean_coarse_distance")}
    return write_manifest(plan, result["ntotal"], timings, result["recall"], memory, training)


def build_in_process(cfg: Config) -> dict:
    """The whole stage in this process, shard after shard (tests, small corpora); returns the manifest.
    ``jobs.index`` runs the same steps with the shard adds spread over Ray workers."""
    started = time.perf_counter()
    plan = prepare(cfg)
    trained, train_info = trained_index(plan)
    add_started = time.perf_counter()
    if plan.mergeable:
        for shard in pending_shards(plan):
            add_shard(plan, shard, trained)
    add_s = time.perf_counter() - add_started
    complete(plan, train_info, add_s, finish(plan, trained), started, in_tasks=False)
    return read_index_manifest(plan.source)


def load_shard_group(folder: Folder, shard_names: list[str]):
    """One index holding the committed shard indexes ``shard_names`` (a mining worker's group), with the merged
    index's tuned search parameters applied. Memory: the group's codes and ids, and the trained index once."""
    manifest = read_index_manifest(folder)
    if not manifest["mergeable"]:
        raise ValueError(
            f"index type {manifest['type']} has no shard indexes (it cannot be merged, so it is built "
            f"whole): use mine.mode = replicated"
        )
    entries = {s["name"]: s for s in manifest["shards"]}
    chosen = [entries.get(name, {"name": name}) for name in shard_names]
    urls = [shard_index_url(folder.join("index"), entry) for entry in chosen]
    so = folder.storage_options
    dead = [dead_ids(tombstone_url(folder.join("index"), entry), so) for entry in chosen]  # a refresh's dead rows
    if manifest.get("shard_format") == "lists":
        trained = faiss_index.deserialize(folder.read_bytes("index", manifest["files"]["trained"]))
        index = ivf_lists.fill(trained, urls, so, dead)
    else:
        index = faiss_index.merge(without_dead(read_index_file(url, so), gone) for url, gone in zip(urls, dead))
    faiss_index.set_search_parameters(index, **manifest["search_parameters"])
    return searched(index, folder, manifest)
