"""FAISS on the node's GPUs, where a GPU build of FAISS (the ``[gpu]`` extra) and a GPU are present.

``index.gpu``: ``auto`` (the default) uses them when both are there, ``true`` requires them (an error names the
extra otherwise), ``false`` never uses them. On GPUs, with results equal to the CPU's within FAISS's own tolerance
(float sums in another order; ties may swap):

- training: the k-means of an IVF index's coarse quantizer runs on every GPU of the node (its assignment step, the
  bulk of the work), and the trained index is the CPU index it always is;
- adding: the vectors of a shard are assigned to their IVF lists by the centroids on the GPUs (for a flat coarse
  quantizer: an HNSW quantizer assigns approximately, so it stays on the CPU), then encoded into the lists on the
  CPU exactly as FAISS's own add does;
- exact search (the recall measurement, and exact k-NN of a Flat index's shards): brute force on a GPU.

Searchers keep the memory-mapped merged index on the CPU: a GPU holds a copy of what it searches, and the point of
mapping the index is that no process holds all of it. Without a GPU every function here does what the CPU path does.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import faiss
import numpy as np

log = logging.getLogger(__name__)
SETTINGS = ("auto", "true", "false")


def gpu_count() -> int:
    """GPUs FAISS can use here: 0 without a GPU build of FAISS or without a GPU."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def wanted(setting: str) -> bool:
    """Whether to use GPUs under ``index.gpu`` = ``setting``; ``true`` without them is an error naming the fix."""
    count = gpu_count()
    if setting == "true" and not count:
        built = hasattr(faiss, "StandardGpuResources")
        raise RuntimeError(
            "index.gpu = true, but "
            + (
                "FAISS sees no GPU on this node"
                if built
                else "this FAISS is a CPU build: install the [gpu] extra (faiss-gpu of the same release as "
                "faiss-cpu: pip install 'ray-retrieval-jobs[gpu]')"
            )
        )
    return setting != "false" and count > 0


@functools.lru_cache(maxsize=1)
def _resources() -> list:
    return [faiss.StandardGpuResources() for _ in range(gpu_count())]


def _on_gpus(index: faiss.Index) -> faiss.Index:
    """A copy of a flat index on every GPU of the node, the vectors sharded over them."""
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    return faiss.index_cpu_to_all_gpus(index, co=options)


def train_ivf(index: faiss.Index, sample: np.ndarray) -> None:
    """Train ``index`` (an IVF index, possibly behind a transform) with its k-means on the GPUs."""
    ivf: Any = faiss.extract_index_ivf(index)
    ivf.clustering_index = _on_gpus(faiss.IndexFlatL2(ivf.d))
    index.train(sample)
    ivf.clustering_index = None


def can_assign(index: faiss.Index) -> bool:
    """An IVF index (no transform in front) whose coarse quantizer is flat: its exact assignment moves to a GPU."""
    plain = faiss.downcast_index(index)
    return isinstance(plain, faiss.IndexIVF) and isinstance(faiss.downcast_index(plain.quantizer), faiss.IndexFlat)


def assign(index: faiss.Index, vectors: np.ndarray) -> np.ndarray:
    """The IVF list of each vector: its nearest centroid by the quantizer's metric, searched on the GPUs."""
    ivf: Any = faiss.downcast_index(index)
    centroids = faiss.downcast_index(ivf.quantizer)
    on_gpus = _on_gpus(centroids)
    _, lists = on_gpus.search(vectors, 1)
    return lists.ravel().astype(np.int64)


def add_assigned(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, lists: np.ndarray) -> None:
    """Add ``vectors`` under ``ids`` to IVF ``index`` in the given ``lists`` (as ``add_with_ids`` does after its own
    assignment): the codes are computed on the CPU."""
    ivf: Any = faiss.downcast_index(index)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    lists = np.ascontiguousarray(lists, dtype=np.int64)
    ivf.add_core(len(vectors), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(lists))


def knn(queries: np.ndarray, vectors: np.ndarray, k: int, metric: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``queries`` among ``vectors`` on the first GPU."""
    return faiss.knn_gpu(_resources()[0], queries, vectors, k, metric=metric)
