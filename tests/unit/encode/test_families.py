"""Model families: prompts resolved as the authors intended, asymmetric and separate query encoders, Matryoshka
truncation; every vector compared with sentence-transformers called directly with the same prompts."""

import dataclasses
import shutil

import numpy as np
import pytest

from retrieval_core.config import ConfigError, ModelConfig, load_config
from retrieval_core.encode import encoding, families
from retrieval_core.encode.encoding import SentenceTransformerEncoder

DOCS = [
    "the river flows past the old mill",
    "protein folding in the cell",
    "market revenue beat estimates",
    "a song for piano and strings",
] * 3
QUERIES = ["which river", "how do proteins fold"]


@pytest.mark.parametrize(
    "name, family",
    [
        ("intfloat/e5-large-v2", "e5"),
        ("intfloat/multilingual-e5-base", "e5"),
        ("e5-small", "e5"),
        ("intfloat/e5-mistral-7b-instruct", "plain"),
        ("intfloat/multilingual-e5-large-instruct", "plain"),
        ("BAAI/bge-large-en-v1.5", "bge"),
        ("BAAI/bge-small-zh-v1.5", "bge-zh"),
        ("BAAI/bge-m3", "plain"),
        ("thenlper/gte-large", "gte"),
        ("Alibaba-NLP/gte-base-en-v1.5", "gte"),
        ("facebook-dpr-ctx_encoder-single-nq-base", "dpr"),
        ("all-MiniLM-L6-v2", "plain"),
        ("/models/intfloat-e5-small-v2", "e5"),
        ("/data/knowledge-base/model", "plain"),
    ],
)
def test_family_is_inferred_from_well_known_names(name, family):
    assert families.infer_family(name) == family


def test_presets_are_the_authors_strings():
    assert (families.FAMILIES["e5"].query_prompt, families.FAMILIES["e5"].document_prompt) == ("query: ", "passage: ")
    assert families.FAMILIES["bge"].query_prompt == "Represent this sentence for searching relevant passages: "
    assert families.FAMILIES["bge"].document_prompt == "" and families.FAMILIES["gte"].query_prompt == ""


def reference(path: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu")


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize(
    "key, doc_prefix, query_prefix",
    [
        ("e5", "passage: ", "query: "),
        ("bge", "", "Represent this sentence for searching relevant passages: "),
        ("gte", "", ""),
    ],
)
def test_family_presets_equal_sentence_transformers_with_those_prefixes(family_models, key, doc_prefix, query_prefix):
    encoder = SentenceTransformerEncoder(ModelConfig(name=family_models[key], batch_size=4))
    st = reference(family_models[key])
    np.testing.assert_allclose(
        encoder.encode_documents(DOCS), unit(st.encode([doc_prefix + t for t in DOCS])), atol=1e-5
    )
    np.testing.assert_allclose(
        encoder.encode_queries(QUERIES), unit(st.encode([query_prefix + q for q in QUERIES])), atol=1e-5
    )


def test_prompts_shipped_by_the_model_apply_and_config_prompts_override_them(family_models):
    path = family_models["shipped"]
    st = reference(path)
    encoder = SentenceTransformerEncoder(ModelConfig(name=path, family="e5"))  # shipped prompts beat the preset
    assert (encoder.document_prompt, encoder.query_prompt) == ("D: ", "Q: ")
    np.testing.assert_allclose(encoder.encode_documents(DOCS), unit(st.encode_document(DOCS)), atol=1e-5)
    np.testing.assert_allclose(encoder.encode_queries(QUERIES), unit(st.encode_query(QUERIES)), atol=1e-5)
    none = SentenceTransformerEncoder(ModelConfig(name=path, document_prompt="", query_prompt="find: "))
    np.testing.assert_allclose(none.encode_documents(DOCS), unit(st.encode(DOCS, prompt="")), atol=1e-5)
    np.testing.assert_allclose(
        none.encode_queries(QUERIES), unit(st.encode(["find: " + q for q in QUERIES])), atol=1e-5
    )


def test_an_asymmetric_router_model_routes_documents_and_queries(family_models):
    path = family_models["router"]
    st = reference(path)
    encoder = SentenceTransformerEncoder(ModelConfig(name=path))
    docs, queries = encoder.encode_documents(QUERIES), encoder.encode_queries(QUERIES)
    np.testing.assert_allclose(docs, unit(st.encode_document(QUERIES)), atol=1e-5)
    np.testing.assert_allclose(queries, unit(st.encode_query(QUERIES)), atol=1e-5)
    assert np.abs(docs - queries).max() > 0.01  # the same texts, two different towers


def test_dpr_encodes_queries_with_the_question_encoder(family_models):
    cfg = ModelConfig(name=family_models["dpr"])  # the question encoder is implied by the ctx_encoder name
    assert families.query_model_name(cfg) == family_models["dpr_question"]
    encoder = SentenceTransformerEncoder(cfg)
    np.testing.assert_allclose(
        encoder.encode_documents(DOCS), unit(reference(family_models["dpr"]).encode(DOCS)), atol=1e-5
    )
    np.testing.assert_allclose(
        encoder.encode_queries(QUERIES), unit(reference(family_models["dpr_question"]).encode(QUERIES)), atol=1e-5
    )
    document, query = encoding.encoder_identity(cfg), encoding.query_identity(cfg)
    assert query["model"] == family_models["dpr_question"] and query["weights_sha256"] != document["weights_sha256"]
    explicit = dataclasses.replace(cfg, name=family_models["gte"], family="dpr", query_name=family_models["e5"])
    assert families.query_model_name(explicit) == family_models["e5"]
    with pytest.raises(ValueError, match="set model.query_name"):
        families.query_model_name(dataclasses.replace(cfg, name=family_models["gte"], family="dpr"))


def test_truncate_dim_keeps_the_first_dimensions_renormalized(family_models):
    path = family_models["gte"]
    full = SentenceTransformerEncoder(ModelConfig(name=path)).encode_documents(DOCS)
    cut = SentenceTransformerEncoder(ModelConfig(name=path, truncate_dim=8, force_truncate=True))
    assert cut.dim == 8
    np.testing.assert_allclose(cut.encode_documents(DOCS), unit(full[:, :8]), atol=1e-5)
    with pytest.raises(ValueError, match="model.truncate_dim = 64 exceeds the dimension"):
        SentenceTransformerEncoder(ModelConfig(name=path, truncate_dim=64, force_truncate=True))


def test_truncation_is_refused_for_a_model_not_trained_for_it_unless_forced(family_models, tmp_path):
    path = family_models["gte"]
    refused = "model.truncate_dim = 8: model .* is not known to be trained for truncation"
    with pytest.raises(ValueError, match=refused):
        SentenceTransformerEncoder(ModelConfig(name=path, truncate_dim=8))
    with pytest.raises(ValueError, match=refused):  # the driver's fingerprint, before any worker starts
        encoding.encoder_identity(ModelConfig(name=path, truncate_dim=8))
    marked = tmp_path / "marked"
    shutil.copytree(path, marked)
    (marked / "README.md").write_text("Trained with MatryoshkaLoss at dimensions [32, 16, 8].\n")
    assert families.trained_for_truncation(str(marked), str(marked))
    assert SentenceTransformerEncoder(ModelConfig(name=str(marked), truncate_dim=8)).dim == 8
    assert families.trained_for_truncation("nomic-ai/nomic-embed-text-v1.5", path)  # a well-known one


def test_fingerprints_cover_the_prompts_applied_and_truncation(family_models):
    path = family_models["e5"]
    base = ModelConfig(name=path)
    fingerprint = encoding.encoder_identity(base)["fingerprint"]
    assert encoding.encoder_identity(base)["document_prompt"] == "passage: "
    assert encoding.encoder_identity(dataclasses.replace(base, family="plain"))["fingerprint"] != fingerprint
    cut = dataclasses.replace(base, truncate_dim=16, force_truncate=True)
    assert encoding.encoder_identity(cut)["fingerprint"] != fingerprint
    same = dataclasses.replace(base, family="plain", document_prompt="passage: ")
    assert encoding.encoder_identity(same)["fingerprint"] == fingerprint  # the prompt applied, however it was set
    query = encoding.query_identity(base)
    assert query["query_prompt"] == "query: "
    assert encoding.query_identity(dataclasses.replace(base, query_prompt="q: "))["fingerprint"] != query["fingerprint"]
    assert encoding.query_side(base) == {"query_prompt": "query: "}
    assert encoding.query_side(ModelConfig()) == {}  # the default model: identities that include it are unchanged


def test_default_model_fingerprint_is_unchanged_by_the_families():
    """Outputs encoded before model families existed keep their fingerprint (no re-encode, no refusal)."""
    import hashlib
    import json

    identity = encoding.encoder_identity(ModelConfig())
    before = {
        key: identity[key]
        for key in ("model", "weights_sha256", "config_sha256", "max_seq_length", "normalize", "precision")
    } | {"document_prompt": ""}
    assert identity["fingerprint"] == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:32]


def test_bad_family_and_truncate_dim_are_named():
    with pytest.raises(ConfigError, match="'model.family' = 'e6'"):
        load_config(None, ["model.family=e6"])
    with pytest.raises(ConfigError, match="'model.truncate_dim' = 0"):
        load_config(None, ["model.truncate_dim=0"])
