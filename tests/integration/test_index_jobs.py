"""The index, search and evaluate jobs on the session's local Ray cluster."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import DEMO_CORPUS, REPO, clustered_vectors, config, write_synthetic_embeddings

from jobs import encode, evaluate, index, search
from jobs.ray import actors, cluster, query_encoding
from retrieval_core.config import load_config
from retrieval_core.evaluate import metrics
from retrieval_core.index import faiss_index, indexing, lookup
from retrieval_core.io import judgements
from retrieval_core.io.folder import Folder
from retrieval_core.io.manifest import IncompatibleOutputError

pytestmark = pytest.mark.usefixtures("ray_cluster")
DEMO = REPO / "examples" / "demo"


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory):
    """The demo corpus encoded with the packaged model (title + text) and indexed (auto = Flat)."""
    root = tmp_path_factory.mktemp("demo-index") / "out"
    cfg = config(DEMO_CORPUS, root, corpus__title_column="title", runtime__rows_per_shard=32)
    encode.run(cfg)
    return cfg, index.run(cfg)


def test_demo_index_is_flat_and_exact(demo_index):
    cfg, summary = demo_index
    import pyarrow.parquet as pq

    rows = pq.read_metadata(DEMO_CORPUS).num_rows
    manifest = indexing.read_index_manifest(Folder(cfg.output.root))
    assert summary["type"] == "Flat" and summary["ntotal"] == rows and summary["recall_at_10"] == 1.0
    assert [s["ntotal"] for s in manifest["shards"]] == [min(32, rows - start) for start in range(0, rows, 32)]
    assert set(manifest["timings_s"]) == {"train", "add", "merge", "recall", "total", "driver_cpu"}
    assert manifest["peak_memory_mb"]["driver"] > 0 and "merge_task" not in manifest["peak_memory_mb"]  # in-process


def test_search_ranks_the_revenue_beat_document_first(demo_index):
    cfg, _ = demo_index
    hits = search.run(cfg, ["Which company beat revenue estimates?"], k=5)[0]
    assert hits[0]["doc_id"] == "d007" and "Northwind" in hits[0]["text"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))


def test_search_cli_prints_the_hit(demo_index):
    cfg, _ = demo_index
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.search",
            "--set",
            f"output.root={cfg.output.root}",
            "--set",
            "corpus.title_column=title",
            "--query",
            "Which company beat revenue estimates?",
            "--k",
            "3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "query: Which company beat revenue estimates?"
    assert lines[2].split()[:1] == ["1"] and lines[2].split()[2] == "d007"


def test_queries_from_another_encoder_are_refused(demo_index):
    cfg, _ = demo_index
    other = config(DEMO_CORPUS, cfg.output.root, corpus__title_column="title", model__max_seq_length=128)
    with pytest.raises(IncompatibleOutputError, match="max_seq_length") as error:
        search.run(other, ["anything"])
    manifest = indexing.read_index_manifest(Folder(cfg.output.root))
    assert manifest["fingerprint"] in str(error.value)


def test_evaluate_equals_sentence_transformers_evaluator(demo_index):
    """Our metrics over the Flat index equal sentence-transformers' InformationRetrievalEvaluator (exact cosine
    search with the same model) on the demo queries and qrels."""
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from retrieval_core.encode.model_files import resolve_model_path

    cfg, _ = demo_index
    result = evaluate.run(cfg)
    queries = judgements.read_queries(str(DEMO / "queries.jsonl"))
    qrels = judgements.read_qrels(str(DEMO / "qrels.tsv"))
    corpus = {r["id"]: f"{r['title']} {r['text']}" for r in pq.read_table(DEMO_CORPUS).to_pylist()}
    reference = InformationRetrievalEvaluator(
        queries=queries,
        corpus=corpus,
        relevant_docs={q: {d for d, s in j.items() if s > 0} for q, j in qrels.items()},
        ndcg_at_k=[10],
        mrr_at_k=[10],
        precision_recall_at_k=[10, 100],
        accuracy_at_k=[1],
        map_at_k=[10],
        show_progress_bar=False,
        batch_size=32,
        write_csv=False,
    )
    figures = reference(SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu"))
    ours = result["metrics"]
    assert ours["queries"] == len({q for q, j in qrels.items() if any(s > 0 for s in j.values())})
    for name in ("ndcg@10", "recall@10", "recall@100", "mrr@10"):
        key = next(k for k in figures if k.endswith(name))
        assert ours[name] == pytest.approx(figures[key], abs=1e-6), name
    assert Path(cfg.output.root, "eval", "metrics.json").exists()
    again = evaluate.run(cfg)  # same index, queries, qrels and settings: reused, same figures
    assert again["reused"] is True and result["reused"] is False and again["metrics"] == ours
    deeper = evaluate.run(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, depth=150)))
    assert deeper["reused"] is False and deeper["depth"] == 150
    evaluate.run(cfg)


def test_evaluation_in_batches_by_row_id_equals_scoring_every_doc_id_ranking_at_once(demo_index, monkeypatch):
    """Searched and scored 7 queries at a time, judged documents compared by row id: the same per-query metrics
    and means, to the last bit, as the doc-id rankings of all queries scored at once."""
    cfg, _ = demo_index
    queries = judgements.read_queries(str(DEMO / "queries.jsonl"))
    qrels = judgements.read_qrels(str(DEMO / "qrels.tsv"))
    qids = evaluate.judged_queries(queries, qrels)
    _, ids, _ = query_encoding.search_texts(cfg, [queries[q] for q in qids], cfg.eval.depth)
    ranked = lookup.as_doc_ids(ids, lookup.doc_ids_for_rows(Folder(str(cfg.output.root)), ids.ravel()))
    run_ = dict(zip(qids, ranked))
    monkeypatch.setattr(evaluate, "BATCH_QUERIES", 7)
    again = evaluate.run(dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, overwrite=True)))
    assert len(qids) > 14 and again["reused"] is False
    assert again["metrics"] == metrics.evaluate_run(run_, qrels)
    per_query = json.loads(Path(cfg.output.root, "eval", "per_query.json").read_text())
    assert per_query == metrics.per_query_metrics(run_, qrels) and list(per_query) == qids


def test_evaluation_batches_encoded_on_actors_started_once_equal_the_local_evaluation(demo_index, monkeypatch):
    """Each batch of queries is encoded when it is searched: on encoder actors (more queries than
    runtime.inline_rows) started once for every batch, the figures equal those of the queries encoded in the
    driver."""
    cfg, _ = demo_index
    again = dataclasses.replace(cfg.output, overwrite=True)
    local = evaluate.run(dataclasses.replace(cfg, output=again))
    starts = []
    start_encode_workers = actors.start_encode_workers
    monkeypatch.setattr(actors, "start_encode_workers", lambda *a: starts.append(a[1]) or start_encode_workers(*a))
    encoded, encode_on = [], query_encoding._encode_on
    monkeypatch.setattr(
        query_encoding,
        "_encode_on",
        lambda workers, texts, speculation: encoded.append(len(texts)) or encode_on(workers, texts, speculation),
    )
    monkeypatch.setattr(evaluate, "BATCH_QUERIES", 7)
    monkeypatch.setattr(query_encoding, "CHUNK", 4)
    on_actors = evaluate.run(
        dataclasses.replace(cfg, output=again, runtime=dataclasses.replace(cfg.runtime, inline_rows=3))
    )
    assert len(starts) == 1 and on_actors["metrics"]["queries"] > 14
    assert max(encoded) == 7 and sum(encoded) == on_actors["metrics"]["queries"]  # a batch at a time
    assert on_actors["metrics"] == pytest.approx(local["metrics"], rel=1e-6)


def test_actor_query_encoding_equals_local(demo_index, monkeypatch):
    cfg, _ = demo_index
    texts = [f"question number {i} about revenue" for i in range(10)]
    with cluster.LazyRaySession(cfg.runtime) as session:
        local = query_encoding.encode_queries(cfg, texts, session)
        monkeypatch.setattr(query_encoding, "CHUNK", 4)
        on_actors = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, inline_rows=3))
        remote = query_encoding.encode_queries(on_actors, texts, session)
    assert remote.shape == local.shape == (10, 384)
    assert np.min(np.sum(remote * local, axis=1)) >= 0.9999


def ivf_config(root, *extra):
    return load_config(
        None,
        [
            f"output.root={root}",
            "runtime.progress=false",
            "index.type=IVF16,Flat",
            "index.recall_queries=100",
            "runtime.inline_rows=0",
            *extra,
        ],
    )  # built in Ray tasks


def test_ray_build_equals_in_process_build(tmp_path):
    vectors = clustered_vectors(2000, 16, seed=3)
    write_synthetic_embeddings(tmp_path / "ray", vectors, 300)
    write_synthetic_embeddings(tmp_path / "local", vectors, 300)
    summary = index.run(ivf_config(tmp_path / "ray", "index.merge_memory=30000"))  # several merge tasks
    local = indexing.build_in_process(ivf_config(tmp_path / "local"))
    assert summary["search_parameters"] == local["search_parameters"]
    merged = [(tmp_path / where / "index" / "merged.faiss").read_bytes() for where in ("ray", "local")]
    assert merged[0] == merged[1]
    a, _ = indexing.load_index(Folder(str(tmp_path / "ray")))
    b, _ = indexing.load_index(Folder(str(tmp_path / "local")))
    queries = clustered_vectors(40, 16, seed=4)
    np.testing.assert_array_equal(faiss_index.search(a, queries, 10)[1], faiss_index.search(b, queries, 10)[1])


def test_rerun_redoes_only_uncommitted_shards(tmp_path):
    vectors = clustered_vectors(1500, 16, seed=5)
    write_synthetic_embeddings(tmp_path, vectors, 300)
    cfg = ivf_config(tmp_path)
    index.run(cfg)
    idx = tmp_path / "index"
    mtimes = {p.name: p.stat().st_mtime_ns for p in idx.glob("shard-*.lists")}
    for name in ("manifest.json", "merged.faiss", "shard-00003.lists", "_shards/shard-00003.json"):
        (idx / name).unlink()
    summary = index.run(cfg)
    assert not summary["reused"] and summary["ntotal"] == 1500
    after = {p.name: p.stat().st_mtime_ns for p in idx.glob("shard-*.lists")}
    changed = sorted(name for name in after if after[name] != mtimes.get(name))
    assert changed == ["shard-00003.lists"]
    assert index.run(cfg)["reused"] is True


def test_relevant_documents_missing_from_the_index_are_counted_and_warned(demo_index, tmp_path, caplog):
    """A judgement naming a document the corpus lacks stays in the figures as never retrieved (as BEIR counts it),
    and the evaluation says how many there are, with examples."""
    import logging

    cfg, _ = demo_index
    qrels_path = tmp_path / "qrels.tsv"
    first_query = (DEMO / "qrels.tsv").read_text().splitlines()[1].split("\t")[0]
    qrels_path.write_text((DEMO / "qrels.tsv").read_text().rstrip("\n") + f"\n{first_query}\tno-such-doc\t1\n")
    with_missing = dataclasses.replace(
        cfg,
        eval=dataclasses.replace(cfg.eval, qrels_path=str(qrels_path)),
        output=dataclasses.replace(cfg.output, root=str(cfg.output.root)),
    )
    clean = evaluate.run(cfg)
    with caplog.at_level(logging.WARNING, logger="jobs.evaluate"):
        result = evaluate.run(with_missing)
    assert result["relevant_not_indexed"] == 1 and clean["relevant_not_indexed"] == 0
    assert f"query {first_query} -> doc no-such-doc" in caplog.text
    assert result["metrics"]["recall@100"] < clean["metrics"]["recall@100"]
    evaluate.run(cfg)  # the module's other tests find the demo evaluation in place
