"""Embedding APIs (OpenAI's and Cohere's, played by the local stand-in tests/fake_embedding_api.py) through every
job: encode, index, evaluate, search's query path (in the driver and on actors), mine and refresh give the vectors
and scores of the provider's own vectors; a failing batch fails its shard, a rerun sends only what is missing, the
manifest says what the run cost, and the key appears nowhere."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import API_KEY, API_KEY_ENV
from fake_embedding_api import WORD, expected_vectors
from helpers import DEMO_CORPUS, REPO, config

from jobs import encode, evaluate, index, mine, refresh
from jobs.ray import cluster, query_encoding
from retrieval_core.encode import embeddings
from retrieval_core.evaluate import metrics
from retrieval_core.io import judgements
from retrieval_core.io.folder import Folder
from retrieval_core.mine import mining

pytestmark = pytest.mark.usefixtures("ray_cluster")
DEMO = REPO / "examples" / "demo"
INPUT_TYPES = {"openai": ("", ""), "cohere": ("search_document", "search_query")}


def api_config(api, provider, root, **extra):
    base = f"{api.url}/v1" if provider == "openai" else api.url
    settings = dict(
        model__provider=provider,
        model__base_url=base,
        model__api_key_env=API_KEY_ENV,
        model__batch_size=16,
        corpus__title_column="title",
        runtime__rows_per_shard=64,
        index__type="Flat",
        eval__queries_path=str(DEMO / "queries.jsonl"),
        eval__qrels_path=str(DEMO / "qrels.tsv"),
        mine__pairs_path=str(DEMO / "pairs.jsonl"),
        mine__query_id_column="query_id",
        mine__relative_margin="null",
    )
    return config(DEMO_CORPUS, root, model="fake-embed", **{**settings, **extra})


def demo_documents() -> tuple[list[str], list[str]]:
    rows = pq.read_table(DEMO_CORPUS).to_pylist()
    return [r["id"] for r in rows], [f"{r['title']} {r['text']}" for r in rows]


def files_under(root) -> list:
    return [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]


@pytest.fixture(params=["openai", "cohere"])
def built(request, embedding_api, tmp_path):
    provider = request.param
    where = {"runtime__inline_rows": 0} if provider == "cohere" else {}  # documents on actors, or in the driver
    cfg = api_config(embedding_api, provider, tmp_path / "out", **where)
    result = encode.run(cfg)
    index.run(cfg)
    return provider, cfg, result


def test_every_job_uses_the_provider_s_vectors(built, embedding_api, tmp_path):
    provider, cfg, result = built
    doc_type, query_type = INPUT_TYPES[provider]
    ids, texts = demo_documents()
    _, vectors, doc_ids = embeddings.load_embeddings(Folder(str(cfg.output.root)))
    assert doc_ids == ids
    documents = expected_vectors(texts, input_type=doc_type)
    np.testing.assert_allclose(vectors, documents, atol=1e-6)

    # what the run cost, in the summary and the manifest: one request per 16 texts, a word a token
    manifest = embeddings.read_embeddings_manifest(Folder(str(cfg.output.root)))
    usage = manifest["api_usage"]
    assert usage == result["api_usage"]
    shards = [s["rows"] for s in manifest["shards"]]
    assert usage["requests"] == sum(-(-n // 16) for n in shards) and usage["retries"] == 0
    assert usage["tokens"] == sum(len(WORD.findall(t)) for t in texts) and usage["texts"] == len(texts)
    assert "requests (0 retries)" in encode.format_summary(result)
    assert manifest["encoder"]["provider"] == provider and "weights_sha256" not in manifest["encoder"]

    # queries: in the driver and on actors; evaluate against an exact search over the provider's vectors
    queries = judgements.read_queries(str(DEMO / "queries.jsonl"))
    qrels = judgements.read_qrels(str(DEMO / "qrels.tsv"))
    qids = sorted(q for q in qrels if any(s > 0 for s in qrels[q].values()))
    query_vectors = expected_vectors([queries[q] for q in qids], input_type=query_type)
    on_actors = api_config(embedding_api, provider, cfg.output.root, runtime__inline_rows=0)
    with cluster.LazyRaySession(cfg.runtime) as session:
        for each in (cfg, on_actors):
            np.testing.assert_allclose(
                query_encoding.encode_queries(each, [queries[q] for q in qids], session), query_vectors, atol=1e-6
            )
    scores = query_vectors @ documents.T
    run = {q: [ids[j] for j in np.argsort(-row, kind="stable")[:100]] for q, row in zip(qids, scores)}
    reference = metrics.evaluate_run(run, qrels)
    ours = evaluate.run(cfg)["metrics"]
    assert reference["ndcg@10"] > 0.3  # the stand-in's vectors retrieve, so the comparison means something
    for name in ("ndcg@10", "recall@10", "mrr@10"):
        assert ours[name] == pytest.approx(reference[name], abs=1e-6), name

    # mine: every negative's score is the provider's query vector against its document vector
    mine.run(cfg)
    parts = mining.read_parts(Folder(str(cfg.output.root))).to_pylist()
    by_id = dict(zip(ids, documents))
    mined_queries = expected_vectors([p["query"] for p in parts], input_type=query_type)
    for part, query in zip(parts, mined_queries):
        want = np.array([query @ by_id[d] for d in part["negative_ids"]], np.float32)
        np.testing.assert_allclose(np.asarray(part["negative_scores"], np.float32), want, atol=1e-5)

    # refresh encodes as the encode job does
    record = refresh.run(api_config(embedding_api, provider, tmp_path / "nightly"))
    version_root = tmp_path / "nightly" / "versions" / record["version"]
    _, refreshed, refreshed_ids = embeddings.load_embeddings(Folder(str(version_root)))
    assert refreshed_ids == ids
    np.testing.assert_allclose(refreshed, vectors, atol=1e-6)
    assert embeddings.read_embeddings_manifest(Folder(str(version_root)))["api_usage"]["texts"] == len(texts)

    for path in files_under(tmp_path):
        with open(path, "rb") as handle:
            assert API_KEY.encode() not in handle.read(), path


def test_a_failing_batch_fails_its_shard_and_a_rerun_bills_only_what_is_missing(embedding_api, tmp_path):
    """On actors: the last shard's texts keep getting 500s, which fails the job with the provider's message once
    the retries are spent (no vector is made up); the rerun sends none of the shards committed meanwhile (at least
    one: the last shard starts only when an earlier one is done)."""
    ids, texts = demo_documents()
    poisoned = texts[-10]
    embedding_api.fail(status=500, times=1000, when=poisoned)
    cfg = api_config(embedding_api, "openai", tmp_path / "out", runtime__inline_rows=0, model__max_retries=1)
    with pytest.raises(Exception, match=r"failed after 2 attempt\(s\).*HTTP 500") as failure:
        encode.run(cfg)
    assert API_KEY not in str(failure.value)
    committed = embeddings.committed_records(embeddings.layout_of(cfg))
    assert committed and poisoned not in embedding_api.texts_sent()
    embedding_api.reset()
    result = encode.run(cfg)
    sent_again = set(embedding_api.texts_sent())
    committed_texts = {t for r in committed.values() for t in texts[r["row_start"] : r["row_stop"]]}
    assert poisoned in sent_again and not sent_again & committed_texts
    assert sent_again | committed_texts == set(texts)
    assert result["shards_skipped"] == len(committed)
    _, vectors, doc_ids = embeddings.load_embeddings(Folder(str(cfg.output.root)))
    assert doc_ids == ids
    np.testing.assert_allclose(vectors, expected_vectors(texts), atol=1e-6)
