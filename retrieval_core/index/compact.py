"""``index.vectors``: compact codes for the first-stage search, rescored with the stored vectors.

``float16`` and ``int8`` are FAISS scalar quantizers (``SQfp16``, ``SQ8``: 2 and 1 bytes a dimension); ``binary``
is RaBitQ (one bit a dimension and 8 bytes of correction factors a vector, an unbiased estimate of the inner
product). They are codes like any other: shard indexes, the merge by ranges of lists, memory-mapped searchers and
mining's shard groups take them as they take ``Flat``. With ``index.rescore_factor`` = F > 0, a search asks the
codes for F x k candidates and ranks them by their exact scores, computed from the vectors the index stage stored
beside the index (``index/vectors/<shard>.npy``, one file per embeddings shard, rows at ``row_id - row_start``, in
the embeddings' dtype): what sentence-transformers' quantization guide calls rescoring, with the document side
exact too. A searcher memory-maps those files (on object storage: this node's copy of each file it touches) and
reads the candidates' rows only; it holds the shards' row bounds (16 bytes a shard) and at most
``OPEN_FILES`` open maps.
"""

from __future__ import annotations

import collections
import io
import threading

import numpy as np

from retrieval_core.config.schema import VECTOR_CODES as CODES
from retrieval_core.io import file_cache, shard_list, storage

VECTORS_DIR = "vectors"
OPEN_FILES = 256
GATHER_BYTES = 64 << 20  # candidate vectors a search holds at once (queries are taken in chunks to stay under it)


def with_vectors(factory: str, vectors: str) -> str:
    """``factory`` (as ``index.type: auto`` picks it: ``Flat`` or ``IVF...,<code>``) with ``vectors``' code."""
    parts = factory.split(",")
    return ",".join([*parts[:-1], CODES[vectors]]) if len(parts) > 1 else CODES[vectors]


def rescore_factor(vectors: str, factor: int) -> int:
    """The rescoring an index of ``vectors`` gets: none for float32 (its codes are the vectors)."""
    return factor if vectors != "float32" else 0


def vectors_url(index_dir: str, shard_name: str) -> str:
    return storage.join(index_dir, VECTORS_DIR, f"{shard_name}.npy")


def write_shard_vectors(index_dir: str, shard: dict, row_ids: np.ndarray, vectors: np.ndarray, dtype: str, so) -> int:
    """Store one embeddings shard's vectors for rescoring, at ``row_id - row_start`` (rows that were not encoded,
    rejects, stay zero and are never candidates); returns the file's size. Memory: the shard's vectors 3 times."""
    start, stop = int(shard["row_start"]), int(shard["row_stop"])
    dense = np.zeros((stop - start, vectors.shape[1]), dtype=dtype)
    dense[np.asarray(row_ids, dtype=np.int64) - start] = vectors
    buffer = io.BytesIO()
    np.save(buffer, dense)
    storage.write_bytes_atomic(vectors_url(index_dir, shard["name"]), buffer.getbuffer(), so)
    return buffer.tell()


class StoredVectors:
    """Row id -> the vector stored for rescoring, read from memory-mapped shard files."""

    def __init__(self, index_dir: str, storage_options: dict | None, shards, dim: int):
        self.index_dir, self.storage_options, self.shards, self.dim = index_dir, storage_options, shards, dim
        self.starts, self.stops = shard_list.row_bounds(shards)
        self._maps: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()  # a mining worker searches for its peers on a second thread

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of ``ids`` (any shape; -1 for none) as float32, shape ``ids.shape + (dim,)``; zeros for -1."""
        flat = np.asarray(ids, dtype=np.int64).ravel()
        out = np.zeros((len(flat), self.dim), dtype=np.float32)
        where = np.flatnonzero(flat >= 0)
        shard = np.searchsorted(self.starts, flat[where], side="right") - 1
        outside = (shard < 0) | (flat[where] >= self.stops[np.maximum(shard, 0)])
        if outside.any():
            raise ValueError(f"row id {int(flat[where][outside][0])} is in no shard of the stored vectors")
        for number in np.unique(shard):
            at = where[shard == number]
            out[at] = self._map(int(number))[flat[at] - self.starts[number]]
        return out.reshape(*np.shape(ids), self.dim)

    def _map(self, number: int) -> np.ndarray:
        with self._lock:
            return self._mapped(number)

    def _mapped(self, number: int) -> np.ndarray:
        if number in self._maps:
            self._maps.move_to_end(number)
            return self._maps[number]
        url = vectors_url(self.index_dir, self.shards[number]["name"])
        mapped = np.load(file_cache.local_copy(url, self.storage_options), mmap_mode="r")
        self._maps[number] = mapped
        if len(self._maps) > OPEN_FILES:
            self._maps.popitem(last=False)
        return mapped


class Rescored:
    """A first-stage index whose ``factor`` x k candidates are ranked by their exact scores against the stored
    vectors: inner products for ``ip``, squared L2 distances for ``l2``, as FAISS scores them. Everything else
    (``d``, ``ntotal``, ``nprobe`` ...) is the first-stage index's."""

    def __init__(self, index, stored: StoredVectors, factor: int, metric: str):
        self.index, self.stored, self.factor, self.metric = index, stored, int(factor), metric

    def __getattr__(self, name: str):
        return getattr(self.__dict__["index"], name)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        wanted = k * self.factor
        chunk = max(1, GATHER_BYTES // max(1, wanted * self.stored.dim * 4))
        parts = [self._search(queries[i : i + chunk], k, wanted) for i in range(0, len(queries), chunk)]
        if not parts:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.vstack([p[0] for p in parts]), np.vstack([p[1] for p in parts])

    def _search(self, queries: np.ndarray, k: int, wanted: int) -> tuple[np.ndarray, np.ndarray]:
        _, ids = self.index.search(queries, wanted)
        vectors = self.stored.gather(ids)
        if self.metric == "ip":
            scores = np.einsum("nd,nkd->nk", queries, vectors)
            keys = -scores.astype(np.float64)
        else:
            scores = np.sum((vectors - queries[:, None, :]) ** 2, axis=2)
            keys = scores.astype(np.float64)
        keys[ids < 0] = np.inf
        order = np.lexsort((ids, keys), axis=-1)[:, :k]  # ties by the smaller id, as the shards' merge breaks them
        top_ids = np.take_along_axis(ids, order, axis=1)
        top = np.take_along_axis(scores, order, axis=1).astype(np.float32)
        top[top_ids < 0] = -np.inf if self.metric == "ip" else np.inf
        return top, top_ids


def rescored(index, index_dir: str, storage_options: dict | None, manifest: dict, shards):
    """``index`` as searchers get it: wrapped in :class:`Rescored` when the index manifest says its vectors are
    stored for rescoring (``shards``: the embeddings manifest's shard list, for the rows' bounds)."""
    factor = manifest.get("rescore_factor") or 0
    if not factor:
        return index
    return Rescored(
        index, StoredVectors(index_dir, storage_options, shards, manifest["dim"]), factor, manifest["metric"]
    )


def first_stage(index):
    """The FAISS index under a :class:`Rescored` (its search parameters are set there)."""
    return index.index if isinstance(index, Rescored) else index
