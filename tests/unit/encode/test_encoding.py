import dataclasses
import shutil

import numpy as np
import pytest

from retrieval_core.config import ModelConfig
from retrieval_core.encode.encoding import SentenceTransformerEncoder, encode_by_length, encoder_identity
from retrieval_core.encode.model_files import resolve_model_path


def test_packaged_default_resolves_to_a_local_directory():
    path = resolve_model_path("all-MiniLM-L6-v2")
    assert path.endswith("model") and (__import__("pathlib").Path(path) / "modules.json").is_file()


def test_unknown_model_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="model.name = 'no-such-model-xyz'"):
        resolve_model_path("no-such-model-xyz")


def test_fingerprint_covers_what_changes_a_vector(tiny_model, tmp_path):
    base = ModelConfig(name=tiny_model)
    fingerprint = encoder_identity(base)["fingerprint"]
    assert encoder_identity(base)["fingerprint"] == fingerprint  # deterministic
    for change in [
        dict(precision="bf16"),
        dict(document_prompt="passage: "),
        dict(max_seq_length=16),
        dict(normalize=False),
    ]:
        assert encoder_identity(dataclasses.replace(base, **change))["fingerprint"] != fingerprint, change
    # batch size and the query prompt do not change document vectors
    assert encoder_identity(dataclasses.replace(base, batch_size=7, query_prompt="q: "))["fingerprint"] == fingerprint
    # other weights under the same name: another fingerprint
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    weights = next(copy.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert encoder_identity(ModelConfig(name=str(copy)))["weights_sha256"] != encoder_identity(base)["weights_sha256"]


def test_encode_by_length_keeps_input_order(tiny_model):
    from sentence_transformers import SentenceTransformer

    texts = ["short", "a much longer text with many words in it " * 3, "mid length text", "x", "another one"] * 7
    encoder = SentenceTransformerEncoder(ModelConfig(name=tiny_model, batch_size=4))
    calls = []
    vectors = encode_by_length(encoder, texts, batch_size=4, on_progress=calls.append)
    reference = SentenceTransformer(tiny_model, device="cpu").encode(texts, normalize_embeddings=True)
    cosine = np.sum(vectors * reference, axis=1)
    assert cosine.min() > 0.99999
    assert sum(calls) == len(texts) and len(calls) == 2  # chunks of 8 batches of 4


def test_document_prompt_is_prepended(tiny_model):
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformerEncoder(
        ModelConfig(name=tiny_model, document_prompt="passage: ", query_prompt="query: ")
    )
    reference = SentenceTransformer(tiny_model, device="cpu")
    docs = encoder.encode_documents(["the body"])
    queries = encoder.encode_queries(["the body"])
    assert np.allclose(docs, reference.encode(["passage: the body"], normalize_embeddings=True), atol=1e-5)
    assert np.allclose(queries, reference.encode(["query: the body"], normalize_embeddings=True), atol=1e-5)


def test_threads_split_the_texts_and_give_the_one_thread_vectors(tiny_model):
    import torch

    texts = [f"text {i} " + "about rivers and planets " * (i % 7) for i in range(90)]
    cfg = ModelConfig(name=tiny_model, batch_size=8)
    before = torch.get_num_threads()
    try:
        serial = SentenceTransformerEncoder(cfg).encode_documents(texts)
        threaded = SentenceTransformerEncoder(cfg, threads=3)
        assert threaded.threads == 3 and torch.get_num_threads() == 1  # one torch thread per encoding thread
        for _ in range(3):  # concurrent tokenization must never collide ("Already borrowed")
            np.testing.assert_allclose(threaded.encode_documents(texts), serial, atol=1e-6)
        np.testing.assert_allclose(threaded.encode_queries(texts[:5]), serial[:5], atol=1e-6)  # few: one thread
    finally:
        torch.set_num_threads(before)


def test_bf16_is_close_to_fp32(tiny_model):
    texts = [f"text number {i} about rivers and planets" for i in range(20)]
    fp32 = SentenceTransformerEncoder(ModelConfig(name=tiny_model)).encode_documents(texts)
    bf16 = SentenceTransformerEncoder(ModelConfig(name=tiny_model, precision="bf16")).encode_documents(texts)
    assert bf16.dtype == np.float32
    assert np.sum(fp32 * bf16, axis=1).min() > 0.99
    assert not np.array_equal(fp32, bf16)


def test_estimated_rate_scales_with_workers_resources_and_model_size(tiny_model):
    from retrieval_core.encode.encoding import REFERENCE_DOCS_PER_S_PER_CPU, estimated_docs_per_s

    default = ModelConfig()
    assert estimated_docs_per_s(default, 1, 0) == pytest.approx(REFERENCE_DOCS_PER_S_PER_CPU)
    assert estimated_docs_per_s(default, 4, 0) == pytest.approx(4 * REFERENCE_DOCS_PER_S_PER_CPU)
    assert estimated_docs_per_s(default, 1, 1) > 50 * estimated_docs_per_s(default, 1, 0)
    assert estimated_docs_per_s(ModelConfig(name=tiny_model), 1, 0) > estimated_docs_per_s(default, 1, 0)


MEMORY_CAPPED_ENCODE = """
import resource, sys
import numpy as np
from retrieval_core.encode import encoding
from retrieval_core.config import ModelConfig

model, texts_file, out = sys.argv[1:4]
texts = open(texts_file).read().split("\\n")
encoder = encoding.SentenceTransformerEncoder(ModelConfig(name=model, batch_size=len(texts)))
encoder.encode_documents(texts[:2])  # loaded and warm: what follows is the batch's own memory
size = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 100 * 2**20,) * 2)  # 100 MiB more: a quarter of what the batch needs
np.save(out, encoding.encode_by_length(encoder, texts, len(texts)))
print("batch size", encoder.batch_size)
"""


def test_a_batch_over_memory_is_encoded_again_in_halves_to_the_same_vectors(tmp_path):
    """A real allocation failure, not a simulated one: the process's address space is capped (RLIMIT_AS) below
    what 64 texts need in a model with wide feed-forward layers (about 400 MiB); the encoder halves its batch
    until it fits, with a warning, and the vectors equal those of small batches without a cap."""
    import subprocess
    import sys

    from helpers import REPO, build_tiny_model

    model = str(build_tiny_model(tmp_path / "wide", intermediate_size=16384))
    texts = [f"document {i} " + " ".join(f"word{(i * 7 + j) % 997}" for j in range(80)) for i in range(64)]
    (tmp_path / "texts.txt").write_text("\n".join(texts))
    env = {**__import__("os").environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_CAPPED_ENCODE, model, str(tmp_path / "texts.txt"), str(tmp_path / "capped.npy")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "out of memory at model.batch_size 64" in run.stderr and "can't allocate memory" in run.stderr
    assert int(run.stdout.split("batch size")[1]) < 64
    reference = SentenceTransformerEncoder(ModelConfig(name=model, batch_size=8)).encode_documents(texts)
    np.testing.assert_allclose(np.load(tmp_path / "capped.npy"), reference, atol=1e-5)
