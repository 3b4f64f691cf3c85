"""model.backend: onnx | openvino: the model's networks in ONNX Runtime or OpenVINO give torch's vectors, exported
once per node, and fall back to torch (saying so) when they would not."""

import logging
import os

import numpy as np
import pytest
from helpers import config

from retrieval_core.config import ConfigError
from retrieval_core.encode import encoding, exported

TEXTS = ["a short one", "protein folding in the cell " * 20, "revenue beat estimates", "x"]
RUNTIME_MODULES = {"onnx": "onnxruntime", "openvino": "openvino"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_FILE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def encoder(tmp_path, model, **settings):
    return encoding.SentenceTransformerEncoder(config("unused", tmp_path, model=model, **settings).model)


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_an_exported_network_gives_torch_s_vectors_and_is_exported_once_per_node(
    tmp_path, tiny_model, cache, caplog, backend
):
    pytest.importorskip(RUNTIME_MODULES[backend])  # in the test extra; skipped only where it cannot install
    torch_vectors = encoder(tmp_path, tiny_model).encode_documents(TEXTS)
    with caplog.at_level(logging.INFO):
        fast = encoder(tmp_path, tiny_model, model__backend=backend)
    assert "encodes the model in fp32" in caplog.text and fast.exported
    assert exported.runtime_of(fast.model[0].model) == backend
    vectors = fast.encode_documents(TEXTS)
    assert vectors.shape == torch_vectors.shape
    assert np.min(np.sum(vectors * torch_vectors, axis=1)) >= 0.99999
    files = sorted(cache.glob("*.onnx"))
    assert len(files) == 1
    stamp = os.stat(files[0]).st_mtime_ns
    again = encoder(tmp_path, tiny_model, model__backend=backend, model__batch_size=3)  # another process would too
    np.testing.assert_allclose(again.encode_documents(TEXTS), vectors, atol=1e-6)
    assert sorted(cache.glob("*.onnx")) == files and os.stat(files[0]).st_mtime_ns == stamp


def test_openvino_in_bf16_stays_within_the_lossless_cosine(tmp_path, tiny_model, cache):
    pytest.importorskip("openvino")
    torch_vectors = encoder(tmp_path, tiny_model).encode_documents(TEXTS)
    bf16 = encoder(tmp_path, tiny_model, model__backend="openvino", model__precision="bf16")
    vectors = bf16.encode_documents(TEXTS)  # bf16 on CPUs that have it; OpenVINO keeps f32 on those that do not
    assert np.min(np.sum(vectors * torch_vectors, axis=1)) >= exported.MIN_COSINE


def test_the_backend_is_part_of_the_fingerprint_only_when_not_torch(tmp_path, tiny_model):
    plain = encoding.encoder_identity(config("unused", tmp_path, model=tiny_model).model)
    onnx = encoding.encoder_identity(config("unused", tmp_path, model=tiny_model, model__backend="onnx").model)
    assert "backend" not in plain and onnx["backend"] == "onnx" and onnx["fingerprint"] != plain["fingerprint"]


def test_vectors_that_would_differ_put_torch_back_with_a_warning(tmp_path, tiny_model, cache, caplog, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(exported, "MIN_COSINE", 1.01)  # no cosine reaches it
    torch_vectors = encoder(tmp_path, tiny_model).encode_documents(TEXTS)
    with caplog.at_level(logging.WARNING):
        fallen = encoder(tmp_path, tiny_model, model__backend="onnx")
    assert "torch encodes the model" in caplog.text and "< 1.01" in caplog.text
    assert not fallen.exported and exported.runtime_of(fallen.model[0].model) == ""
    np.testing.assert_array_equal(fallen.encode_documents(TEXTS), torch_vectors)


def test_onnx_is_fp32_and_backends_are_named(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="model.backend' = 'onnx' runs in fp32, and model.precision = 'bf16'"):
        config("unused", tmp_path, model=tiny_model, model__backend="onnx", model__precision="bf16")
    with pytest.raises(ConfigError, match="model.backend' = 'openvino' runs in fp32 or bf16"):
        config("unused", tmp_path, model=tiny_model, model__backend="openvino", model__precision="fp16")
    with pytest.raises(ConfigError, match="expected one of auto, torch, onnx, openvino"):
        config("unused", tmp_path, model=tiny_model, model__backend="tensorrt")
