"""Benchmark: hard-negative mining with this project's jobs against sentence-transformers' mine_hard_negatives.

What it measures, on SciFact (``$SCIFACT_DIR``, default ``../shared/data/scifact``: corpus, train queries and qrels),
in one run:
  * ``mine_hard_negatives`` (sentence-transformers), what a user would otherwise run: the (query, positive text)
    pairs of the train qrels, the whole corpus as candidates (``title + " " + text``), all-MiniLM-L6-v2, once with
    ``use_faiss=False`` and once with ``use_faiss=True``. Each call encodes the corpus and the queries itself.
  * this project (a) from scratch: ``encode`` -> ``index`` (Flat, exact) -> ``mine`` in one local Ray session, and
    (b) with the corpus already encoded and indexed, as a nightly job that re-mines would run: ``mine`` alone.
  Same settings on both sides (``--num-negatives``, ``--relative-margin``, top sampling). Printed: wall seconds,
  the ratio of each to ``mine_hard_negatives`` without FAISS, and the per-query overlap of the chosen negatives
  with the reference (|ours ∩ reference| / |reference|, averaged over queries; 1.0 = identical sets).
  * with a cross-encoder (``--cross-encoder DIR``; by default all-MiniLM-L6-v2's weights under a fresh, seeded
    one-output head, the size of ms-marco-MiniLM-L6-v2, built in a temporary directory): ``mine_hard_negatives(...,
    cross_encoder=...)`` against ``python -m jobs.mine`` (a process of its own, as a user runs it) on the indexed
    corpus with ``mine.cross_encoder``, on the first ``--ce-queries`` queries with ``--ce-max-length`` tokens per
    pair, parts of ``--ce-queries-per-part`` queries; ratio and overlap against the former. Both start from encoded
    documents (``mine_hard_negatives`` from its ``cache_folder``, filled by an untimed call): the rows time the
    query side, search, rescoring and selection (and, for the job, starting Ray and its workers). Without a margin:
    the scores of a random head make any margin arbitrary; both take the same window.

Run (from the repository root, with the venv active)
  python bench/mine_vs_st.py                      # SciFact when present; exits 0 with a message when absent
  python bench/mine_vs_st.py --relative-margin 0 --num-negatives 5 --out mine.json
  python bench/mine_vs_st.py --ce-queries 0         # without the cross-encoder rows
  python bench/mine_vs_st.py --only-cross-encoder   # only them
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from retrieval_core.io.folder import Folder

REPO = Path(__file__).resolve().parents[1]
SCIFACT = Path(os.environ.get("SCIFACT_DIR") or REPO.parent / "shared" / "data" / "scifact")  # BEIR SciFact


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SCIFACT, help="BEIR directory (corpus.parquet, queries.jsonl, qrels/)")
    p.add_argument("--qrels", default="qrels/train.tsv")
    p.add_argument("--num-negatives", type=int, default=3)
    p.add_argument("--relative-margin", type=float, default=0.05, help="0 or negative: no margin")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cross-encoder", default="", help="a CrossEncoder directory (default: built, see above)")
    p.add_argument("--ce-queries", type=int, default=200, help="queries of the cross-encoder rows; 0 = no such rows")
    p.add_argument("--ce-max-length", type=int, default=128, help="cross-encoder tokens per pair")
    p.add_argument(
        "--ce-queries-per-part",
        type=int,
        default=25,
        help="mine.queries_per_part of the job's cross-encoder row (parts for every worker)",
    )
    p.add_argument(
        "--only-cross-encoder",
        action="store_true",
        help="only the cross-encoder rows (the corpus is encoded and indexed first, untimed)",
    )
    p.add_argument("--out", type=Path, help="also write the results to this JSON file")
    return p.parse_args(argv)


def load_data(data: Path, qrels_path: Path):
    import pyarrow.parquet as pq

    from retrieval_core.io import judgements

    corpus = {r["_id"]: f"{r['title']} {r['text']}" for r in pq.read_table(data / "corpus.parquet").to_pylist()}
    queries = judgements.read_queries(str(data / "queries.jsonl"))
    qrels = judgements.read_qrels(str(qrels_path))
    pairs = [(queries[q], corpus[d]) for q, judged in qrels.items() for d, s in judged.items() if s > 0 and d in corpus]
    return corpus, pairs


def reference(
    corpus: dict, pairs: list, args, use_faiss: bool, cross_encoder: str = "", cache_folder: str | None = None
) -> tuple[float, dict[str, set[str]]]:
    from datasets import Dataset
    from sentence_transformers import CrossEncoder, SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from retrieval_core.encode.encoding import resolve_model_path

    options = {"relative_margin": args.relative_margin} if args.relative_margin > 0 else {}
    started = time.perf_counter()
    model = SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu")
    if cross_encoder:  # no margin (see cross_encoder_rows); min_score -1e9 removes nothing but makes it rescore
        options = {
            "cross_encoder": CrossEncoder(cross_encoder, device="cpu", max_length=args.ce_max_length),
            "range_max": 10 * args.num_negatives + max_positives(pairs) - _query_slot(),
            "min_score": -1e9,
        }
    result = mine_hard_negatives(
        Dataset.from_list([{"query": q, "positive": p} for q, p in pairs]),
        model,
        corpus=list(corpus.values()),
        num_negatives=args.num_negatives,
        sampling_strategy="top",
        batch_size=args.batch_size,
        use_faiss=use_faiss,
        output_format="triplet",
        verbose=False,
        cache_folder=cache_folder,
        **options,
    )
    seconds = time.perf_counter() - started
    negatives: dict[str, set[str]] = {}
    for row in result:
        negatives.setdefault(row["query"], set()).add(row["negative"])
    return seconds, negatives


def _query_slot() -> int:
    """1 on sentence-transformers >= 6.3, which ranks one candidate more (a slot for the query's own text): with
    range_max one lower it ranks the candidates the job ranks."""
    import sentence_transformers

    return int(tuple(int(p) for p in sentence_transformers.__version__.split(".")[:2]) >= (6, 3))


def max_positives(pairs: list) -> int:
    counts: dict[str, int] = {}
    for query, _ in pairs:
        counts[query] = counts.get(query, 0) + 1
    return max(counts.values())


def job_config(args, root: str):
    from retrieval_core.config import load_config

    os.environ.setdefault("SCIFACT_DIR", str(args.data))  # configs/scifact.yaml names its data by this variable
    return load_config(str(REPO / "configs" / "scifact.yaml"), job_items(args, root))


def job_items(args, root: str, qrels: str = "", extra: tuple = ()) -> list[str]:
    items = [
        f"corpus.path={json.dumps(str(args.data / 'corpus.parquet'))}",
        f"output.root={json.dumps(root)}",
        f"mine.queries_path={json.dumps(str(args.data / 'queries.jsonl'))}",
        f"mine.qrels_path={json.dumps(qrels or str(args.data / args.qrels))}",
        "index.type=Flat",
        f"mine.num_negatives={args.num_negatives}",
        f"model.batch_size={args.batch_size}",
        "runtime.progress=false",
        "mine.formats=[triplet]",
    ]
    if args.relative_margin > 0:
        items.append(f"mine.relative_margin={args.relative_margin}")
    return [*items, *extra]


def cross_encoder_rows(args, root: str) -> list:
    """mine_hard_negatives with a cross-encoder against ``mine`` with it, on the first ``--ce-queries`` queries
    (their qrels written under ``root``); the corpus under ``root`` is already encoded and indexed."""
    from retrieval_core.io import judgements

    qrels = judgements.read_qrels(str(args.data / args.qrels))
    path = Path(root) / "ce-qrels.tsv"
    path.write_text(
        "query-id\tcorpus-id\tscore\n"
        + "".join(f"{q}\t{d}\t{s}\n" for q, judged in list(qrels.items())[: args.ce_queries] for d, s in judged.items())
    )
    corpus, pairs = load_data(args.data, path)
    model = args.cross_encoder or build_cross_encoder(Path(root) / "ce")
    cache = str(Path(root) / "st-cache")  # both sides start from encoded documents: the rows time the mining
    reference(corpus, pairs, args, use_faiss=False, cache_folder=cache)
    base_s, base = reference(corpus, pairs, args, use_faiss=False, cross_encoder=model, cache_folder=cache)
    shutil.rmtree(Path(root) / "negatives", ignore_errors=True)
    window = 10 * args.num_negatives + max_positives(pairs)
    items = job_items(
        args,
        root,
        str(path),
        (
            f"mine.cross_encoder={json.dumps(model)}",
            f"mine.range_max={window}",
            "mine.relative_margin=null",
            f"mine.cross_encoder_max_length={args.ce_max_length}",
            f"mine.cross_encoder_batch_size={args.batch_size}",
            f"mine.queries_per_part={args.ce_queries_per_part}",
        ),
    )
    return [("mine_hard_negatives + CE", base_s, base), ("jobs: mine (indexed) + CE", *mine_command(args, root, items))]


def mine_command(args, root: str, items: list[str]) -> tuple[float, dict[str, set[str]]]:
    """``python -m jobs.mine`` as a user runs it, in a process of its own; (seconds, negatives per query)."""
    import subprocess

    import pyarrow.parquet as pq

    from retrieval_core.mine import mining

    command = [sys.executable, "-m", "jobs.mine", "--config", "configs/scifact.yaml"]
    for item in items:
        command += ["--set", item]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "SCIFACT_DIR": str(args.data)})
    seconds = time.perf_counter() - started
    corpus = {r["_id"]: f"{r['title']} {r['text']}" for r in pq.read_table(args.data / "corpus.parquet").to_pylist()}
    return seconds, {
        r["query"]: {corpus[d] for d in r["negative_ids"]} for r in mining.read_parts(Folder(root)).to_pylist()
    }


def build_cross_encoder(directory: Path) -> str:
    """all-MiniLM-L6-v2's transformer under a fresh one-output head (seeded), saved as a CrossEncoder."""
    import torch
    from sentence_transformers import CrossEncoder

    from retrieval_core.encode.encoding import resolve_model_path

    torch.manual_seed(0)
    CrossEncoder(resolve_model_path("all-MiniLM-L6-v2"), num_labels=1, device="cpu").save_pretrained(str(directory))
    return str(directory)


def ours(cfg, corpus: dict, stages: tuple) -> tuple[float, dict[str, set[str]]]:
    from jobs import encode, index, mine
    from jobs.ray import cluster
    from retrieval_core.mine import mining

    started = time.perf_counter()
    with cluster.ray_session(cfg.runtime):
        if "encode" in stages:
            encode.run(cfg)
            index.run(cfg)
        mine.run(cfg)
    seconds = time.perf_counter() - started
    table = mining.read_parts(Folder(cfg.output.root)).to_pylist()
    return seconds, {r["query"]: {corpus[d] for d in r["negative_ids"]} for r in table}


def overlap(got: dict[str, set[str]], want: dict[str, set[str]]) -> float:
    shares = [len(got.get(q, set()) & negs) / len(negs) for q, negs in want.items() if negs]
    return sum(shares) / len(shares) if shares else float("nan")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.data / "corpus.parquet").exists():
        print(f"skipped: no corpus at {args.data / 'corpus.parquet'}")
        return 0
    corpus, pairs = load_data(args.data, args.data / args.qrels)
    rows = (
        []
        if args.only_cross_encoder
        else [
            ("mine_hard_negatives", *reference(corpus, pairs, args, False)),
            ("mine_hard_negatives faiss", *reference(corpus, pairs, args, True)),
        ]
    )
    with tempfile.TemporaryDirectory(prefix="bench-mine-") as root:
        cfg = job_config(args, root)
        if args.only_cross_encoder:
            index_only(cfg)
        else:
            rows.append(("jobs: encode+index+mine", *ours(cfg, corpus, ("encode", "index", "mine"))))
            shutil.rmtree(Path(root) / "negatives")
            rows.append(("jobs: mine (indexed)", *ours(cfg, corpus, ("mine",))))
        ce_rows = cross_encoder_rows(args, root) if args.ce_queries > 0 else []
    results = []
    if rows:
        print(
            f"\n{len(pairs)} pairs, {len(rows[0][2])} queries with negatives in the reference, {len(corpus)} "
            f"documents; num_negatives {args.num_negatives}, relative_margin "
            f"{args.relative_margin if args.relative_margin > 0 else 'none'}"
        )
        results += table(rows)
    if ce_rows:
        print(
            f"\nwith a cross-encoder ({args.cross_encoder or 'all-MiniLM-L6-v2 + a random head'}, max length "
            f"{args.ce_max_length}), the first {args.ce_queries} queries; window {10 * args.num_negatives} + "
            f"max positives"
        )
        results += table(ce_rows)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


def index_only(cfg) -> None:
    from jobs import encode, index
    from jobs.ray import cluster

    with cluster.ray_session(cfg.runtime):
        encode.run(cfg)
        index.run(cfg)


def table(rows: list) -> list[dict]:
    """Print the rows (name, seconds, negatives per query) against the first one; return them as records."""
    _, base_s, base = rows[0]
    print(f"{'variant':<28}{'seconds':>10}{'x faster':>10}{'overlap':>10}")
    results = []
    for name, seconds, negs in rows:
        results.append(
            {
                "variant": name,
                "seconds": seconds,
                "speedup": base_s / seconds,
                "overlap_with_reference": overlap(negs, base),
            }
        )
        print(f"{name:<28}{seconds:>10.1f}{base_s / seconds:>9.2f}x{results[-1]['overlap_with_reference']:>10.4f}")
    return results


if __name__ == "__main__":
    sys.exit(main())
