"""The index stage without Ray: merged shard indexes against one index filled in one process, exact search,
recall tuning, auto type choice, resume and identity checks."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pytest
from helpers import build_synthetic_index, clustered_vectors, write_synthetic_embeddings

from retrieval_core.config import ConfigError, load_config
from retrieval_core.config.rules import parse_memory
from retrieval_core.index import faiss_index, indexing, merging, search
from retrieval_core.io.folder import Folder
from retrieval_core.io.manifest import IncompatibleOutputError

DIM = 16


def index_config(root, *extra, **overrides):
    items = [f"output.root={root}", "runtime.progress=false", "index.recall_queries=200", *extra]
    items += [f"index.{k}={v}" for k, v in overrides.items()]
    return load_config(None, items)


@pytest.fixture(scope="module")
def vectors():
    return clustered_vectors(3000, DIM, clusters=12, seed=1)


@pytest.fixture(scope="module")
def queries():
    return clustered_vectors(50, DIM, clusters=12, seed=2)


def build(tmp_path, vectors, shard_rows=437, **index_settings):
    return build_synthetic_index(tmp_path, vectors, shard_rows, **index_settings)


def monolithic(cfg, vectors):
    """One index from the same trained state, filled with every vector in one call."""
    plan = indexing.prepare(cfg)
    trained, _ = indexing.trained_index(plan)
    index = faiss_index.deserialize(trained)
    faiss_index.add(index, vectors, np.arange(len(vectors)))
    return index


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "IVF16,SQ8", "IVF8,PQ4x4", "SQ8"])
def test_merged_index_answers_exactly_as_a_monolithic_one(tmp_path, vectors, queries, factory):
    cfg, manifest = build(tmp_path, vectors, type=factory, nprobe=3)
    merged, _ = indexing.load_index(Folder(str(tmp_path)))
    reference = monolithic(cfg, vectors)
    faiss_index.set_search_parameters(reference, nprobe=3)
    got_scores, got_ids = faiss_index.search(merged, queries, 20)
    want_scores, want_ids = faiss_index.search(reference, queries, 20)
    assert manifest["ntotal"] == len(vectors) == merged.ntotal
    assert [s["ntotal"] for s in manifest["shards"]] == [437] * 6 + [3000 - 6 * 437]
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_scores, want_scores)
    mapped, _ = indexing.load_index(Folder(str(tmp_path)), mmap=True)  # memory-mapped: the same answers
    np.testing.assert_array_equal(faiss_index.search(mapped, queries, 20)[1], want_ids)


def _anonymous_mb() -> float:
    return int(next(line for line in open("/proc/self/status") if line.startswith("RssAnon")).split()[1]) / 1024


@pytest.mark.parametrize("factory", ["Flat", "IVF32,Flat"])
def test_a_memory_mapped_index_holds_its_codes_outside_the_process_memory(tmp_path, factory):
    """IO_FLAG_MMAP reads a flat-code index into memory; the flag the searchers use maps every type in place."""
    data = np.random.default_rng(0).random((20_000, 256), dtype=np.float32)  # 20 MB of codes
    index = faiss.IndexIDMap2(faiss.index_factory(256, factory, faiss.METRIC_INNER_PRODUCT))
    index.train(data)
    index.add_with_ids(data, np.arange(len(data)) + 5)
    path = str(tmp_path / "index.faiss")
    faiss.write_index(index, path)
    before = _anonymous_mb()
    mapped = faiss.read_index(path, faiss_index.MMAP_FLAG)
    assert _anonymous_mb() - before < 5
    assert faiss_index.search(mapped, data[:3], 1)[1][:, 0].tolist() == [5, 6, 7]


def test_flat_index_equals_exact_numpy_search(tmp_path, vectors, queries):
    build(tmp_path, vectors, type="Flat")
    merged, manifest = indexing.load_index(Folder(str(tmp_path)))
    _, ids = faiss_index.search(merged, queries, 10)
    brute = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, brute)
    assert manifest["recall"]["recall_at_10"] == 1.0


# (a transform such as PCA8 in front is not byte-exact: its matrix product rounds by batch size, shard or whole)
@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF32,SQ8", "IVF8,PQ4x4", "IVF16_HNSW8,SQ8"])
def test_ivf_shards_hold_lists_only_and_merge_by_ranges_into_faiss_s_own_file(tmp_path, vectors, caplog, factory):
    """Shard files hold codes and ids (and 16 bytes per list); merged by ranges of lists under a small
    index.merge_memory, merged.faiss is byte for byte the file FAISS writes for the index filled in one call."""
    cfg, manifest = build(tmp_path, vectors, type=factory, merge_memory="20000", on_disk="true")
    assert "index.on_disk is no longer needed" in caplog.text
    reference = monolithic(cfg, vectors)
    merged = (tmp_path / "index" / "merged.faiss").read_bytes()
    assert merged == faiss.serialize_index(reference).tobytes()
    ivf = faiss.extract_index_ivf(reference)
    files = sorted((tmp_path / "index").glob("shard-*.lists"))
    assert len(files) == 7 and not list((tmp_path / "index").glob("shard-*.faiss"))
    codes_and_ids = len(vectors) * (ivf.code_size + 8)
    assert codes_and_ids < sum(f.stat().st_size for f in files) <= codes_and_ids + 7 * (32 + 16 * ivf.nlist)
    assert manifest["shard_format"] == "lists" and not (tmp_path / "index" / "_merge").exists()


def test_a_merge_range_holds_a_bounded_share_of_the_lists(tmp_path, vectors):
    """The merge plan counts every list over the shard files and cuts ranges of at most half of
    index.merge_memory of codes and ids (a larger list alone), covering every list once."""
    cfg, _ = build(tmp_path, vectors, type="IVF32,Flat", merge_memory="40000")
    plan = indexing.prepare(cfg)
    merge = merging.plan_merge(plan)
    reference = monolithic(cfg, vectors)
    ivf = faiss.extract_index_ivf(reference)
    totals = np.array([ivf.invlists.list_size(number) for number in range(32)])
    np.testing.assert_array_equal(np.load(tmp_path / "index" / "_merge" / "totals.npy"), totals)
    ranges, entry = merge.ranges, DIM * 4 + 8
    assert ranges[0][0] == 0 and ranges[-1][1] == 32 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(totals[lo:hi].sum() * entry <= 20000 or hi - lo == 1 for lo, hi in ranges)
    assert len(ranges) >= totals.sum() * entry / 20000 and merge.ntotal == len(vectors)


def test_a_range_task_reads_its_slice_of_each_shard_file_and_nothing_else(tmp_path, vectors, monkeypatch):
    """The plan's spans give each range, in each shard file, the slice of the header and the payload of its lists:
    what a range task reads equals the lists [lo, hi) read from the whole header, and its reads add up to the
    shard files' payload once over all ranges (plus the header slices: 16 bytes per list present)."""
    from fsspec.implementations.local import LocalFileSystem

    from retrieval_core.index import ivf_lists

    cfg, _ = build(tmp_path, vectors, type="IVF32,Flat", merge_memory="40000")
    plan = indexing.prepare(cfg)
    merge = merging.plan_merge(plan)
    urls, _ = merging.shard_files(plan)
    spans = np.fromfile(tmp_path / "index" / "_merge" / "spans.bin", np.int64).reshape(len(merge.ranges), len(urls), 4)
    read = []
    cat = LocalFileSystem.cat_file  # a spy counting the bytes of each ranged read
    monkeypatch.setattr(
        LocalFileSystem,
        "cat_file",
        lambda fs, path, start=None, end=None, **kw: read.append(end - start) or cat(fs, path, start, end, **kw),
    )
    for number, (lo, hi) in enumerate(merge.ranges):
        for url, span in zip(urls, spans[number]):
            header = ivf_lists.read_header(url)
            got, want = ivf_lists.read_span(url, span, DIM * 4), ivf_lists.read_lists(url, header, lo, hi)
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)
    headers = [ivf_lists.read_header(url) for url in urls]
    read.clear()
    for number in range(len(merge.ranges)):
        for url, span in zip(urls, spans[number]):
            ivf_lists.read_span(url, span, DIM * 4)
    assert sum(read) == sum(os.path.getsize(url) - ivf_lists.HEAD.size for url in urls)
    assert sum(read) == sum(h.sizes.sum() * (DIM * 4 + 8) + 16 * len(h.lists) for h in headers)


def test_a_rerun_with_other_merge_ranges_never_takes_the_ranges_of_the_run_before(tmp_path, vectors):
    """A merge killed after its ranges were written, rerun with another index.merge_memory: the ranges differ, the
    files of the first run are left aside, and merged.faiss is still FAISS's file of the one-process index."""
    write_synthetic_embeddings(tmp_path, vectors, 437)
    first = indexing.prepare(index_config(tmp_path, type="IVF16,Flat", merge_memory="60000"))
    trained, _ = indexing.trained_index(first)
    for shard in first.shards:
        indexing.add_shard(first, shard, trained)
    merge = merging.plan_merge(first)
    for number in range(len(merge.ranges)):
        merging.merge_range(first, merge, number)  # then the run is killed
    cfg = index_config(tmp_path, type="IVF16,Flat", merge_memory="20000")
    second = merging.plan_merge(indexing.prepare(cfg))
    assert set(second.ranges) != set(merge.ranges)
    indexing.build_in_process(cfg)
    merged = (tmp_path / "index" / "merged.faiss").read_bytes()
    assert merged == faiss.serialize_index(monolithic(cfg, vectors)).tobytes()


def test_a_shard_group_is_one_index_answering_as_its_shards_merged(tmp_path, vectors, queries):
    cfg, manifest = build(tmp_path, vectors, type="IVF16,SQ8", nprobe=4)
    group = indexing.load_shard_group(Folder(str(tmp_path)), ["shard-00001", "shard-00003"])
    rows = np.r_[437:874, 1311:1748]
    reference = faiss_index.deserialize(indexing.trained_index(indexing.prepare(cfg))[0])
    faiss_index.add(reference, vectors[rows], rows)
    faiss_index.set_search_parameters(reference, nprobe=4)
    assert group.ntotal == len(rows) and faiss.extract_index_ivf(group).nprobe == 4
    for got, want in zip(faiss_index.search(group, queries, 10), faiss_index.search(reference, queries, 10)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF8,PQ4x4", "Flat", "SQ8"])
def test_dead_ids_of_shared_shard_indexes_are_left_out_of_the_merge_and_of_shard_groups(
    tmp_path, vectors, queries, factory
):
    """What a refresh leaves a shared shard index: a tombstone file of its rows dead since it was built. The merge
    (ranges of lists, or whole indexes) and a mining worker's shard group leave them out: they answer as one index
    filled with the live vectors only."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg, _ = build(tmp_path, vectors, type=factory, nprobe=16, merge_memory="30000")
    rng = np.random.default_rng(5)
    dead = {}
    for shard, (lo, hi) in {"shard-00001": (437, 874), "shard-00004": (1748, 2185)}.items():
        dead[shard] = np.sort(rng.choice(np.arange(lo, hi), size=150, replace=False))
        pq.write_table(pa.table({"row_id": dead[shard]}), tmp_path / f"{shard}.dead.parquet")
        record_path = tmp_path / "index" / "_shards" / f"{shard}.json"
        record = json.loads(record_path.read_text())
        record_path.write_text(json.dumps({**record, "deleted_path": f"../{shard}.dead.parquet"}))
    plan = indexing.prepare(cfg)
    trained, _ = indexing.trained_index(plan)
    merging.merge_all(plan, trained)
    merged = faiss.read_index(str(tmp_path / "index" / "merged.faiss"))
    live = np.setdiff1d(np.arange(len(vectors)), np.concatenate(list(dead.values())))
    reference = faiss_index.deserialize(trained)
    faiss_index.add(reference, vectors[live], live)
    for index in (merged, reference):
        faiss_index.set_search_parameters(index, nprobe=16)
    assert merged.ntotal == len(live) == len(vectors) - 300
    for got, want in zip(faiss_index.search(merged, queries, 20), faiss_index.search(reference, queries, 20)):
        np.testing.assert_array_equal(got, want)
    assert faiss.serialize_index(merged).tobytes() == faiss.serialize_index(reference).tobytes()
    manifest_entries = {name: {"name": name, "file": f"{name}.{'lists' if plan.lists else 'faiss'}"} for name in dead}
    manifest_entries["shard-00001"]["deleted_path"] = "../shard-00001.dead.parquet"
    group_ids = np.r_[437:874, 1748:2185]
    group_live = np.setdiff1d(group_ids, dead["shard-00001"])
    monkey_manifest = {**indexing.read_index_manifest(Folder(str(tmp_path))), "shards": list(manifest_entries.values())}
    original = indexing.read_index_manifest
    try:
        indexing.read_index_manifest = lambda folder: monkey_manifest
        group = indexing.load_shard_group(Folder(str(tmp_path)), ["shard-00001", "shard-00004"])
    finally:
        indexing.read_index_manifest = original
    assert group.ntotal == len(group_live)


def test_fast_scan_codes_are_built_whole_and_answer_as_one_index(tmp_path, vectors, queries):
    """FAISS's merge of fast-scan shard indexes of 437 vectors corrupts memory (it aborted the process): such types
    are built whole, like graphs, and answer as one index filled in one process."""
    assert not faiss_index.is_mergeable("IVF8,PQ4x4fs") and faiss_index.is_mergeable("IVF8,PQ4x4")
    cfg, manifest = build(tmp_path, vectors, type="IVF8,PQ4x4fs", nprobe=8)
    merged, _ = indexing.load_index(Folder(str(tmp_path)))
    reference = monolithic(cfg, vectors)
    faiss_index.set_search_parameters(reference, nprobe=8)
    assert manifest["ntotal"] == merged.ntotal == len(vectors) and not manifest["mergeable"]
    for got, want in zip(faiss_index.search(merged, queries, 10), faiss_index.search(reference, queries, 10)):
        np.testing.assert_array_equal(got, want)


def test_hnsw_is_built_whole_and_reaches_the_target_recall(tmp_path, vectors):
    _, manifest = build(tmp_path, vectors, type="HNSW16", target_recall=0.97)
    assert not manifest["mergeable"] and list(manifest["shards"]) == [] and manifest["shard_count"] == 0
    assert manifest["recall"]["parameter"] == "ef_search"
    assert manifest["recall"]["recall_at_10"] >= 0.97
    assert manifest["ntotal"] == len(vectors)


def test_nprobe_is_the_smallest_reaching_the_target(tmp_path, vectors):
    _, manifest = build(tmp_path, vectors, type="IVF64,Flat", target_recall=0.9)
    recall = manifest["recall"]
    assert recall["parameter"] == "nprobe" and manifest["search_parameters"] == {"nprobe": recall["value"]}
    assert recall["recall_at_10"] >= 0.9
    below = [t for t in recall["tried"] if t["value"] < recall["value"]]
    assert all(t["recall_at_10"] < 0.9 for t in below)
    merged, _ = indexing.load_index(Folder(str(tmp_path)))
    assert faiss.extract_index_ivf(merged).nprobe == recall["value"]


def test_recall_is_measured_against_exact_search(tmp_path, vectors):
    """The recorded recall equals recall recomputed here with brute force on the same sampled queries, each
    query's own vector left out of both lists."""
    cfg, manifest = build(tmp_path, vectors, type="IVF64,Flat", nprobe=1)
    plan = indexing.prepare(cfg)
    positions = indexing.sample_positions(plan.ntotal, 200, cfg.index.seed + 1)
    q = vectors[positions]
    exact = np.argsort(-(q @ vectors.T), axis=1, kind="stable")[:, :11]
    merged, _ = indexing.load_index(Folder(str(tmp_path)))
    _, found = faiss_index.search(merged, q, 11)
    exact = [[i for i in row if i != own][:10] for row, own in zip(exact.tolist(), positions.tolist())]
    found = [[i for i in row if i != own][:10] for row, own in zip(found.tolist(), positions.tolist())]
    hits = sum(len(set(f) & set(e)) for f, e in zip(found, exact))
    assert manifest["recall"]["recall_at_10"] == pytest.approx(hits / (200 * 10), abs=1e-5)


def test_exact_search_over_shards_equals_brute_force(vectors, queries):
    shards = [(np.arange(s, min(s + 500, 3000)) + 7, vectors[s : s + 500]) for s in range(0, 3000, 500)]
    scores, ids = search.exact_search(iter(shards), queries, 15, "ip")
    sims = queries @ vectors.T
    want = np.argsort(-sims, axis=1, kind="stable")[:, :15] + 7
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, want - 7, axis=1), rtol=1e-5)
    l2_scores, l2_ids = search.exact_search(iter(shards), queries, 5, "l2")
    d = ((queries[:, None, :] - vectors[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(l2_ids, np.argsort(d, axis=1, kind="stable")[:, :5] + 7)


def test_merge_topk_breaks_ties_by_id_and_pads_missing():
    a = (np.array([[0.9, 0.5]], np.float32), np.array([[7, 3]]))
    b = (np.array([[0.9, 0.1]], np.float32), np.array([[2, -1]]))
    scores, ids = search.merge_topk([a, b], 5, "ip")
    assert ids.tolist() == [[2, 7, 3, -1, -1]]
    assert scores[0, :3].tolist() == pytest.approx([0.9, 0.9, 0.5])
    assert np.isneginf(scores[0, 3:]).all()
    _, again = search.merge_topk([b, a], 5, "ip")
    assert again.tolist() == ids.tolist()


def test_auto_type_follows_size_and_memory():
    assert faiss_index.choose_index_type(10_000, 384, parse_memory("8GB")) == "Flat"
    assert faiss_index.choose_index_type(100_000, 384, parse_memory("8GB")) == "IVF1024,Flat"
    assert faiss_index.choose_index_type(1_000_000, 384, parse_memory("1GB")) == "IVF4096,SQ8"
    # 1M x (64 + 8 id) bytes = 72 MB
    assert faiss_index.choose_index_type(1_000_000, 384, parse_memory("80MB")) == "IVF4096,PQ64"
    assert faiss_index.choose_index_type(10_000_000, 384, parse_memory("100GB")).startswith("IVF16384_HNSW32,")
    # the index does not fit: it is served from disk with one PQ byte per 8 dimensions (1B x 768: 96 + 8 bytes)
    assert faiss_index.choose_index_type(10_000_000, 384, parse_memory("100MB")) == "IVF16384_HNSW32,PQ48"
    assert faiss_index.choose_index_type(1_000_000_000, 768, parse_memory("8GB")) == "IVF65536_HNSW32,PQ96"
    with pytest.raises(faiss_index.IndexTypeError, match="coarse quantizer .* index.max_memory"):
        faiss_index.choose_index_type(10_000_000, 384, parse_memory("10MB"))


def test_bad_type_and_metric_are_named(tmp_path, vectors):
    write_synthetic_embeddings(tmp_path, vectors[:100], 50, normalized=False)
    with pytest.raises(faiss_index.IndexTypeError, match="IVFx"):
        indexing.prepare(index_config(tmp_path, type="IVFx,Flat", metric="l2"))
    with pytest.raises(ValueError, match="model.normalize"):
        indexing.prepare(index_config(tmp_path, type="Flat"))
    with pytest.raises(ConfigError, match="index.metric"):
        index_config(tmp_path, metric="cosine")
    with pytest.raises(ConfigError, match="index.max_memory"):
        index_config(tmp_path, max_memory="lots")


def test_committed_shards_are_skipped_and_other_settings_refused(tmp_path, vectors):
    write_synthetic_embeddings(tmp_path, vectors, 1000)
    cfg = index_config(tmp_path, type="IVF16,Flat")
    plan = indexing.prepare(cfg)
    trained, _ = indexing.trained_index(plan)
    indexing.add_shard(plan, plan.shards[0], trained)
    assert [s["name"] for s in indexing.pending_shards(plan)] == ["shard-00001", "shard-00002"]
    again, info = indexing.trained_index(indexing.prepare(cfg))
    assert info["reused"] and again == trained
    with pytest.raises(IncompatibleOutputError, match="type"):
        indexing.prepare(index_config(tmp_path, type="IVF32,Flat"))
    replaced = indexing.prepare(index_config(tmp_path, "output.overwrite=true", type="IVF32,Flat"))
    assert replaced.factory == "IVF32,Flat"
    assert len(indexing.pending_shards(replaced)) == 3


def test_training_is_deterministic(tmp_path, vectors):
    write_synthetic_embeddings(tmp_path, vectors, 1000)
    cfg = index_config(tmp_path, type="IVF16,PQ4x4", train_size=2000)
    plan = indexing.prepare(cfg)
    faiss.omp_set_num_threads(1)
    _, sample = indexing.read_sample(plan, indexing.sample_positions(plan.ntotal, 2000, 0))
    a = faiss_index.serialize(faiss_index.train(plan.factory, DIM, "ip", sample, 0))
    b = faiss_index.serialize(faiss_index.train(plan.factory, DIM, "ip", sample, 0))
    assert a == b and len(sample) == 2000


def test_a_shard_from_another_encoder_is_refused(tmp_path, vectors):
    from retrieval_core.encode.embeddings import embeddings_table
    from retrieval_core.io import storage

    write_synthetic_embeddings(tmp_path, vectors[:600], 300)
    ids = list(range(300, 600))
    other = embeddings_table(
        ids, [f"doc{i}" for i in ids], vectors[300:600], ["0" * 16] * 300, "float32", {"fingerprint": "e" * 32}
    )
    storage.write_parquet_atomic(str(tmp_path / "embeddings" / "shard-00001.parquet"), other)
    with pytest.raises(IncompatibleOutputError, match="e" * 32 + ".*" + "f" * 32):
        indexing.build_in_process(index_config(tmp_path, type="Flat"))


def test_index_gpu_is_checked_and_true_without_a_gpu_build_names_the_extra(tmp_path, vectors):
    from retrieval_core.index import gpu

    with pytest.raises(ConfigError, match="index.gpu"):
        index_config(tmp_path, gpu="sometimes")
    if gpu.gpu_count():
        pytest.skip("this machine has FAISS on a GPU")
    write_synthetic_embeddings(tmp_path, vectors[:500], 250)
    with pytest.raises(RuntimeError, match=r"\[gpu\] extra"):
        indexing.build_in_process(index_config(tmp_path, type="IVF4,Flat", gpu="true"))
    assert indexing.build_in_process(index_config(tmp_path, type="IVF4,Flat", gpu="false"))["ntotal"] == 500


def test_adds_assigned_outside_faiss_s_add_fill_the_same_lists(vectors):
    """The GPU path assigns lists itself and lets FAISS encode them (gpu.add_assigned): with the CPU quantizer's
    assignment it fills byte for byte what add_with_ids fills."""
    from retrieval_core.index import gpu

    for factory in ("IVF16,Flat", "IVF16,PQ4", "IVF16,SQ8"):
        trained = faiss_index.train(factory, DIM, "ip", vectors)
        assert gpu.can_assign(trained)
        plain, assigned = faiss.clone_index(trained), faiss.clone_index(trained)
        faiss_index.add(plain, vectors, np.arange(len(vectors)))
        _, lists = faiss.downcast_index(assigned).quantizer.search(vectors, 1)
        gpu.add_assigned(assigned, vectors, np.arange(len(vectors)), lists.ravel())
        assert faiss.serialize_index(plain).tobytes() == faiss.serialize_index(assigned).tobytes()
    assert not gpu.can_assign(faiss_index.train("IVF16_HNSW8,Flat", DIM, "ip", vectors))
