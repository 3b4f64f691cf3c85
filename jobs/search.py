"""Search the index with query texts (--query, repeatable).

Reads:  <output.root>/index/ and embeddings/, and the corpus (for the text previews). On a root that jobs.refresh
        publishes versions under, the version CURRENT names (or output.version), under a reader's lease that keeps
        retention off it while this job runs.
Writes: nothing; prints rank, score, doc id and the start of each hit's text.
Each query is encoded with the index's encoder (model.query_prompt included); --k overrides search.k.
"""

from __future__ import annotations

import logging
import sys

from jobs import _cli
from jobs.ray import cluster, query_encoding
from retrieval_core.config import Config
from retrieval_core.index import lookup
from retrieval_core.io.folder import Folder

log = logging.getLogger("jobs.search")
PREVIEW_CHARS = 80
KEYS = ("output.root", "output.version", "search.k", "model.query_prompt")  # for --help


def run(cfg: Config, queries: list[str], k: int | None = None) -> list[list[dict]]:
    """For each query, its top k hits as dicts (rank, score, row_id, doc_id, text), best first."""
    cfg = cluster.read_version(cfg)
    scores, ids, _ = query_encoding.search_texts(cfg, queries, k or cfg.search.k)
    doc_ids = lookup.doc_ids_for_rows(Folder.output(cfg.output), ids.ravel())
    texts = lookup.texts_for_rows(Folder.output(cfg.output), ids.ravel(), cfg.corpus.storage_options)
    return [
        [
            {
                "rank": rank + 1,
                "score": float(score),
                "row_id": int(row),
                "doc_id": doc_ids.get(int(row)),
                "text": texts.get(int(row), ""),
            }
            for rank, (score, row) in enumerate(zip(score_row, id_row))
            if row >= 0
        ]
        for score_row, id_row in zip(scores, ids)
    ]


def format_hits(query: str, hits: list[dict]) -> str:
    lines = [f"query: {query}", f"{'rank':>4}  {'score':>8}  {'doc id':<16} text"]
    for hit in hits:
        text = " ".join(hit["text"].split())
        preview = text[:PREVIEW_CHARS] + ("..." if len(text) > PREVIEW_CHARS else "")
        lines.append(f"{hit['rank']:>4}  {hit['score']:>8.4f}  {str(hit['doc_id']):<16} {preview}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser(__doc__, "python -m jobs.search", KEYS)
    p.add_argument("--query", action="append", required=True, help="query text (repeatable)")
    p.add_argument("--k", type=int, default=None, help="hits per query (default: search.k)")
    args = p.parse_args(argv)
    cfg = _cli.config_from_args(args)
    if args.k is not None and args.k <= 0:
        p.error(f"--k = {args.k}: expected a positive integer")
    return _cli.run_guarded(
        cfg,
        lambda: run(cfg, args.query, args.k),
        lambda results: print("\n\n".join(format_hits(q, hits) for q, hits in zip(args.query, results))),
    )


if __name__ == "__main__":
    sys.exit(main())
