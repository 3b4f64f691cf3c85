"""Ray actor classes: each holds what is expensive to build (a model) and calls library functions."""

from __future__ import annotations

import os

import ray

from jobs.ray import cluster, dispatch
from retrieval_core.config import Config, ModelConfig, RuntimeConfig
from retrieval_core.config.rules import gpu_setting
from retrieval_core.io.folder import Folder
from retrieval_core.io.sharding import Shard
from retrieval_core.mine import mining
from retrieval_core.mine.mining import MineWork


class EncodeWorker:
    """Loads the encoder (a model, or an embedding API's client) once, then encodes and commits shards."""

    def __init__(self, model_cfg: ModelConfig, cpus: int, gpus: float):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from retrieval_core.encode import encoding

        self.encoder = encoding.load_encoder(model_cfg, gpus, threads=cpus)

    def encode_shard(self, shard: Shard, work, encoder_identity: dict) -> dict:
        from retrieval_core.encode.embeddings import encode_shard

        worker = {"node_id": ray.get_runtime_context().get_node_id()}
        return encode_shard(shard, work, self.encoder, encoder_identity, worker)

    def encode_segment(self, segment, plan, cfg: Config, encoder_identity: dict) -> dict:
        from retrieval_core.refresh.refreshing import encode_segment

        return encode_segment(plan, segment, cfg, self.encoder, encoder_identity, _node())

    def encode_queries(self, texts: list[str]):
        return self.encoder.encode_queries(texts)

    def pid(self) -> int:
        return os.getpid()


def start_encode_workers(cfg: Config, count: int) -> list:
    rt: RuntimeConfig = cfg.runtime
    remote = ray.remote(EncodeWorker).options(
        num_cpus=rt.cpus_per_worker,
        num_gpus=rt.gpus_per_worker,
        max_restarts=rt.max_restarts,
        max_task_retries=rt.max_task_retries,
    )
    return [remote.remote(cfg.model, rt.cpus_per_worker, rt.gpus_per_worker) for _ in range(count)]


def faiss_threads(cpus: int) -> None:
    import faiss

    faiss.omp_set_num_threads(max(1, int(cpus)))


def _node() -> dict:
    return {"node_id": ray.get_runtime_context().get_node_id()}


def _train_index(plan, cpus: int):
    from retrieval_core.index import indexing

    faiss_threads(cpus)
    data, info = indexing.trained_index(plan)
    return data, {**info, "peak_memory_mb": indexing.peak_memory_mb()}


def _add_index_shard(plan, shard: dict, trained, cpus: int) -> dict:
    from retrieval_core.index import indexing

    faiss_threads(cpus)
    return indexing.add_shard(plan, shard, trained, _node())


def _plan_merge(plan):
    from retrieval_core.index import merging

    return merging.plan_merge(plan)


def _merge_range(plan, merge, number: int, cpus: int) -> dict:
    from retrieval_core.index import merging

    faiss_threads(cpus)
    return merging.merge_range(plan, merge, number)


def _finish_index(plan, trained, merge, cpus: int) -> dict:
    from retrieval_core.index import indexing

    faiss_threads(cpus)
    return indexing.finish(plan, trained, merge)


def index_tasks(cfg: Config, node_cpus: int) -> dict:
    """Remote functions of the index stage: training and the finish (the merged file, recall) take a whole node's
    CPUs; adds, the merge plan and each range of the merge one worker's (they reuse worker processes, so the peak
    memory they report is that of the worker process so far)."""
    rt = cfg.runtime
    gpus = gpu_setting(cfg.index) != "false"  # FAISS on GPUs where the tasks get some (index.gpu)
    # max_calls=1: a fresh worker process each, so the peak memory it reports is that task's own
    whole_node = dict(num_cpus=node_cpus, num_gpus=dispatch.largest_node_gpus() if gpus else 0)
    whole_node["max_retries"] = rt.max_task_retries
    worker = dict(num_cpus=rt.cpus_per_worker, num_gpus=rt.gpus_per_worker if gpus else 0)
    worker["max_retries"] = rt.max_task_retries
    return {
        "train": ray.remote(max_calls=1)(_train_index).options(**whole_node),
        "add": ray.remote(_add_index_shard).options(**worker),
        "plan_merge": ray.remote(_plan_merge).options(**worker),
        "merge_range": ray.remote(max_calls=1)(_merge_range).options(**worker),
        "finish": ray.remote(max_calls=1)(_finish_index).options(**whole_node),
    }


class IndexSearcher:
    """Holds the merged index (memory-mapped when local), or a group of shard indexes, and searches query
    batches; a group's per-shard top-k are merged here, so each searcher returns one top-k."""

    def __init__(self, root: str, storage_options: dict, shard_names: list | None, cpus: int):
        from retrieval_core.index import indexing

        faiss_threads(cpus)
        if shard_names is None:
            self.indexes = [indexing.load_index(Folder(root, storage_options), mmap=True)[0]]
        else:
            self.indexes = [indexing.load_shard_group(Folder(root, storage_options), shard_names)]

    def search(self, vectors, k: int):
        from retrieval_core.index import faiss_index, search
        from retrieval_core.io import faults

        faults.point("search", "search")
        return search.merge_topk([faiss_index.search(index, vectors, k) for index in self.indexes], k, "ip")


class MineWorker:
    """Mines parts in two halves around the join of their candidates (see ``jobs.mine``): holds the query encoder,
    an index (the merged one, or a group of shard indexes), a row lookup and, with ``mine.cross_encoder``, the
    cross-encoder. ``search_part`` encodes a part's queries, searches and writes its requests; ``join_group`` looks
    up a text group's requested rows; ``select_part`` rescores, selects and commits a part.
    In sharded mode a part's queries are also searched by every peer (``search``, served on the actor's second
    thread while its own part runs) and the top-k merged here."""

    def __init__(
        self,
        cfg: Config,
        shard_names: list | None,
        position: int,
        encoder=None,
        manifest: dict | None = None,
        cpus: int | None = None,
    ):
        """``encoder``: one already loaded (else the model is loaded here); ``manifest``: the embeddings manifest
        already read; ``cpus``: the threads of the search and the models (default ``runtime.cpus_per_worker``)."""
        from retrieval_core.encode import encoding
        from retrieval_core.index import lookup
        from retrieval_core.mine import rescoring

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        rt, cpus = cfg.runtime, cpus or cfg.runtime.cpus_per_worker
        self.searcher = IndexSearcher(cfg.output.root, cfg.output.storage_options, shard_names, cpus)
        self.encoder = encoder or encoding.load_encoder(cfg.model, rt.gpus_per_worker, threads=cpus)
        self.scorer = (
            rescoring.CrossEncoderScorer(cfg.mine, cfg.model, encoding.pick_device(rt.gpus_per_worker), cpus)
            if cfg.mine.cross_encoder
            else None
        )
        self.rows = lookup.RowLookup(Folder.output(cfg.output), cfg.corpus.storage_options, manifest)
        self.position = position

    @classmethod
    def here(cls, cfg: Config, manifest: dict) -> "MineWorker":
        """A worker in the job's own process (a small run without a cross-encoder): the merged index on every
        core, the process's cached encoder, and the embeddings ``manifest`` already read."""
        from retrieval_core.encode import encoding

        return cls(cfg, None, 0, cluster.inline_encoder(cfg), manifest, encoding.cpu_count())

    def search(self, vectors, k: int):
        return self.searcher.search(vectors, k)

    def ready(self) -> int:
        return os.getpid()

    def search_part(self, part, work: MineWork, depth: int, text_starts: list[int], peers: list) -> dict:
        from retrieval_core.mine import parts as mine_parts
        from retrieval_core.mine import plan as mine_plan

        return mine_parts.search_part(
            work,
            part.number,
            mine_plan.read_part_input(work, part),
            self.encoder.encode_queries,
            lambda vectors, k: self._search_all(vectors, k, peers),
            depth,
            text_starts,
        )

    def join_group(self, item: dict, work: MineWork) -> dict:
        from retrieval_core.mine import parts as mine_parts
        from retrieval_core.mine import texts as mine_texts

        return mine_texts.resolve_group(
            mine_parts.candidates_dir(work),
            item["group"],
            item["parts"],
            self.rows,
            work.root.storage_options,
            texts=bool(work.mine.cross_encoder),
        )

    def join_texts(self, item: dict, work: MineWork) -> dict:
        """The text join of the exports for one text group (``item``: group, parts), once every part is committed."""
        from retrieval_core.mine import mining

        return mining.join_export_texts(work, item["group"], item["parts"], self.rows)

    def export_part(self, number: int, work: MineWork) -> dict:
        from retrieval_core.mine import mining

        return mining.export_part(work, number)

    def select_part(self, part, work: MineWork, range_max: int, text_starts: list[int]) -> dict:
        from retrieval_core.mine import parts as mine_parts
        from retrieval_core.mine import plan as mine_plan

        return mine_parts.select_part(
            work,
            self.rows,
            part.number,
            mine_plan.read_part_input(work, part),
            range_max,
            text_starts,
            self.scorer.score if self.scorer else None,
        )

    def _search_all(self, vectors, k: int, peers: list):
        from retrieval_core.index import search

        if not peers:
            return self.searcher.search(vectors, k)
        refs = [peer.search.remote(vectors, k) for i, peer in enumerate(peers) if i != self.position]
        return search.merge_topk([self.searcher.search(vectors, k), *ray.get(refs)], k, "ip")


def _shuffle_step(work: MineWork, step: str, item: int, plan: dict, emb: dict) -> dict:
    from retrieval_core.mine import plan as mine_plan
    from retrieval_core.mine import shuffle as mine_shuffle

    if step == "split":
        return mine_shuffle.split_input(work, item, plan)
    if step == "partition":
        return mine_shuffle.partition_corpus(work, item, plan, emb)
    if step == "join":
        return mine_shuffle.join_positives(work, item, plan)
    return mine_plan.plan_bucket(work, item, plan)


def shuffle_input(cfg: Config, plan: dict, emb: dict, waves: list[list[tuple[str, int]]]) -> dict[int, dict]:
    """Plan the mining input by the shuffle of ``mine.shuffle``: each wave of ``waves`` ((step, item) pairs:
    ``split`` an input file, ``partition`` a shard group, ``join`` a doc bucket, ``plan`` a query bucket) on Ray
    tasks (``runtime.cpus_per_worker`` CPUs each), one wave after the other. Returns query bucket -> its commit
    record, for the buckets planned."""
    task = ray.remote(_shuffle_step).options(**_task_options(cfg))
    plan_ref, emb_ref, records = ray.put(plan), ray.put(emb), {}
    work_ref = ray.put(mining.work_of(cfg))
    for wave in waves:
        dispatch.run_tasks(
            lambda unit: task.remote(work_ref, unit["step"], unit["item"], plan_ref, emb_ref),
            ({"name": f"{SHUFFLE_STEPS[step]} {item}", "step": step, "item": item} for step, item in wave),
            lambda done, record: records.update({done["item"]: record} if done["step"] == "plan" else {}),
            "mine: input planning",
            dispatch.window_size(cfg.runtime.cpus_per_worker),
        )
    return records


SHUFFLE_STEPS = {
    "split": "the split of input file",
    "partition": "the partition of shard group",
    "join": "the join of doc bucket",
    "plan": "the planning of query bucket",
}


def _task_options(cfg: Config) -> dict:
    return {"num_cpus": cfg.runtime.cpus_per_worker, "max_retries": cfg.runtime.max_task_retries}


def duplicate_ids(cfg: Config, files: list, scratch: Folder) -> list[str]:
    """Up to 5 duplicate doc ids of the corpus ``files``, in corpus order, found by the map/reduce of
    ``retrieval_core.io.id_check`` on Ray tasks of one CPU each (its steps hash and sort on one thread): a map task
    per group of rows, a reduce task per hash partition, exchanging their hashes through ``scratch``. This process
    holds the plan, counts and a bounded set of suspect hashes, nothing per row."""
    from retrieval_core.io import id_check

    def run(step: str, function, items: list[int], args: tuple, on_done) -> None:
        dispatch.each_in_tasks(function, items, args, on_done, f"encode: {step}", cfg.runtime.max_task_retries)

    return id_check.find_duplicate_ids(files, cfg.corpus, scratch, run=run)


def _text_group(work: MineWork, group: int, parts: list[int]) -> dict:
    from retrieval_core.index import lookup
    from retrieval_core.mine import mining

    rows = lookup.RowLookup(work.root, work.corpus_storage_options)
    return mining.join_export_texts(work, group, parts, rows)


def _export_part(work: MineWork, number: int) -> dict:
    from retrieval_core.mine import mining

    return mining.export_part(work, number)


def join_texts(cfg: Config, groups: dict[int, list[int]], parts: list[int], on_part_done) -> list[dict]:
    """The text join of the mining exports on Ray tasks (``runtime.cpus_per_worker`` CPUs each): one task per text
    group (``groups``: group -> the parts requesting from it), then one per part of ``parts`` writing its exports
    (``on_part_done(number)`` as each finishes). Returns the groups' commit records."""
    group_task = ray.remote(_text_group).options(**_task_options(cfg))
    part_task = ray.remote(_export_part).options(**_task_options(cfg))
    records, work_ref = [], ray.put(mining.work_of(cfg))
    window = dispatch.window_size(cfg.runtime.cpus_per_worker)
    dispatch.run_tasks(
        lambda g: group_task.remote(work_ref, g, groups[g]),
        groups,
        lambda group, record: records.append(record),
        "mine: joining the texts of group",
        window,
    )
    dispatch.run_tasks(
        lambda number: part_task.remote(work_ref, number),
        parts,
        lambda number, record: on_part_done(number),
        "mine: writing the exports of part",
        window,
    )
    return records


def start_mine_workers(cfg: Config, groups: list) -> list:
    """One mine worker per group of shard names (None = the merged index), each with ``runtime.cpus_per_worker``
    CPUs and ``runtime.gpus_per_worker`` GPUs (query encoding and rescoring)."""
    rt = cfg.runtime
    remote = ray.remote(MineWorker).options(
        num_cpus=rt.cpus_per_worker,
        num_gpus=rt.gpus_per_worker,
        max_concurrency=2,
        max_restarts=rt.max_restarts,
        max_task_retries=rt.max_task_retries,
    )
    return [remote.remote(cfg, group, position) for position, group in enumerate(groups)]
