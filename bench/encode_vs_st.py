"""Benchmark: this project's encode job against plain sentence-transformers, on the same corpus, in one run.

What it measures
  * baseline: what a user would otherwise run -- ``SentenceTransformer(all-MiniLM-L6-v2, device="cpu")`` with
    ``torch.set_num_threads(os.cpu_count())`` and ``model.encode(texts, normalize_embeddings=True)`` in fp32.
    Only the encode call is timed (model loaded, after a short warm-up encode).
  * when bf16 is asked for, the same plain call under ``torch.autocast("cpu", dtype=torch.bfloat16)``: the
    speed bf16 itself gives on this CPU, the ceiling a bf16 job can approach.
  * the job: ``jobs.encode.run(cfg)`` for each precision, timed end to end (wall clock, including the start of
    Ray's local cluster, the model loads in the workers and the writing of the shards), since that is what a
    user pays. Its vectors are read back and compared row by row (matched by doc id) with the fp32 baseline.
  For each: seconds, docs/s, docs/s relative to the baseline, and min / mean cosine to the baseline vectors.
  Document text is ``title + " " + text`` (``retrieval_core.io.corpus.assemble_text``), as the job builds it.

Targets
  * fp32 job: >= 0.95x the docs/s of plain sentence-transformers.
  * bf16 job: >= 2x the docs/s of plain fp32 sentence-transformers, with min cosine >= 0.999.
  (bf16 on a CPU is only fast where /proc/cpuinfo lists avx512_bf16 or amx_bf16; both flags are printed.)

Run (from the repository root, with the venv active)
  python bench/encode_vs_st.py                  # SciFact ($SCIFACT_DIR, default ../shared/data/scifact) when
                                                # present, else the demo
  python bench/encode_vs_st.py --limit 500      # a quick look on the first 500 documents
  Other options: --corpus, --precisions fp32,bf16, --batch-size 32, --title-column title, --id-column,
  --repeat N (median of N runs), --out results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from retrieval_core.io.folder import Folder

REPO = Path(__file__).resolve().parents[1]
SCIFACT = (
    Path(os.environ.get("SCIFACT_DIR") or Path(__file__).resolve().parents[2] / "shared/data/scifact")
    / "corpus.parquet"
)  # BEIR SciFact
DEMO = REPO / "examples/demo/corpus.parquet"
MODEL = "all-MiniLM-L6-v2"
WARMUP_TEXTS = 16
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
TARGET_FP32_RATIO = 0.95
TARGET_BF16_RATIO = 2.0
TARGET_BF16_MIN_COSINE = 0.999

if str(REPO) not in sys.path:  # `python bench/encode_vs_st.py` puts bench/ on the path, not the repository
    sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--corpus", type=Path, default=None, help=f"Parquet corpus (default: {SCIFACT} when it exists, else {DEMO})"
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N rows (default: all)")
    parser.add_argument("--precisions", default="fp32,bf16", help="job precisions, comma separated")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--title-column", default="title", help="title column ('' for none)")
    parser.add_argument(
        "--id-column", default=None, help="id column (default: 'id' when the corpus has one, else '_id' as in BEIR)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each variant; the median is reported")
    parser.add_argument("--out", type=Path, default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def default_corpus() -> Path:
    return SCIFACT if SCIFACT.is_file() else DEMO


def detect_id_column(path: Path) -> str:
    names = pq.read_schema(path).names
    return "id" if "id" in names or "_id" not in names else "_id"


def limited_copy(path: Path, limit: int, tmpdir: str) -> Path:
    """A Parquet copy of the first ``limit`` rows of ``path`` inside ``tmpdir``."""
    copy = Path(tmpdir) / f"first-{limit}.parquet"
    pq.write_table(pq.read_table(path).slice(0, limit), copy)
    return copy


def load_texts(path: Path, id_column: str, title_column: str | None) -> tuple[list[str], list[str]]:
    """(doc ids, texts) of the rows the job encodes: those with an id and a non-blank text."""
    from retrieval_core.io.corpus import assemble_text

    columns = [id_column, "text"] + ([title_column] if title_column else [])
    data = pq.read_table(path, columns=columns).to_pydict()
    titles = data[title_column] if title_column else [None] * len(data[id_column])
    doc_ids, texts = [], []
    for doc_id, title, text in zip(data[id_column], titles, data["text"]):
        if doc_id is None or str(doc_id) == "" or text is None or not str(text).strip():
            continue
        doc_ids.append(str(doc_id))
        texts.append(assemble_text(title, str(text)))
    return doc_ids, texts


def cpu_flags() -> dict[str, bool]:
    try:
        flags = set(
            " ".join(
                line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
            ).split()
        )
    except OSError:
        flags = set()
    return {flag: flag in flags for flag in BF16_FLAGS}


def versions() -> dict[str, str]:
    import ray
    import sentence_transformers
    import torch

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "ray": ray.__version__,
    }


def load_baseline_model():
    import torch
    from sentence_transformers import SentenceTransformer

    from retrieval_core.encode.encoding import resolve_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    return SentenceTransformer(resolve_model_path(MODEL), device="cpu")


def encode_baseline(model, texts: list[str], batch_size: int, precision: str = "fp32") -> tuple[float, np.ndarray]:
    """(seconds, vectors) of one plain ``model.encode`` call over all texts (bf16: under CPU autocast)."""
    import torch

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    started = time.perf_counter()
    with autocast:
        vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True)
    vectors = vectors.float().numpy()
    return time.perf_counter() - started, np.asarray(vectors, dtype=np.float32)


def job_config(corpus: Path, id_column: str, title_column: str | None, precision: str, batch_size: int, root: str):
    from retrieval_core.config import load_config

    def quoted(value) -> str:  # JSON strings are YAML strings: paths with ':' or '#' stay intact
        return json.dumps(value)

    return load_config(
        None,
        [
            f"corpus.path={quoted(str(corpus))}",
            f"corpus.id_column={quoted(id_column)}",
            f"corpus.title_column={quoted(title_column) if title_column else 'null'}",
            f"model.precision={precision}",
            f"model.batch_size={batch_size}",
            f"output.root={quoted(root)}",
            "runtime.progress=false",
        ],
    )


def run_job(cfg) -> tuple[float, dict, list[str], np.ndarray]:
    """(wall seconds, summary, doc ids, vectors) of one end-to-end ``jobs.encode.run``."""
    from jobs import encode
    from retrieval_core.encode.embeddings import load_embeddings

    started = time.perf_counter()
    summary = encode.run(cfg)
    seconds = time.perf_counter() - started
    _, vectors, doc_ids = load_embeddings(Folder(cfg.output.root))
    return seconds, summary, doc_ids, vectors


def cosines_vs_baseline(base_ids: list[str], base: np.ndarray, ids: list[str], vectors: np.ndarray) -> np.ndarray:
    """Per-row cosine between ``vectors`` and the baseline rows with the same doc id."""
    where = {doc_id: i for i, doc_id in enumerate(base_ids)}
    missing = [doc_id for doc_id in ids if doc_id not in where]
    if missing or len(ids) != len(base_ids):
        raise RuntimeError(f"job and baseline rows differ: {len(ids)} vs {len(base_ids)}, e.g. {missing[:3]}")
    matched = base[[where[doc_id] for doc_id in ids]]
    dots = np.einsum("ij,ij->i", matched, vectors)
    return dots / (np.linalg.norm(matched, axis=1) * np.linalg.norm(vectors, axis=1))


def time_baseline_runs(model, texts: list[str], batch_size: int, repeat: int) -> tuple[list[float], np.ndarray]:
    model.encode(texts[:WARMUP_TEXTS], batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    runs = [encode_baseline(model, texts, batch_size) for _ in range(repeat)]
    return [seconds for seconds, _ in runs], runs[0][1]


def time_job_runs(args, corpus: Path, id_column: str, precision: str, base_ids: list[str], base: np.ndarray) -> dict:
    """Seconds of each run, and min / mean cosine to the baseline over all runs."""
    seconds, mins, means, rows = [], [], [], 0
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix=f"bench-encode-{precision}-") as root:
            cfg = job_config(corpus, id_column, args.title_column or None, precision, args.batch_size, root)
            took, summary, ids, vectors = run_job(cfg)
        cos = cosines_vs_baseline(base_ids, base, ids, vectors)
        seconds.append(took)
        mins.append(float(cos.min()))
        means.append(float(cos.mean()))
        rows = summary["rows_encoded"]
    return {"seconds_runs": seconds, "rows": rows, "min_cosine": min(mins), "mean_cosine": statistics.mean(means)}


def plain_bf16_row(args, texts: list[str], base: np.ndarray, base_rate: float) -> dict:
    model = load_baseline_model()
    runs = [encode_baseline(model, texts, args.batch_size, "bf16") for _ in range(args.repeat)]
    cos = np.einsum("ij,ij->i", base, runs[0][1]) / (np.linalg.norm(base, axis=1) * np.linalg.norm(runs[0][1], axis=1))
    return result_row(
        "sentence-transformers bf16",
        [s for s, _ in runs],
        len(texts),
        base_rate,
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
    )


def result_row(name: str, seconds_runs: list[float], rows: int, base_rate: float | None, **extra) -> dict:
    seconds = statistics.median(seconds_runs)
    rate = rows / seconds if seconds > 0 else float("inf")
    return {
        "variant": name,
        "rows": rows,
        "seconds": seconds,
        "seconds_runs": seconds_runs,
        "docs_per_s": rate,
        "ratio_vs_baseline": rate / base_rate if base_rate else 1.0,
        **extra,
    }


def format_table(rows: list[dict]) -> str:
    head = f"{'variant':<27}{'rows':>7}{'seconds':>10}{'docs/s':>10}{'x base':>9}{'min cos':>11}{'mean cos':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['variant']:<27}{r['rows']:>7}{r['seconds']:>10.2f}{r['docs_per_s']:>10.1f}"
            f"{r['ratio_vs_baseline']:>8.2f}x{r['min_cosine']:>11.6f}{r['mean_cosine']:>11.6f}"
        )
    return "\n".join(lines)


def target_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r["variant"] == "job fp32":
            ok = r["ratio_vs_baseline"] >= TARGET_FP32_RATIO
            lines.append(f"target fp32 job >= {TARGET_FP32_RATIO}x baseline docs/s: {'met' if ok else 'NOT met'}")
        if r["variant"] == "job bf16":
            ok = r["ratio_vs_baseline"] >= TARGET_BF16_RATIO and r["min_cosine"] >= TARGET_BF16_MIN_COSINE
            lines.append(
                f"target bf16 job >= {TARGET_BF16_RATIO}x baseline docs/s and min cosine >= "
                f"{TARGET_BF16_MIN_COSINE}: {'met' if ok else 'NOT met'}"
            )
    return lines


def resolve_corpus(args, tmpdir: str) -> tuple[Path, Path, str]:
    """(the corpus asked for, the file the run reads, its id column)."""
    source = (args.corpus or default_corpus()).resolve()
    print(f"corpus: {source}" + (f" (first {args.limit} rows)" if args.limit else ""))
    corpus = limited_copy(source, args.limit, tmpdir) if args.limit else source
    return source, corpus, args.id_column or detect_id_column(corpus)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    environment = {"cpu_count": os.cpu_count(), "cpu_flags": cpu_flags(), **versions()}
    print(
        "cpu: "
        + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in environment["cpu_flags"].items())
        + f", {environment['cpu_count']} cores"
    )
    print(
        f"versions: torch {environment['torch']}, sentence-transformers {environment['sentence_transformers']}, "
        f"ray {environment['ray']}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmpdir:
        source, corpus, id_column = resolve_corpus(args, tmpdir)
        base_ids, texts = load_texts(corpus, id_column, args.title_column or None)
        print(f"{len(texts)} documents, batch size {args.batch_size}, repeat {args.repeat}")
        base_runs, base = time_baseline_runs(load_baseline_model(), texts, args.batch_size, args.repeat)
        rows = [result_row("sentence-transformers", base_runs, len(texts), None, min_cosine=1.0, mean_cosine=1.0)]
        if "bf16" in precisions:  # the ceiling bf16 sets on this CPU, measured the way a user would run it
            rows.append(plain_bf16_row(args, texts, base, rows[0]["docs_per_s"]))
        for precision in precisions:
            job = time_job_runs(args, corpus, id_column, precision, base_ids, base)
            rows.append(
                result_row(f"job {precision}", job.pop("seconds_runs"), job.pop("rows"), rows[0]["docs_per_s"], **job)
            )
    print()
    print(format_table(rows))
    print("\n".join(target_lines(rows)))
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "environment": environment,
                    "corpus": str(source),
                    "limit": args.limit,
                    "batch_size": args.batch_size,
                    "repeat": args.repeat,
                    "results": rows,
                },
                indent=2,
            )
        )
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
