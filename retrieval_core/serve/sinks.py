"""What a serving store must offer to be kept in step with the published versions: a small class.

A sink stores one vector per document, keyed by ``doc_id``. The sync (:mod:`retrieval_core.serve.syncing`) decides
what to send; a sink only writes batches and says which version it holds. To add a store, subclass :class:`Sink`,
implement its abstract methods, and add it to :func:`retrieval_core.serve.stores.open_sink`; the sync's guarantees
(idempotent steps, resumed after a crash, rollbacks) then hold for it too.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from typing import Callable, Iterable, TypeVar

import numpy as np
import pyarrow as pa

log = logging.getLogger("retrieval_core.serve")
T = TypeVar("T")


class Sink(ABC):
    """A serving store. ``spec``: the sink's entry of ``serve.sinks`` with its defaults
    (:func:`retrieval_core.config.sinks.sink_specs`); ``dim``: the vectors' dimension; ``normalized``: whether they
    are unit vectors (the store's distance follows)."""

    def __init__(self, spec: dict, dim: int, normalized: bool, max_retries: int = 6):
        self.spec, self.name, self.dim, self.normalized = spec, spec["name"], dim, normalized
        self.max_retries = max_retries

    @abstractmethod
    def holds(self) -> str | None:
        """The version the store records that it holds, or None (empty, missing, or no record)."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether the table or collection exists (a missing one is loaded whole)."""

    @abstractmethod
    def upsert(self, doc_ids: list[str], vectors: np.ndarray) -> None:
        """Insert or replace the documents' vectors (float32, one row per doc id)."""

    @abstractmethod
    def delete(self, doc_ids: list[str]) -> None:
        """Remove the documents; ids the store lacks are ignored."""

    def upsert_all(self, batches: Iterable[tuple[list[str], np.ndarray]]) -> None:
        """Every batch upserted; a store that takes a stream in one request (one commit) overrides this."""
        for doc_ids, vectors in batches:
            self.upsert(doc_ids, vectors)

    def delete_all(self, batches: Iterable[list[str]]) -> None:
        """Every batch of ids deleted; a store that takes a stream in one request overrides this."""
        for doc_ids in batches:
            self.delete(doc_ids)

    @abstractmethod
    def replace(self, version: str, batches: Iterable[tuple[list[str], np.ndarray]]) -> None:
        """Make the store hold exactly ``batches`` (the whole of ``version``), recorded as ``version``; readers see
        the old content until the new one is complete where the store allows it."""

    @abstractmethod
    def mark(self, version: str) -> None:
        """Record in the store that it now holds ``version`` (after an in-place step)."""

    def where(self) -> str:
        """The store this sink writes (its URL and table or collection), recorded beside the version it holds."""
        return store_of(self.spec)

    def can_restore(self, version: str) -> bool:
        """Whether the store keeps ``version`` in its own history (then :meth:`restore` replaces replaying)."""
        return False

    def restore(self, version: str) -> bool:
        """Bring the store back to ``version`` from its own history, if it keeps one; False when it cannot."""
        return False

    def forget(self, kept: set[str]) -> None:
        """Drop what the store keeps of versions no longer under the output root (``kept``: those that are)."""
        return None

    def stats(self) -> dict:
        """What the store says of itself for the sync's record (rows, its own version)."""
        return {}

    def close(self) -> None:
        """Release connections."""
        return None

    def retried(self, what: str, call: Callable[[], T], retryable: Callable[[BaseException], bool]) -> T:
        """``call()``, retried with exponential back-off from 0.5 s (at most ``max_retries`` times) while it
        fails with an error ``retryable`` accepts (a rate limit, a server error, a broken connection)."""
        for attempt in range(self.max_retries + 1):
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - sorted by retryable()
                if attempt == self.max_retries or not retryable(exc):
                    raise
                delay = 0.5 * 2**attempt
                log.warning("sink %s: %s failed (%s); retry %d in %.1f s", self.name, what, exc, attempt + 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


def store_of(spec: dict) -> str:
    """The store a ``serve.sinks`` entry names: its URL and its table or collection (never its credentials)."""
    keys = ("uri", "table") if spec["kind"] == "lance" else ("url", "collection")
    return " ".join(str(spec[k]) for k in keys)


def vectors_of(table: pa.Table | pa.RecordBatch, column: str = "embedding") -> np.ndarray:
    """The float32 matrix of a list<float> column (float16 embeddings widened)."""
    values = table.column(column)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    flat = values.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(len(table), -1)
