"""Evaluate retrieval: ``python -m jobs.evaluate --config F [--set eval.queries_path=...] [--set eval.qrels_path=...]``.

Reads BEIR queries (JSONL ``_id``, ``text``) and qrels (TSV ``query-id corpus-id score``), retrieves the top
``eval.depth`` documents per query from the index, and writes nDCG@10, recall@10, recall@100 and MRR@10 to
``<output.root>/eval/metrics.json`` (per-query figures in ``eval/per_query.json``).
"""
from __future__ import annotations

import logging
import sys
import time

from jobs import _cli, _queries
from retrieval_core import lookup, metrics, storage
from retrieval_core.config import Config
from retrieval_core.manifest import stamp

log = logging.getLogger("jobs.evaluate")


def judged_queries(queries: dict[str, str], qrels: dict[str, dict[str, int]]) -> list[str]:
    """Ids of the queries evaluated: those with at least one relevant (score > 0) document; each must have text."""
    ids = [qid for qid, judged in qrels.items() if any(score > 0 for score in judged.values())]
    missing = [qid for qid in ids if qid not in queries]
    if missing:
        raise metrics.EvaluationDataError(f"{len(missing)} judged queries have no text in the queries file, "
                                           f"e.g. {missing[:5]}")
    return ids


def retrieve(cfg: Config, texts: list[str], depth: int) -> tuple[list[list[str]], dict]:
    """Doc ids of the top ``depth`` hits of each query text (best first), and the index manifest."""
    _, ids, index_manifest = _queries.search_texts(cfg, texts, depth)
    mapping = lookup.doc_ids_for_rows(cfg.output.root, ids.ravel(), cfg.output.storage_options)
    return lookup.as_doc_ids(ids, mapping), index_manifest


def run(cfg: Config) -> dict:
    """Evaluate and write ``eval/metrics.json``; returns the metrics dict."""
    started = time.perf_counter()
    ev = cfg.eval
    queries = metrics.read_queries(ev.queries_path, ev.storage_options)
    qrels = metrics.read_qrels(ev.qrels_path, ev.storage_options)
    qids = judged_queries(queries, qrels)
    ranked, index_manifest = retrieve(cfg, [queries[q] for q in qids], ev.depth)
    run_ = dict(zip(qids, ranked))
    figures = metrics.evaluate_run(run_, qrels)
    per_query = metrics.per_query_metrics(run_, qrels)
    result = {**stamp(), "stage": "eval", "metrics": figures, "queries_path": ev.queries_path,
              "qrels_path": ev.qrels_path, "depth": ev.depth, "index_type": index_manifest["type"],
              "search_parameters": index_manifest["search_parameters"],
              "fingerprint": index_manifest["fingerprint"], "seconds": round(time.perf_counter() - started, 3)}
    out = storage.join(cfg.output.root, "eval")
    storage.write_json_atomic(storage.join(out, "per_query.json"), per_query, cfg.output.storage_options)
    storage.write_json_atomic(storage.join(out, "metrics.json"), result, cfg.output.storage_options)
    return result


def format_summary(result: dict) -> str:
    m = result["metrics"]
    return (f"eval: {m['queries']} queries, nDCG@10 {m['ndcg@10']:.4f}, recall@10 {m['recall@10']:.4f}, "
            f"recall@100 {m['recall@100']:.4f}, MRR@10 {m['mrr@10']:.4f} ({result['index_type']})")


def main(argv: list[str] | None = None) -> int:
    return _cli.run_job(__doc__, run, format_summary, argv)


if __name__ == "__main__":
    sys.exit(main())
