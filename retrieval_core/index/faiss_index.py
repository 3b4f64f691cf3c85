"""FAISS indexes: choose a type, train, add with global ids, merge, serialize, tune search parameters.

Which types merge shard by shard (``merge_from``): every IVF type (``IVFn,Flat``, ``IVFn,SQ8``, ``IVFn,PQm`` ...)
and the flat-code types (``Flat``, ``SQ8``, ``PQm``), which are wrapped in ``IDMap2`` to carry global row ids.
Graph types (``HNSW``, ``NSG``) cannot merge: they are built in one process that streams every shard into one
index (memory: the whole graph, about ``N * (4 * dim + 8 * M)`` bytes for ``HNSWM``).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import faiss
import numpy as np

from retrieval_core.index import gpu

log = logging.getLogger(__name__)

FLAT_THRESHOLD = 50_000  # below this many vectors, ``auto`` picks exact search
ID_BYTES = 8  # an int64 id stored per vector by IVF lists and IDMap
PQ_CHOICES = (96, 64, 48, 32, 24, 16, 8, 4)


class IndexTypeError(ValueError):
    """An index type that FAISS cannot build, or that does not fit the data."""


def faiss_metric(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def is_mergeable(factory: str) -> bool:
    """True when shard indexes of this type merge into one (IVF types, an HNSW coarse quantizer included, and
    flat-code types); False for graph indexes (``HNSW32``, ``NSG64``, ``HNSW32,SQ8``) and for fast-scan codes
    (``IVF1024,PQ32x4fs``): FAISS's ``merge_from`` of fast-scan indexes whose sizes are not multiples of their
    block corrupts memory (faiss-cpu 1.13, shards of 437 vectors), so they are built whole like graphs."""
    if is_fast_scan(factory):
        return False
    return is_ivf(factory) or not any(graph in factory.upper() for graph in ("HNSW", "NSG"))


def is_fast_scan(factory: str) -> bool:
    """A factory string with a fast-scan code (``PQ32x4fs``, ``PQ32x4fsr``): 4-bit codes packed in blocks."""
    return any(part.strip().upper().endswith(("FS", "FSR")) for part in factory.split(","))


# How a local index is memory-mapped, whatever its type: ``IO_FLAG_MMAP_IFC`` maps the codes and ids in place
# (flat codes, IVF lists, graph storage). ``IO_FLAG_MMAP`` reads flat codes into memory, and serves IVF lists
# through a slower path that two processes searching at once contend on: 1.34 to 1.47 times the time each on a
# 2-core machine, against 0.96 to 1.04 in place, which is also 22 to 35% faster alone (bench/mmap_search.py).
MMAP_FLAG = faiss.IO_FLAG_MMAP_IFC


def is_ivf(factory: str) -> bool:
    return factory.upper().startswith("IVF") or ",IVF" in factory.upper()


def storage_factory(factory: str) -> str:
    """The factory string actually built: non-IVF types get ``IDMap2`` so that they keep global row ids."""
    if is_ivf(factory) or factory.upper().startswith("IDMAP"):
        return factory
    return f"IDMap2,{factory}"


def nlist_for(ntotal: int) -> int:
    """IVF lists for ``ntotal`` vectors: the power of two nearest 4 * sqrt(N) (FAISS's guideline: 4..16 sqrt(N)),
    capped at 65,536 and at N / 39 so that training has at least 39 points per list."""
    target = 4 * math.sqrt(max(ntotal, 1))
    nlist = 2 ** round(math.log2(target))
    return int(max(1, min(nlist, 65_536, ntotal // 39 or 1)))


def bytes_per_vector(factory: str, dim: int) -> float:
    """Approximate memory per stored vector for the encodings ``choose_index_type`` picks."""
    encoding = factory.split(",")[-1].upper()
    code: float
    if encoding == "FLAT":
        code = 4 * dim
    elif encoding in ("SQFP16", "SQBF16"):
        code = 2 * dim
    elif encoding.startswith("SQ"):
        code = dim * int(encoding[2:] or 8) / 8
    elif encoding == "RABITQ":
        code = dim / 8 + 8  # a bit a dimension, and two float32 correction factors
    elif encoding.startswith("PQ"):
        code = int(encoding[2:].split("X")[0])
    else:
        code = 4 * dim
    return code + ID_BYTES


def choose_index_type(ntotal: int, dim: int, max_memory: int) -> str:
    """``index.type: auto``. ``max_memory`` bounds what a searcher holds in RAM, not the size of the index: Flat
    (exact) below ``FLAT_THRESHOLD`` vectors when it fits; above, IVF with ``nlist_for(N)`` lists (an HNSW coarse
    quantizer from 16,384 lists) and the least lossy code with which the whole index fits in ``max_memory`` (Flat:
    4 * dim bytes, SQ8: dim bytes, then PQ with the largest sub-quantizer count that divides dim). When none fits,
    the index is served from disk (searchers memory-map it and hold the lists they probe): PQ with about dim / 8
    sub-quantizers (one byte per 8 dimensions). Only a coarse quantizer larger than ``max_memory`` is refused."""
    if ntotal <= FLAT_THRESHOLD and ntotal * bytes_per_vector("Flat", dim) <= max_memory:
        return "Flat"
    nlist = nlist_for(ntotal)
    coarse = f"IVF{nlist}_HNSW32" if nlist >= 16_384 else f"IVF{nlist}"
    quantizer = nlist * (4 * dim + (2 * 32 * 4 if nlist >= 16_384 else 0))  # centroids (+ HNSW32 links)
    if quantizer > max_memory:
        raise IndexTypeError(
            f"the coarse quantizer of {coarse} ({nlist} centroids of dim {dim}, ~{quantizer} bytes) does not fit "
            f"index.max_memory = {max_memory} bytes, and every searcher holds it: raise index.max_memory"
        )
    codes = [m for m in PQ_CHOICES if dim % m == 0 and m < dim]
    for code in ["Flat", "SQ8"] + [f"PQ{m}" for m in codes]:
        if quantizer + ntotal * bytes_per_vector(code, dim) <= max_memory:
            return f"{coarse},{code}"
    on_disk = next((m for m in codes if m <= max(1, dim // 8)), min(codes, default=0))
    if not on_disk:
        raise IndexTypeError(f"no PQ code divides dim {dim}: set index.type (e.g. {coarse},SQ8)")
    log.info(
        "index.type auto: %d vectors of dim %d do not fit index.max_memory = %d bytes with any code; %s,PQ%d is "
        "served from disk (memory-mapped)",
        ntotal,
        dim,
        max_memory,
        coarse,
        on_disk,
    )
    return f"{coarse},PQ{on_disk}"


def ivf_lists(factory: str) -> int:
    """The number of IVF lists a factory string asks for (``IVF1024,...`` -> 1024), 0 when it is not IVF."""
    match = re.search(r"IVF(\d+)", factory)
    return int(match.group(1)) if match else 0


def new_index(factory: str, dim: int, metric: str) -> faiss.Index:
    try:
        return faiss.index_factory(dim, storage_factory(factory), faiss_metric(metric))
    except RuntimeError as exc:
        raise IndexTypeError(
            f"index.type = {factory!r} is not a FAISS factory string FAISS can build for "
            f"dim {dim}: {str(exc).strip().splitlines()[-1]}"
        ) from None


def default_train_size(factory: str, dim: int, ntotal: int) -> int:
    """Training points: 64 per IVF list (FAISS asks for 39..256), at least 10,000 for SQ/PQ codes; at most N.
    0 for types that need no training (Flat, HNSW with flat storage)."""
    if not needs_training(factory, dim):
        return 0
    wanted = 10_000
    ivf = _ivf_or_none(new_index(factory, dim, "ip"))
    if ivf is not None:
        wanted = max(wanted, 64 * ivf.nlist)
    return min(wanted, ntotal)


def needs_training(factory: str, dim: int) -> bool:
    return not new_index(factory, dim, "ip").is_trained


def train(factory: str, dim: int, metric: str, sample: np.ndarray, seed: int = 0, gpus: bool = False) -> faiss.Index:
    """An empty index of ``factory``, trained on ``sample`` (n x dim float32) when the type needs training; with
    ``gpus`` the k-means of an IVF type runs on the node's GPUs (see ``index.gpu``)."""
    index = new_index(factory, dim, metric)
    if not index.is_trained:
        if len(sample) == 0:
            raise IndexTypeError(f"index.type = {factory!r} needs training vectors and none were given")
        _seed_clustering(index, seed)
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if gpus and _ivf_or_none(index) is not None:
            gpu.train_ivf(index, sample)
        else:
            index.train(sample)
    return index


def _seed_clustering(index: faiss.Index, seed: int) -> None:
    ivf = _ivf_or_none(index)
    if ivf is not None:
        ivf.cp.seed = 1234 + seed


def _ivf_or_none(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def add(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, gpus: bool = False) -> None:
    """Add vectors (n x dim float32) under their global ids (n int64); with ``gpus`` an IVF index with a flat
    coarse quantizer assigns them to their lists on the node's GPUs (see ``index.gpu``)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if gpus and gpu.can_assign(index):
        gpu.add_assigned(index, vectors, ids, gpu.assign(index, vectors))
    else:
        index.add_with_ids(vectors, ids)


def merge(indexes) -> faiss.Index:
    """Merge shard indexes (an iterable, consumed one at a time, in shard order) into the first one."""
    merged = None
    for index in indexes:
        if merged is None:
            merged = index
        else:
            merged.merge_from(index, 0)
    if merged is None:
        raise ValueError("no shard indexes to merge")
    return merged


def coarse_distance(index: faiss.Index, vectors: np.ndarray) -> float | None:
    """Mean distance (squared L2, the k-means objective) of ``vectors`` to their nearest IVF centroid; None for
    types without a coarse quantizer. Compared between training time and later data, it measures drift."""
    ivf = _ivf_or_none(index)
    if ivf is None or len(vectors) == 0:
        return None
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexPreTransform):  # the centroids live in the transformed space
        chain: Any = outer.chain  # a FAISS vector of transforms
        for step in range(chain.size()):
            vectors = chain.at(step).apply_py(vectors)
    distances, _ = faiss.knn(vectors, centroids, 1)
    return float(distances.mean())


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def serialize_array(index: faiss.Index) -> np.ndarray:
    """The serialized index as a uint8 array (no bytes copy; pass ``memoryview`` of it to writers)."""
    return faiss.serialize_index(index)


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def set_search_parameters(index: faiss.Index, nprobe: int = 0, ef_search: int = 0) -> None:
    """Apply nprobe (IVF) and efSearch (HNSW) where the index has them; 0 leaves a parameter as it is."""
    ivf = _ivf_or_none(index)
    if ivf is not None and nprobe:
        ivf.nprobe = int(nprobe)
    hnsw = _hnsw_or_none(index)
    if hnsw is not None and ef_search:
        hnsw.hnsw.efSearch = int(ef_search)


def _hnsw_or_none(index: faiss.Index):
    inner = faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else index
    return inner if hasattr(inner, "hnsw") else None


def search(index: faiss.Index, queries: np.ndarray, k: int, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (n x k), best first; ids are global row ids, -1 where fewer than k results exist.
    Scores are inner products for ``ip`` and squared L2 distances for ``l2``."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or (len(queries) and queries.shape[1] != index.d):
        raise ValueError(
            f"query vectors of shape {queries.shape} for an index of {index.d}-dimensional vectors: "
            f"queries must be encoded as the index's documents were"
        )
    parts = [index.search(queries[i : i + batch_size], k) for i in range(0, len(queries), batch_size)]
    if not parts:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.vstack([p[0] for p in parts]), np.vstack([p[1] for p in parts])


def tunable_parameter(index: faiss.Index) -> str | None:
    """'nprobe' for IVF, 'ef_search' for HNSW, None for exact or flat-code indexes."""
    if _ivf_or_none(index) is not None:
        return "nprobe"
    if _hnsw_or_none(index) is not None:
        return "ef_search"
    return None


def candidate_values(index: faiss.Index, parameter: str) -> list[int]:
    """Increasing values to try: powers of two up to nlist (nprobe), or 16..4096 (efSearch)."""
    if parameter == "nprobe":
        nlist = faiss.extract_index_ivf(index).nlist
        return sorted({min(2**i, nlist) for i in range(0, int(math.log2(nlist)) + 2)})
    return [2**i for i in range(4, 13)]
