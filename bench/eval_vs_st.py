"""Benchmark: retrieval metrics of this project's jobs against sentence-transformers' own evaluator, in one run.

What it measures, on SciFact (``$SCIFACT_DIR``, default ``../shared/data/scifact``: corpus, train queries and qrels)
by default:
  * reference: what a user would otherwise run -- ``InformationRetrievalEvaluator`` of sentence-transformers with
    the same model (all-MiniLM-L6-v2), documents as ``title + " " + text``, exact cosine search over the whole
    corpus, nDCG@10, recall@10, recall@100 and MRR@10.
  * the jobs: ``encode`` (fp32) -> ``index`` (``index.type=Flat``, exact) -> ``evaluate``, in one local Ray session.
  For each metric: both figures and their difference; and the wall time of each side. The figures must be equal
  (up to float rounding of near-tied scores).

Run (from the repository root, with the venv active)
  python bench/eval_vs_st.py                    # SciFact when present; exits 0 with a message when absent
  python bench/eval_vs_st.py --out eval.json    # also write the results as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCIFACT = Path(os.environ.get("SCIFACT_DIR") or REPO.parent / "shared" / "data" / "scifact")  # BEIR SciFact
METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10")
TOLERANCE = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", type=Path, default=SCIFACT, help="BEIR directory (corpus.parquet, queries.jsonl, qrels/train.tsv)"
    )
    p.add_argument("--qrels", default="qrels/train.tsv", help="qrels file inside --data")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, help="also write the results to this JSON file")
    return p.parse_args(argv)


def reference_metrics(data: Path, qrels_name: str, batch_size: int) -> tuple[dict, float]:
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from retrieval_core.encode.encoding import resolve_model_path
    from retrieval_core.io import judgements

    started = time.perf_counter()
    corpus = {r["_id"]: f"{r['title']} {r['text']}" for r in pq.read_table(data / "corpus.parquet").to_pylist()}
    qrels = judgements.read_qrels(str(data / qrels_name))
    evaluator = InformationRetrievalEvaluator(
        queries=judgements.read_queries(str(data / "queries.jsonl")),
        corpus=corpus,
        relevant_docs={q: {d for d, s in judged.items() if s > 0} for q, judged in qrels.items()},
        ndcg_at_k=[10],
        mrr_at_k=[10],
        precision_recall_at_k=[10, 100],
        accuracy_at_k=[1],
        map_at_k=[100],
        batch_size=batch_size,
        show_progress_bar=False,
        write_csv=False,
    )
    figures = evaluator(SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu"))
    picked = {name: float(next(v for k, v in figures.items() if k.endswith(f"_{name}"))) for name in METRICS}
    return picked, time.perf_counter() - started


def job_metrics(data: Path, qrels_name: str, batch_size: int, root: str) -> tuple[dict, float]:
    from jobs import encode, evaluate, index
    from jobs.ray import cluster
    from retrieval_core.config import load_config

    os.environ.setdefault("SCIFACT_DIR", str(data))  # configs/scifact.yaml names its data by this variable
    cfg = load_config(
        str(REPO / "configs" / "scifact.yaml"),
        [
            f"corpus.path={json.dumps(str(data / 'corpus.parquet'))}",
            f"output.root={json.dumps(root)}",
            f"eval.queries_path={json.dumps(str(data / 'queries.jsonl'))}",
            f"eval.qrels_path={json.dumps(str(data / qrels_name))}",
            "index.type=Flat",
            f"model.batch_size={batch_size}",
            "runtime.progress=false",
        ],
    )
    started = time.perf_counter()
    with cluster.ray_session(cfg.runtime):
        encode.run(cfg)
        index.run(cfg)
        result = evaluate.run(cfg)
    return {
        **{name: result["metrics"][name] for name in METRICS},
        "queries": result["metrics"]["queries"],
    }, time.perf_counter() - started


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.data / "corpus.parquet").exists():
        print(f"skipped: no corpus at {args.data / 'corpus.parquet'}")
        return 0
    reference, ref_s = reference_metrics(args.data, args.qrels, args.batch_size)
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as root:
        ours, ours_s = job_metrics(args.data, args.qrels, args.batch_size, root)
    print(f"\n{ours['queries']} judged queries, {args.data}")
    print(f"{'metric':<12}{'sentence-transformers':>24}{'jobs':>12}{'difference':>13}")
    rows = []
    for name in METRICS:
        diff = ours[name] - reference[name]
        rows.append({"metric": name, "reference": reference[name], "jobs": ours[name], "difference": diff})
        print(f"{name:<12}{reference[name]:>24.5f}{ours[name]:>12.5f}{diff:>13.2e}")
    print(f"{'wall s':<12}{ref_s:>24.1f}{ours_s:>12.1f}   (ratio jobs/reference {ours_s / ref_s:.2f})")
    equal = all(abs(r["difference"]) <= TOLERANCE for r in rows)
    print(f"figures equal within {TOLERANCE}: {'yes' if equal else 'NO'}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {"rows": rows, "reference_s": ref_s, "jobs_s": ours_s, "queries": ours["queries"], "equal": equal},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
