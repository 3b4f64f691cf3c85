"""Benchmark: searching a memory-mapped FAISS index, one process alone against two processes at once, for each way
of reading the index file.

What it measures
  An IVF index (``IVF<4 sqrt N>,Flat``, inner product) over N random unit vectors (32 dimensions by default, as the
  tiny model of ``bench/mine_scale.py``) is written to disk. For each read flag -- read into memory (0),
  ``IO_FLAG_MMAP`` and ``IO_FLAG_MMAP_IFC`` (mapped in place, what the mine workers and the query searchers use) --
  a fresh process reads the index, searches one warm-up batch, then times ``--repeat`` searches of ``--queries``
  random queries (top 100, one FAISS thread): once alone, then two such processes started together. The table gives
  the seconds alone, the mean seconds of the pair, and pair / alone: 1.0 means the two processes do not slow each
  other (two workers on one node search twice as fast as one).

Run (from the repository root, with the venv active)
  python bench/mmap_search.py                       # 1M vectors, nprobe 256 (as mine_scale's 1M size tunes it)
  python bench/mmap_search.py --vectors 300000 --nprobe 64
  Other options: --dim 32, --queries 2000, --repeat 3, --workdir DIR (keeps the index), --out results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLAGS = {"memory": "0", "IO_FLAG_MMAP": "IO_FLAG_MMAP", "IO_FLAG_MMAP_IFC": "IO_FLAG_MMAP_IFC"}


def build(path: Path, vectors: int, dim: int) -> None:
    import faiss
    import numpy as np

    data = np.random.default_rng(0).standard_normal((vectors, dim)).astype("float32")
    faiss.normalize_L2(data)
    nlist = 4 * int(vectors**0.5)
    index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(data[: max(64 * nlist, 100_000)])
    index.add(data)
    faiss.write_index(index, str(path))


def search(path: str, flag: str, nprobe: int, queries: int, repeat: int, dim: int) -> float:
    """Seconds of ``repeat`` searches of ``queries`` queries in the index at ``path`` read with ``flag``."""
    import faiss
    import numpy as np

    faiss.omp_set_num_threads(1)
    index = faiss.read_index(path, 0 if flag == "0" else getattr(faiss, flag))
    faiss.extract_index_ivf(index).nprobe = nprobe
    batch = np.random.default_rng(1).standard_normal((queries, dim)).astype("float32")
    faiss.normalize_L2(batch)
    index.search(batch[:100], 100)  # warm: the pages mapped, the lists touched once
    started = time.perf_counter()
    for _ in range(repeat):
        index.search(batch, 100)
    return time.perf_counter() - started


def timed(args, flag: str, processes: int) -> list[float]:
    """The seconds each of ``processes`` processes started together reports."""
    command = [
        sys.executable,
        __file__,
        "--child",
        flag,
        "--index",
        str(args.index),
        "--nprobe",
        str(args.nprobe),
        "--queries",
        str(args.queries),
        "--repeat",
        str(args.repeat),
        "--dim",
        str(args.dim),
    ]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    outputs = [child.communicate()[0] for child in children]
    if any(child.returncode for child in children):
        raise RuntimeError(f"a search process failed for {flag}")
    return [float(out.strip().splitlines()[-1]) for out in outputs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--nprobe", type=int, default=256)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--index", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(f"{search(args.index, args.child, args.nprobe, args.queries, args.repeat, args.dim):.4f}")
        return 0
    folder = Path(args.workdir or tempfile.mkdtemp(prefix="mmap-search-"))
    folder.mkdir(parents=True, exist_ok=True)
    args.index = folder / f"ivf-{args.vectors}-{args.dim}.faiss"
    if not args.index.exists():
        build(args.index, args.vectors, args.dim)
    rows = []
    for name, flag in FLAGS.items():
        alone = timed(args, flag, 1)[0]
        pair = timed(args, flag, 2)
        rows.append(
            {
                "read": name,
                "alone_s": round(alone, 3),
                "pair_s": [round(p, 3) for p in pair],
                "pair_over_alone": round(sum(pair) / len(pair) / alone, 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n{args.vectors:,} vectors of {args.dim} dimensions, nprobe {args.nprobe}, {args.repeat} x "
        f"{args.queries} queries, top 100, one thread per process"
    )
    print("| read | alone s | two at once s (mean) | two at once / alone |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['read']} | {r['alone_s']:.2f} | {sum(r['pair_s']) / 2:.2f} | {r['pair_over_alone']:.2f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    if not args.workdir:
        import shutil

        shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
