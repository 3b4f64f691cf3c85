"""Evaluate retrieval with BEIR-style queries and qrels.

Reads:  <output.root>/index/, eval.queries_path (JSONL _id, text) and eval.qrels_path (TSV query-id, corpus-id,
        score with a header).
Writes: <output.root>/eval/metrics.json (nDCG@10, recall@10, recall@100, MRR@10) and eval/per_query.json.
A rerun with the same index, queries, qrels and settings reuses metrics.json. The queries are searched and scored
BATCH_QUERIES at a time (encoded, searched, scored), by row id (the judged documents' rows are found once), and
each query's metrics are written as they come: the driver holds the queries and their judgements, and one batch's
vectors and results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time

from jobs import _cli
from jobs.ray import cluster, query_encoding
from retrieval_core.config import Config
from retrieval_core.encode import encoding
from retrieval_core.evaluate import metrics
from retrieval_core.index import indexing, lookup
from retrieval_core.io import judgements, storage
from retrieval_core.io.folder import Folder
from retrieval_core.io.manifest import stamp

log = logging.getLogger("jobs.evaluate")
KEYS = (
    "output.root",
    "eval.queries_path",
    "eval.qrels_path",
    "eval.depth",
    "model.query_prompt",
    "search.batch_size",
)  # shown with their defaults by --help
BATCH_QUERIES = 10_000  # queries encoded, searched and scored at a time: the driver holds one batch's vectors


def judged_queries(queries: dict[str, str], qrels: dict[str, dict[str, int]]) -> list[str]:
    """Ids of the queries evaluated: those with at least one relevant (score > 0) document; each must have text."""
    ids = [qid for qid, judged in qrels.items() if any(score > 0 for score in judged.values())]
    if not ids:
        raise judgements.EvaluationDataError(
            "no query in the qrels has a relevant document (score > 0); nothing to evaluate"
        )
    missing = [qid for qid in ids if qid not in queries]
    if missing:
        raise judgements.EvaluationDataError(
            f"{len(missing)} judged queries have no text in the queries file, e.g. {missing[:5]}"
        )
    return ids


def run(cfg: Config) -> dict:
    """Evaluate and write ``eval/metrics.json``, or reuse it when it was made with the same index, queries, qrels
    and settings (``output.overwrite`` evaluates again); returns the metrics record with ``reused``."""
    cfg = cluster.read_version(cfg)
    started = time.perf_counter()
    ev, so = cfg.eval, cfg.output.storage_options
    queries = judgements.read_queries(ev.queries_path, ev.storage_options)
    qrels = judgements.read_qrels(ev.qrels_path, ev.storage_options)
    qids = judged_queries(queries, qrels)
    out = storage.join(cfg.output.root, "eval")
    identity = evaluation_identity(cfg, queries, qrels, qids)
    earlier = _earlier_result(storage.join(out, "metrics.json"), cfg)
    if earlier and earlier.get("identity") == identity and not cfg.output.overwrite:
        return {**earlier, "reused": True}
    rows = lookup.rows_for_doc_ids(Folder(cfg.output.root, so), {d for q in qids for d in qrels[q]})
    unindexed = relevant_not_indexed(qrels, qids, rows)
    texts = [queries[q] for q in qids]
    with query_encoding.searched_batches(cfg, texts, ev.depth, BATCH_QUERIES) as (batches, index_manifest):
        figures = score_batches(qids, qrels, rows, batches, storage.join(out, "per_query.json"), so)
    result = {
        **stamp(),
        "stage": "eval",
        "metrics": figures,
        "queries_path": ev.queries_path,
        "qrels_path": ev.qrels_path,
        "depth": ev.depth,
        "index_type": index_manifest["type"],
        "search_parameters": index_manifest["search_parameters"],
        "identity": identity,
        "fingerprint": index_manifest["fingerprint"],
        "relevant_not_indexed": unindexed,
        "seconds": round(time.perf_counter() - started, 3),
    }
    storage.write_json_atomic(storage.join(out, "metrics.json"), result, so)
    return {**result, "reused": False}


def score_batches(
    qids: list[str],
    qrels: dict[str, dict[str, int]],
    rows: dict[str, int],
    batches,
    url: str,
    storage_options: dict | None = None,
) -> dict:
    """The mean metrics of the queries ``qids`` (BEIR's, see :mod:`metrics`) from their hits' row ids, one batch
    (``batches``: (first position, row ids)) at a time; each query's metrics are written to ``url`` as they come
    (a JSON object: query id -> metrics). Judged documents are compared by row id (``rows``: doc id -> row id;
    a judged document without a row keeps its doc id, which no hit equals), so no hit is looked up."""
    mean = metrics.MeanOf()
    with storage.open_atomic(url, storage_options) as out:
        out.write(b"{")
        for start, ids in batches:
            batch = qids[start : start + len(ids)]
            run_ = {q: [int(r) for r in row if r >= 0] for q, row in zip(batch, ids)}
            judged = {q: {rows.get(d, d): score for d, score in qrels[q].items()} for q in batch}
            for query_id, values in metrics.per_query_metrics(run_, judged).items():
                out.write(f"{',' if mean.count else ''}\n{json.dumps(query_id)}: {json.dumps(values)}".encode())
                mean.add(values)
        out.write(b"\n}\n")
    figures = {**mean.means(), "queries": mean.count}
    log.info("evaluated %d queries: %s", mean.count, {k: round(v, 4) for k, v in figures.items()})
    return figures


def relevant_not_indexed(qrels: dict[str, dict[str, int]], qids: list[str], rows: dict[str, int]) -> int:
    """How many relevant judgements (score > 0) of the evaluated queries name a document the embeddings do not hold
    (absent from the corpus, or rejected at encode: not in ``rows``); warned with examples. They stay in the
    figures as never retrieved (as BEIR counts them), so recall cannot reach 1 for those queries."""
    pairs = [(q, d) for q in qids for d, score in qrels[q].items() if score > 0]
    missing = [(q, d) for q, d in pairs if d not in rows]
    if missing:
        log.warning(
            "%d of %d relevant judgements name documents the index does not hold (absent from the corpus "
            "or rejected at encode), e.g. %s; they count as never retrieved",
            len(missing),
            len(pairs),
            ", ".join(f"query {q} -> doc {d}" for q, d in missing[:5]),
        )
    return len(missing)


def evaluation_identity(cfg: Config, queries: dict[str, str], qrels: dict, qids: list[str]) -> dict:
    """What fixes the figures: the index build, the query encoder (its prompt included), the depth, and the judged
    queries' texts and judgements (by content, so a moved file with the same content is the same evaluation)."""
    index_manifest = indexing.read_index_manifest(Folder.output(cfg.output))
    content = json.dumps([[q, queries[q], sorted(qrels[q].items())] for q in qids])
    return {
        "index": index_manifest["identity"],
        "query_encoder": encoding.query_identity(cfg.model)["fingerprint"],
        "depth": cfg.eval.depth,
        "judged": hashlib.sha256(content.encode()).hexdigest()[:32],
    }


def _earlier_result(url: str, cfg: Config) -> dict | None:
    return (
        storage.read_json(url, cfg.output.storage_options) if storage.exists(url, cfg.output.storage_options) else None
    )


def format_summary(result: dict) -> str:
    m = result["metrics"]
    return (
        f"eval: {m['queries']} queries, nDCG@10 {m['ndcg@10']:.4f}, recall@10 {m['recall@10']:.4f}, "
        f"recall@100 {m['recall@100']:.4f}, MRR@10 {m['mrr@10']:.4f} ({result['index_type']})"
        f"{'; already evaluated' if result['reused'] else ''}"
    )


def main(argv: list[str] | None = None) -> int:
    return _cli.run_job(__doc__, run, format_summary, argv, KEYS)


if __name__ == "__main__":
    sys.exit(main())
