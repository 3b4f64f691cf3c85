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

CACHE_COPIES_KEPT = 3  # copies of one file name kept in the file cache (merged.faiss of the last versions used)
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
    fetched again; of the copies of one file name, the ``CACHE_COPIES_KEPT`` used last are kept (a process mapping
    a removed one reads on until it closes it)."""
    local = storage.local_path(url, storage_options)
    if local:
        return local
    fs, path = storage.filesystem(url, storage_options)
    return _cached(url, storage_options, "", lambda tmp: fs.get_file(path, tmp))


def decompressed_copy(url: str, storage_options: dict | None = None) -> str:
    """A path on this machine's disk holding ``url`` (gzip, bz2, xz, zstd ...: what fsspec infers from the name)
    decompressed: made once per machine in :func:`cache_dir`, as :func:`local_copy` makes its copies, and shared by
    the node's processes. Costs the file's uncompressed size on each node's disk that reads it."""
    fs, path = storage.filesystem(url, storage_options)

    def decompress(tmp: str) -> None:
        with fs.open(path, "rb", compression="infer") as source, open(tmp, "wb") as target:
            shutil.copyfileobj(source, target, 2**20)

    return _cached(url, storage_options, ".plain", decompress)


def _cached(url: str, storage_options: dict | None, suffix: str, make) -> str:
    """The cache's copy of ``url`` (``make(path)`` writes it once, under a lock of its own)."""
    fs, path = storage.filesystem(url, storage_options)
    with storage.naming(url, "read"):
        info = fs.info(path)
    stamp = f"{url}|{info.get('size')}|{info.get('ETag') or info.get('mtime') or info.get('LastModified')}"
    cache, name = cache_dir(), posixpath.basename(path) + suffix
    target = os.path.join(cache, hashlib.sha256(stamp.encode()).hexdigest()[:24] + "-" + name)
    os.makedirs(os.path.join(cache, LOCKS), exist_ok=True)
    with open(_lock_file(target), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(target):
            tmp = storage.temporary_name(target)
            try:
                with storage.naming(url, "read"):
                    make(tmp)
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
        os.utime(target)  # used now
        _evict(cache, name)
    return target


def _evict(cache: str, name: str) -> None:
    """Remove the copies of file ``name`` in ``cache`` beyond the ``CACHE_COPIES_KEPT`` used last."""
    copies = [os.path.join(cache, f) for f in os.listdir(cache) if f.endswith("-" + name) and storage.TMP_MARK not in f]
    for old in sorted(copies, key=os.path.getmtime, reverse=True)[CACHE_COPIES_KEPT:]:
        for path in (old, _lock_file(old)):
            with contextlib.suppress(OSError):
                os.remove(path)


def _lock_file(copy: str) -> str:
    """The lock a copy is made under (one per copy, so that copies of different files are made at once)."""
    return os.path.join(os.path.dirname(copy), LOCKS, os.path.basename(copy) + ".lock")
