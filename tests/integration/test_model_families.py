"""Every model family through the jobs (encode, index, evaluate, search's query path, mine, refresh): the vectors
and scores the jobs produce equal sentence-transformers called directly with the family's prompts and encoders."""

import numpy as np
import pyarrow.parquet as pq
import pytest
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
# family -> (document prefix, query prefix, key of the query encoder's model), as the authors use them
EXPECTED = {
    "e5": ("passage: ", "query: ", "e5"),
    "bge": ("", "Represent this sentence for searching relevant passages: ", "bge"),
    "dpr": ("", "", "dpr_question"),
    "shipped": ("D: ", "Q: ", "shipped"),
    "router": (None, None, "router"),  # routed by task: encode_document / encode_query
}


def direct(path: str, texts: list[str], prefix, side: str) -> np.ndarray:
    """sentence-transformers itself: the prefix concatenated by hand, or the model's own routing (Router)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu")
    if prefix is None:
        vectors = model.encode_document(texts) if side == "document" else model.encode_query(texts)
    else:
        vectors = model.encode([prefix + t for t in texts], prompt="")
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def demo_documents() -> tuple[list[str], list[str]]:
    rows = pq.read_table(DEMO_CORPUS).to_pylist()
    return [r["id"] for r in rows], [f"{r['title']} {r['text']}" for r in rows]


def family_config(family_models, key, root, **extra):
    return config(
        DEMO_CORPUS,
        root,
        model=family_models[key],
        corpus__title_column="title",
        runtime__rows_per_shard=64,
        index__type="Flat",
        eval__queries_path=str(DEMO / "queries.jsonl"),
        eval__qrels_path=str(DEMO / "qrels.tsv"),
        mine__pairs_path=str(DEMO / "pairs.jsonl"),
        mine__query_id_column="query_id",
        mine__relative_margin="null",
        **extra,
    )


@pytest.fixture(scope="module", params=list(EXPECTED))
def built(request, family_models, tmp_path_factory):
    """One family's corpus encoded and indexed by the jobs."""
    key = request.param
    cfg = family_config(family_models, key, tmp_path_factory.mktemp(key) / "out")
    encode.run(cfg)
    index.run(cfg)
    return key, cfg


def test_encode_job_vectors_equal_sentence_transformers(built, family_models):
    key, cfg = built
    ids, texts = demo_documents()
    _, vectors, doc_ids = embeddings.load_embeddings(Folder(str(cfg.output.root)))
    assert doc_ids == ids
    np.testing.assert_allclose(vectors, direct(family_models[key], texts, EXPECTED[key][0], "document"), atol=1e-5)


def test_query_encoding_and_evaluation_use_the_query_side(built, family_models):
    """The query path of search, evaluate and mine (in the driver; on actors too for the separate and the routed
    query encoders, the cases where an actor's encoder could differ), and evaluate's figures against an exact
    search over sentence-transformers' own vectors."""
    key, cfg = built
    queries = judgements.read_queries(str(DEMO / "queries.jsonl"))
    qrels = judgements.read_qrels(str(DEMO / "qrels.tsv"))
    qids = sorted(q for q in qrels if any(s > 0 for s in qrels[q].values()))
    texts = [queries[q] for q in qids]
    expected = direct(family_models[EXPECTED[key][2]], texts, EXPECTED[key][1], "query")
    on_actors = config(DEMO_CORPUS, cfg.output.root, model=cfg.model.name, runtime__inline_rows=0)
    with cluster.LazyRaySession(cfg.runtime) as session:
        np.testing.assert_allclose(query_encoding.encode_queries(cfg, texts, session), expected, atol=1e-5)
        if key in ("dpr", "router"):
            np.testing.assert_allclose(query_encoding.encode_queries(on_actors, texts, session), expected, atol=1e-5)
    ids, docs = demo_documents()
    scores = expected @ direct(family_models[key], docs, EXPECTED[key][0], "document").T
    run = {q: [ids[j] for j in np.argsort(-row, kind="stable")[:100]] for q, row in zip(qids, scores)}
    reference = metrics.evaluate_run(run, qrels)
    ours = evaluate.run(cfg)["metrics"]
    for name in ("ndcg@10", "recall@10", "mrr@10"):
        assert ours[name] == pytest.approx(reference[name], abs=1e-6), name


def test_mined_negative_scores_are_the_family_query_and_document_scores(built, family_models):
    key, cfg = built
    if key not in ("dpr", "router"):
        pytest.skip("the separate and the routed query encoders are the cases the query side could get wrong")
    mine.run(cfg)
    parts = mining.read_parts(Folder(str(cfg.output.root))).to_pylist()
    ids, docs = demo_documents()
    doc_vectors = dict(zip(ids, direct(family_models[key], docs, EXPECTED[key][0], "document")))
    queries = direct(family_models[EXPECTED[key][2]], [p["query"] for p in parts], EXPECTED[key][1], "query")
    for part, query in zip(parts, queries):
        got = np.asarray(part["negative_scores"], np.float32)
        want = np.array([query @ doc_vectors[d] for d in part["negative_ids"]], np.float32)
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_refresh_encodes_as_the_encode_job(built, family_models, tmp_path):
    key, cfg = built
    if key not in ("e5", "router"):
        pytest.skip("one prompt family and the routed model suffice: refresh shares the encoder with encode")
    record = refresh.run(family_config(family_models, key, tmp_path / "nightly"))
    version_root = str(tmp_path / "nightly" / "versions" / record["version"])
    _, refreshed, refreshed_ids = embeddings.load_embeddings(Folder(version_root))
    _, encoded, encoded_ids = embeddings.load_embeddings(Folder(str(cfg.output.root)))
    assert refreshed_ids == encoded_ids
    np.testing.assert_allclose(refreshed, encoded, atol=1e-5)
