"""Benchmark: compact index vectors (float16, int8, binary), with and without rescoring, against the float32 index on
SciFact; and Matryoshka truncation as a table (dimension -> nDCG@10).

What it measures, on SciFact (``$SCIFACT_DIR``, default ``../shared/data/scifact``: corpus, train queries, qrels)
  * The corpus is encoded once (``jobs.encode`` with configs/scifact.yaml's settings). Then, for each
    ``index.vectors`` and ``index.rescore_factor``: ``jobs.index`` (``index.type: auto``; SciFact's 5,183 documents
    get a flat index) in a root of its own holding a copy of those embeddings, and ``jobs.evaluate`` on the train
    queries: the jobs a user runs, evaluation unchanged. Reported: nDCG@10 and recall@100, nDCG@10 as a share of
    float32's, the size of ``merged.faiss`` (what a searcher holds) and float32's size over it, and the bytes of the
    vectors stored for rescoring (on disk, memory-mapped by searchers).
  * Matryoshka: nDCG@10 of exact search over the first N dimensions (re-normalized, as ``model.truncate_dim`` does)
    of the document and query vectors, for the default model (not trained for truncation: the bench forces it) and,
    with ``--matryoshka-model``, a model trained for it (train one with ``train.matryoshka_dims``, e.g. the
    pipeline on configs/scifact.yaml with ``--set train.matryoshka_dims=[384,256,128,64]``).

Targets (issue 32): binary + rescoring >= 0.95 of float32's nDCG@10 with >= 16x less index memory; int8 + rescoring
>= 0.99 with >= 4x less.

Run (from the repository root, with the venv active)
  python bench/compact_vectors.py                 # exits 0 with a message when SciFact is absent
  Options: --data DIR, --factors 0,4,10, --dims 384,256,128,64, --matryoshka-model DIR, --out results.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCIFACT = Path(os.environ.get("SCIFACT_DIR") or REPO.parent / "shared" / "data" / "scifact")  # BEIR SciFact
VECTORS = ("float16", "int8", "binary")
TARGETS = {"binary": (0.95, 16.0), "int8": (0.99, 4.0)}  # share of float32's nDCG@10, times less index memory

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SCIFACT, help="BEIR SciFact directory")
    p.add_argument("--factors", default="0,4,10", help="index.rescore_factor values, comma separated")
    p.add_argument("--dims", default="384,256,128,64", help="Matryoshka dimensions, comma separated")
    p.add_argument("--matryoshka-model", default="", help="a model trained with train.matryoshka_dims")
    p.add_argument("--out", type=Path, help="also write the results to this JSON file")
    return p.parse_args(argv)


def scifact_config(data: Path, root: Path, *settings: str, model: str = ""):
    from retrieval_core.config import load_config

    os.environ["SCIFACT_DIR"] = str(data)
    extra = [f"output.root={json.dumps(str(root))}", "runtime.progress=false", "index.type=auto"]
    extra += [f"model.name={json.dumps(model)}", "model.force_truncate=true"] if model else []
    return load_config(str(REPO / "configs" / "scifact.yaml"), [*extra, *settings])


def encoded_root(data: Path, work: Path) -> Path:
    from jobs import encode

    root = work / "encoded"
    encode.run(scifact_config(data, root))
    return root


def index_and_evaluate(data: Path, encoded: Path, work: Path, vectors: str, factor: int) -> dict:
    from jobs import evaluate, index

    root = work / f"{vectors}-x{factor}"
    shutil.copytree(encoded / "embeddings", root / "embeddings")
    cfg = scifact_config(data, root, f"index.vectors={vectors}", f"index.rescore_factor={factor}")
    built = index.run(cfg)
    metrics = evaluate.run(cfg)["metrics"]
    stored = root / "index" / "vectors"
    return {
        "vectors": vectors,
        "rescore_factor": factor if vectors != "float32" else 0,
        "type": built["type"],
        "ndcg@10": metrics["ndcg@10"],
        "recall@100": metrics["recall@100"],
        "index_bytes": os.path.getsize(root / "index" / "merged.faiss"),
        "stored_bytes": sum(f.stat().st_size for f in stored.glob("*.npy")) if stored.is_dir() else 0,
    }


def matryoshka_table(data: Path, model: str, dims: list[int]) -> dict[int, float]:
    """nDCG@10 of exact search over the first N dimensions of ``model``'s vectors, for each N of ``dims``."""
    import pyarrow.parquet as pq

    from retrieval_core.encode import encoding
    from retrieval_core.evaluate.metrics import evaluate_run
    from retrieval_core.io import judgements
    from retrieval_core.io.corpus import assemble_text

    cfg = scifact_config(data, Path("unused"), model=model)
    encoder = encoding.load_encoder(cfg.model, 0, threads=encoding.cpu_count())
    rows = pq.read_table(data / "corpus.parquet").to_pylist()
    docs = encoding.encode_by_length(encoder, [assemble_text(r["title"], r["text"]) for r in rows], 32)
    qrels = judgements.read_qrels(str(data / "qrels" / "train.tsv"))
    queries = {q: t for q, t in judgements.read_queries(str(data / "queries.jsonl")).items() if q in qrels}
    query_vectors = encoder.encode_queries(list(queries.values()))
    table = {}
    for dim in dims:
        d, q = unit(docs[:, :dim]), unit(query_vectors[:, :dim])
        top = np.argsort(-(q @ d.T), axis=1)[:, :10]
        run = {qid: [rows[i]["_id"] for i in found] for qid, found in zip(queries, top)}
        table[dim] = evaluate_run(run, qrels, ndcg_ks=(10,), recall_ks=(), mrr_ks=())["ndcg@10"]
    return table


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def report(rows: list[dict]) -> list[str]:
    base = rows[0]
    head = (
        f"{'vectors':<9}{'rescore':>8}{'type':>14}{'nDCG@10':>9}{'x f32':>8}{'R@100':>8}{'index MB':>10}{'less':>8}"
        f"{'stored MB':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        r["ndcg_share"] = r["ndcg@10"] / base["ndcg@10"]
        r["memory_ratio"] = base["index_bytes"] / r["index_bytes"]
        lines.append(
            f"{r['vectors']:<9}{r['rescore_factor']:>8}{r['type']:>14}{r['ndcg@10']:>9.4f}{r['ndcg_share']:>8.4f}"
            f"{r['recall@100']:>8.4f}{r['index_bytes'] / 1e6:>10.2f}{r['memory_ratio']:>7.1f}x"
            f"{r['stored_bytes'] / 1e6:>11.2f}"
        )
    for vectors, (share, less) in TARGETS.items():
        best = max((r for r in rows if r["vectors"] == vectors and r["rescore_factor"]), key=lambda r: r["ndcg@10"])
        ok = best["ndcg_share"] >= share and best["memory_ratio"] >= less
        lines.append(
            f"target {vectors} + rescoring >= {share} of float32 nDCG@10 at >= {less}x less memory: "
            f"{best['ndcg_share']:.4f} at {best['memory_ratio']:.1f}x (rescore x{best['rescore_factor']}), "
            f"{'met' if ok else 'NOT met'}"
        )
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not (args.data / "corpus.parquet").is_file():
        print(f"SciFact not found at {args.data}: set SCIFACT_DIR (configs/scifact.yaml says where to get it)")
        return 0
    factors = [int(f) for f in args.factors.split(",")]
    dims = [int(d) for d in args.dims.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-compact-") as tmp:
        work = Path(tmp)
        encoded = encoded_root(args.data, work)
        rows = [index_and_evaluate(args.data, encoded, work, "float32", 0)]
        for vectors in VECTORS:
            rows += [index_and_evaluate(args.data, encoded, work, vectors, factor) for factor in factors]
    lines = report(rows)
    print("\n".join(lines))
    models = {"all-MiniLM-L6-v2 (not trained for it)": "all-MiniLM-L6-v2"}
    if args.matryoshka_model:
        models[f"{args.matryoshka_model} (trained for it)"] = args.matryoshka_model
    tables = {name: matryoshka_table(args.data, model, dims) for name, model in models.items()}
    print("\nMatryoshka truncation, nDCG@10 by dimension:")
    print(f"{'model':<50}" + "".join(f"{d:>9}" for d in dims))
    for name, table in tables.items():
        print(f"{name:<50}" + "".join(f"{table[d]:>9.4f}" for d in dims))
    if args.out:
        args.out.write_text(json.dumps({"indexes": rows, "matryoshka": tables}, indent=2))
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
