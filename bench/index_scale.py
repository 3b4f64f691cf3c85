"""Benchmark: how the index job scales with the corpus size -- time, memory and recall at 10k, 100k and 1M vectors.

What it measures
  For each size N in --sizes, synthetic clustered vectors (Gaussian blobs around --clusters random centers, with
  --noise so that IVF lists mean something but neighbours are not trivial), unit length, float32, dim --dim, are
  written as an encode stage's output: ``embeddings/shard-XXXXX.parquet`` + ``embeddings/_manifest.json``, one
  shard at a time (this process never holds more than one shard: its own peak memory is printed at the end).
  Then ``python -m jobs.index`` runs as a subprocess (``--set index.type=T runtime.progress=false ...``), so that
  the job's driver is a process of its own and its peak memory is the job's, and ``index/manifest.json`` is read:
  * the index type (``auto`` resolves to Flat up to 50,000 vectors, then IVF<4*sqrt(N)>,Flat), ntotal, shards,
    training points;
  * seconds of training, of adding the shards (the driver's wall time over all add tasks), of the merge and of
    the recall measurement (manifest ``timings_s``), and the wall seconds of the whole subprocess (Python and Ray
    start-up included); time per vector = (add + merge seconds) / N, in microseconds;
  * peak resident memory, MiB, of the driver and of the tasks (manifest ``peak_memory_mb``: train task, largest
    add task, merge task), next to the raw size of the vectors (N * dim * 4 bytes), so that one sees whether the
    driver (or a task) holds them all;
  * recall@10 of the merged index against exact search on --recall-queries corpus vectors used as queries, and
    the nprobe (IVF) the job chose to reach ``index.target_recall`` (0.95).
  The data of each size is deleted once it is measured, unless --keep.

Run (from the repository root, with the venv active)
  python bench/index_scale.py                               # 10k, 100k, 1M at dim 384 (see the note below)
  python bench/index_scale.py --sizes 10000,100000          # a quick look
  python bench/index_scale.py --sizes 10000 --type IVF64,Flat --out scale.json
  Other options: --dim 384, --type auto, --train-size 0, --shard-rows 100000, --seed 0, --recall-queries 1000,
  --clusters 1000, --noise 0.5, --out results.json, --workdir DIR (outputs go there instead of a temp dir),
  --keep (keep each size's embeddings and index).

Note on small machines
  At 1M vectors ``auto`` builds IVF4096,Flat and, with ``index.train_size: 0``, trains its k-means on 64 points
  per list = 262,144 vectors of dim 384: on 2 cores this training alone takes many minutes (the adds, the merge
  and the recall measurement are much cheaper). ``--train-size N`` passes ``index.train_size=N``: the k-means
  sample (0 = the job's default; at most N vectors). FAISS asks for at least 39 points per list, so
  ``--train-size 159744`` (39 * 4096) is the smallest sample that trains IVF4096 without FAISS's warning and cuts
  the training by about 40%; smaller samples train faster still but give coarser lists (a larger nprobe for the
  same recall). Figures taken with another training size are not comparable with the default's.
  Disk: about 3 * N * dim * 4 bytes per size while it is measured (the shards, the shard indexes and the merged
  index: ~4.6 GB at 1M, dim 384).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
LOG_TAIL_LINES = 40
GEN_CHUNK_ROWS = 16_384  # rows generated (and turned into an Arrow table) at a time

if str(REPO) not in sys.path:  # `python bench/index_scale.py` puts bench/ on the path, not the repository
    sys.path.insert(0, str(REPO))


def parse_sizes(text: str) -> list[int]:
    """'10000,100k,1M' -> [10000, 100000, 1000000]."""
    sizes = []
    for item in text.split(","):
        item = item.strip().replace("_", "").lower()
        if not item:
            continue
        scale = {"k": 1_000, "m": 1_000_000}.get(item[-1], 1)
        value = int(float(item[:-1] if scale > 1 else item) * scale)
        if value < 1:
            raise argparse.ArgumentTypeError(f"size {item!r}: expected a positive count")
        sizes.append(value)
    if not sizes:
        raise argparse.ArgumentTypeError("--sizes: no size given")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        default=parse_sizes("10000,100000,1000000"),
        help="corpus sizes, comma separated (k / M suffixes allowed; default 10000,100000,1000000)",
    )
    p.add_argument("--dim", type=int, default=384, help="vector dimension (default 384, all-MiniLM-L6-v2's)")
    p.add_argument("--type", default="auto", help="index.type: auto or a FAISS factory string (default auto)")
    p.add_argument(
        "--train-size",
        type=int,
        default=0,
        help="index.train_size: k-means sample size (0 = the job's default, 64 points per IVF list)",
    )
    p.add_argument(
        "--shard-rows",
        type=int,
        default=100_000,
        help="rows per embedding shard (default 100000; at most ceil(N / 4), so >= 4 shards per size)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    p.add_argument(
        "--recall-queries",
        type=int,
        default=1000,
        help="index.recall_queries: corpus vectors used as queries for recall@10 (default 1000)",
    )
    p.add_argument("--clusters", type=int, default=1000, help="Gaussian blobs of the synthetic data (default 1000)")
    p.add_argument(
        "--noise", type=float, default=0.5, help="per-coordinate noise std relative to the centers' (default 0.5)"
    )
    p.add_argument("--out", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="write each size's embeddings and index under this directory (default: a temp dir)",
    )
    p.add_argument("--keep", action="store_true", help="keep each size's data after measuring it")
    args = p.parse_args(argv)
    for name in ("dim", "shard_rows", "recall_queries", "clusters"):
        if getattr(args, name) < (0 if name == "recall_queries" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.train_size < 0:
        p.error("--train-size must be >= 0 (0 = the job's default)")
    return args


# ------------------------------------------------------------------------------------------------ synthetic data


def shard_rows_for(size: int, shard_rows: int) -> int:
    """--shard-rows, but at most ceil(size / 4) so that even a small size is split into several shards."""
    return max(1, min(shard_rows, math.ceil(size / 4)))


def fingerprint_of(size: int, args) -> str:
    text = f"bench-index-scale:{size}:{args.dim}:{args.clusters}:{args.noise}:{args.seed}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cluster_centers(dim: int, clusters: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0]).standard_normal((clusters, dim), dtype=np.float32)


def shard_table(centers: np.ndarray, start: int, stop: int, fingerprint: str, args, size: int, index: int):
    """The embeddings table of rows [start, stop): unit-length float32 vectors, each a random center plus Gaussian
    noise, seeded per (seed, size, shard). Made GEN_CHUNK_ROWS rows at a time (one ``embeddings_table`` per
    chunk), so that memory is the shard's table plus one chunk's temporaries."""
    import pyarrow as pa

    from retrieval_core.encode.embeddings import embeddings_table

    rng = np.random.default_rng([args.seed, size, index + 1])
    assignment = rng.integers(0, len(centers), size=stop - start)
    parts = []
    for lo in range(0, stop - start, GEN_CHUNK_ROWS):
        hi = min(lo + GEN_CHUNK_ROWS, stop - start)
        x = centers[assignment[lo:hi]]
        x += args.noise * rng.standard_normal(x.shape, dtype=np.float32)
        x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
        ids = list(range(start + lo, start + hi))
        parts.append(
            embeddings_table(
                ids, [f"doc{i}" for i in ids], x, ["0" * 16] * len(ids), "float32", {"fingerprint": fingerprint}
            )
        )
    return pa.concat_tables(parts)


def write_embeddings(root: Path, size: int, args) -> dict:
    """The encode stage's output for ``size`` synthetic vectors, written shard by shard (as
    ``tests/helpers.write_synthetic_embeddings`` lays it out); returns the embeddings manifest."""
    from retrieval_core.io import storage
    from retrieval_core.io.manifest import stamp

    fingerprint = fingerprint_of(size, args)
    centers = cluster_centers(args.dim, args.clusters, args.seed)
    per_shard = shard_rows_for(size, args.shard_rows)
    shards = []
    for start in range(0, size, per_shard):
        stop = min(start + per_shard, size)
        name = f"shard-{len(shards):05d}"
        table = shard_table(centers, start, stop, fingerprint, args, size, len(shards))
        storage.write_parquet_atomic(str(root / "embeddings" / f"{name}.parquet"), table)
        del table
        shards.append(
            {
                "name": name,
                "path": f"{name}.parquet",
                "row_start": start,
                "row_stop": stop,
                "rows": stop - start,
                "rejected": 0,
                "rejects_path": None,
            }
        )
    manifest = {
        **stamp(),
        "stage": "embeddings",
        "fingerprint": fingerprint,
        "encoder": {"fingerprint": fingerprint},
        "dim": args.dim,
        "normalized": True,
        "totals": {"rows_in": size, "rows_encoded": size, "rows_rejected": 0, "shards": len(shards)},
        "shards": shards,
        "config": {},
    }
    storage.write_json_atomic(str(root / "embeddings" / "_manifest.json"), manifest)
    return manifest


# ------------------------------------------------------------------------------------------------- the index job


def index_command(root: Path, args) -> list[str]:
    def quoted(value) -> str:  # --set values are parsed as YAML: JSON strings keep paths and "IVF64,Flat" intact
        return json.dumps(value)

    overrides = [
        f"output.root={quoted(str(root))}",
        f"index.type={quoted(args.type)}",
        "runtime.progress=false",
        f"index.recall_queries={args.recall_queries}",
    ]
    if args.train_size:
        overrides.append(f"index.train_size={args.train_size}")
    command = [sys.executable, "-m", "jobs.index"]
    for item in overrides:
        command += ["--set", item]
    return command


def run_index_job(root: Path, args) -> tuple[float, dict]:
    """(wall seconds of the subprocess, index manifest). The job's output goes to ``root/index_job.log``."""
    log_path = root / "index_job.log"
    command = index_command(root, args)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        raise RuntimeError(f"jobs.index exited with {proc.returncode}:\n  {' '.join(command)}\n{tail}")
    return wall, json.loads((root / "index" / "manifest.json").read_text())


def disk_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / MIB


def measure(size: int, root: Path, args) -> dict:
    started = time.perf_counter()
    emb = write_embeddings(root, size, args)
    gen_s = time.perf_counter() - started
    print(f"  N={size}: wrote {len(emb['shards'])} shard(s) in {gen_s:.1f} s; running jobs.index ...", flush=True)
    wall, manifest = run_index_job(root, args)
    timings = manifest["timings_s"]
    memory = manifest.get("peak_memory_mb", {})
    recall = manifest.get("recall", {})
    add_merge = (timings.get("add") or 0.0) + (timings.get("merge") or 0.0)
    return {
        "size": size,
        "dim": manifest["dim"],
        "type": manifest["type"],
        "ntotal": manifest["ntotal"],
        "shards": len(emb["shards"]),
        "shard_rows": shard_rows_for(size, args.shard_rows),
        "train_points": manifest["identity"]["train_size"],
        "generate_s": round(gen_s, 3),
        "train_s": timings.get("train"),
        "add_s": timings.get("add"),
        "merge_s": timings.get("merge"),
        "recall_s": timings.get("recall"),
        "job_total_s": timings.get("total"),
        "wall_s": round(wall, 3),
        "us_per_vector": round(add_merge / size * 1e6, 3),
        "raw_vectors_mib": round(size * manifest["dim"] * 4 / MIB, 1),
        "peak_memory_mib": {
            "driver": memory.get("driver"),
            "train_task": memory.get("train_task"),
            "add_tasks_max": memory.get("add_tasks_max"),
            "merge_task": memory.get("merge_task"),
        },
        "recall_at_10": recall.get("recall_at_10"),
        "recall_queries": recall.get("queries"),
        "search_parameters": manifest.get("search_parameters", {}),
        "recall_tried": recall.get("tried", []),
        "disk_mib": round(disk_mib(root), 1),
    }


# ---------------------------------------------------------------------------------------------------- reporting

COLUMNS = [  # (header, width, how to format one result)
    ("N", 9, lambda r: f"{r['size']}"),
    ("type", 14, lambda r: r["type"]),
    ("ntotal", 9, lambda r: f"{r['ntotal']}"),
    ("shards", 7, lambda r: f"{r['shards']}"),
    ("train pts", 10, lambda r: f"{r['train_points']}"),
    ("train s", 9, lambda r: _num(r["train_s"], 2)),
    ("add s", 8, lambda r: _num(r["add_s"], 2)),
    ("merge s", 9, lambda r: _num(r["merge_s"], 2)),
    ("recall s", 9, lambda r: _num(r["recall_s"], 2)),
    ("wall s", 8, lambda r: _num(r["wall_s"], 1)),
    ("us/vec", 8, lambda r: _num(r["us_per_vector"], 2)),
    ("raw MiB", 9, lambda r: _num(r["raw_vectors_mib"], 1)),
    ("driver", 8, lambda r: _num(r["peak_memory_mib"]["driver"], 0)),
    ("train", 7, lambda r: _num(r["peak_memory_mib"]["train_task"], 0)),
    ("add max", 8, lambda r: _num(r["peak_memory_mib"]["add_tasks_max"], 0)),
    ("merge", 7, lambda r: _num(r["peak_memory_mib"]["merge_task"], 0)),
    ("R@10", 8, lambda r: _num(r["recall_at_10"], 4)),
    ("search", 12, lambda r: ", ".join(f"{k}={v}" for k, v in r["search_parameters"].items()) or "-"),
]


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[dict]) -> str:
    head = "".join(f"{name:>{width}}" if i else f"{name:<{width}}" for i, (name, width, _) in enumerate(COLUMNS))
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            last = (r["error"].strip().splitlines() or [""])[-1]
            lines.append(f"{r['size']:<9}  FAILED: {last[:140]}")
            continue
        lines.append(
            "".join(f"{fmt(r):>{width}}" if i else f"{fmt(r):<{width}}" for i, (_, width, fmt) in enumerate(COLUMNS))
        )
    lines.append(
        "seconds: manifest timings_s (add = wall time of all add tasks); wall s = the whole subprocess; "
        "us/vec = (add + merge) / N."
    )
    lines.append(
        "memory: peak RSS in MiB of the job's driver and tasks (manifest peak_memory_mb); raw MiB = "
        "N * dim * 4 bytes of vectors. R@10 = recall@10 vs exact search."
    )
    return "\n".join(lines)


def environment() -> dict:
    """Versions from the package metadata: importing ray or faiss here would only inflate this process's memory."""
    from importlib import metadata

    def version(*names: str) -> str:
        for name in names:
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        return "?"

    return {
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "faiss": version("faiss-cpu", "faiss-gpu", "faiss"),
        "ray": version("ray"),
    }


def self_peak_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    print(f"{env['cpu_count']} cores; faiss {env['faiss']}, ray {env['ray']}, numpy {env['numpy']}")
    print(
        f"sizes {args.sizes}, dim {args.dim}, index.type {args.type}, train size "
        f"{args.train_size or 'job default'}, {args.clusters} clusters, noise {args.noise}, seed {args.seed}"
    )
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        base, temp = args.workdir.resolve(), None
    else:
        base = Path(tempfile.mkdtemp(prefix="bench-index-scale-"))
        temp = None if args.keep else base
    rows, failed = [], False
    try:
        for size in args.sizes:
            root = base / f"n{size}-d{args.dim}"
            if root.exists():  # a rerun must not resume (or refuse) an earlier build
                shutil.rmtree(root)
            root.mkdir(parents=True)
            try:
                rows.append(measure(size, root, args))
            except RuntimeError as exc:
                failed = True
                print(str(exc), file=sys.stderr)
                rows.append({"size": size, "error": str(exc)})
            finally:
                if not args.keep:
                    shutil.rmtree(root, ignore_errors=True)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    print()
    print(format_table(rows))
    print(f"this benchmark process's own peak memory: {self_peak_mib()} MiB")
    if args.keep:
        print(f"outputs kept under {base}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "environment": env,
                    "bench_peak_memory_mib": self_peak_mib(),
                    "settings": {
                        "sizes": args.sizes,
                        "dim": args.dim,
                        "type": args.type,
                        "train_size": args.train_size,
                        "shard_rows": args.shard_rows,
                        "seed": args.seed,
                        "recall_queries": args.recall_queries,
                        "clusters": args.clusters,
                        "noise": args.noise,
                    },
                    "results": rows,
                },
                indent=2,
            )
        )
        print(f"results written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
