"""Benchmark: a nightly refresh against rebuilding from scratch, on SciFact.

Day 1: 97% of SciFact's corpus (title + text), built with ``jobs.refresh`` on an empty root (version 1).
Day 2: from day 1, 5% of the documents changed (a sentence appended), 2% deleted, and the 3% held out on day 1 added.
Measured in one run, side by side on the same machine:
  (a) ``jobs.refresh`` of day 2 on the day-1 root: diff, encode the change, index, gates, publish;
  (b) what a user would otherwise run: ``jobs.encode`` + ``jobs.index`` of the day-2 snapshot on an empty root.
Printed: wall time of each (fixed costs included: Ray start, model loads, manifests), their ratio, the refresh's
counts, and a check that (a) and (b) give the same top-10 for a sample of queries.

Run (from the repository root, with the venv active):
  python bench/refresh_vs_full.py               # SciFact from $SCIFACT_DIR (default ../shared/data/scifact)
  python bench/refresh_vs_full.py --out refresh.json --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from retrieval_core.io.folder import Folder

REPO = Path(__file__).resolve().parents[1]
SCIFACT = Path(os.environ.get("SCIFACT_DIR") or REPO.parent / "shared" / "data" / "scifact")  # BEIR SciFact


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SCIFACT, help="BEIR SciFact folder with corpus.parquet")
    p.add_argument("--changed", type=float, default=0.05)
    p.add_argument("--added", type=float, default=0.03)
    p.add_argument("--deleted", type=float, default=0.02)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="keep outputs here (default: a temp dir)")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def snapshots(args, out: Path) -> dict:
    """Day 1 and day 2 Parquet snapshots; returns their paths and the planned counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(args.data / "corpus.parquet").to_pylist()
    rng = random.Random(args.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    n = len(rows)
    held = set(order[: int(n * args.added)])
    gone = set(order[int(n * args.added) : int(n * args.added) + int(n * args.deleted)])
    edit = set(order[len(held) + len(gone) : len(held) + len(gone) + int(n * args.changed)])
    day1 = [r for i, r in enumerate(rows) if i not in held]
    day2 = [
        ({**r, "text": r["text"] + " This abstract was revised."} if i in edit else r)
        for i, r in enumerate(rows)
        if i not in gone
    ]
    paths = {}
    for name, data in (("day1", day1), ("day2", day2)):
        paths[name] = out / name / "corpus.parquet"
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(data), paths[name], row_group_size=1000)
    return {
        "paths": paths,
        "planned": {
            "day1": len(day1),
            "day2": len(day2),
            "changed": len(edit),
            "added": len(held),
            "deleted": len(gone),
        },
    }


def config(args, corpus: Path, root: Path):
    from retrieval_core.config import load_config

    q = json.dumps
    return load_config(
        None,
        [
            f"corpus.path={q(str(corpus))}",
            "corpus.id_column=_id",
            "corpus.title_column=title",
            f"output.root={q(str(root))}",
            f"model.precision={args.precision}",
            "index.type=Flat",
            "runtime.progress=false",
            "eval.queries_path=",
            "publish.max_deleted_fraction=0.05",
        ],
    )


def timed(work) -> tuple[object, float]:
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def same_top10(refresh_root: str, scratch_root: str) -> float:
    """Share of sampled queries (corpus vectors) whose top-10 doc ids agree between the two builds."""
    import numpy as np

    from retrieval_core.encode import embeddings
    from retrieval_core.index import faiss_index, indexing
    from retrieval_core.io import versions

    version_root, _ = versions.resolve_root(Folder(refresh_root))
    results = []
    for root in (version_root, scratch_root):
        row_ids, vectors, doc_ids = embeddings.load_embeddings(Folder(root))
        by_doc = dict(zip(doc_ids, vectors))
        queries = np.stack([by_doc[d] for d in sorted(by_doc)[::50]])
        index, _ = indexing.load_index(Folder(root))
        _, ids = faiss_index.search(index, queries, 10)
        doc_of = dict(zip(row_ids.tolist(), doc_ids))
        results.append([[doc_of[int(r)] for r in row] for row in ids])
    return sum(a == b for a, b in zip(*results)) / len(results[0])


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.data / "corpus.parquet").is_file():
        print(f"SciFact not found at {args.data} (set SCIFACT_DIR or --data; see README, 'SciFact'): nothing to run")
        return 0
    sys.path.insert(0, str(REPO))
    from jobs import encode, index, refresh

    work = args.workdir or Path(tempfile.mkdtemp(prefix="refresh-bench-"))
    snaps = snapshots(args, work)
    nightly, scratch = work / "nightly", work / "scratch"
    # each job starts and stops its own local Ray cluster, as the commands a user runs do (fixed costs included)
    day1, day1_s = timed(lambda: refresh.run(config(args, snaps["paths"]["day1"], nightly)))
    day2, refresh_s = timed(lambda: refresh.run(config(args, snaps["paths"]["day2"], nightly)))
    scratch_cfg = config(args, snaps["paths"]["day2"], scratch)
    _, full_s = timed(lambda: (encode.run(scratch_cfg), index.run(scratch_cfg)))
    agreement = same_top10(str(nightly), str(scratch))
    result = {
        "planned": snaps["planned"],
        "counts": day2["counts"],
        "retrain": day2["retrain"]["reason"],
        "day1_refresh_s": round(day1_s, 1),
        "day2_refresh_s": round(refresh_s, 1),
        "day2_from_scratch_s": round(full_s, 1),
        "ratio": round(refresh_s / full_s, 3),
        "refresh_steps_s": day2["timings_s"],
        "top10_agreement": agreement,
        "precision": args.precision,
    }
    print(
        f"day 2 refresh {refresh_s:.1f} s vs from scratch (encode + index) {full_s:.1f} s: "
        f"ratio {refresh_s / full_s:.3f}"
    )
    print(f"counts: {day2['counts']}")
    print(f"refresh steps (s): {day2['timings_s']}")
    print(f"top-10 agreement with the from-scratch build: {agreement:.3f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
