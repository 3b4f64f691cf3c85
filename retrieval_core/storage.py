"""Storage through fsspec: any URL (local path, ``file://``, ``memory://``, ``s3://`` ...).

Writes are atomic for readers: a file is written under a temporary name and renamed into place, so a reader sees
the whole file or none. (On object stores the rename is a copy; the final object still appears whole.)
"""
from __future__ import annotations

import io
import json
import posixpath
import uuid
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

TMP_MARK = ".tmp-"


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``url`` and the path inside it."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The inverse of :func:`filesystem`: plain paths for the local disk, full URLs elsewhere."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts)


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
    fs.mv(tmp, path)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as handle:
        return handle.read()


def local_path(url: str, storage_options: dict | None = None) -> str | None:
    """The path on the local disk when ``url`` is local (plain path or ``file://``), else None."""
    fs, path = filesystem(url, storage_options)
    return path if isinstance(fs, LocalFileSystem) else None


def write_json_atomic(url: str, obj: Any, storage_options: dict | None = None) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=2, sort_keys=True).encode(), storage_options)


def read_json(url: str, storage_options: dict | None = None) -> Any:
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read())


def write_parquet_atomic(url: str, table: pa.Table, storage_options: dict | None = None) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    write_bytes_atomic(url, buffer.getvalue(), storage_options)


def read_parquet(url: str, storage_options: dict | None = None, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def remove(url: str, storage_options: dict | None = None) -> None:
    """Remove a file or a directory tree; nothing happens when it does not exist."""
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def remove_temporaries(url: str, storage_options: dict | None = None) -> int:
    """Delete half-written files (``*.tmp-*``) left in a directory by a killed writer; returns how many."""
    fs, path = filesystem(url, storage_options)
    if not fs.exists(path):
        return 0
    stale = [p for p in fs.ls(path, detail=False) if TMP_MARK in posixpath.basename(p)]
    for p in stale:
        fs.rm(p)
    return len(stale)


def list_names(url: str, storage_options: dict | None = None) -> list[str]:
    """Base names of the entries of a directory (empty when it does not exist)."""
    fs, path = filesystem(url, storage_options)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def expand_paths(paths: str | Iterable[str], suffixes: tuple[str, ...],
                 storage_options: dict | None = None) -> list[str]:
    """Files named by a path, directory, glob or list of them, sorted; an error names any that matches nothing.

    A directory contributes the files under it whose names end with one of ``suffixes``.
    """
    items = [paths] if isinstance(paths, str) else list(paths)
    found: list[str] = []
    for item in items:
        fs, path = filesystem(item, storage_options)
        if any(c in path for c in "*?["):
            matches = [p for p in fs.glob(path) if fs.isfile(p)]
        elif fs.isdir(path):
            matches = [p for p in fs.find(path) if p.endswith(suffixes) and not _hidden(p, path)]
        elif fs.isfile(path):
            matches = [path]
        else:
            raise FileNotFoundError(f"corpus path '{item}' does not exist")
        if not matches:
            raise FileNotFoundError(f"corpus path '{item}' matches no file (looked for {', '.join(suffixes)})")
        found.extend(to_url(fs, p) for p in sorted(matches))
    duplicates = {p for p in found if found.count(p) > 1}
    if duplicates:
        raise ValueError(f"corpus files listed more than once: {sorted(duplicates)[:5]}")
    return found


def _hidden(path: str, root: str) -> bool:
    relative = posixpath.relpath(path, root)
    return any(part.startswith((".", "_")) for part in relative.split("/"))
