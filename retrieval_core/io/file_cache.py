"""This node's copies of files on object storage, shared by its processes (a merged index memory-mapped by every
searcher of the node is downloaded once)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import posixpath

from retrieval_core.io import storage

CACHE_COPIES_KEPT = 3  # copies of one file name kept in the file cache (merged.faiss of the last versions used)


def local_copy(url: str, storage_options: dict | None = None) -> str:
    """A path on this machine's disk holding ``url``: the file itself when local, else one copy per machine under
    ``$RETRIEVAL_FILE_CACHE`` (default ``~/.cache/ray-retrieval-jobs/files``), downloaded once and shared by every
    process of the node (they wait on a file lock while the first downloads). The copy is named by the URL, size and
    ETag (or modification time), so a rewritten file is fetched again; of the copies of one file name, the
    ``CACHE_COPIES_KEPT`` used last are kept (a process mapping a removed one reads on until it closes it)."""
    local = storage.local_path(url, storage_options)
    if local:
        return local
    fs, path = storage.filesystem(url, storage_options)
    with storage.naming(url, "read"):
        info = fs.info(path)
    stamp = f"{url}|{info.get('size')}|{info.get('ETag') or info.get('mtime') or info.get('LastModified')}"
    cache = os.environ.get("RETRIEVAL_FILE_CACHE") or os.path.expanduser("~/.cache/ray-retrieval-jobs/files")
    os.makedirs(cache, exist_ok=True)
    name = posixpath.basename(path)
    target = os.path.join(cache, hashlib.sha256(stamp.encode()).hexdigest()[:24] + "-" + name)
    with open(os.path.join(cache, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(target):
            tmp = storage.temporary_name(target)
            with storage.naming(url, "read"):
                fs.get_file(path, tmp)
            os.replace(tmp, target)
        os.utime(target)  # used now
        _evict(cache, name)
    return target


def _evict(cache: str, name: str) -> None:
    """Remove the copies of file ``name`` in ``cache`` beyond the ``CACHE_COPIES_KEPT`` used last."""
    copies = [os.path.join(cache, f) for f in os.listdir(cache) if f.endswith("-" + name) and storage.TMP_MARK not in f]
    for old in sorted(copies, key=os.path.getmtime, reverse=True)[CACHE_COPIES_KEPT:]:
        with contextlib.suppress(OSError):
            os.remove(old)
