"""model.backend: onnx: the model's networks in ONNX Runtime give torch's vectors, exported once per node, and fall
back to torch (saying so) when they would not."""

import logging
import os

import numpy as np
import pytest
from helpers import config

from retrieval_core.config import ConfigError
from retrieval_core.encode import encoding, onnx_backend

pytest.importorskip("onnxruntime")  # in the test extra; skipped only where it cannot install

TEXTS = ["a short one", "protein folding in the cell " * 20, "revenue beat estimates", "x"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_FILE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def encoder(tmp_path, model, **settings):
    return encoding.SentenceTransformerEncoder(config("unused", tmp_path, model=model, **settings).model)


def test_onnx_gives_torch_s_vectors_and_exports_once_per_node(tmp_path, tiny_model, cache, caplog):
    torch_vectors = encoder(tmp_path, tiny_model).encode_documents(TEXTS)
    with caplog.at_level(logging.INFO):
        onnx = encoder(tmp_path, tiny_model, model__backend="onnx")
    assert "ONNX Runtime encodes the model" in caplog.text
    assert onnx_backend.is_onnx_network(onnx.model[0].model)
    vectors = onnx.encode_documents(TEXTS)
    assert vectors.shape == torch_vectors.shape
    assert np.min(np.sum(vectors * torch_vectors, axis=1)) >= 0.99999
    exported = sorted(cache.glob("*.onnx"))
    assert len(exported) == 1
    stamp = os.stat(exported[0]).st_mtime_ns
    again = encoder(tmp_path, tiny_model, model__backend="onnx", model__batch_size=3)  # another process would too
    np.testing.assert_allclose(again.encode_documents(TEXTS), vectors, atol=1e-6)
    assert sorted(cache.glob("*.onnx")) == exported and os.stat(exported[0]).st_mtime_ns == stamp


def test_the_backend_is_part_of_the_fingerprint_only_when_not_torch(tmp_path, tiny_model):
    plain = encoding.encoder_identity(config("unused", tmp_path, model=tiny_model).model)
    onnx = encoding.encoder_identity(config("unused", tmp_path, model=tiny_model, model__backend="onnx").model)
    assert "backend" not in plain and onnx["backend"] == "onnx" and onnx["fingerprint"] != plain["fingerprint"]


def test_vectors_that_would_differ_put_torch_back_with_a_warning(tmp_path, tiny_model, cache, caplog, monkeypatch):
    monkeypatch.setattr(onnx_backend, "MIN_COSINE", 1.01)  # no cosine reaches it
    torch_vectors = encoder(tmp_path, tiny_model).encode_documents(TEXTS)
    with caplog.at_level(logging.WARNING):
        fallen = encoder(tmp_path, tiny_model, model__backend="onnx")
    assert "torch encodes the model" in caplog.text and "< 1.01" in caplog.text
    assert not onnx_backend.is_onnx_network(fallen.model[0].model)
    np.testing.assert_array_equal(fallen.encode_documents(TEXTS), torch_vectors)


def test_onnx_is_fp32_and_local_only(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="model.backend' = 'onnx' runs in fp32, and model.precision = 'bf16'"):
        config("unused", tmp_path, model=tiny_model, model__backend="onnx", model__precision="bf16")
    with pytest.raises(ConfigError, match="expected one of torch, onnx"):
        config("unused", tmp_path, model=tiny_model, model__backend="openvino")
