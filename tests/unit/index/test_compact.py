"""index.vectors: float16, int8 and binary (RaBitQ) codes for the first stage, rescored with the stored vectors;
compared with exact search over the same vectors, and with the codes alone."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import build_synthetic_index, clustered_vectors

from retrieval_core.config import ConfigError, load_config
from retrieval_core.index import compact, faiss_index, indexing, search
from retrieval_core.io.folder import Folder

DIM = 64
K = 10


@pytest.fixture(scope="module")
def vectors():
    return clustered_vectors(3000, DIM, clusters=12, seed=3)


@pytest.fixture(scope="module")
def queries():
    return clustered_vectors(60, DIM, clusters=12, seed=4)


def build(root, data, **index_settings):
    return build_synthetic_index(root, data, recall_queries=100, **index_settings)[1]


def exact(vectors, queries, k=K):
    return search.exact_search([(np.arange(len(vectors)), vectors)], queries, k, "ip")


@pytest.mark.parametrize("vectors_setting, code", [("float16", "SQfp16"), ("int8", "SQ8"), ("binary", "RaBitQ")])
def test_compact_codes_rescored_give_exact_scores_and_at_least_the_codes_recall(
    tmp_path, vectors, queries, vectors_setting, code
):
    manifest = build(tmp_path / "rescored", vectors, vectors=vectors_setting, rescore_factor=8)
    assert manifest["type"] == code and manifest["vectors"] == vectors_setting and manifest["rescore_factor"] == 8
    index, _ = indexing.load_index(Folder(str(tmp_path / "rescored")), mmap=True)
    scores, ids = faiss_index.search(index, queries, K)
    np.testing.assert_allclose(scores, np.einsum("nd,nkd->nk", queries, vectors[ids]), rtol=1e-6, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)
    want_scores, want_ids = exact(vectors, queries)
    plain = build(tmp_path / "codes", vectors, vectors=vectors_setting, rescore_factor=0)
    assert plain["rescore_factor"] == 0 and not os.path.exists(tmp_path / "codes" / "index" / "vectors")
    codes, _ = indexing.load_index(Folder(str(tmp_path / "codes")))
    recall = search.recall_at_k(ids, want_ids, K)
    codes_recall = search.recall_at_k(faiss_index.search(codes, queries, K)[1], want_ids, K)
    if vectors_setting == "binary":  # 1 bit a dimension on tight synthetic clusters: far from exact, better rescored
        assert recall > codes_recall + 0.1
        assert manifest["recall"]["recall_at_10"] > plain["recall"]["recall_at_10"]  # measured rescored
    else:
        assert recall >= max(codes_recall, 0.99)
        assert manifest["recall"]["recall_at_10"] >= 0.99  # the index stage measured the rescored search


def test_rescoring_a_float16_flat_index_is_exact_search(tmp_path, vectors, queries):
    build(tmp_path, vectors, vectors="float16")
    index, _ = indexing.load_index(Folder(str(tmp_path)))
    got_scores, got_ids = faiss_index.search(index, queries, K)
    want_scores, want_ids = exact(vectors, queries)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-6)


def test_binary_codes_take_a_sixteenth_of_float32_and_auto_keeps_its_structure(tmp_path):
    wide = clustered_vectors(3000, 256, clusters=12, seed=5)
    float32 = build(tmp_path / "f", wide, type="IVF16,Flat", nprobe=4)
    binary = build(tmp_path / "b", wide, type="IVF16,RaBitQ", vectors="binary", nprobe=4)
    size = lambda root: os.path.getsize(root / "index" / "merged.faiss")  # noqa: E731
    assert size(tmp_path / "f") >= 16 * (size(tmp_path / "b") - size_of_quantizer(256, 16))
    assert compact.with_vectors("IVF1024,Flat", "int8") == "IVF1024,SQ8"
    assert compact.with_vectors("Flat", "binary") == "RaBitQ"
    assert faiss_index.bytes_per_vector("IVF16,RaBitQ", 256) == 256 / 8 + 8 + faiss_index.ID_BYTES
    assert binary["vectors"] == "binary" and float32["vectors"] == "float32"


def size_of_quantizer(dim: int, lists: int) -> int:
    return 4 * dim * lists + 4096  # the centroids, and the file's headers (an upper bound)


def test_a_shard_group_is_rescored_too(tmp_path, vectors, queries):
    build(tmp_path, vectors, type="IVF16,SQ8", vectors="int8", nprobe=16, rescore_factor=4)
    group = indexing.load_shard_group(Folder(str(tmp_path)), ["shard-00001", "shard-00003"])
    rows = np.r_[437:874, 1311:1748]
    scores, ids = faiss_index.search(group, queries, K)
    assert set(ids.ravel()) <= set(rows)
    np.testing.assert_allclose(scores, np.einsum("nd,nkd->nk", queries, vectors[ids]), rtol=1e-6, atol=1e-6)
    want = search.exact_search([(rows, vectors[rows])], queries, K, "ip")[1]
    assert search.recall_at_k(ids, want, K) >= 0.99


def test_vectors_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="'index.vectors' = 'int4'"):
        load_config(None, ["index.vectors=int4"])
    with pytest.raises(ConfigError, match="an explicit type must end in the code of the vectors \\(SQ8"):
        load_config(None, ["index.vectors=int8", "index.type=IVF64,Flat"])
    with pytest.raises(ConfigError, match="'index.rescore_factor' = -1"):
        load_config(None, ["index.rescore_factor=-1"])
    assert load_config(None, ["index.vectors=int8", "index.type=IVF64,SQ8"]).index.vectors == "int8"
