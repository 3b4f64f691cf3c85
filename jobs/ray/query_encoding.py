"""Query encoding for search, evaluation and mining: in the driver for small sets, on encoder actors for large."""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from jobs.ray import actors, cluster, dispatch
from retrieval_core.config import Config
from retrieval_core.encode import encoding
from retrieval_core.index import indexing
from retrieval_core.io.folder import Folder

CHUNK = 1024  # queries per actor call
log = logging.getLogger(__name__)


def check_encoder(cfg: Config, index_manifest: dict) -> None:
    """The run's model settings must give the encoder the index was built with; a query encoder other than the one
    recorded at encoding time (another query prompt, say) is allowed, with a warning naming the differences."""
    indexing.check_query_encoder(index_manifest, encoding.encoder_identity(cfg.model))
    recorded, now = index_manifest.get("query_encoder"), encoding.query_identity(cfg.model)
    if recorded and recorded["fingerprint"] != now["fingerprint"]:
        from retrieval_core.io.manifest import identity_differences

        log.warning(
            "queries are encoded otherwise than the index's documents' run recorded: %s",
            "; ".join(identity_differences(recorded, now)),
        )


def encode_queries(cfg: Config, texts: list[str], session: cluster.LazyRaySession) -> np.ndarray:
    """(n x dim float32) query vectors with ``model.query_prompt``, in input order. Actors started here for a
    large set are released before returning, so their CPUs are free for the next step."""
    with query_encoder(cfg, session, len(texts)) as encode:
        return encode(texts)


@contextmanager
def query_encoder(cfg: Config, session: cluster.LazyRaySession, count: int) -> Iterator:
    """Yields ``encode(texts)`` -> (n x dim float32) query vectors with ``model.query_prompt``, in input order, for
    ``count`` queries in all, in any number of calls: the job's own encoder when ``count`` is at most
    ``runtime.inline_rows``, else encoder actors, started once here and released on exit."""
    if dispatch.runs_here(count, cfg.runtime.inline_rows):
        encoder = cluster.inline_encoder(cfg)
        before = encoding.usage_of(encoder)
        yield encoder.encode_queries
        if before is not None:
            from retrieval_core.encode.providers import usage_between

            log.info("queries: %s", usage_between(before, encoding.usage_of(encoder)))
        return
    with dispatch.released(actors.start_encode_workers(cfg, session.worker_count(math.ceil(count / CHUNK)))) as workers:
        yield lambda texts: _encode_on(workers, texts, cfg.runtime.speculation)


def _encode_on(workers: list, texts: list[str], speculation: float) -> np.ndarray:
    chunks = [texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK)]
    results: dict[int, np.ndarray] = {}
    dispatch.run_on_actors(
        workers,
        "encode_queries",
        list(range(len(chunks))),
        (),
        lambda i, vectors: results.__setitem__(i, vectors),
        item_arg=lambda i: chunks[i],
        work="query encoding",
        speculation=speculation,
    )
    return np.vstack([results[i] for i in range(len(chunks))])


def search_texts(cfg: Config, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(scores, row ids, index manifest): scores and ids (n x k, best first) of query texts searched in the index
    under ``output.root``, after checking that the run's model settings give the index's encoder."""
    from retrieval_core.index import faiss_index

    index, manifest = _checked_index(cfg)
    with cluster.LazyRaySession(cfg.runtime) as session:
        vectors = encode_queries(cfg, texts, session)
    return (*faiss_index.search(index, vectors, k, cfg.search.batch_size), manifest)


@contextmanager
def searched_batches(cfg: Config, texts: list[str], k: int, batch: int) -> Iterator:
    """Yields (batches, index manifest): each batch is (its first query's position, row ids of its top ``k`` hits:
    batch x k, best first, -1 where none). The query texts are encoded and searched ``batch`` at a time as the
    batches are drawn, so that a caller holds one batch's vectors and results; encoder actors, when the texts need
    them, live until the context ends."""
    from retrieval_core.index import faiss_index

    index, manifest = _checked_index(cfg)
    with cluster.LazyRaySession(cfg.runtime) as session, query_encoder(cfg, session, len(texts)) as encode:

        def batches():
            for start in range(0, len(texts), batch):
                vectors = encode(texts[start : start + batch])
                yield start, faiss_index.search(index, vectors, k, cfg.search.batch_size)[1]

        yield batches(), manifest


def _checked_index(cfg: Config) -> tuple[Any, dict]:
    """(the index under ``output.root``, memory-mapped when local; its manifest), once the run's model settings are
    checked to give the index's encoder."""
    index, manifest = indexing.load_index(Folder.output(cfg.output), mmap=True)
    check_encoder(cfg, manifest)
    return index, manifest
