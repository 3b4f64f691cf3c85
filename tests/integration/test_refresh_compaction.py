"""Nights of uniform churn: a night's index work is its change (new segments) plus the segments it compacts; shared
shard indexes keep their dead rows out of the merged index by id; compaction keeps the dead rows bounded."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import config, make_docs, write_parquet

from jobs import refresh
from jobs.ray import cluster
from retrieval_core.encode import embeddings
from retrieval_core.index import faiss_index, indexing
from retrieval_core.io import versions
from retrieval_core.io.folder import Folder

NIGHTS = 7
SETTINGS = dict(
    corpus__title_column="title",
    runtime__rows_per_shard=25,
    refresh__diff_buckets=2,
    refresh__retrain="never",
    refresh__compact_dead_fraction=0.2,
    refresh__compact_budget=0.25,
    eval__queries_path="",
    index__type="IVF4,Flat",
    index__nprobe=4,  # every list: exact, comparable with brute force
    index__train_size=200,
    index__recall_queries=50,
    publish__max_deleted_fraction=0.5,
    publish__keep_versions=10,
)


def night_docs(night: int) -> list[dict]:
    """Night 0: 200 documents. Each later night changes every 20th document (a new offset each night: 5%, spread
    over every segment), deletes one and adds one."""
    docs = make_docs(200, seed=3)
    for n in range(1, night + 1):
        for d in docs[n % 20 :: 20]:
            d["text"] = d["text"] + f" night {n}"
        docs = [d for i, d in enumerate(docs) if i != (7 * n) % len(docs)]
        docs += make_docs(1, seed=100 + n, prefix=f"new{n}-")
    return docs


def never_on_ray(*args):
    raise AssertionError("a refresh this small must not need Ray")


@pytest.fixture(scope="module")
def nights(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("churn")
    root = tmp / "root"
    results = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cluster.LazyRaySession, "ensure", never_on_ray)
        for night in range(NIGHTS):
            corpus = write_parquet(tmp / f"night{night}" / "corpus.parquet", night_docs(night), row_group_size=16)
            result = refresh.run(config(corpus, root, model=tiny_model, **SETTINGS))
            assert result["published"], result
            results.append(result)
    return root, results


def version_dir(root: Path, result: dict) -> Path:
    return Path(versions.version_root(str(root), result["version"]))


def built_tonight(version: Path) -> set[str]:
    """Shard indexes this version built (not shared with the one before)."""
    records = [json.loads(p.read_text()) for p in (version / "index" / "_shards").glob("*.json")]
    return {r["name"] for r in records if not r.get("shared_from")}


def test_every_night_answers_as_exact_search_over_its_live_vectors(nights):
    root, results = nights
    for night, result in enumerate(results):
        version = str(version_dir(root, result))
        row_ids, vectors, doc_ids = embeddings.load_embeddings(Folder(version))
        assert sorted(doc_ids) == sorted(d["id"] for d in night_docs(night))
        index, _ = indexing.load_index(Folder(version))
        assert index.ntotal == len(row_ids)
        queries = vectors[::7]
        _, got = faiss_index.search(index, queries, 10)
        exact = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
        hits = np.mean([len(set(g) & set(row_ids[e])) / 10 for g, e in zip(got, exact)])
        assert hits == 1.0, f"night {night}"


def test_a_night_builds_only_its_new_and_compacted_segments(nights):
    root, results = nights
    compacted_nights = 0
    for result in results[1:]:
        version = version_dir(root, result)
        manifest = embeddings.read_embeddings_manifest(Folder(str(version)))
        entries = list(manifest["shards"])
        new = {e["name"] for e in entries if not e.get("shared_from") and not e.get("compacted_from")}
        compacted = {e["name"] for e in entries if e.get("compacted_from") and not e.get("shared_from")}
        assert built_tonight(version) == new | compacted
        assert manifest["totals"]["shards_compacted"] == len(compacted)
        for entry in entries:
            if entry["name"] in compacted:  # its own file, the live rows only
                assert "deleted_path" not in entry and entry["path"] == f"{entry['name']}.parquet"
        compacted_nights += bool(compacted)
    assert compacted_nights >= 2  # dead rows crossed the threshold on several nights


def test_dead_rows_stay_bounded_by_the_compaction_settings(nights):
    root, results = nights
    shares = []
    for result in results:
        manifest = embeddings.read_embeddings_manifest(Folder(str(version_dir(root, result))))
        dead, live = manifest["totals"].get("rows_dead", 0), manifest["totals"]["rows_encoded"]
        shares.append(dead / (dead + live))
    # the threshold plus what the nights between compactions add: 5% a night for about 4 nights at most
    assert max(shares) <= 0.2 + 4 * 0.055, shares
    assert shares[-1] < 0.2 + 2 * 0.055, shares


def test_no_compaction_lets_dead_rows_grow(tmp_path, tiny_model):
    """refresh.compact_budget 0: no segment is rewritten, so dead rows only grow (the reference for the bound above);
    the index still leaves them out."""
    root = tmp_path / "root"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cluster.LazyRaySession, "ensure", never_on_ray)
        dead = []
        for night in range(4):
            corpus = write_parquet(tmp_path / f"night{night}" / "corpus.parquet", night_docs(night), row_group_size=16)
            result = refresh.run(config(corpus, root, model=tiny_model, **{**SETTINGS, "refresh__compact_budget": 0}))
            manifest = embeddings.read_embeddings_manifest(Folder(str(version_dir(root, result))))
            assert manifest["totals"].get("shards_compacted", 0) == 0
            dead.append(manifest["totals"].get("rows_dead", 0))
            index, _ = indexing.load_index(Folder(str(version_dir(root, result))))
            assert index.ntotal == manifest["totals"]["rows_encoded"]
    assert dead == sorted(dead) and dead[-1] > dead[1] > 0
