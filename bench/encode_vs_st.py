"""Benchmark: this project's encode job, on every backend and precision installed, against plain
sentence-transformers, on the same corpus, in one run.

What it measures
  * baseline: what a user would otherwise run -- ``SentenceTransformer(all-MiniLM-L6-v2, device="cpu")`` with
    ``torch.set_num_threads(os.cpu_count())`` and ``model.encode(texts, normalize_embeddings=True)`` in fp32.
    Only the encode call is timed (model loaded, after a short warm-up encode).
  * the job, for each variant ``backend/precision`` (default: every one installed that this CPU runs natively, and
    ``auto/auto``): ``jobs.encode.run(cfg)`` timed end to end (wall clock, including the start of Ray's local
    cluster, the model loads in the workers, the export of the model to ONNX and its compilation -- each variant
    gets an empty file cache -- and the writing of the shards), since that is what a user pays. Its vectors are read
    back and compared row by row (matched by doc id) with the baseline's.
  * quality, where the corpus has BEIR queries and qrels beside it (SciFact: queries.jsonl, qrels/train.tsv) and
    no --limit is given: nDCG@10 of exact inner-product search, queries encoded the variant's way, against the
    baseline's nDCG@10.
  For each: seconds, docs/s, docs/s relative to the baseline, min / mean cosine to the baseline vectors, nDCG@10.
  Document text is ``title + " " + text`` (``retrieval_core.io.corpus.assemble_text``), as the job builds it.

Targets (issue 32; ``auto`` is what the job picks on this CPU, said in the output)
  * CPUs with avx512_bf16 or AMX: auto >= 2.3x the baseline's docs/s, |nDCG@10 - baseline's| <= 0.001.
  * other CPUs: auto >= 1.35x the baseline's docs/s, min cosine >= 0.9999.
  * on every CPU: auto at least as fast as the job's torch/fp32.

Run (from the repository root, with the venv active)
  python bench/encode_vs_st.py                  # SciFact ($SCIFACT_DIR, default ../shared/data/scifact) when
                                                # present, else the demo
  python bench/encode_vs_st.py --limit 500      # a quick look on the first 500 documents (no nDCG)
  Other options: --corpus, --variants torch/fp32,auto/auto, --batch-size 32, --title-column title, --id-column,
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
TARGET_BF16_CPU_RATIO = 2.3
TARGET_BF16_CPU_NDCG_DELTA = 0.001
TARGET_CPU_RATIO = 1.35
TARGET_MIN_COSINE = 0.9999
QRELS = "qrels/train.tsv"

if str(REPO) not in sys.path:  # `python bench/encode_vs_st.py` puts bench/ on the path, not the repository
    sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--corpus", type=Path, default=None, help=f"Parquet corpus (default: {SCIFACT} when it exists, else {DEMO})"
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N rows (default: all)")
    parser.add_argument(
        "--variants", default="", help="job variants backend/precision, comma separated (default: all installed)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--title-column", default="title", help="title column ('' for none)")
    parser.add_argument(
        "--id-column", default=None, help="id column (default: 'id' when the corpus has one, else '_id' as in BEIR)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each variant; the median is reported")
    parser.add_argument("--out", type=Path, default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def default_variants() -> list[str]:
    """Every backend/precision installed that this CPU runs natively, then auto/auto."""
    from retrieval_core.encode import hardware

    hw = hardware.this_machine()
    variants = ["torch/fp32"] + (["torch/bf16"] if hw.native_bf16 else [])
    for backend in hw.runtimes:
        variants.append(f"{backend}/fp32")
        if backend == "openvino" and hw.native_bf16:
            variants.append("openvino/bf16")
    return [*variants, "auto/auto"]


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


def load_judgements(corpus: Path) -> tuple[dict, dict] | None:
    """(queries, qrels) of the BEIR data beside ``corpus`` -- queries.jsonl and qrels/train.tsv -- or None."""
    from retrieval_core.io import judgements

    queries, qrels = corpus.parent / "queries.jsonl", corpus.parent / QRELS
    if not (queries.is_file() and qrels.is_file()):
        return None
    judged = judgements.read_qrels(str(qrels))
    return {q: t for q, t in judgements.read_queries(str(queries)).items() if q in judged}, judged


def ndcg_at_10(doc_ids: list[str], docs: np.ndarray, query_vectors: np.ndarray, query_ids: list[str], qrels) -> float:
    """nDCG@10 of exact inner-product search of ``query_vectors`` over ``docs``."""
    from retrieval_core.evaluate.metrics import evaluate_run

    top = np.argsort(-(query_vectors @ docs.T), axis=1)[:, :10]
    run = {q: [doc_ids[i] for i in row] for q, row in zip(query_ids, top)}
    return float(evaluate_run(run, qrels, ndcg_ks=(10,), recall_ks=(), mrr_ks=())["ndcg@10"])


def environment() -> dict:
    import ray
    import sentence_transformers
    import torch

    from retrieval_core.encode import hardware

    hw = hardware.this_machine()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_flags": list(hw.cpu_flags),
        "runtimes": list(hw.runtimes),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "ray": ray.__version__,
        **{name: runtime_version(name) for name in hw.runtimes},
    }


def runtime_version(backend: str) -> str:
    return __import__({"onnx": "onnxruntime", "openvino": "openvino"}[backend]).__version__


def load_baseline_model():
    import torch
    from sentence_transformers import SentenceTransformer

    from retrieval_core.encode.encoding import resolve_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    return SentenceTransformer(resolve_model_path(MODEL), device="cpu")


def encode_baseline(model, texts: list[str], batch_size: int) -> tuple[float, np.ndarray]:
    """(seconds, vectors) of one plain fp32 ``model.encode`` call over all texts."""
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    return time.perf_counter() - started, np.asarray(vectors, dtype=np.float32)


def job_config(corpus: Path, id_column: str, title_column: str | None, variant: str, batch_size: int, root: str):
    from retrieval_core.config import load_config

    def quoted(value) -> str:  # JSON strings are YAML strings: paths with ':' or '#' stay intact
        return json.dumps(value)

    backend, precision = variant.split("/")
    return load_config(
        None,
        [
            f"corpus.path={quoted(str(corpus))}",
            f"corpus.id_column={quoted(id_column)}",
            f"corpus.title_column={quoted(title_column) if title_column else 'null'}",
            f"model.backend={backend}",
            f"model.precision={precision}",
            f"model.batch_size={batch_size}",
            f"output.root={quoted(root)}",
            "runtime.progress=false",
        ],
    )


@contextlib.contextmanager
def empty_file_cache():
    """A fresh ``$RETRIEVAL_FILE_CACHE`` for one run, so its time includes the model's export and compilation."""
    before = os.environ.get("RETRIEVAL_FILE_CACHE")
    with tempfile.TemporaryDirectory(prefix="bench-encode-cache-") as cache:
        os.environ["RETRIEVAL_FILE_CACHE"] = cache
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("RETRIEVAL_FILE_CACHE", None)
            else:
                os.environ["RETRIEVAL_FILE_CACHE"] = before


def run_job(cfg) -> tuple[float, dict, list[str], np.ndarray]:
    """(wall seconds, summary, doc ids, vectors) of one end-to-end ``jobs.encode.run``."""
    from jobs import encode
    from retrieval_core.encode.embeddings import load_embeddings

    started = time.perf_counter()
    summary = encode.run(cfg)
    seconds = time.perf_counter() - started
    _, vectors, doc_ids = load_embeddings(Folder(cfg.output.root))
    return seconds, summary, doc_ids, vectors


def aligned(base_ids: list[str], ids: list[str], vectors: np.ndarray) -> np.ndarray:
    """``vectors`` in the baseline's row order (matched by doc id)."""
    where = {doc_id: i for i, doc_id in enumerate(ids)}
    missing = [doc_id for doc_id in base_ids if doc_id not in where]
    if missing or len(ids) != len(base_ids):
        raise RuntimeError(f"job and baseline rows differ: {len(ids)} vs {len(base_ids)}, e.g. {missing[:3]}")
    return vectors[[where[doc_id] for doc_id in base_ids]]


def cosines(base: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    dots = np.einsum("ij,ij->i", base, vectors)
    return dots / (np.linalg.norm(base, axis=1) * np.linalg.norm(vectors, axis=1))


def time_baseline_runs(model, texts: list[str], batch_size: int, repeat: int) -> tuple[list[float], np.ndarray]:
    model.encode(texts[:WARMUP_TEXTS], batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    runs = [encode_baseline(model, texts, batch_size) for _ in range(repeat)]
    return [seconds for seconds, _ in runs], runs[0][1]


def time_job_runs(args, corpus: Path, id_column: str, variant: str, base_ids: list[str], base: np.ndarray) -> dict:
    """Seconds of each run, min / mean cosine to the baseline over all runs, and the vectors of the first."""
    seconds, mins, means, rows, first = [], [], [], 0, None
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-encode-") as root, empty_file_cache():
            cfg = job_config(corpus, id_column, args.title_column or None, variant, args.batch_size, root)
            took, summary, ids, vectors = run_job(cfg)
        vectors = aligned(base_ids, ids, vectors)
        cos = cosines(base, vectors)
        seconds.append(took)
        mins.append(float(cos.min()))
        means.append(float(cos.mean()))
        rows = summary["rows_encoded"]
        first = vectors if first is None else first
    return {
        "seconds_runs": seconds,
        "rows": rows,
        "min_cosine": min(mins),
        "mean_cosine": statistics.mean(means),
    }, first


def job_query_vectors(cfg, texts: list[str]) -> np.ndarray:
    """The queries encoded as the job's stages would encode them with ``cfg`` (here, on every core)."""
    from retrieval_core.encode import encoding

    return encoding.load_encoder(cfg.model, 0, threads=encoding.cpu_count()).encode_queries(texts)


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
    head = (
        f"{'variant':<30}{'rows':>7}{'seconds':>10}{'docs/s':>10}{'x base':>9}{'min cos':>11}{'mean cos':>11}"
        f"{'nDCG@10':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ndcg = f"{r['ndcg@10']:>9.4f}" if r.get("ndcg@10") is not None else f"{'-':>9}"
        lines.append(
            f"{r['variant']:<30}{r['rows']:>7}{r['seconds']:>10.2f}{r['docs_per_s']:>10.1f}"
            f"{r['ratio_vs_baseline']:>8.2f}x{r['min_cosine']:>11.6f}{r['mean_cosine']:>11.6f}{ndcg}"
        )
    return "\n".join(lines)


def target_lines(rows: list[dict], native_bf16: bool) -> list[str]:
    by_name = {r["variant"].split(" ")[0]: r for r in rows}
    auto, torch_fp32, base = by_name.get("auto/auto"), by_name.get("torch/fp32"), rows[0]
    if auto is None:
        return []
    lines = []
    if native_bf16:
        ok = auto["ratio_vs_baseline"] >= TARGET_BF16_CPU_RATIO
        lines.append(f"target (avx512_bf16/AMX) auto >= {TARGET_BF16_CPU_RATIO}x baseline docs/s: {met(ok)}")
        if auto.get("ndcg@10") is not None:
            delta = abs(auto["ndcg@10"] - base["ndcg@10"])
            lines.append(
                f"target |nDCG@10 delta| <= {TARGET_BF16_CPU_NDCG_DELTA}: {delta:.4f}, "
                f"{met(delta <= TARGET_BF16_CPU_NDCG_DELTA)}"
            )
    else:
        ok = auto["ratio_vs_baseline"] >= TARGET_CPU_RATIO and auto["min_cosine"] >= TARGET_MIN_COSINE
        lines.append(f"target auto >= {TARGET_CPU_RATIO}x baseline docs/s, min cos >= {TARGET_MIN_COSINE}: {met(ok)}")
    if torch_fp32:
        ok = auto["docs_per_s"] >= torch_fp32["docs_per_s"]
        lines.append(f"target auto never slower than the job's torch/fp32: {met(ok)}")
    return lines


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def resolve_corpus(args, tmpdir: str) -> tuple[Path, Path, str]:
    """(the corpus asked for, the file the run reads, its id column)."""
    source = (args.corpus or default_corpus()).resolve()
    print(f"corpus: {source}" + (f" (first {args.limit} rows)" if args.limit else ""))
    corpus = limited_copy(source, args.limit, tmpdir) if args.limit else source
    return source, corpus, args.id_column or detect_id_column(corpus)


def variant_name(variant: str) -> str:
    """``auto/auto`` with what it picks on this machine."""
    if "auto" not in variant:
        return variant
    from retrieval_core.config import load_config
    from retrieval_core.encode import hardware

    backend, precision = variant.split("/")
    model = load_config(None, [f"model.backend={backend}", f"model.precision={precision}"]).model
    picked = hardware.resolved(model)
    return f"{variant} ({picked.backend}/{picked.precision})"


def measure(args, corpus: Path, id_column: str, variants: list[str], judged) -> list[dict]:
    base_ids, texts = load_texts(corpus, id_column, args.title_column or None)
    print(f"{len(texts)} documents, batch size {args.batch_size}, repeat {args.repeat}, variants {variants}")
    model = load_baseline_model()
    base_runs, base = time_baseline_runs(model, texts, args.batch_size, args.repeat)
    quality = {}
    if judged:
        query_ids, query_texts = list(judged[0]), list(judged[0].values())
        queries = model.encode(query_texts, normalize_embeddings=True, convert_to_numpy=True)
        quality = {"ndcg@10": ndcg_at_10(base_ids, base, queries, query_ids, judged[1])}
    rows = [
        result_row("sentence-transformers", base_runs, len(texts), None, min_cosine=1.0, mean_cosine=1.0, **quality)
    ]
    for variant in variants:
        job, vectors = time_job_runs(args, corpus, id_column, variant, base_ids, base)
        if judged:
            cfg = job_config(corpus, id_column, None, variant, args.batch_size, "unused")
            queries = job_query_vectors(cfg, query_texts)
            job["ndcg@10"] = ndcg_at_10(base_ids, vectors, queries, query_ids, judged[1])
        name = variant_name(variant)
        rows.append(result_row(name, job.pop("seconds_runs"), job.pop("rows"), rows[0]["docs_per_s"], **job))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] or default_variants()
    env = environment()
    print(f"cpu: {', '.join(env['cpu_flags']) or 'no avx2'}, {env['cpu_count']} cores; runtimes: {env['runtimes']}")
    print(f"versions: {json.dumps({k: v for k, v in env.items() if k not in ('cpu_flags', 'runtimes', 'cpu_count')})}")
    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmpdir:
        source, corpus, id_column = resolve_corpus(args, tmpdir)
        judged = None if args.limit else load_judgements(source)
        rows = measure(args, corpus, id_column, variants, judged)
    native_bf16 = any(flag in env["cpu_flags"] for flag in ("avx512_bf16", "amx_bf16"))
    print()
    print(format_table(rows))
    print("\n".join(target_lines(rows, native_bf16)))
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "environment": env,
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
