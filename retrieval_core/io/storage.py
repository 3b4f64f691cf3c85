"""Storage through fsspec: any URL (local path, ``file://``, ``memory://``, ``s3://`` ...).

Writes are atomic for readers. On file systems a file is written under a temporary name and renamed into place.
On object stores (``s3://``, ``gs://``, ``abfs://`` ..., and ``memory://``), where a rename is a copy plus a delete,
the final object is written with one PUT (a multipart upload for very large ones), which appears whole or not at
all. Either way a stage writes its data first and its commit record or manifest last.

Object-store file systems cache directory listings (s3fs) and fsspec reuses file system instances, so a listing
made earlier in this process can miss (or show the old size of) what other processes wrote since.
:func:`filesystem` forgets the cached listings of the path it is given, its parents and everything under it, so
every helper here checks and reads what is there now.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import posixpath
import re
import socket
import uuid
from typing import Any, Iterable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from retrieval_core.io import faults

TMP_MARK = ".tmp-"
# Protocols whose objects are written whole by one request: no temporary name, no rename (a copy there).
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "memory"})


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``url`` and the path inside it, with no stale cached listing of that path."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    forget_listings(fs, path)
    return fs, path


def forget_listings(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Drop the cached directory listings of ``path``, of its parents and of everything under it (s3fs keeps them
    per file system instance, and fsspec shares instances within a process)."""
    fs.invalidate_cache(path)
    cache = getattr(fs, "dircache", None)
    if cache:
        prefix = path.rstrip("/") + "/"
        for key in [k for k in list(cache) if k.startswith(prefix)]:
            cache.pop(key, None)


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    """True for object stores (and ``memory://``), where an object is written whole and a rename is a copy."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool(OBJECT_STORE_PROTOCOLS.intersection(protocols))


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The inverse of :func:`filesystem`: plain paths for the local disk, full URLs elsewhere."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts)


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def temporary_name(path: str) -> str:
    """A name beside ``path`` for writing it before the rename: host, pid and a random part, so that writers on
    different hosts sharing a file system never collide (a pid alone repeats across hosts)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())
    return f"{path}{TMP_MARK}{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def write_bytes_atomic(url: str, data: bytes | memoryview, storage_options: dict | None = None) -> None:
    """Write ``data`` so that readers see the whole of it or nothing: one PUT on object stores (never creating a
    bucket), a temporary name renamed into place on file systems."""
    fs, path = filesystem(url, storage_options)
    if is_object_store(fs):
        faults.point("write", url)
        with naming(url, "write"):  # e.g. no such bucket, or 500s past the retries
            _write_object(fs, path, data, "wb")
        return
    with open_atomic(url, storage_options) as handle:
        handle.write(data)


STREAMED_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az"})  # multipart uploads that abort


@contextlib.contextmanager
def open_atomic(url: str, storage_options: dict | None = None):
    """A binary file to write ``url`` through, streaming, that readers see whole or not at all: on file systems a
    temporary name renamed into place on success; on S3, GCS and Azure a multipart upload, sent block by block as
    it is written (nothing passes through this machine's disk), which appears when completed and is aborted on an
    error; on other object stores a local temporary file uploaded on success. An error inside leaves nothing behind
    (a crash may leave a temporary, which reruns remove, or an unfinished upload, which a bucket lifecycle rule for
    incomplete multipart uploads removes)."""
    import tempfile

    fs, path = filesystem(url, storage_options)
    remote = is_object_store(fs)
    if remote and set(_protocols(fs)) & STREAMED_PROTOCOLS:
        with _streamed_upload(fs, path, url) as handle:
            yield handle
        return
    if remote:
        handle = tempfile.NamedTemporaryFile(prefix="upload-", suffix=TMP_MARK.strip("-"))
        tmp = handle.name
    else:
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = temporary_name(path)
        handle = fs.open(tmp, "wb")
    try:
        with handle:
            yield handle
            handle.flush()
            faults.point("write", url)
            if remote:
                with naming(url, "write"):
                    fs.put_file(tmp, path)
        if not remote:
            fs.mv(tmp, path)
    except Exception:  # a failed write (a full disk, say) leaves nothing behind; a crash leaves a temporary
        if not remote:
            with contextlib.suppress(OSError):
                fs.rm(tmp)
        raise


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


@contextlib.contextmanager
def _streamed_upload(fs: fsspec.AbstractFileSystem, path: str, url: str):
    """A file whose blocks are uploaded as they fill; completed on leaving, discarded (aborted) on an error."""
    with naming(url, "write"):
        handle = fs.open(path, "wb")
    try:
        yield handle
        faults.point("write", url)
        with naming(url, "write"):
            handle.close()
    except BaseException:
        _discard(handle)
        raise


def _discard(handle) -> None:
    """Abort a file being uploaded (S3: its multipart upload), so that no part of it appears."""
    discard = getattr(handle, "discard", None)
    if discard is not None:
        with contextlib.suppress(Exception):
            discard()
            handle.closed = True  # discarded: closing it again (when collected) must not upload anything


def _write_object(fs: fsspec.AbstractFileSystem, path: str, data: bytes | memoryview, mode: str) -> None:
    """One object written whole: one PUT when closed, or a multipart upload above the block size. A failure on the
    way discards the upload (S3 aborts the multipart upload, so no parts are left billed and no partial object
    appears): a file object's ``with`` block would instead complete it with the parts sent so far."""
    handle = fs.open(path, mode)
    try:
        handle.write(data)
        handle.close()
    except BaseException:
        _discard(handle)
        raise


def create_exclusive(url: str, data: bytes, storage_options: dict | None = None) -> bool | None:
    """Create ``url`` holding ``data`` only if it is absent (it appears whole): True when created, False when it
    exists, None when the store cannot create conditionally (the caller then needs another way)."""
    fs, path = filesystem(url, storage_options)
    local = local_path(url, storage_options)
    if local is not None:
        return _create_local_exclusive(local, data)
    try:
        _write_object(fs, path, data, "xb")  # S3: a PUT with If-None-Match: *
        return True
    except FileExistsError:
        return False
    except (NotImplementedError, ValueError):  # no exclusive mode in this file system
        return None
    except OSError as exc:
        if exc.errno == errno.ENOSYS:  # the store rejects the condition (501 NotImplemented)
            return None
        if exc.errno in (errno.EBUSY, errno.EINVAL):  # 409 (another conditional PUT in flight), or a 412 that a
            return False  # store sent without saying which condition: both lost
        raise


def _create_local_exclusive(path: str, data: bytes) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = temporary_name(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
    try:
        os.link(tmp, path)  # fails when the path exists, like O_EXCL, but readers never see a half-written file
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: plain O_EXCL
        try:
            with open(path, "xb") as handle:
                handle.write(data)
            return True
        except FileExistsError:
            return False
    finally:
        os.remove(tmp)


@contextlib.contextmanager
def naming(url: str, doing: str):
    """Within: an OSError that does not name ``url`` is raised again (same type and errno) naming it."""
    try:
        yield
    except OSError as exc:
        if url in str(exc) or fsspec.core.strip_protocol(url) in str(exc):
            raise
        message = f"cannot {doing} '{url}': {exc.strerror or exc}"
        try:
            named = type(exc)(exc.errno, message) if exc.errno is not None else type(exc)(message)
        except TypeError:  # an OSError subclass with a constructor of its own
            named = OSError(exc.errno, message)
        raise named from exc


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    with naming(url, "read"), fs.open(path, "rb") as handle:
        return handle.read()


READ_THREADS = 16  # concurrent small reads (commit records, headers): on object storage each is a round trip


def read_range(url: str, start: int, stop: int, storage_options: dict | None = None) -> bytes:
    """Bytes ``[start, stop)`` of a file (one ranged request on object storage)."""
    fs, path = filesystem(url, storage_options)
    with naming(url, "read"):
        return fs.cat_file(path, start, stop)


def read_json_many(urls: list[str], storage_options: dict | None = None) -> list[Any]:
    """The JSON documents at ``urls``, in their order, read ``READ_THREADS`` at a time."""
    return map_threads(lambda url: read_json(url, storage_options), urls)


def map_threads(function, items: list) -> list:
    """``function(item)`` for every item, ``READ_THREADS`` at a time (I/O bound work); results in item order."""
    if len(items) < 2:
        return [function(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(READ_THREADS, len(items))) as pool:
        return list(pool.map(function, items))


def local_path(url: str, storage_options: dict | None = None) -> str | None:
    """The path on the local disk when ``url`` is local (plain path or ``file://``), else None."""
    fs, path = filesystem(url, storage_options)
    return path if isinstance(fs, LocalFileSystem) else None


def local_file(url: str, storage_options: dict | None = None) -> str:
    """The path on the local disk of ``url``, which must be local (a plain path or ``file://``)."""
    path = local_path(url, storage_options)
    if path is None:
        raise ValueError(f"'{url}' is not on the local disk; this step needs a local path")
    return path


def write_json_atomic(url: str, obj: Any, storage_options: dict | None = None) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=2, sort_keys=True).encode(), storage_options)


def read_json(url: str, storage_options: dict | None = None) -> Any:
    return json.loads(read_bytes(url, storage_options))


def write_parquet_atomic(url: str, table: pa.Table, storage_options: dict | None = None) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    write_bytes_atomic(url, buffer.getvalue(), storage_options)


def concat_parquet_atomic(url: str, pieces: list[str], schema: pa.Schema, storage_options: dict | None = None) -> int:
    """Write the Parquet files ``pieces`` (cast to ``schema``) one after another into ``url``, streaming (one piece
    in memory at a time; see :func:`open_atomic`); returns the rows written."""
    rows = 0
    with parquet_writer_atomic(url, schema, storage_options, group_per_table=False) as write:
        for piece in pieces:
            table = read_parquet(piece, storage_options).cast(schema)
            write(table)
            rows += table.num_rows
    return rows


def read_parquet(url: str, storage_options: dict | None = None, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(url, storage_options)
    with naming(url, "read"), fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def write_parquet_by_value(url: str, table: pa.Table, column: str, storage_options: dict | None = None) -> None:
    """Write ``table`` sorted by the integer ``column``, one row group per value of it, so that a reader of one
    value (:func:`read_parquet_where`) reads that row group alone (atomic, see :func:`open_atomic`)."""
    table = table.sort_by(column)
    values = table.column(column).to_numpy()
    edges = [0, *(np.flatnonzero(np.diff(values)) + 1).tolist(), len(values)]
    with parquet_writer_atomic(url, table.schema, storage_options) as write_row_group:
        for start, stop in zip(edges, edges[1:]):
            write_row_group(table.slice(start, stop - start))


@contextlib.contextmanager
def parquet_writer_atomic(
    url: str,
    schema: pa.Schema,
    storage_options: dict | None = None,
    group_per_table: bool = True,
    statistics: bool = True,
):
    """A function writing each table it is given into the Parquet file ``url``, streaming: as one row group each
    (``group_per_table``), or in row groups of Parquet's default size. The file appears whole when the block ends
    (see :func:`open_atomic`). Without ``statistics`` no column's min and max are stored: a file of many row groups
    of long texts keeps a small footer, which every reader holds whole."""
    with open_atomic(url, storage_options) as out:
        with pq.ParquetWriter(out, schema, compression="zstd", write_statistics=statistics) as writer:
            if group_per_table:
                yield lambda table: writer.write_table(table, row_group_size=max(1, table.num_rows))
            else:
                yield writer.write_table


def read_parquet_where(url: str, column: str, value: int, storage_options: dict | None = None) -> pa.Table:
    """The rows of a Parquet file whose ``column`` equals ``value``, read from the row groups whose statistics may
    hold it (in a file written by :func:`write_parquet_by_value`, that value's row group alone); the other row
    groups are not read."""
    fs, path = filesystem(url, storage_options)
    with naming(url, "read"), fs.open(path, "rb") as handle:
        reader = pq.ParquetFile(handle)
        at = reader.schema_arrow.get_field_index(column)
        wanted = [
            i
            for i in range(reader.metadata.num_row_groups)
            if _may_hold(reader.metadata.row_group(i).column(at).statistics, value)
        ]
        table = reader.read_row_groups(wanted) if wanted else reader.schema_arrow.empty_table()
    return table.filter(pc.equal(table.column(column), value))


def _may_hold(statistics, value) -> bool:
    return statistics is None or not statistics.has_min_max or statistics.min <= value <= statistics.max


def remove(url: str, storage_options: dict | None = None) -> None:
    """Remove a file or a directory tree; nothing happens when it does not exist."""
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        with contextlib.suppress(FileNotFoundError):  # removed by another process in between
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


def upload_dir(local_dir: str, url: str, storage_options: dict | None = None) -> list[str]:
    """Copy the files under a local directory to ``url`` (same relative paths), one upload per file; on object
    stores no bucket or directory marker is created. Returns the relative paths, sorted."""
    fs, path = filesystem(url, storage_options)
    names = sorted(os.path.relpath(os.path.join(d, f), local_dir) for d, _, files in os.walk(local_dir) for f in files)
    for name in names:
        target = posixpath.join(path, name.replace(os.sep, "/"))
        if not is_object_store(fs):
            fs.makedirs(posixpath.dirname(target), exist_ok=True)
        fs.put_file(os.path.join(local_dir, name), target)
    return names


def list_names(url: str, storage_options: dict | None = None) -> list[str]:
    """Base names of the entries of a directory (empty when it does not exist)."""
    fs, path = filesystem(url, storage_options)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def expand_paths(
    paths: str | Iterable[str], suffixes: tuple[str, ...], storage_options: dict | None = None
) -> list[str]:
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


# ---------------------------------------------------------------------------------------------------- relative paths

# Protocols whose URLs hold a plain path (``memory://a/b`` is the path ``/a/b``); elsewhere the first component
# after ``://`` is a bucket or host that a relative path may not climb out of.
_PATH_PROTOCOLS = frozenset({"file", "local", "memory"})


def _split_url(url: str) -> tuple[str, str, str, str]:
    """(``proto://`` or '', fixed authority (bucket or host, '' when none), leading slashes, path below)."""
    if "://" not in url:
        lead = "/" if url.startswith("/") else ""
        return "", "", lead, url.lstrip("/")
    protocol, rest = url.split("://", 1)
    if protocol.lower() in _PATH_PROTOCOLS or rest.startswith("/"):
        lead = rest[: len(rest) - len(rest.lstrip("/"))]
        return f"{protocol}://", "", lead, rest.lstrip("/")
    authority, _, below = rest.partition("/")
    return f"{protocol}://", authority, "", below


def _normalize_below(below: str, where: str, can_climb: bool) -> str:
    """``below`` with ``.`` and ``..`` resolved; climbing above its start is an error unless ``can_climb``."""
    if not below:
        return ""
    normal = posixpath.normpath(below)
    if normal == ".":
        return ""
    if (normal == ".." or normal.startswith("../")) and not can_climb:
        raise ValueError(f"'{where}' climbs above the root of its URL")
    return normal


def resolve_relative(base_dir: str, relative: str) -> str:
    """``relative`` (which may hold ``..``) joined onto the directory ``base_dir`` (a URL or local path) and
    normalized, keeping the protocol and bucket: ``s3://b/r/v2/emb`` + ``../../v1/x`` -> ``s3://b/r/v1/x``.
    An absolute ``relative`` (a URL or, for local bases, an absolute path) is returned as it is."""
    if "://" in relative or (relative.startswith("/") and "://" not in base_dir):
        return relative
    if relative.startswith("/"):
        raise ValueError(f"'{relative}' is not relative (joined onto '{base_dir}')")
    prefix, authority, lead, below = _split_url(base_dir)
    joined = posixpath.join(below, relative) if below else relative
    relative_local = not prefix and not lead  # a relative local path may climb above where it starts
    normal = _normalize_below(joined, f"{base_dir} + {relative}", can_climb=relative_local)
    if authority:
        return f"{prefix}{authority}/{normal}" if normal else f"{prefix}{authority}"
    if relative_local:
        return normal or "."
    return f"{prefix}{lead}{normal}"


def relative_to(from_dir: str, target: str) -> str:
    """The relative path that :func:`resolve_relative` turns back into ``target`` from ``from_dir``; both must
    have the same protocol and bucket (both local paths: both absolute or both relative)."""
    from_prefix, from_authority, from_lead, from_below = _split_url(from_dir)
    to_prefix, to_authority, to_lead, to_below = _split_url(target)
    same = (
        from_prefix.lower() == to_prefix.lower()
        and from_authority == to_authority
        and (bool(from_lead) == bool(to_lead) or from_prefix.lower() == "memory://")
    )
    if not same:
        raise ValueError(
            f"'{target}' and '{from_dir}' are not on the same protocol and bucket: no relative path joins them"
        )
    start = _normalize_below(from_below, from_dir, can_climb=not from_prefix and not from_lead) or "."
    end = _normalize_below(to_below, target, can_climb=not to_prefix and not to_lead) or "."
    return posixpath.relpath(end, start)
