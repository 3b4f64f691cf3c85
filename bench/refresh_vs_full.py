"""Benchmark: a nightly refresh against rebuilding from scratch, on SciFact.

Day 1: 97% of SciFact's corpus (title + text), built with ``jobs.refresh`` on an empty root (version 1).
Day 2: from day 1, 5% of the documents changed (a sentence appended), 2% deleted, and the 3% held out on day 1 added.
Measured in one run, side by side on the same machine:
  (a) ``jobs.refresh`` of day 2 on the day-1 root: diff, encode the change, index, gates, publish;
  (b) what a user would otherwise run: ``jobs.encode`` + ``jobs.index`` of the day-2 snapshot on an empty root.
Printed: wall time of each (fixed costs included: Ray start, model loads, manifests), their ratio, the refresh's
counts, and a check that (a) and (b) give the same top-10 for a sample of queries.

``--uniform``: nights of churn spread uniformly over every segment, on a synthetic corpus with a tiny random
encoder (2 layers, 32 dimensions; no SciFact needed), one run per ``--churn`` (default 1% and 5% a night):
  * night 0 builds ``--docs`` documents with ``jobs.refresh``; each of ``--nights`` nights then changes ``churn`` of
    the documents (drawn anew each night, so every segment loses rows every night), deletes ``churn / 5`` of them
    and adds as many, and runs ``jobs.refresh``, in this process (Ray is never started at this size);
  * what a user would otherwise run, ``jobs.encode`` + ``jobs.index`` of the night's snapshot on an empty root, in
    this process too (``runtime.inline_rows`` set high: no Ray start counted against it), is timed on night 1 and
    on the last night;
  * per night: the refresh's CPU seconds (this process, threads included) and wall seconds, their ratio to the
    rebuild's, the shard indexes built (new + compacted segments), the segments compacted, the dead rows (changed
    or deleted since their segment was written, still in its file) and their share, the files and bytes under the
    root (three published versions kept).
  Index ``IVF64,Flat`` with the quantizer reused (``refresh.retrain: never``), ``refresh.compact_dead_fraction``
  0.2 and ``refresh.compact_budget`` 0.25 (the defaults) unless ``--set`` says otherwise.

``--writer``: the change-file writer alone (``refreshing._stream``, what ``changes/upserts.parquet`` is written
with), fed segments of 5,000 changed documents (doc id, a 128-dimension float32 vector, text hash) made on the fly,
for 100k and 1M changed documents, each in a fresh process: its peak memory above its start.

Run (from the repository root, with the venv active):
  python bench/refresh_vs_full.py --writer
  python bench/refresh_vs_full.py               # SciFact from $SCIFACT_DIR (default ../shared/data/scifact)
  python bench/refresh_vs_full.py --out refresh.json --precision bf16
  python bench/refresh_vs_full.py --uniform --nights 30 --out nights.json
"""

from __future__ import annotations

import argparse
import functools
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
    p.add_argument("--uniform", action="store_true", help="nights of uniform churn on a synthetic corpus")
    p.add_argument("--churn", type=float, nargs="+", default=[0.01, 0.05], help="--uniform: changed share a night")
    p.add_argument("--nights", type=int, default=30)
    p.add_argument("--docs", type=int, default=20_000)
    p.add_argument("--rows-per-shard", type=int, default=500)
    p.add_argument("--set", action="append", default=[], help="--uniform: more config items (key=value)")
    p.add_argument("--writer", action="store_true", help="the change-file writer's peak memory at two sizes")
    p.add_argument("--_writer_rows", type=int, default=0, help=argparse.SUPPRESS)
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


# ------------------------------------------------------------------------------------------------ uniform churn

WORDS = "alpha beta gamma delta river mountain protein cell market revenue planet orbit song piano tumor dose".split()


def synthetic_docs(count: int, rng, first: int = 0) -> list[dict]:
    return [{"_id": f"d{first + i}", "text": " ".join(rng.choice(WORDS, size=20))} for i in range(count)]


def next_night(docs: list[dict], churn: float, rng, night: int, next_id: int) -> tuple[list[dict], int]:
    """``churn`` of the documents changed, ``churn / 5`` deleted and as many added, drawn anew: spread uniformly."""
    n = len(docs)
    order = rng.permutation(n)
    changed, gone = set(order[: int(n * churn)].tolist()), set(order[int(n * churn) : int(n * churn * 1.2)].tolist())
    out = [
        {**d, "text": d["text"] + f" night {night}"} if i in changed else d for i, d in enumerate(docs) if i not in gone
    ]
    added = int(n * churn * 0.2)
    return out + synthetic_docs(added, rng, next_id), next_id + added


def uniform_config(args, corpus: Path, root: Path, model: str):
    from retrieval_core.config import load_config

    q = json.dumps
    return load_config(
        None,
        [
            f"corpus.path={q(str(corpus))}",
            "corpus.id_column=_id",
            f"output.root={q(str(root))}",
            f"model.name={q(model)}",
            "index.type=IVF64,Flat",
            "index.nprobe=32",
            "refresh.retrain=never",
            f"runtime.rows_per_shard={args.rows_per_shard}",
            "runtime.inline_rows=1000000000",  # the rebuild too runs in this process: CPU seconds compare
            "runtime.progress=false",
            "eval.queries_path=",
            "publish.max_deleted_fraction=0.5",
            "publish.max_added_fraction=0.5",
            *args.set,
        ],
    )


def cpu_timed(work) -> tuple[object, float, float]:
    started, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, time.process_time() - cpu, time.perf_counter() - started


def tree(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def night_row(root: Path, result: dict, cpu: float, wall: float) -> dict:
    from retrieval_core.encode import embeddings
    from retrieval_core.io import versions

    version = versions.version_root(str(root), result["version"])
    totals = embeddings.read_embeddings_manifest(Folder(version))["totals"]
    built = [
        json.loads(p.read_text()) for p in (Path(version) / "index" / "_shards").glob("*.json")
    ]  # the shard indexes' commit records, left after the merge
    dead = totals.get("rows_dead", 0)
    files, size = tree(root)
    return {
        "cpu_s": round(cpu, 2),
        "wall_s": round(wall, 2),
        "encoded": totals["rows_encoded_now"],
        "shard_indexes_built": sum(1 for r in built if not r.get("shared_from")),
        "shard_indexes": len(built),
        "compacted": totals.get("shards_compacted", 0),
        "rows_compacted": totals.get("rows_compacted", 0),
        "dead_rows": dead,
        "dead_share": round(dead / (dead + totals["rows_encoded"]), 4),
        "files": files,
        "mib": round(size / 2**20, 1),
        "steps_s": result["timings_s"],
    }


def rebuild(encode, index, cfg) -> None:
    encode.run(cfg)
    index.run(cfg)


def uniform_nights(args, churn: float, work: Path, model: str) -> dict:
    """Night 0, then ``args.nights`` nights of uniform churn; the rebuild timed on night 1 and the last night."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs import encode, index, refresh

    rng = np.random.default_rng(args.seed)
    docs, next_id = synthetic_docs(args.docs, rng), args.docs
    root, rows, rebuilds = work / f"churn-{churn}" / "nightly", [], {}
    for night in range(args.nights + 1):
        if night:
            docs, next_id = next_night(docs, churn, rng, night, next_id)
        corpus = work / f"churn-{churn}" / f"night-{night:02d}" / "corpus.parquet"
        corpus.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(docs), corpus, row_group_size=1000)
        result, cpu, wall = cpu_timed(functools.partial(refresh.run, uniform_config(args, corpus, root, model)))
        if night:
            rows.append({"night": night, **night_row(root, result, cpu, wall)})
            print(json.dumps({"churn": churn, **rows[-1]}), flush=True)
        if night in (1, args.nights):
            scratch = uniform_config(args, corpus, work / f"churn-{churn}" / f"scratch-{night}", model)
            _, cpu, wall = cpu_timed(functools.partial(rebuild, encode, index, scratch))
            rebuilds[night] = {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2)}
        for old in corpus.parent.parent.glob("night-*"):
            if old != corpus.parent:
                for f in old.iterdir():
                    f.unlink()
                old.rmdir()
    first, last = rebuilds[1], rebuilds[args.nights]
    for row in rows:
        reference = first if row["night"] <= args.nights // 2 else last
        row["cpu_ratio"] = round(row["cpu_s"] / reference["cpu_s"], 3)
        row["wall_ratio"] = round(row["wall_s"] / reference["wall_s"], 3)
    return {"churn": churn, "rebuild": rebuilds, "nights": rows}


def uniform_summary(runs: list[dict]) -> list[str]:
    lines = []
    for run in runs:
        nights = run["nights"]
        lines.append(
            f"churn {run['churn']:.0%} a night: rebuild night 1 {run['rebuild'][min(run['rebuild'])]['cpu_s']} CPU-s, "
            f"last night {run['rebuild'][max(run['rebuild'])]['cpu_s']} CPU-s"
        )
        lines.append(
            "| night | CPU ratio | wall ratio | encoded | shard indexes built | compacted | dead share | files | MiB |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for row in nights:
            if row["night"] in (1, 2, 5, 10, 15, 20, 25, 30) or row["night"] == len(nights):
                lines.append(
                    f"| {row['night']} | {row['cpu_ratio']} | {row['wall_ratio']} | {row['encoded']} "
                    f"| {row['shard_indexes_built']} / {row['shard_indexes']} | {row['compacted']} "
                    f"| {row['dead_share']:.1%} | {row['files']} | {row['mib']} |"
                )
        mean = lambda key, part: sum(r[key] for r in part) / len(part)  # noqa: E731
        half = len(nights) // 2
        lines.append(
            f"mean CPU ratio nights 1-{half}: {mean('cpu_ratio', nights[:half]):.3f}; "
            f"nights {half + 1}-{len(nights)}: {mean('cpu_ratio', nights[half:]):.3f}; mean wall ratio "
            f"{mean('wall_ratio', nights[:half]):.3f} and {mean('wall_ratio', nights[half:]):.3f}; "
            f"max dead share {max(r['dead_share'] for r in nights):.1%}; max files {max(r['files'] for r in nights)}"
        )
    return lines


def main_uniform(args) -> int:
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import build_tiny_model

    work = args.workdir or Path(tempfile.mkdtemp(prefix="refresh-nights-"))
    model = str(build_tiny_model(work / "model", dropout=0.0))
    runs = [uniform_nights(args, churn, work, model) for churn in args.churn]
    print("\n".join(uniform_summary(runs)))
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "table": uniform_summary(runs)}, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------- change writer


def writer_child(rows: int, out: Path) -> dict:
    """Write ``rows`` changed documents through the change-file writer, 5,000 a segment; peak memory above start."""
    import numpy as np
    import pyarrow as pa

    from retrieval_core.refresh import refreshing

    def segments():
        rng = np.random.default_rng(0)
        for start in range(0, rows, 5000):
            n = min(5000, rows - start)
            vectors = rng.standard_normal((n, 128)).astype(np.float32)
            yield pa.table(
                {
                    "doc_id": [f"d{i}" for i in range(start, start + n)],
                    "embedding": pa.FixedSizeListArray.from_arrays(vectors.ravel(), 128),
                    "text_hash": [f"{i:016x}" for i in range(start, start + n)],
                }
            )

    with open("/proc/self/status") as status:
        start = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
    written = refreshing._stream(str(out), {}, segments(), None)
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    return {
        "rows": written,
        "peak_above_start_mib": round(peak - start, 1),
        "file_mib": round(out.stat().st_size / 2**20),
    }


def main_writer(args) -> int:
    import subprocess

    work = args.workdir or Path(tempfile.mkdtemp(prefix="writer-bench-"))
    results = []
    for rows in (100_000, 1_000_000):
        command = [sys.executable, __file__, "--_writer_rows", str(rows), "--workdir", str(work)]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        (work / "upserts.parquet").unlink()
    for r in results:
        print(
            f"{r['rows']:,} changed documents: writer peak {r['peak_above_start_mib']} MiB above start "
            f"({r['peak_above_start_mib'] / results[0]['peak_above_start_mib']:.2f}x), file {r['file_mib']} MiB"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._writer_rows:
        print(json.dumps(writer_child(args._writer_rows, args.workdir / "upserts.parquet")))
        return 0
    if args.writer:
        return main_writer(args)
    if args.uniform:
        sys.path.insert(0, str(REPO))
        return main_uniform(args)
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
