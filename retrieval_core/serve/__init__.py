"""Serving stores kept in step with the published versions.

``sinks`` is the interface a store implements (:class:`~retrieval_core.serve.sinks.Sink`); ``lance_sink`` and
``qdrant_sink`` are the two stores; ``stores`` opens the one a ``serve.sinks`` entry names; ``syncing`` plans and
runs a store's way from the version it holds to ``CURRENT`` (apply, undo, restore, load) and keeps its record.
Reads: ``<root>/versions/<name>/`` (change files, embeddings, ``refresh.json``). Writes: the stores and
``<root>/sinks/<name>.json``.
"""
