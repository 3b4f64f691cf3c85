"""The sink of a ``serve.sinks`` entry, by its kind: the one place that knows every kind of store (each store's
module imports :mod:`retrieval_core.serve.sinks`, never this one)."""

from __future__ import annotations

from retrieval_core.serve.sinks import Sink


def open_sink(spec: dict, dim: int, normalized: bool, max_retries: int = 6) -> Sink:
    """The sink of a ``serve.sinks`` entry; its client package is imported here (extras ``lance``, ``qdrant``)."""
    if spec["kind"] == "lance":
        from retrieval_core.serve.lance_sink import LanceSink

        return LanceSink(spec, dim, normalized, max_retries)
    if spec["kind"] == "qdrant":
        from retrieval_core.serve.qdrant_sink import QdrantSink

        return QdrantSink(spec, dim, normalized, max_retries)
    raise ValueError(f"sink {spec.get('name')!r}: unknown kind {spec.get('kind')!r}")
