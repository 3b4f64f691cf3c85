"""Check the GPU paths against the CPU: encoding in fp32/fp16/bf16, what ``model.backend / precision: auto`` picks
there, the exported CPU backends installed (ONNX Runtime, OpenVINO) against torch, FAISS (CPU) over GPU-encoded vectors,
cross-encoder rescoring in fp32/fp16, a few training steps, the encode job with ``runtime.gpus_per_worker = 1``,
and, with a GPU build of FAISS (the ``[gpu]`` extra), FAISS on the GPUs (IVF k-means, list assignment of adds,
exact k-NN) against FAISS on the CPU. Prints a table; writes it as JSON.

    python scripts/gpu_check.py [--device cuda] [--steps 4] [--json gpu_check.json]

Exit status: 0 every check passed, 1 a check failed, 2 no CUDA device (nothing was checked). ``--device cpu`` runs
the same checks against the CPU itself (a smoke test of this script on a machine without a GPU).

Thresholds: fp32 vectors within min cosine 0.99999 of the CPU's; fp16 0.999 and bf16 0.99 (half-precision
autocast); FAISS top-10 over the device's fp16 vectors sharing >= 90% of the CPU fp32 top-10; cross-encoder
scores (all-MiniLM-L6-v2 under a seeded random one-output head, sigmoid) within 1e-4 of the CPU's in fp32 and 1e-2 in
fp16 (``MAX_SCORE_GAP``); after the training
steps, the device-trained weights closer to the CPU-trained ones than half the size of the update itself (dropout
off on both, so only arithmetic differs). FAISS on GPUs: k-means objective within 1% of the CPU's, list
assignments and exact top-10 agreeing on >= 99.9% (float sums in another order may swap ties).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from retrieval_core.io.folder import Folder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retrieval_core.config import load_config  # noqa: E402
from retrieval_core.encode import encoding, model_files  # noqa: E402
from retrieval_core.mine import rescoring  # noqa: E402
from retrieval_core.train import training  # noqa: E402

DEMO = ROOT / "examples" / "demo"
MIN_COSINE = {"fp32": 0.99999, "fp16": 0.999, "bf16": 0.99}
MAX_SCORE_GAP = {"fp32": 1e-4, "fp16": 1e-2}


def demo_texts() -> tuple[list[str], list[str], list[str]]:
    """(document ids, document texts, query texts) of the bundled demo corpus."""
    docs = [json.loads(line) for line in (DEMO / "corpus.jsonl").read_text().splitlines() if line.strip()]
    queries = [json.loads(line)["query"] for line in (DEMO / "pairs.jsonl").read_text().splitlines() if line.strip()]
    return [d["id"] for d in docs], [d["text"] for d in docs], queries


def encode(device: str, precision: str, texts: list[str], repeat: int = 1) -> tuple[np.ndarray, float]:
    """(vectors of ``texts``, documents per second over ``repeat`` passes after a warm-up pass)."""
    cfg = load_config(None, [f"model.precision={precision}"]).model
    encoder = encoding.SentenceTransformerEncoder(cfg, device=device, threads=1)
    vectors = encoder.encode_documents(texts)
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeat):
        encoder.encode_documents(texts)
    _sync(device)
    return vectors, repeat * len(texts) / (time.perf_counter() - started)


def backend_rows(device: str, docs: list[str], reference: np.ndarray, cpu_rate: float) -> list[dict]:
    """What ``auto`` picks for a worker of this machine (with a GPU: torch fp16), and every exported CPU backend
    installed (ONNX Runtime, OpenVINO, each precision this CPU runs natively) against torch fp32 on the CPU."""
    from retrieval_core.encode import exported, hardware

    hw = hardware.this_machine(1 if device.startswith("cuda") else 0)
    picked = hardware.choose("auto", "auto", hw)
    sees_cuda = hw.cuda == device.startswith("cuda")  # what a cluster run's probe finds is the device torch finds
    rows = [{"check": f"auto picks {'/'.join(picked)} on {hw.describe()}", "value": 1.0, "unit": "", "ok": sees_cuda}]
    for backend in hw.runtimes:
        for precision in ("fp32", "bf16") if backend == "openvino" and hw.native_bf16 else ("fp32",):
            cfg = load_config(None, [f"model.backend={backend}", f"model.precision={precision}"]).model
            encoder = encoding.SentenceTransformerEncoder(cfg, device="cpu", threads=1)
            started = time.perf_counter()
            vectors = encoder.encode_documents(docs)
            rate = len(docs) / (time.perf_counter() - started)
            cosine = min_cosine(reference, vectors)
            rows.append(
                {
                    "check": f"encode cpu {backend} {precision}",
                    "value": rate,
                    "unit": "docs/s",
                    "ratio_to_cpu_fp32": rate / cpu_rate,
                    "min_cosine": cosine,
                    "ok": encoder.exported and cosine >= exported.MIN_COSINE,
                }
            )
    return rows


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def top10_agreement(reference: np.ndarray, other: np.ndarray, queries: np.ndarray) -> float:
    """Mean share of the CPU fp32 top-10 that an exact FAISS (CPU) index over ``other`` also returns."""
    import faiss

    tops = []
    for vectors in (reference, other):
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        tops.append(index.search(np.ascontiguousarray(queries, dtype=np.float32), 10)[1])
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(*tops)]))


def train_weights(device: str, steps: int, docs: list[str], queries: list[str]) -> dict:
    """The model's parameters (CPU copies) after ``steps`` steps on ``device``, dropout off."""
    cfg = load_config(
        None,
        [
            f"train.max_steps={steps}",
            "train.batch_size=8",
            "train.checkpoint_steps=0",
            "train.num_negatives=1",
            "model.max_seq_length=64",
        ],
    )
    examples = [
        training.Example(f"q{i}", q, docs[i % len(docs)], (docs[(i * 7 + 3) % len(docs)],))
        for i, q in enumerate(queries)
    ]
    original = training.load_model

    def without_dropout(mc, device="cpu"):
        model = original(mc, device)
        for module in model.modules():
            if module.__class__.__name__ == "Dropout":
                module.p = 0.0
        return model

    training.load_model = without_dropout
    try:
        model, _ = training.fit(cfg.train, cfg.model, examples, [], {}, device=device)
    finally:
        training.load_model = original
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def cross_encoder(directory: str) -> str:
    """all-MiniLM-L6-v2's transformer under a seeded random one-output head, saved as a CrossEncoder."""
    import torch
    from sentence_transformers import CrossEncoder

    torch.manual_seed(0)
    model = CrossEncoder(model_files.resolve_model_path("all-MiniLM-L6-v2"), num_labels=1, device="cpu")
    model.save_pretrained(directory)
    return directory


def rescore(model_dir: str, device: str, precision: str, pairs: list) -> tuple[np.ndarray, float]:
    """(cross-encoder scores of ``pairs``, pairs per second of a second pass)."""
    mi = load_config(None, [f"mine.cross_encoder={model_dir}", f"mine.cross_encoder_precision={precision}"]).mine
    scorer = rescoring.CrossEncoderScorer(mi, load_config(None, []).model, device=device)
    scores = scorer.score(pairs)
    _sync(device)
    started = time.perf_counter()
    scorer.score(pairs)
    _sync(device)
    return scores, len(pairs) / (time.perf_counter() - started)


def rescore_rows(device: str, docs: list[str], queries: list[str]) -> list[dict]:
    pairs = [(queries[i % len(queries)], doc) for i, doc in enumerate(docs)]
    with tempfile.TemporaryDirectory() as directory:
        model_dir = cross_encoder(directory)
        reference, cpu_rate = rescore(model_dir, "cpu", "fp32", pairs)
        rows = [{"check": "rescore cpu fp32", "value": cpu_rate, "unit": "pairs/s", "ok": True}]
        for precision, limit in MAX_SCORE_GAP.items():
            scores, rate = rescore(model_dir, device, precision, pairs)
            gap = float(np.abs(scores - reference).max())
            rows.append(
                {
                    "check": f"rescore {device} {precision}: max score gap",
                    "value": gap,
                    "unit": "score",
                    "ratio_to_cpu_fp32": rate / cpu_rate,
                    "ok": gap <= limit,
                }
            )
    return rows


def distance(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a)))


def encode_job(device: str, output: str) -> tuple[list[str], np.ndarray]:
    """Run ``jobs.encode`` on the demo corpus with one worker holding one GPU (none with ``--device cpu``)."""
    gpus = "1" if device.startswith("cuda") else "0"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.encode",
            "--config",
            "configs/demo.yaml",
            "--set",
            f"output.root={output}",
            "--set",
            f"runtime.gpus_per_worker={gpus}",
            "--set",
            "runtime.num_workers=1",
            "--set",
            "runtime.progress=false",
        ],
        cwd=ROOT,
        check=True,
    )
    from retrieval_core.encode import embeddings

    _, vectors, doc_ids = embeddings.load_embeddings(Folder(output))
    return doc_ids, vectors


def faiss_rows(device: str, n: int = 200_000, dim: int = 64) -> list[dict]:
    """FAISS on the node's GPUs against the CPU (``retrieval_core.index.gpu``): k-means, assignment, exact k-NN."""
    import faiss

    from retrieval_core.index import gpu

    if not device.startswith("cuda") or not gpu.gpu_count():
        why = "CPU build of FAISS (install the [gpu] extra)" if device.startswith("cuda") else "--device cpu"
        return [{"check": f"FAISS on GPUs: skipped, {why}", "value": 0, "unit": "", "ok": True}]
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((256, dim))[rng.integers(0, 256, n)] + rng.standard_normal((n, dim))).astype("f4")
    timings, indexes = {}, {}
    for where in ("cpu", "gpu"):
        indexes[where] = faiss.index_factory(dim, "IVF1024,Flat")
        started = time.perf_counter()
        gpu.train_ivf(indexes[where], data) if where == "gpu" else indexes[where].train(data)
        timings[where] = time.perf_counter() - started
    objective = {w: faiss.downcast_index(i.quantizer).search(data, 1)[0].mean() for w, i in indexes.items()}
    cpu_lists = faiss.downcast_index(indexes["cpu"].quantizer).search(data, 1)[1].ravel()
    gpu_lists = gpu.assign(indexes["cpu"], data)
    queries = data[:1000]
    exact_cpu = faiss.knn(queries, data, 10)[1]
    exact_gpu = gpu.knn(queries, data, 10, faiss.METRIC_L2)[1]
    shared = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_cpu, exact_gpu)])
    gap = abs(objective["gpu"] / objective["cpu"] - 1)
    return [
        {
            "check": "FAISS IVF1024 k-means gpu vs cpu",
            "value": timings["cpu"] / timings["gpu"],
            "unit": "x faster",
            "objective_gap": float(gap),
            "ok": gap <= 0.01,
        },
        {
            "check": "FAISS IVF list assignment gpu vs cpu",
            "value": float(np.mean(cpu_lists == gpu_lists)),
            "unit": "same list",
            "ok": np.mean(cpu_lists == gpu_lists) >= 0.999,
        },
        {"check": "FAISS exact top-10 gpu vs cpu", "value": float(shared), "unit": "shared", "ok": shared >= 0.999},
    ]


def run(device: str, steps: int, repeat: int) -> list[dict]:
    ids, docs, queries = demo_texts()
    rows = []
    reference, cpu_rate = encode("cpu", "fp32", docs)
    rows.append({"check": "encode cpu fp32", "value": cpu_rate, "unit": "docs/s", "ok": True})
    vectors = {}
    for precision in ("fp32", "fp16", "bf16"):
        vectors[precision], rate = encode(device, precision, docs, repeat)
        cosine = min_cosine(reference, vectors[precision])
        rows.append(
            {
                "check": f"encode {device} {precision}",
                "value": rate,
                "unit": "docs/s",
                "ratio_to_cpu_fp32": rate / cpu_rate,
                "min_cosine": cosine,
                "ok": cosine >= MIN_COSINE[precision],
            }
        )
    rows += backend_rows(device, docs, reference, cpu_rate)
    query_vectors, _ = encode("cpu", "fp32", queries)
    agreement = top10_agreement(reference, vectors["fp16"], query_vectors)
    rows.append(
        {
            "check": f"FAISS cpu top-10, {device} fp16 vectors",
            "value": agreement,
            "unit": "shared",
            "ok": agreement >= 0.9,
        }
    )
    rows += rescore_rows(device, docs, queries)
    initial = train_weights("cpu", 0, docs, queries)
    on_cpu = train_weights("cpu", steps, docs, queries)
    on_device = train_weights(device, steps, docs, queries)
    update, gap = distance(on_cpu, initial), distance(on_device, on_cpu)
    rows.append(
        {
            "check": f"train {steps} steps {device} vs cpu",
            "value": gap / update,
            "unit": "gap/update",
            "ok": update > 0 and gap < 0.5 * update,
        }
    )
    rows += faiss_rows(device)
    with tempfile.TemporaryDirectory() as output:
        job_ids, job_vectors = encode_job(device, output)
    order = {d: i for i, d in enumerate(ids)}
    cosine = min_cosine(reference[[order[d] for d in job_ids]], job_vectors)
    rows.append(
        {
            "check": f"jobs.encode gpus_per_worker={1 if device.startswith('cuda') else 0}",
            "value": cosine,
            "unit": "min cosine",
            "ok": cosine >= MIN_COSINE["fp32"] and len(job_ids) == len(ids),
        }
    )
    return rows


def print_table(rows: list[dict], card: str) -> None:
    print(f"\nGPU check on {card}")
    print(f"{'check':45} {'value':>12} {'unit':12} {'x cpu':>7} {'min cos':>9}  ok")
    for r in rows:
        ratio = f"{r['ratio_to_cpu_fp32']:.2f}" if "ratio_to_cpu_fp32" in r else ""
        cosine = f"{r['min_cosine']:.6f}" if "min_cosine" in r else ""
        print(f"{r['check']:45} {r['value']:12.5g} {r['unit']:12} {ratio:>7} {cosine:>9}  {'yes' if r['ok'] else 'NO'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke test")
    parser.add_argument("--steps", type=int, default=4, help="training steps on each device (default 4)")
    parser.add_argument("--repeat", type=int, default=5, help="timed encoding passes on the device (default 5)")
    parser.add_argument("--json", default="gpu_check.json", help="where the table goes as JSON")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing checked (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    on_cuda = args.device.startswith("cuda")
    card = torch.cuda.get_device_name(args.device) if on_cuda else f"cpu ({os.cpu_count()} cores)"
    rows = run(args.device, args.steps, args.repeat)
    print_table(rows, card)
    Path(args.json).write_text(json.dumps({"card": card, "torch": torch.__version__, "rows": rows}, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
