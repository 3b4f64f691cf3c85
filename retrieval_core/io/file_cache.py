"""This node's copies of files, shared by its processes: a file on object storage (a merged index memory-mapped by
every searcher of the node is downloaded once), and a compressed corpus file decompressed (so that the pieces of a
gzip JSONL file are read by seeking, not by decompressing it from its start for each)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import posixpath
import shutil

from retrieval_core.io import storage

CACHE_COPIES_KEPT = 3  # versions of one URL kept in the file cache (merged.faiss of the last versions used)
LOCKS = ".locks"  # the cache's folder of lock files


def cache_dir() -> str:
    """``$RETRIEVAL_FILE_CACHE``, default ``~/.cache/ray-retrieval-jobs/files`` (made when missing)."""
    cache = os.environ.get("RETRIEVAL_FILE_CACHE") or os.path.expanduser("~/.cache/ray-retrieval-jobs/files")
    os.makedirs(cache, exist_ok=True)
    return cache


def local_copy(url: str, storage_options: dict | None = None) -> str:
    """A path on this machine's disk holding ``url``: the file itself when local, else one copy per machine under
    :func:`cache_dir`, downloaded once and shared by every process of the node (they wait on a file lock while the
    first downloads). The copy is named by the URL, size and ETag (or modification time), so a rewritten file is
    fetched again; of the versions of one URL, the ``CACHE_COPIES_KEPT`` used last are kept (a process mapping a
    removed one reads on until it closes it)."""
    local = storage.local_path(url, storage_options)
    if local:
        return local
    fs, path = storage.filesystem(url, storage_options)
    return _cached(url, storage_options, "", lambda tmp: fs.get_file(path, tmp), posixpath.basename(path))


def decompressed_copy(url: str, storage_options: dict | None = None) -> str:
    """A path on this machine's disk holding ``url`` (gzip, bz2, xz, zstd ...: what fsspec infers from the name)
    decompressed: made once per machine in :func:`cache_dir`, as :func:`local_copy` makes its copies, and shared by
    the node's processes. Costs the file's uncompressed size on each node's disk that reads it; of one URL's
    versions (a file rewritten in place), the ``CACHE_COPIES_KEPT`` used last are kept."""
    fs, path = storage.filesystem(url, storage_options)

    def decompress(tmp: str) -> None:
        with fs.open(path, "rb", compression="infer") as source, open(tmp, "wb") as target:
            shutil.copyfileobj(source, target, 2**20)

    return _cached(url, storage_options, ".plain", decompress, url)


def _cached(url: str, storage_options: dict | None, suffix: str, make, group: str) -> str:
    """The cache's copy of ``url`` (``make(path)`` writes it once). Copies form groups (the copies of one file name,
    or of one URL): of a group, the ``CACHE_COPIES_KEPT`` used last are kept, and every step on a group's copies
    (making one, marking it used, evicting the others) happens under the group's lock, so no process removes a copy
    another is checking or making. A copy is named by its group's hash, then its URL and version's (size and ETag or
    modification time)."""
    fs, path = storage.filesystem(url, storage_options)
    with storage.naming(url, "read"):
        info = fs.info(path)
    version = f"{info.get('size')}|{info.get('ETag') or info.get('mtime') or info.get('LastModified')}"
    cache, key = cache_dir(), _digest(group + "|" + suffix)
    target = os.path.join(cache, f"{key}-{_digest(url + '|' + version)}-{posixpath.basename(path)}{suffix}")
    with locked(key):
        _make_once(target, make, url)
        os.utime(target)  # used now
        _evict(cache, key)
    return target


@contextlib.contextmanager
def locked(name: str):
    """The node's exclusive lock ``name`` (a file under the cache's lock folder, kept: empty, one a name) for the
    block: processes of the node wait on it in turn."""
    folder = os.path.join(cache_dir(), LOCKS)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def made_once(name: str, make) -> str:
    """The cache's file ``name`` (``make(path)`` writes it), made by one process of the node, under a lock of its
    own, and kept: what is built once per node (an exported model)."""
    target = os.path.join(cache_dir(), name)
    with locked(_digest(name)):
        _make_once(target, make, target)
    return target


def _make_once(target: str, make, what: str) -> None:
    if os.path.exists(target):
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = storage.temporary_name(target)
    try:
        with storage.naming(what, "read"):
            make(tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _evict(cache: str, key: str) -> None:
    """Remove the copies of the group hashed to ``key`` beyond the ``CACHE_COPIES_KEPT`` used last (under its
    lock)."""
    copies = [
        os.path.join(cache, f) for f in os.listdir(cache) if f.startswith(key + "-") and storage.TMP_MARK not in f
    ]
    for old in sorted(copies, key=os.path.getmtime, reverse=True)[CACHE_COPIES_KEPT:]:
        with contextlib.suppress(OSError):
            os.remove(old)
