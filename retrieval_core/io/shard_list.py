"""A stage's list of shards, kept out of the processes that walk it.

The embeddings and index manifests name one entry per shard. At 100,000 shards those entries, as Python dicts,
are ~100 MB: the drivers held them whole. They now live in a Parquet table beside the manifest
(``_shard_list.parquet``, one row group per ``BATCH`` entries) that the manifest names with its count and digest,
and a :class:`ShardList` reads it a row group at a time: walking it holds one batch; ``shards[i]`` reads the row
group holding entry ``i`` (the last one read is kept). Manifests written before the table existed hold their
entries inline, as a JSON list, and read as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval_core.io import storage
from retrieval_core.io.folder import NameSet
from retrieval_core.io.schemas import IncompatibleOutputError

T = TypeVar("T")

SHARD_LIST_FILE = "_shard_list.parquet"
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # names become file names of later stages: none leads out
BATCH = 1000  # entries per row group of the table, and per read


class ShardList(Sequence):
    """The entries of a stage's shard table, read a row group at a time (a picklable reference: a task that gets
    one reads the table itself). Entries are dicts without the fields an entry did not have."""

    def __init__(self, url: str, storage_options: dict, count: int, digest: str, batch: int):
        self.url, self.storage_options, self.length, self.digest = url, storage_options, count, digest
        self.batch = batch  # entries per row group (all but the last)
        self._group: tuple[int, list[dict]] | None = None
        self._bounds: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.length))]
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"shard {index} of a list of {self.length} ({self.url})")
        number = index // self.batch
        if self._group is None or self._group[0] != number:
            self._group = (number, self._read_group(number))
        return self._group[1][index % self.batch]

    def __iter__(self) -> Iterator[dict]:
        for batch in self.batches():
            yield from batch

    def batches(self) -> Iterator[list[dict]]:
        """The entries, one row group (``batch`` entries) at a time, in order (the file opened once for the walk)."""
        with self._opened() as table:
            for number in range(-(-self.length // self.batch)):
                yield self._entries(table.read_row_group(number).to_pylist())

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(row_start, row_stop) of every entry as arrays, read once and kept (16 bytes an entry): what a row
        lookup bisects on every call."""
        if self._bounds is None:
            with self._opened() as table:
                columns = table.read(columns=["row_start", "row_stop"])
            starts, stops = (columns.column(c).to_numpy().astype(np.int64) for c in ("row_start", "row_stop"))
            self._bounds = (starts, stops)
        return self._bounds

    def _read_group(self, number: int) -> list[dict]:
        with self._opened() as table:
            return self._entries(table.read_row_group(number).to_pylist())

    @contextlib.contextmanager
    def _opened(self) -> Iterator[pq.ParquetFile]:
        """The table open for reading, once checked against the manifest (:meth:`_checked`)."""
        fs, path = storage.filesystem(self.url, self.storage_options)
        with storage.naming(self.url, "read"), fs.open(path, "rb") as handle:
            yield self._checked(pq.ParquetFile(handle))

    def _checked(self, table: pq.ParquetFile) -> pq.ParquetFile:
        """The table, if it is the one the manifest names: its entries and row groups as counted there."""
        meta = table.metadata
        if meta.num_rows != self.length or meta.num_row_groups != max(1, -(-self.length // self.batch)):
            raise IncompatibleOutputError(
                f"'{self.url}' holds {meta.num_rows} entries in {meta.num_row_groups} row groups, its manifest "
                f"{self.length} in groups of {self.batch}: the table was replaced after the manifest was written"
            )
        return table

    def _entries(self, rows: list[dict]) -> list[dict]:
        check_names(rows, self.url)
        return [{key: value for key, value in row.items() if value is not None} for row in rows]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_group": None, "_bounds": None}

    def __repr__(self) -> str:
        return f"ShardList({self.url!r}, {self.length} entries)"


def check_names(entries: Iterable[dict], where: str) -> None:
    """Shard names become file names of later stages (index shards, commit records): a name that could lead out of
    the output root (not letters, digits, '-' and '_') is refused, naming ``where`` it was read."""
    bad = [entry.get("name") for entry in entries if not SHARD_NAME.fullmatch(str(entry.get("name")))]
    if bad:
        raise IncompatibleOutputError(
            f"'{where}' names shards {bad[:3]} that are not shard names (letters, digits, '-' and '_'): it was not "
            f"written by these jobs"
        )


class NonEmpty(Sequence):
    """The entries of a shard list that hold rows (``rows`` > 0), counted once when made: the shards a later stage
    reads. Walking it walks the list; ``view[i]`` is direct when no entry is empty, else a walk."""

    def __init__(self, shards: Sequence[dict]):
        self.shards = shards
        self.length = sum(1 for entry in shards if entry["rows"] > 0)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict]:
        return (entry for entry in self.shards if entry["rows"] > 0)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return list(itertools.islice(self, *index.indices(self.length)))
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"shard {index} of {self.length} with rows")
        if self.length == len(self.shards):
            return self.shards[index]
        return next(itertools.islice(self, index, None))


@dataclasses.dataclass(frozen=True)
class Pending(Generic[T]):
    """The items of a plan that have no commit record yet, made on demand: a driver holds the plan, the committed
    names' hashes (8 bytes a unit) and these counts, not an item per unit."""

    items: Iterable[T]
    done: NameSet
    name_of: Callable[[T], str]
    count: int
    num_rows: int

    def __iter__(self) -> Iterator[T]:
        return (item for item in self.items if self.name_of(item) not in self.done)

    def __len__(self) -> int:
        return self.count


def pending(items: Iterable[T], done: NameSet, name_of: Callable[[T], str], rows_of: Callable[[T], int]) -> Pending:
    """The items of ``items`` whose name is not in ``done``, counted in one pass. ``items`` is walked again for the
    work, so it must be a collection (a plan, a shard list), not a one-pass iterator."""
    if iter(items) is items:
        raise TypeError("pending() walks its items twice: give it a collection, not an iterator")
    count = rows = 0
    for item in items:
        if name_of(item) not in done:
            count, rows = count + 1, rows + rows_of(item)
    return Pending(items, done, name_of, count, rows)


def write(url: str, entries: Iterable[dict], schema: pa.Schema, storage_options: dict | None = None) -> dict:
    """Write ``entries`` (consumed once) into the table at ``url``, ``BATCH`` per row group, streaming: this holds
    one batch. Returns what a manifest records of it: ``{"file", "count", "digest", "batch"}``. An entry with a
    field the schema lacks is an error (nothing is dropped on the way)."""
    fields, count, digest = set(schema.names), 0, hashlib.sha256()
    with storage.parquet_writer_atomic(url, schema, storage_options) as write_group:
        for batch in batched(entries, BATCH):
            extra = sorted({key for entry in batch for key in entry} - fields)
            if extra:
                raise ValueError(f"shard entries hold fields {extra} that the shard table of '{url}' lacks")
            for entry in batch:
                digest.update(json.dumps(entry, sort_keys=True).encode() + b"\n")
            write_group(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
        if not count:
            write_group(schema.empty_table())
    name = posixpath.basename(url.rstrip("/"))
    return {"file": name, "count": count, "digest": digest.hexdigest()[:32], "batch": BATCH}


def attach(manifest: dict, manifest_url: str, storage_options: dict | None = None) -> dict:
    """``manifest`` with its ``shards`` as a :class:`ShardList` when it names a shard table (``shard_list``); a
    manifest that holds its entries inline is returned as it is."""
    table = manifest.get("shard_list")
    if table is None or "shards" in manifest:
        return manifest
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", str(table.get("file"))) or ".." in str(table.get("file")):
        raise IncompatibleOutputError(f"'{manifest_url}' names a shard table {table.get('file')!r} outside its folder")
    url = storage.join(posixpath.dirname(manifest_url.rstrip("/")), table["file"])
    shards = ShardList(url, storage_options or {}, table["count"], table["digest"], table["batch"])
    return {**manifest, "shards": shards}


def row_bounds(shards: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(row_start, row_stop) of every entry of an embeddings shard list, as arrays (kept by a :class:`ShardList`)."""
    if isinstance(shards, ShardList):
        return shards.bounds()
    return tuple(np.array([s[key] for s in shards], dtype=np.int64) for key in ("row_start", "row_stop"))  # type: ignore[return-value]


def content_id(shards: Sequence[dict]) -> Any:
    """What stands for a shard list in a digest: a table's digest, or an inline list itself."""
    return shards.digest if isinstance(shards, ShardList) else list(shards)


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last may be shorter)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
