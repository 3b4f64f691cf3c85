"""The GPU check script's own logic (its GPU runs happen on a GPU machine, not in CI)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_min_cosine_finds_the_worst_row(gpu_check):
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[3.0, 0.0], [1.0, 1.0]])
    assert gpu_check.min_cosine(a, b) == pytest.approx(np.sqrt(0.5))


def test_top10_agreement_counts_shared_neighbours(gpu_check):
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(50, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    assert gpu_check.top10_agreement(docs, docs.copy(), queries) == 1.0
    assert gpu_check.top10_agreement(docs, rng.normal(size=(50, 8)).astype(np.float32), queries) < 0.9


def test_exits_2_without_cuda(gpu_check, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main(["--device", "cuda", "--json", "/nonexistent/x.json"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_faiss_on_gpus_is_skipped_and_named_without_a_gpu_build(gpu_check):
    from retrieval_core.index import gpu

    if gpu.gpu_count():
        pytest.skip("this machine has FAISS on a GPU")
    rows = gpu_check.faiss_rows("cuda")
    assert len(rows) == 1 and rows[0]["ok"] and "install the [gpu] extra" in rows[0]["check"]
