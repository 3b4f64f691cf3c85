"""The stage contract's places: a :class:`Folder` is a directory on any fsspec URL together with the storage options
that reach it (the ``(url, storage_options)`` pair no caller has to carry by hand), and a :class:`StageLayout` says
where one stage's files go under an output root.

Every stage lays its files out the same way::

    <root>/<name>/_plan.json            the run's identity and plan, written before any unit
    <root>/<name>/<unit>.parquet        a unit's data (a shard, a part ...)
    <root>/<name>/<records>/<unit>.json the unit's commit record, written after its data
    <root>/<name>/<manifest>            written last; its presence means the stage is complete
    <root>/rejects/<rejects>/<unit>.parquet  rows a unit did not take, with the reason (stages that reject rows)
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from retrieval_core.config import OutputConfig
from retrieval_core.io import storage


class NameSet:
    """A set of names held as sorted 64-bit hashes (BLAKE2b), 8 bytes a name: what a driver keeps of 100,000
    committed units. Two names sharing a hash (odds about 1 in 10^8 among a million names) would make one look
    committed; the stage's manifest then finds its record missing and says so."""

    def __init__(self, names: Iterable[str]):
        self.hashes = np.unique(np.fromiter((_name_hash(n) for n in names), dtype=np.uint64))

    def __contains__(self, name: object) -> bool:
        key = np.uint64(_name_hash(str(name)))
        at = int(np.searchsorted(self.hashes, key))
        return at < len(self.hashes) and self.hashes[at] == key

    def __len__(self) -> int:
        return len(self.hashes)


def _name_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


@dataclasses.dataclass(frozen=True)
class Folder:
    """A directory on any fsspec URL, with the storage options that reach it. Its writes are atomic for readers."""

    url: str
    storage_options: dict = dataclasses.field(default_factory=dict, repr=False)  # credentials: never in a repr

    def __init__(self, url: str, storage_options: dict | None = None):
        object.__setattr__(self, "url", url)
        object.__setattr__(self, "storage_options", {} if storage_options is None else storage_options)

    @classmethod
    def output(cls, output: OutputConfig) -> Folder:
        """The output root of a run (``cfg.output``): where every stage writes, with its storage options."""
        return cls(output.root, output.storage_options)

    def join(self, *parts: str) -> str:
        """The URL of ``parts`` under this folder."""
        return storage.join(self.url, *parts)

    def sub(self, *parts: str) -> Folder:
        """The folder ``parts`` under this one, reached with the same storage options."""
        return Folder(self.join(*parts), self.storage_options)

    def exists(self, *parts: str) -> bool:
        return storage.exists(self.join(*parts) if parts else self.url, self.storage_options)

    def read_bytes(self, *parts: str) -> bytes:
        return storage.read_bytes(self.join(*parts), self.storage_options)

    def write_bytes(self, data: bytes | memoryview, *parts: str) -> None:
        storage.write_bytes_atomic(self.join(*parts), data, self.storage_options)

    def read_json(self, *parts: str) -> Any:
        return storage.read_json(self.join(*parts), self.storage_options)

    def write_json(self, obj: Any, *parts: str) -> None:
        storage.write_json_atomic(self.join(*parts), obj, self.storage_options)

    def read_parquet(self, *parts: str, columns: list[str] | None = None) -> pa.Table:
        return storage.read_parquet(self.join(*parts), self.storage_options, columns)

    def write_parquet(self, table: pa.Table, *parts: str) -> None:
        storage.write_parquet_atomic(self.join(*parts), table, self.storage_options)

    def open_atomic(self, *parts: str):
        """A binary file handle whose content appears at ``parts`` whole, when the block ends without an error."""
        return storage.open_atomic(self.join(*parts), self.storage_options)

    def list_names(self, *parts: str) -> list[str]:
        return storage.list_names(self.join(*parts) if parts else self.url, self.storage_options)


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """Where one stage's files go: ``<root>/<name>/`` (see the module's docstring for the shape every stage shares).

    ``unit`` prefixes numbered units (``part-`` gives ``part-00000``); units named by the stage (a shard's name)
    are used as they are. ``rejects`` names the stage's folder under ``<root>/rejects/`` ('' for none)."""

    root: str
    name: str
    storage_options: dict = dataclasses.field(default_factory=dict, repr=False)  # credentials: never in a repr
    records: str = "_shards"
    manifest_name: str = "_manifest.json"
    unit: str = ""
    rejects: str = ""

    @property
    def folder(self) -> Folder:
        return Folder(self.dir, self.storage_options)

    @property
    def dir(self) -> str:
        return storage.join(self.root, self.name)

    def file(self, *parts: str) -> str:
        return storage.join(self.dir, *parts)

    @property
    def plan(self) -> str:
        return self.file("_plan.json")

    @property
    def manifest(self) -> str:
        return self.file(self.manifest_name)

    @property
    def records_dir(self) -> str:
        return self.file(self.records)

    def unit_name(self, unit: str | int) -> str:
        """A unit's name: a number with the stage's prefix (``part-00042``), or the name the stage gave it."""
        return unit if isinstance(unit, str) else f"{self.unit}{unit:05d}"

    def data_file(self, unit: str | int, suffix: str = ".parquet") -> str:
        return self.file(self.unit_name(unit) + suffix)

    def record_file(self, unit: str | int) -> str:
        return storage.join(self.records_dir, self.unit_name(unit) + ".json")

    def committed_names(self) -> list[str]:
        """Names of the units with a commit record: one listing of the records folder, not a request per unit."""
        names = storage.list_names(self.records_dir, self.storage_options)
        return [name[:-5] for name in names if name.endswith(".json") and storage.TMP_MARK not in name]

    def committed_set(self) -> NameSet:
        """:meth:`committed_names` as a :class:`NameSet`: 8 bytes a unit, for a driver checking which are done."""
        return NameSet(self.committed_names())

    @property
    def rejects_dir(self) -> str:
        if not self.rejects:
            raise ValueError(f"the stage writing {self.dir} keeps no rejects")
        return storage.join(self.root, "rejects", self.rejects)

    def rejects_file(self, unit: str | int) -> str:
        return storage.join(self.rejects_dir, self.unit_name(unit) + ".parquet")
