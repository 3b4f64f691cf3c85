"""Benchmark: what the encode and index jobs cost per shard as the number of shards grows, what shard indexes
store, what a merge task holds, and what a searcher of a memory-mapped IVF index holds.

Parts (``--parts``, all by default)
  dispatch  For each S in ``--shards`` (1000,10000,100000): a corpus of S * ``--rows-per-shard`` short documents,
            generated from ``--seed`` (Parquet in a temporary folder), is encoded by ``python -m jobs.encode`` with a
            tiny random model (2 layers, dimension ``--dim``) in shards of ``--rows-per-shard`` rows, then indexed
            by ``python -m jobs.index`` (``IVF64,PQ16``), both on a local Ray cluster (``runtime.inline_rows=0``),
            each job in a process of its own. From the manifests: the driver's CPU seconds (``time.process_time``
            at the end of the job: all its threads, Ray's included) and peak resident memory. Reported: the driver
            CPU per shard, and the marginal CPU per shard between sizes (the start-up, ~seconds, cancels out), and
            the peak memory relative to the smallest S. Targets: peak memory within 1.2x from the smallest to the
            largest S; marginal time per shard constant within 20% and under 5 ms.
  storage   ``--vectors`` vectors (Gaussian blobs, dimension ``--dim``) in shards of ``--shard-vectors``, indexed
            as IVF1024,PQ16 and IVF1024,SQ8: the bytes of the shard files (``shard-*.lists``) over the merged
            index's codes + ids (N * (code size + 8)). Target <= 1.1.
  merge     The same lists merged by ranges with ``index.merge_memory`` = ``--merge-memory``, at ``--vectors`` and at
            4x as many: each range is merged in a fresh process, and its peak resident memory above its start is
            recorded. Target: the largest range's peak is the same at both sizes, and within the setting.
  search    ``--search-vectors`` vectors (10M by default) as IVF4096,PQ16 merged into ``merged.faiss``; a fresh
            process opens it memory-mapped, searches ``--queries`` queries with nprobe ``--nprobe``, and reports
            its resident memory above what it held before opening the file, over the bytes of the lists it probed
            plus the quantizer (target < 1.5), next to the same process reading the file whole. The mapped search
            runs cold (the page cache dropped first, when this runs as root) and hot (the whole file cached, where
            the kernel maps cached pages in large blocks, up to 2 MB, around each list touched).

Run (from the repository root)
  python bench/scale_sim.py                                 # every part, the issue's sizes (about 40 minutes)
  python bench/scale_sim.py --parts dispatch --shards 1000,10000
  python bench/scale_sim.py --parts storage,merge,search --search-vectors 2000000
  Other options: --rows-per-shard 5, --dim 64, --vectors 1000000, --shard-vectors 50000, --merge-memory 64MB,
  --queries 10, --nprobe 32, --seed 0, --workdir DIR, --out results.json.
Disk: the search part writes the vectors' codes three times (shards, ranges, merged): ~0.7 GB at 10M.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
MIB = 1024 * 1024
ADD_SECONDS: dict[str, float] = {}  # FAISS add time of the last shards written, by type (this process's threads)
WORDS = np.array("dense retrieval index shard vector query corpus night cluster merge list code".split())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="dispatch,storage,merge,search")
    p.add_argument("--shards", default="1000,10000,100000", help="numbers of shards S (dispatch)")
    p.add_argument("--rows-per-shard", type=int, default=5)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--vectors", type=int, default=1_000_000, help="vectors of the storage and merge parts")
    p.add_argument("--shard-vectors", type=int, default=50_000)
    p.add_argument("--merge-memory", default="64MB")
    p.add_argument("--search-vectors", type=int, default=10_000_000)
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)  # internal: one measured step in a process
    return p.parse_args(argv)


def rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


# ------------------------------------------------------------------------------------------------------ dispatch


def write_corpus(folder: Path, rows: int, seed: int) -> None:
    """``rows`` short documents from ``seed``, 50,000 rows per Parquet file in row groups of 1,000."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for number, start in enumerate(range(0, rows, 50_000)):
        stop = min(start + 50_000, rows)
        words = WORDS[rng.integers(0, len(WORDS), size=(stop - start, 6))]
        texts = [f"doc {i} " + " ".join(w) for i, w in zip(range(start, stop), words)]
        table = pa.table({"_id": [f"d{i}" for i in range(start, stop)], "text": texts})
        pq.write_table(table, folder / f"part-{number:05d}.parquet", row_group_size=1000)


def run_job(module: str, settings: list[str]) -> float:
    command = [sys.executable, "-m", module, *[arg for s in settings for arg in ("--set", s)]]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{module} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def measure_dispatch(shards: int, base: Path, model: str, args) -> dict:
    root, corpus = base / f"s{shards}", base / f"s{shards}-corpus"
    write_corpus(corpus, shards * args.rows_per_shard, args.seed)
    common = [
        f"output.root={json.dumps(str(root))}",
        "runtime.progress=false",
        "runtime.inline_rows=0",
        "runtime.num_workers=2",
        "runtime.speculation=0",
    ]
    encode_s = run_job(
        "jobs.encode",
        common
        + [
            f"corpus.path={json.dumps(str(corpus))}",
            "corpus.id_column=_id",
            f"model.name={json.dumps(model)}",
            f"runtime.rows_per_shard={args.rows_per_shard}",
        ],
    )
    index_s = run_job("jobs.index", common + ['index.type="IVF64,PQ16"', "index.recall_queries=100"])
    emb = json.loads((root / "embeddings" / "_manifest.json").read_text())
    ix = json.loads((root / "index" / "manifest.json").read_text())
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(corpus, ignore_errors=True)
    return {
        "shards": shards,
        "encode": {"wall_s": round(encode_s, 1), **emb["driver"]},
        "index": {
            "wall_s": round(index_s, 1),
            "cpu_s": ix["timings_s"]["driver_cpu"],
            "peak_memory_mb": ix["peak_memory_mb"]["driver"],
        },
    }


def dispatch_summary(rows: list[dict]) -> list[str]:
    lines = ["stage   S        driver CPU s  ms/shard  marginal ms/shard  driver peak MiB  x smallest"]
    for stage in ("encode", "index"):
        first, previous = rows[0][stage], None
        for row in rows:
            r = row[stage]
            marginal = ""
            if previous is not None:
                extra = (r["cpu_s"] - previous[1]["cpu_s"]) / (row["shards"] - previous[0])
                marginal = f"{1000 * extra:.3f}"
            lines.append(
                f"{stage:7} {row['shards']:<8} {r['cpu_s']:>12.1f}  {1000 * r['cpu_s'] / row['shards']:>8.3f}  "
                f"{marginal:>17}  {r['peak_memory_mb']:>15.1f}  {r['peak_memory_mb'] / first['peak_memory_mb']:.2f}"
            )
            previous = (row["shards"], r)
    return lines


def build_tiny_model(folder: Path, dim: int) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import build_tiny_model as build

    return str(build(folder, dropout=0.0, hidden_size=dim))


# ------------------------------------------------------------------------------------------- storage and merge


def blobs(count: int, dim: int, seed: int, start: int = 0) -> np.ndarray:
    """Unit vectors ``start .. start + count`` of an endless seeded sequence around 256 centers (made 100k at a
    time)."""
    centers = np.random.default_rng(seed).standard_normal((256, dim)).astype(np.float32)
    parts = []
    for chunk in range(start // 100_000, (start + count - 1) // 100_000 + 1):
        rng = np.random.default_rng([seed, chunk])
        picks = rng.integers(0, 256, size=100_000)
        block = centers[picks] + 0.5 * rng.standard_normal((100_000, dim)).astype(np.float32)
        lo, hi = max(start, chunk * 100_000), min(start + count, (chunk + 1) * 100_000)
        parts.append(block[lo - chunk * 100_000 : hi - chunk * 100_000])
    vectors = np.vstack(parts)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_shards(folder: Path, factory: str, vectors: int, shard_vectors: int, args):
    """Train ``factory`` on 64 points per list, write the shard lists files; returns (trained, shard paths)."""
    import faiss

    from retrieval_core.index import faiss_index, ivf_lists

    folder.mkdir(parents=True, exist_ok=True)
    nlist = faiss_index.ivf_lists(factory)
    sample = blobs(min(vectors, 64 * nlist), args.dim, args.seed + 1)
    trained = faiss_index.train(factory, args.dim, "ip", sample)  # the jobs' default metric
    paths, ADD_SECONDS[factory] = [], 0.0
    for number, start in enumerate(range(0, vectors, shard_vectors)):
        index = faiss.clone_index(trained)
        count = min(shard_vectors, vectors - start)
        batch = blobs(count, args.dim, args.seed, start)
        started = time.perf_counter()
        faiss_index.add(index, batch, np.arange(start, start + count))
        ADD_SECONDS[factory] += time.perf_counter() - started
        paths.append(str(folder / f"shard-{number:05d}.lists"))
        ivf_lists.write_shard(index, paths[-1])
        del index
    return trained, paths


def measure_storage(base: Path, args) -> list[dict]:
    import faiss

    rows = []
    for factory in ("IVF1024,PQ16", "IVF1024,SQ8"):
        trained, paths = write_shards(base / factory.replace(",", "-"), factory, args.vectors, args.shard_vectors, args)
        codes_and_ids = args.vectors * (faiss.extract_index_ivf(trained).code_size + 8)
        files = sum(os.path.getsize(p) for p in paths)
        rows.append(
            {"type": factory, "vectors": args.vectors, "shard_files_bytes": files, "codes_and_ids": codes_and_ids}
        )
        rows[-1]["ratio"] = round(files / codes_and_ids, 4)
        rows[-1]["add_us_per_vector"] = round(1e6 * ADD_SECONDS[factory] / args.vectors, 2)
        shutil.rmtree(base / factory.replace(",", "-"))
    return rows


def merge_in_ranges(folder: Path, trained, paths: list[str], budget: int, measure: bool) -> dict:
    """plan_ranges + merge_range (in fresh processes when ``measure``) + assemble; the ranges' peaks."""
    import faiss

    from retrieval_core.index import faiss_index, ivf_lists

    ivf = faiss.extract_index_ivf(trained)
    totals, _ = ivf_lists.list_totals(paths)
    ranges = ivf_lists.plan_ranges(totals, ivf.code_size + 8, budget // 2)  # as merging.plan_merge
    spans = ivf_lists.range_spans(paths, ranges, ivf.nlist)
    peaks, range_files = [], []
    for number, (lo, hi) in enumerate(ranges):
        range_files.append(str(folder / f"range-{number:05d}.bin"))
        if not measure:
            ivf_lists.merge_range(paths, spans[number], lo, totals[lo:hi], ivf.code_size, range_files[-1])
            continue
        np.save(folder / "spans.npy", spans[number])  # what merging.merge_range reads of _merge/ for its range
        np.save(folder / "counts.npy", totals[lo:hi])
        task = {"step": "merge_range", "paths": paths, "lo": lo, "folder": str(folder), "out": range_files[-1]}
        peaks.append(child(task | {"code_size": ivf.code_size}))
    merged = str(folder / "merged.faiss")
    ivf_lists.assemble(ivf_lists.merged_prefix(trained, totals), range_files, merged)
    for path in range_files:
        os.remove(path)
    quantizer = len(faiss_index.serialize(faiss.clone_index(trained)))
    return {"ranges": len(ranges), "peaks_mib": peaks, "merged": merged, "trained_bytes": quantizer}


def child(task: dict, script: str = __file__) -> dict:
    """``task`` measured in a fresh process running ``script --_child <task>`` (this benchmark's, or another's):
    the last line it prints, as JSON."""
    out = subprocess.run(
        [sys.executable, script, "--_child", json.dumps(task)], cwd=REPO, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"child {task['step']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(task: dict) -> dict:
    """One measured step in this fresh process: its resident memory above what it held at the start."""
    import faiss

    from retrieval_core.index import ivf_lists

    if task["step"] == "merge_range":
        before, started = rss_mib(), time.perf_counter()
        spans, counts = (np.load(Path(task["folder"], name)) for name in ("spans.npy", "counts.npy"))
        entries = ivf_lists.merge_range(task["paths"], spans, task["lo"], counts, task["code_size"], task["out"])
        seconds = time.perf_counter() - started
        return {"peak_above_start_mib": round(rss_mib("VmHWM") - before, 1), "entries": entries, "seconds": seconds}
    queries = blobs(task["queries"], task["dim"], task["seed"] + 7)[: task["queries"]].copy()
    before = {field: rss_mib(field) for field in ("VmRSS", "RssFile", "RssAnon")}
    index = faiss.read_index(task["path"], faiss.IO_FLAG_MMAP_IFC if task["mmap"] else 0)
    loaded = rss_mib()
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = task["nprobe"]
    index.search(queries, 10)
    after = {field: rss_mib(field) - before[field] for field in before}
    _, probed = ivf.quantizer.search(queries, task["nprobe"])
    lists = np.unique(probed)
    probed_bytes = sum(ivf.invlists.list_size(int(n)) for n in lists) * (ivf.code_size + 8)
    return {
        "open_mib": round(loaded - before["VmRSS"], 1),
        "after_search_mib": round(after["VmRSS"], 1),
        "file_pages_mib": round(after["RssFile"], 1),
        "anonymous_mib": round(after["RssAnon"], 1),
        "lists_probed": len(lists),
        "probed_bytes": int(probed_bytes),
    }


def measure_merge(base: Path, args) -> list[dict]:
    from retrieval_core.config.rules import parse_memory

    budget, rows = parse_memory(args.merge_memory), []
    for vectors in (args.vectors, 4 * args.vectors):
        folder = base / f"merge-{vectors}"
        trained, paths = write_shards(folder, "IVF1024,PQ16", vectors, args.shard_vectors, args)
        result = merge_in_ranges(folder, trained, paths, budget, measure=True)
        peaks = [p["peak_above_start_mib"] for p in result["peaks_mib"]]
        seconds = sum(p["seconds"] for p in result["peaks_mib"])
        rows.append({"vectors": vectors, "ranges": result["ranges"], "max_range_peak_mib": max(peaks)})
        rows[-1]["merge_mb_per_s"] = round(vectors * 24 / 1e6 / seconds, 1)  # PQ16 codes + ids, all ranges
        rows[-1]["setting_mib"] = round(budget / MIB, 1)
        shutil.rmtree(folder)
    return rows


def measure_search(base: Path, args) -> dict:
    folder = base / "search"
    trained, paths = write_shards(folder, "IVF4096,PQ16", args.search_vectors, 500_000, args)
    result = merge_in_ranges(folder, trained, paths, 512 * MIB, measure=False)
    for path in paths:
        os.remove(path)
    task = {"step": "search", "path": result["merged"], "nprobe": args.nprobe, "queries": args.queries}
    task |= {"seed": args.seed, "dim": args.dim}
    cold = drop_page_cache()
    mapped = child({**task, "mmap": True})  # cold: the file's pages are read as the lists are probed
    whole = child({**task, "mmap": False})  # reads the whole file (which leaves it in the page cache)
    hot = child({**task, "mmap": True})  # every page cached: the kernel maps them in larger blocks
    wanted = mapped["probed_bytes"] + result["trained_bytes"]
    return {
        "vectors": args.search_vectors,
        "file_mib": round(os.path.getsize(result["merged"]) / MIB, 1),
        "quantizer_mib": round(result["trained_bytes"] / MIB, 2),
        "page_cache_dropped": cold,
        "mmap_cold": mapped,
        "whole": whole,
        "mmap_hot": hot,
        "ratio_cold": round(mapped["after_search_mib"] * MIB / wanted, 3),
        "ratio_hot": round(hot["after_search_mib"] * MIB / wanted, 3),
    }


def drop_page_cache() -> bool:
    """Drop the kernel's clean page cache (root only), so that a mapped file is read as it is probed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("1\n")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._child:
        print(json.dumps(run_child(json.loads(args._child))))
        return 0
    parts = set(args.parts.split(","))
    base = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-sim-"))
    base.mkdir(parents=True, exist_ok=True)
    results: dict = {"cpu_count": os.cpu_count(), "settings": {k: str(v) for k, v in vars(args).items()}}
    try:
        if "dispatch" in parts:
            model = build_tiny_model(base / "model", args.dim)
            results["dispatch"] = []
            for shards in [int(s) for s in args.shards.split(",")]:
                results["dispatch"].append(measure_dispatch(shards, base, model, args))
                print(json.dumps(results["dispatch"][-1]), flush=True)
            print("\n".join(dispatch_summary(results["dispatch"])))
        for name, measure in (("storage", measure_storage), ("merge", measure_merge), ("search", measure_search)):
            if name in parts:
                results[name] = measure(base, args)
                print(name, json.dumps(results[name], indent=1), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
