"""Benchmark: how the mining job scales with the corpus and the number of queries -- memory of the driver and of
the workers, time per query, and 1 against 2 workers.

What it measures
  For each size (documents N, queries Q) in --sizes, a synthetic corpus (N texts of 12 to 30 words drawn from a
  vocabulary of 5,000 made-up words) and Q query/positive pairs (each query: 6 words of its positive document and
  2 random ones) are written to disk. A tiny random sentence-transformers model (2 layers, 32 dimensions, the
  packaged tokenizer; fast on 2 cores) encodes the corpus and ``index.type: auto`` indexes it (Flat up to 50,000
  vectors, IVF beyond), with ``python -m jobs.pipeline --set pipeline.stages=[encode,index]``.
  Then ``python -m jobs.mine`` runs as a subprocess, as a user runs it, once with 1 worker and once with 2
  (``runtime.num_workers``, one CPU each, ``runtime.inline_rows=0`` so that the workers mine even small inputs), on
  a local Ray cluster of as many CPUs as workers (``runtime.num_cpus``: a 1-worker run gets 1 CPU, not the
  machine's 2, for whatever it runs on Ray), and its ``negatives/_manifest.json`` gives:
  * the driver's peak resident memory (VmHWM) and the largest worker's (each part's commit record holds the peak
    of the process that mined it, each text group's record the peak of the process that joined it);
  * ``timings_s``: planning (reading the input, resolving positives), mining the parts (workers started, encode,
    search, select, text requests per part), the text join and the parts' exports (``texts``), and combining the
    exports and the report;
  * time per query = the seconds of mining once the workers are up (``parts`` - ``workers_start`` + ``texts``) / Q,
    the same without the search's seconds, and the speed-up of 2 workers over 1 on those seconds;
  * the search's share of the parts' own seconds (``part_steps_s``: encode, search, select, text requests): with
    the unclustered vectors of a random model, the IVF index needs a large nprobe (the job tunes it to 0.95
    recall; the results record it under ``search_parameters``), so the search grows with the corpus for reasons
    of the data, not of the job.
  Scores of a random model carry no meaning, so the default relative margin (0.05) would filter every candidate:
  the runs set ``mine.relative_margin=null`` (top-k after removing the positives).
  The data of each size is deleted once it is measured, unless --keep.

Run (from the repository root, with the venv active)
  python bench/mine_scale.py                                  # 100k/20k, 300k/60k, 1M/200k (long on 2 cores)
  python bench/mine_scale.py --sizes 30k:6k,100k:20k          # a quick look
  Other options: --queries-per-part 1000, --seed 0, --out results.json, --workdir DIR, --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "tests"):  # tests/helpers.py builds the tiny model
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

VOCABULARY = 5_000
CHUNK = 100_000


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'100k:20k,1M:200k' -> [(100000, 20000), (1000000, 200000)]."""

    def count(item: str) -> int:
        item = item.strip().lower()
        scale = {"k": 1_000, "m": 1_000_000}.get(item[-1], 1)
        return int(float(item[:-1] if scale > 1 else item) * scale)

    sizes = []
    for pair in text.split(","):
        docs, _, queries = pair.partition(":")
        if not queries:
            raise argparse.ArgumentTypeError(f"size {pair!r}: expected DOCS:QUERIES, e.g. 100k:20k")
        sizes.append((count(docs), count(queries)))
    return sizes


def words(seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return sorted({"".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(VOCABULARY * 2)})[:VOCABULARY]


def write_data(folder: Path, docs: int, queries: int, seed: int) -> tuple[Path, Path]:
    """corpus.parquet (id, text) and pairs.jsonl (query_id, query, positive), written a chunk at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocabulary = np.array(words(seed))
    corpus, pairs = folder / "corpus.parquet", folder / "pairs.jsonl"
    chosen = np.sort(rng.choice(docs, queries, replace=False))
    with (
        pq.ParquetWriter(corpus, pa.schema([("id", pa.string()), ("text", pa.string())])) as writer,
        pairs.open("w") as out,
    ):
        for start in range(0, docs, CHUNK):
            stop = min(docs, start + CHUNK)
            texts = [
                " ".join(vocabulary[rng.integers(0, VOCABULARY, rng.integers(12, 31))]) for _ in range(start, stop)
            ]
            writer.write_table(pa.table({"id": [f"d{i}" for i in range(start, stop)], "text": texts}))
            for i in chosen[(chosen >= start) & (chosen < stop)]:
                picked = (
                    rng.choice(texts[i - start].split(), 6).tolist()
                    + vocabulary[rng.integers(0, VOCABULARY, 2)].tolist()
                )
                out.write(json.dumps({"query_id": f"q{i}", "query": " ".join(picked), "positive": f"d{i}"}) + "\n")
    return corpus, pairs


def job(module: str, sets: list[str]) -> float:
    """Run ``python -m <module>`` with ``--set`` overrides; returns its wall seconds (raises with its log tail)."""
    started = time.perf_counter()
    args = [sys.executable, "-m", module, "--config", "configs/demo.yaml"]
    for item in sets:
        args += ["--set", item]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{module} failed:\n" + "\n".join((done.stdout + done.stderr).splitlines()[-40:]))
    return time.perf_counter() - started


def measure(folder: Path, model: Path, docs: int, queries: int, args) -> dict:
    corpus, pairs = write_data(folder, docs, queries, args.seed)
    root = folder / "out"
    common = [f"corpus.path={corpus}", f"model.name={model}", f"output.root={root}", "runtime.progress=false"]
    built = job("jobs.pipeline", common + ["pipeline.stages=[encode,index]"])
    index = json.loads((root / "index" / "manifest.json").read_text())
    row = {
        "docs": docs,
        "queries": queries,
        "index": index["type"],
        "search_parameters": index["search_parameters"],
        "encode_and_index_s": round(built, 1),
    }
    for workers in (1, 2):
        shutil.rmtree(root / "negatives", ignore_errors=True)
        wall = job(
            "jobs.mine",
            common
            + [
                f"mine.pairs_path={pairs}",
                "mine.query_id_column=query_id",
                f"mine.queries_per_part={args.queries_per_part}",
                "runtime.inline_rows=0",
                f"runtime.num_workers={workers}",
                "runtime.cpus_per_worker=1",
                f"runtime.num_cpus={workers}",
                "mine.relative_margin=null",
            ],
        )
        manifest = json.loads((root / "negatives" / "_manifest.json").read_text())
        timings = manifest["timings_s"]
        steps = manifest["part_steps_s"]
        row[f"w{workers}"] = {
            "wall_s": round(wall, 1),
            **timings,
            "part_steps_s": steps,
            "search_share": round(steps["search"] / max(1e-9, sum(steps.values())), 3),
            "ms_per_query": round(1000 * _mining_s(timings) / queries, 3),
            "ms_per_query_without_search": round(1000 * (_mining_s(timings) - steps["search"] / workers) / queries, 3),
            "driver_mib": manifest["peak_memory_mb"]["driver"],
            "worker_mib": max(
                manifest["peak_memory_mb"]["workers_max"], manifest.get("text_join", {}).get("peak_memory_mb", 0.0)
            ),
            "written": manifest["totals"]["written"],
        }
    row["speedup_2_over_1"] = round(_mining_s(row["w1"]) / _mining_s(row["w2"]), 2)
    return row


def _mining_s(timings: dict) -> float:
    """Seconds of mining once the workers are up (Ray, the model and the index loaded): the parts, then the text
    join and the parts' exports."""
    return timings["parts"] - timings.get("workers_start", 0.0) + timings.get("texts", 0.0)


def print_table(rows: list[dict]) -> None:
    print(
        "\n| docs | queries | index | driver MiB (1 / 2 workers) | worker MiB | ms/query, 1 worker "
        "| without the search | ms/query, 2 workers | 2 workers vs 1 | search share | plan s | workers start s "
        "| text join s | exports+report s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        a, b = r["w1"], r["w2"]
        print(
            f"| {r['docs']:,} | {r['queries']:,} | {r['index']} | {a['driver_mib']:.0f} / {b['driver_mib']:.0f} | "
            f"{max(a['worker_mib'], b['worker_mib']):.0f} | {a['ms_per_query']:.2f} | "
            f"{a['ms_per_query_without_search']:.2f} | {b['ms_per_query']:.2f} | "
            f"{r['speedup_2_over_1']:.2f}x | {a['search_share']:.0%} | {a['plan']:.1f} | {a['workers_start']:.1f} | "
            f"{a.get('texts', 0.0):.1f} | {a['exports_and_report']:.1f} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("100k:20k,300k:60k,1M:200k"))
    parser.add_argument("--queries-per-part", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    from helpers import build_tiny_model

    base = Path(args.workdir or tempfile.mkdtemp(prefix="mine-scale-"))
    base.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(base / "model", dropout=0.0)
    rows = []
    for docs, queries in args.sizes:
        folder = base / f"{docs}-{queries}"
        folder.mkdir(exist_ok=True)
        rows.append(measure(folder, model, docs, queries, args))
        print(json.dumps(rows[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(folder)
    print_table(rows)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    if not args.keep and not args.workdir:
        shutil.rmtree(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
