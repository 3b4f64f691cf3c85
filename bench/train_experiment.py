"""Experiment: do mined hard negatives help? Base model vs fine-tuning with in-batch negatives only vs with mined
hard negatives, on SciFact.

Steps (one run):
  1. Split SciFact's train queries (those with qrels) into train and dev by query, seeded (``--dev-fraction``).
  2. With the base model (all-MiniLM-L6-v2): encode the corpus (title + text), index it exactly (Flat), evaluate
     the dev queries, and mine hard negatives for the train queries (``--relative-margin``, top sampling).
  3. Train twice from the base model with the same steps, batch size, learning rate and seed:
     (a) ``train.num_negatives=0`` -- in-batch negatives only; (b) ``train.num_negatives=--negatives`` -- in-batch
     plus mined hard negatives. Each trained model re-encodes and re-indexes the corpus and is evaluated on dev.
  Printed: dev nDCG@10, recall@10, recall@100, MRR@10 of base, (a) and (b), and the training time of each.
  This is ``jobs.pipeline`` run twice on one corpus (the second run reuses the first one's encode, index and mine).
  ``--precision bf16`` (default) encodes the corpus in bf16 to save time; training itself is fp32.

Run (from the repository root, with the venv active)
  python bench/train_experiment.py                # SciFact when present; exits 0 with a message when absent
  python bench/train_experiment.py --epochs 2 --out train.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCIFACT = Path(os.environ.get("SCIFACT_DIR") or REPO.parent / "shared" / "data" / "scifact")  # BEIR SciFact
METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SCIFACT)
    p.add_argument("--dev-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negatives", type=int, default=3, help="mined negatives per query in (b)")
    p.add_argument("--relative-margin", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--precision", default="bf16", help="corpus encoding precision (training is fp32)")
    p.add_argument("--workdir", type=Path, help="keep outputs here (default: a temp dir)")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def split_beir(data: Path, fraction: float, seed: int, out: Path) -> dict[str, Path]:
    """Write train/dev queries and qrels files (BEIR format) split by query id."""
    from retrieval_core.io import judgements

    queries = judgements.read_queries(str(data / "queries.jsonl"))
    qrels = judgements.read_qrels(str(data / "qrels" / "train.tsv"))
    ids = sorted(q for q in qrels if q in queries)
    random.Random(seed).shuffle(ids)
    dev = set(ids[: int(len(ids) * fraction)])
    paths = {}
    for name, keep in (("train", [q for q in ids if q not in dev]), ("dev", sorted(dev))):
        paths[f"{name}_queries"] = out / f"{name}-queries.jsonl"
        paths[f"{name}_qrels"] = out / f"{name}-qrels.tsv"
        paths[f"{name}_queries"].write_text("".join(json.dumps({"_id": q, "text": queries[q]}) + "\n" for q in keep))
        paths[f"{name}_qrels"].write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q in keep for d, s in qrels[q].items())
        )
    return paths


def config(args, root: Path, paths: dict, num_negatives: int):
    from retrieval_core.config import load_config

    q = json.dumps
    os.environ.setdefault("SCIFACT_DIR", str(args.data))  # configs/scifact.yaml reads it; every path is set below
    return load_config(
        str(REPO / "configs" / "scifact.yaml"),
        [
            f"corpus.path={q(str(args.data / 'corpus.parquet'))}",
            f"output.root={q(str(root))}",
            f"model.precision={args.precision}",
            "index.type=Flat",
            "runtime.progress=false",
            f"eval.queries_path={q(str(paths['dev_queries']))}",
            f"eval.qrels_path={q(str(paths['dev_qrels']))}",
            f"mine.queries_path={q(str(paths['train_queries']))}",
            f"mine.qrels_path={q(str(paths['train_qrels']))}",
            f"mine.relative_margin={args.relative_margin}",
            f"mine.num_negatives={max(args.negatives, 1)}",
            f"train.num_negatives={num_negatives}",
            f"train.epochs={args.epochs}",
            f"train.batch_size={args.batch_size}",
            f"train.learning_rate={args.learning_rate}",
            f"train.max_steps={args.max_steps}",
            f"train.seed={args.seed}",
            "train.eval_fraction=0.1",
            "train.eval_corpus_size=500",
            "mine.formats=[n-tuple]",  # what training reads
        ],
    )


def run_variant(cfg) -> dict:
    from jobs import pipeline

    results = pipeline.run(cfg)
    return {stage: result for stage, (result, _) in results.items()} | {
        "seconds": {stage: seconds for stage, (_, seconds) in results.items()}
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.data / "corpus.parquet").exists():
        print(f"skipped: no corpus at {args.data / 'corpus.parquet'}")
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    paths = split_beir(args.data, args.dev_fraction, args.seed, work)
    hard = run_variant(config(args, work / "hard", paths, args.negatives))
    shutil.copytree(work / "hard", work / "inbatch", ignore=shutil.ignore_patterns("model", "trained", "_ray_train"))
    inbatch = run_variant(config(args, work / "inbatch", paths, 0))
    rows = [
        ("base model", hard["evaluate"]["metrics"], None),
        ("(a) in-batch negatives", inbatch["reevaluate"]["metrics"], inbatch["seconds"]["train"]),
        (f"(b) + {args.negatives} mined negatives", hard["reevaluate"]["metrics"], hard["seconds"]["train"]),
    ]
    steps = hard["train"]["history"]["steps"]
    print(
        f"\nSciFact train queries split {1 - args.dev_fraction:.0%}/{args.dev_fraction:.0%} (seed {args.seed}): "
        f"{hard['mine']['written']} train queries mined ({hard['mine']['complete']} complete, "
        f"{hard['mine']['without_negatives']} without negatives), "
        f"{hard['evaluate']['metrics']['queries']} dev queries; "
        f"{steps} steps of {args.batch_size}, lr {args.learning_rate}, relative margin {args.relative_margin}"
    )
    print(f"{'model':<30}" + "".join(f"{m:>12}" for m in METRICS) + f"{'train s':>10}")
    for name, figures, seconds in rows:
        print(
            f"{name:<30}"
            + "".join(f"{figures[m]:>12.4f}" for m in METRICS)
            + (f"{seconds:>10.1f}" if seconds is not None else f"{'':>10}")
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "rows": [{"model": n, **f, "train_s": s} for n, f, s in rows],
                    "steps": steps,
                    "args": {k: str(v) for k, v in vars(args).items()},
                },
                indent=2,
            )
        )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
