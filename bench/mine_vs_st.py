"""Benchmark: hard-negative mining with this project's jobs against sentence-transformers' mine_hard_negatives.

What it measures, on SciFact (``$SCIFACT_DIR``, default ``../shared/data/scifact``: corpus, train queries and qrels), in one run:
  * ``mine_hard_negatives`` (sentence-transformers), what a user would otherwise run: the (query, positive text)
    pairs of the train qrels, the whole corpus as candidates (``title + " " + text``), all-MiniLM-L6-v2, once with
    ``use_faiss=False`` and once with ``use_faiss=True``. Each call encodes the corpus and the queries itself.
  * this project (a) from scratch: ``encode`` -> ``index`` (Flat, exact) -> ``mine`` in one local Ray session, and
    (b) with the corpus already encoded and indexed, as a nightly job that re-mines would run: ``mine`` alone.
  Same settings on both sides (``--num-negatives``, ``--relative-margin``, top sampling). Printed: wall seconds,
  the ratio of each to ``mine_hard_negatives`` without FAISS, and the per-query overlap of the chosen negatives
  with the reference (|ours ∩ reference| / |reference|, averaged over queries; 1.0 = identical sets).

Run (from the repository root, with the venv active)
  python bench/mine_vs_st.py                      # SciFact when present; exits 0 with a message when absent
  python bench/mine_vs_st.py --relative-margin 0 --num-negatives 5 --out mine.json
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SCIFACT, help="BEIR directory (corpus.parquet, queries.jsonl, qrels/)")
    p.add_argument("--qrels", default="qrels/train.tsv")
    p.add_argument("--num-negatives", type=int, default=3)
    p.add_argument("--relative-margin", type=float, default=0.05, help="0 or negative: no margin")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, help="also write the results to this JSON file")
    return p.parse_args(argv)


def load_data(data: Path, qrels_name: str):
    import pyarrow.parquet as pq

    from retrieval_core import metrics

    corpus = {r["_id"]: f"{r['title']} {r['text']}" for r in pq.read_table(data / "corpus.parquet").to_pylist()}
    queries = metrics.read_queries(str(data / "queries.jsonl"))
    qrels = metrics.read_qrels(str(data / qrels_name))
    pairs = [(queries[q], corpus[d]) for q, judged in qrels.items() for d, s in judged.items() if s > 0 and d in corpus]
    return corpus, pairs


def reference(corpus: dict, pairs: list, args, use_faiss: bool) -> tuple[float, dict[str, set[str]]]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from retrieval_core.encoding import resolve_model_path

    margin = {"relative_margin": args.relative_margin} if args.relative_margin > 0 else {}
    started = time.perf_counter()
    model = SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu")
    result = mine_hard_negatives(Dataset.from_list([{"query": q, "positive": p} for q, p in pairs]), model,
                                 corpus=list(corpus.values()), num_negatives=args.num_negatives,
                                 sampling_strategy="top", batch_size=args.batch_size, use_faiss=use_faiss,
                                 output_format="triplet", verbose=False, **margin)
    seconds = time.perf_counter() - started
    negatives: dict[str, set[str]] = {}
    for row in result:
        negatives.setdefault(row["query"], set()).add(row["negative"])
    return seconds, negatives


def job_config(args, root: str):
    from retrieval_core.config import load_config

    items = [f"corpus.path={json.dumps(str(args.data / 'corpus.parquet'))}", f"output.root={json.dumps(root)}",
             f"mine.queries_path={json.dumps(str(args.data / 'queries.jsonl'))}",
             f"mine.qrels_path={json.dumps(str(args.data / args.qrels))}", "index.type=Flat",
             f"mine.num_negatives={args.num_negatives}", f"model.batch_size={args.batch_size}",
             "runtime.progress=false", "mine.formats=[triplet]"]
    if args.relative_margin > 0:
        items.append(f"mine.relative_margin={args.relative_margin}")
    return load_config(str(REPO / "configs" / "scifact.yaml"), items)


def ours(cfg, corpus: dict, stages: tuple) -> tuple[float, dict[str, set[str]]]:
    from jobs import _runtime, encode, index, mine
    from retrieval_core import mining

    started = time.perf_counter()
    with _runtime.ray_session(cfg.runtime):
        if "encode" in stages:
            encode.run(cfg)
            index.run(cfg)
        mine.run(cfg)
    seconds = time.perf_counter() - started
    table = mining.read_parts(cfg.output.root).to_pylist()
    return seconds, {r["query"]: {corpus[d] for d in r["negative_ids"]} for r in table}


def overlap(got: dict[str, set[str]], want: dict[str, set[str]]) -> float:
    shares = [len(got.get(q, set()) & negs) / len(negs) for q, negs in want.items() if negs]
    return sum(shares) / len(shares) if shares else float("nan")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.data / "corpus.parquet").exists():
        print(f"skipped: no corpus at {args.data / 'corpus.parquet'}")
        return 0
    corpus, pairs = load_data(args.data, args.qrels)
    rows = []
    base_s, base = reference(corpus, pairs, args, use_faiss=False)
    rows.append(("mine_hard_negatives", base_s, base))
    rows.append(("mine_hard_negatives faiss", *reference(corpus, pairs, args, use_faiss=True)))
    with tempfile.TemporaryDirectory(prefix="bench-mine-") as root:
        cfg = job_config(args, root)
        rows.append(("jobs: encode+index+mine", *ours(cfg, corpus, ("encode", "index", "mine"))))
        import shutil

        shutil.rmtree(Path(root) / "negatives")
        rows.append(("jobs: mine (indexed)", *ours(cfg, corpus, ("mine",))))
    print(f"\n{len(pairs)} pairs, {len(base)} queries with negatives in the reference, {len(corpus)} documents; "
          f"num_negatives {args.num_negatives}, relative_margin {args.relative_margin if args.relative_margin > 0 else 'none'}")
    print(f"{'variant':<28}{'seconds':>10}{'x faster':>10}{'overlap':>10}")
    results = []
    for name, seconds, negs in rows:
        results.append({"variant": name, "seconds": seconds, "speedup": base_s / seconds,
                        "overlap_with_reference": overlap(negs, base)})
        print(f"{name:<28}{seconds:>10.1f}{base_s / seconds:>9.2f}x{results[-1]['overlap_with_reference']:>10.4f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
