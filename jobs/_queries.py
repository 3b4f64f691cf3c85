"""Query encoding for search, evaluation and mining: in the driver for small sets, on encoder actors for large."""
from __future__ import annotations

import numpy as np

from jobs import _actors, _runtime
from retrieval_core import encoding, indexing
from retrieval_core.config import Config

LOCAL_LIMIT = 2048      # up to this many queries are encoded in the driver (no actor start-up cost)
CHUNK = 1024            # queries per actor call


def check_encoder(cfg: Config, index_manifest: dict) -> None:
    """The run's model settings must give the encoder the index was built with."""
    indexing.check_query_encoder(index_manifest, encoding.encoder_identity(cfg.model))


def encode_queries(cfg: Config, texts: list[str], session: _runtime.LazyRaySession) -> np.ndarray:
    """(n x dim float32) query vectors with ``model.query_prompt``, in input order."""
    if len(texts) <= LOCAL_LIMIT:
        encoding.quiet_model_loading()
        encoding.set_torch_threads(encoding.cpu_count())
        encoder = encoding.SentenceTransformerEncoder(cfg.model, encoding.pick_device(cfg.runtime.gpus_per_worker))
        return encoder.encode_queries(texts)
    chunks = [texts[i:i + CHUNK] for i in range(0, len(texts), CHUNK)]
    workers = _actors.start_encode_workers(cfg, session.worker_count(len(chunks)))
    results: dict[int, np.ndarray] = {}
    _runtime.run_on_actors(workers, "encode_queries", list(range(len(chunks))), (),
                           lambda i, vectors: results.__setitem__(i, vectors), item_arg=lambda i: chunks[i])
    return np.vstack([results[i] for i in range(len(chunks))])
