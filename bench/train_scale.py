"""Benchmark: what training holds and how fast it goes, against the number of mined tuples.

For each size (``--sizes``, default 10k, 100k and 1M tuples) a synthetic n-tuple export is written as the mine writes
it (``anchor, positive, negative_1..3``, row groups of about 8,192 rows that never split a query, no column
statistics; one positive a query, short texts). Each measurement runs in a fresh process, one after the other, and
reports its peak resident memory above what the process held when it started (``VmHWM`` less ``VmRSS`` at the
start):

  * ``driver``: what ``jobs.train``'s driver does before the workers start: open the table and survey it
    (``examples.survey``: the query column of every row group, then the first row groups for the scored held-out
    queries and their documents), with the defaults (``train.eval_queries`` 1000, ``train.eval_corpus_size`` 2000).
  * ``worker``: what each training worker does: ``training.fit`` on a tiny random model (2 layers) for ``--steps``
    steps of ``--batch-size`` with 3 negatives, streaming the table through the default shuffle buffer (10,000
    examples), nothing held out; reported: steps/s of its training clock.
  * ``stream``: one worker's reading alone: every example of one epoch through the shuffle buffer, no model;
    reported: examples/s. Every worker reads the whole stream (examples.py says why); this is its price.
  * ``held whole``: what the earlier release did in its driver (and a hand-written script would): the table read
    into one Python list of examples (``pq.read_table(...).to_pylist()``).

Run (from the repository root, with the venv active)
  python bench/train_scale.py                          # 10k, 100k, 1M tuples
  python bench/train_scale.py --sizes 10000 100000 --out train_scale.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import scale_sim  # noqa: E402  (beside this file: the fresh-process measurement and the memory readings)
from scale_sim import rss_mib  # noqa: E402

WORDS = np.array("protein cell gene tumor dose risk trial model signal brain virus cancer blood heart drug".split())
NEGATIVES = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)  # internal: one measurement in a process
    return p.parse_args(argv)


def write_table(path: Path, tuples: int, seed: int = 0) -> None:
    """``tuples`` rows of (query, positive, 3 negatives), written 100,000 rows at a time in the mine's row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from retrieval_core.mine import exports

    rng = np.random.default_rng(seed)
    schema = exports.ntuple_schema(NEGATIVES, False)
    with pq.ParquetWriter(str(path), schema, compression="zstd", write_statistics=False) as writer:
        for start in range(0, tuples, 100_000):
            stop = min(start + 100_000, tuples)
            columns = {"anchor": [f"what about {i} " + " ".join(w) for i, w in zip(range(start, stop), words(rng))]}
            for name in ("positive", *(f"negative_{n}" for n in range(1, NEGATIVES + 1))):
                columns[name] = [f"{name} {i} " + " ".join(w) for i, w in zip(range(start, stop), words(rng))]
            table = pa.table(columns, schema=schema)
            for lo, hi in exports.query_groups(columns["anchor"], exports.NTUPLE_GROUP_ROWS):
                writer.write_table(table.slice(lo, hi - lo))


def words(rng, count: int = 100_000) -> np.ndarray:
    return WORDS[rng.integers(0, len(WORDS), size=(count, 8))]


def child(task: dict) -> dict:
    return scale_sim.child(task, __file__)


def run_child(task: dict) -> dict:
    """One measurement in this fresh process (the imports are done before the start is read)."""
    import pyarrow.parquet as pq

    from retrieval_core.config import load_config
    from retrieval_core.train import examples, training

    table = examples.TrainingTable(task["table"], NEGATIVES, 0, task["eval_fraction"], 10_000)
    if task["step"] == "worker":
        import sentence_transformers  # noqa: F401  (imported before the start, as the other steps import theirs)
    start, started = rss_mib(), time.perf_counter()
    result: dict = {}
    if task["step"] == "driver":
        surveyed = examples.survey(table, 1000, 2000)
        result = {"train_examples": surveyed.train_examples, "scored": len(surveyed.evaluation)}
    elif task["step"] == "stream":
        result = {"examples": sum(1 for _ in examples.epoch_examples(table, 0))}
    elif task["step"] == "held whole":
        result = {"examples": len(pq.read_table(task["table"]).to_pylist())}
    else:
        cfg = load_config(
            None,
            [
                f"model.name={json.dumps(task['model'])}",
                f"output.root={json.dumps(task['root'])}",
                f"train.batch_size={task['batch_size']}",
                f"train.max_steps={task['steps']}",
                f"train.num_negatives={NEGATIVES}",
                "train.checkpoint_steps=0",
            ],
        )
        _, history = training.fit(cfg.train, cfg.model, table, examples.Survey(task["tuples"], 0, [], {}))
        result = {"steps_per_s": round(len(history["losses"]) / history["seconds"], 3)}
    result |= {"seconds": round(time.perf_counter() - started, 2), "peak_above_start_mib": rss_mib("VmHWM") - start}
    return result


def measure(size: int, base: Path, model: str, args) -> dict:
    path = base / f"n-tuple-{size}.parquet"
    write_table(path, size)
    task = {"table": str(path), "tuples": size, "eval_fraction": 0.1}
    row = {"tuples": size, "file_mib": round(path.stat().st_size / 2**20, 1)}
    for step in ("driver", "stream", "held whole"):
        row[step] = child({**task, "step": step})
    row["worker"] = child(
        {
            **task,
            "step": "worker",
            "eval_fraction": 0.0,
            "model": model,
            "root": str(base / "root"),
            "steps": args.steps,
            "batch_size": args.batch_size,
        }
    )
    print(json.dumps(row), flush=True)
    return row


def summary(rows: list[dict]) -> list[str]:
    first = rows[0]
    lines = [
        "| tuples | driver peak | worker peak | worker steps/s | stream examples/s | held whole |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def ratio(row: dict, step: str, key: str) -> str:
        value, reference = row[step][key], first[step][key]
        return f"{value:.1f} ({value / reference:.2f}x)" if reference else f"{value:.1f}"

    for row in rows:
        stream_rate = row["stream"]["examples"] / row["stream"]["seconds"]
        lines.append(
            f"| {row['tuples']:,} | {ratio(row, 'driver', 'peak_above_start_mib')} MiB "
            f"| {ratio(row, 'worker', 'peak_above_start_mib')} MiB | {ratio(row, 'worker', 'steps_per_s')} "
            f"| {stream_rate:,.0f} | {ratio(row, 'held whole', 'peak_above_start_mib')} MiB |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._child:
        print(json.dumps(run_child(json.loads(args._child))))
        return 0
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        base = Path(tmp)
        sys.path.insert(0, str(REPO / "tests"))
        from helpers import build_tiny_model

        model = str(build_tiny_model(base / "model", dropout=0.0))
        rows = [measure(size, base, model, args) for size in args.sizes]
    print("\n".join(summary(rows)))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "table": summary(rows)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
