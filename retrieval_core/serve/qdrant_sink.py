"""A Qdrant collection kept in step with the published versions (a server by URL, or the client's local mode:
``:memory:`` or a local path).

Each document is one point: id a stable UUID of its ``doc_id`` (:func:`point_id`), payload ``{"doc_id": ...}``.
The configured ``collection`` is an alias: a whole load fills a new collection ``<collection>--<version>--<n>``
(``parallel`` processes uploading, its graph built once the points are in) and moves the alias to it in one
request, so searches see the old points until the new set is complete, then the old collection is dropped.
In-place steps upsert and delete through the alias in batches, each request retried on a rate limit (429), a
server error (5xx) or a broken connection. The version the collection holds is in its metadata
(``retrieval_version``).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Iterable

import numpy as np

from retrieval_core.serve.sinks import Sink, log

NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "ray-retrieval-jobs/doc_id")
VERSION_KEY = "retrieval_version"
INDEXING_THRESHOLD = 20_000  # Qdrant's own default: KB of vectors a segment holds before its graph is built


def point_id(doc_id: str) -> str:
    """The point id of a document: the same UUID for the same ``doc_id``, in every run and on every machine."""
    return str(uuid.uuid5(NAMESPACE, doc_id))


class QdrantSink(Sink):
    def __init__(self, spec: dict, dim: int, normalized: bool, max_retries: int = 6):
        super().__init__(spec, dim, normalized, max_retries)
        from qdrant_client import QdrantClient, models

        self.models = models
        self.alias = spec["collection"]
        self.client = QdrantClient(**_client_args(spec))
        self.distance = {"auto": "DOT", "dot": "DOT", "cosine": "COSINE", "euclid": "EUCLID"}[spec["distance"]]

    def _target(self) -> str | None:
        """The collection the alias points at (None: no alias); a plain collection of that name is refused."""
        found = {a.alias_name: a.collection_name for a in self._call("list aliases", self.client.get_aliases).aliases}
        if self.alias in found:
            return found[self.alias]
        if self._call("check the collection", lambda: self.client.collection_exists(self.alias)):
            raise ValueError(
                f"sink {self.name}: {self.spec['url']} has a collection named {self.alias!r} that is not an alias; "
                f"this sink serves its points through an alias of that name (whole loads switch it): give the sink "
                f"another collection name, or remove that collection"
            )
        return None

    def exists(self) -> bool:
        return self._target() is not None

    def holds(self) -> str | None:
        target = self._target()
        if target is None:
            return None
        metadata = self._call("read the collection", lambda: self.client.get_collection(target)).config.metadata
        return (metadata or {}).get(VERSION_KEY)

    def upsert(self, doc_ids: list[str], vectors: np.ndarray) -> None:
        self._upsert(self.alias, doc_ids, vectors)

    def _upsert(self, collection: str, doc_ids: list[str], vectors: np.ndarray) -> None:
        batch = self.models.Batch(
            ids=[point_id(d) for d in doc_ids],
            vectors=np.asarray(vectors, dtype=np.float32).tolist(),
            payloads=[{"doc_id": d} for d in doc_ids],
        )
        self._call("upsert", lambda: self.client.upsert(collection, points=batch, wait=True))

    def delete(self, doc_ids: list[str]) -> None:
        if not doc_ids:
            return
        selector = self.models.PointIdsList(points=[point_id(d) for d in doc_ids])
        self._call("delete", lambda: self.client.delete(self.alias, points_selector=selector, wait=True))

    def replace(self, version: str, batches: Iterable[tuple[list[str], np.ndarray]]) -> None:
        old = self._target()
        self._drop_strays(old)
        new = f"{self.alias}--{version}--{time.time_ns()}"
        params = self.models.VectorParams(size=self.dim, distance=getattr(self.models.Distance, self.distance))
        bulk = self.models.OptimizersConfigDiff(indexing_threshold=0)  # no HNSW graph while the points stream in
        self._call(
            "create a collection",
            lambda: self.client.create_collection(new, vectors_config=params, optimizers_config=bulk),
        )
        points = (
            self.models.PointStruct(id=point_id(d), vector=v.tolist(), payload={"doc_id": d})
            for doc_ids, vectors in batches
            for d, v in zip(doc_ids, np.asarray(vectors, dtype=np.float32))
        )
        self.client.upload_points(  # its own retries, per request
            new,
            points,
            batch_size=self.spec["batch_size"],
            parallel=self.spec["parallel"],
            max_retries=self.max_retries,
            wait=True,
        )
        indexed = self.models.OptimizersConfigDiff(indexing_threshold=INDEXING_THRESHOLD)
        self._call("index the collection", lambda: self.client.update_collection(new, optimizers_config=indexed))
        self._set_version(new, version)
        changes: list = [
            self.models.CreateAliasOperation(
                create_alias=self.models.CreateAlias(collection_name=new, alias_name=self.alias)
            )
        ]
        if old is not None:
            changes.insert(
                0, self.models.DeleteAliasOperation(delete_alias=self.models.DeleteAlias(alias_name=self.alias))
            )
        self._call("move the alias", lambda: self.client.update_collection_aliases(change_aliases_operations=changes))
        if old is not None:
            self._call("drop the old collection", lambda: self.client.delete_collection(old))
        log.info("sink %s: alias %s now names %s (%s)", self.name, self.alias, new, version)

    def forget(self, kept: set[str]) -> None:
        self._drop_strays(self._target())

    def _drop_strays(self, serving: str | None) -> None:
        """Drop this sink's collections the alias does not name: a load killed half way, or an old collection
        whose drop failed after the alias moved."""
        names = [c.name for c in self._call("list collections", self.client.get_collections).collections]
        for name in names:
            if name.startswith(f"{self.alias}--") and name != serving:
                log.info("sink %s: dropping %s, which the alias %s does not name", self.name, name, self.alias)
                self._call("drop a stray collection", lambda name=name: self.client.delete_collection(name))

    def mark(self, version: str) -> None:
        target = self._target()
        if target is None:  # an empty version loaded into nothing: an empty collection
            self.replace(version, [])
            return
        self._set_version(target, version)

    def _set_version(self, collection: str, version: str) -> None:
        self._call(
            "record the version", lambda: self.client.update_collection(collection, metadata={VERSION_KEY: version})
        )

    def stats(self) -> dict:
        target = self._target()
        if target is None:
            return {"rows": 0}
        rows = self._call("count", lambda: self.client.count(target, exact=False)).count
        return {"rows": rows, "collection": target}

    def close(self) -> None:
        self.client.close()

    def _call(self, what: str, call):
        return self.retried(what, call, _retryable)


def _client_args(spec: dict) -> dict:
    url = spec["url"]
    if url == ":memory:":
        return {"location": ":memory:"}
    if "://" not in url:
        return {"path": url}
    args: dict = {"url": url}
    if spec.get("api_key_env"):
        key = os.environ.get(spec["api_key_env"], "")
        if not key:
            raise ValueError(
                f"sink {spec['name']}: api_key_env = {spec['api_key_env']!r}, which is not set in this environment"
            )
        args["api_key"] = key
    return args


def _retryable(exc: BaseException) -> bool:
    """A rate limit, a server error, or a connection that broke: worth another try."""
    status = getattr(exc, "status_code", None)
    if status is not None:
        return status == 429 or status >= 500
    name = type(exc).__name__
    return isinstance(exc, (ConnectionError, TimeoutError)) or name in (
        "ResponseHandlingException",
        "ConnectError",
        "ReadTimeout",
        "WriteTimeout",
        "RemoteProtocolError",
    )
