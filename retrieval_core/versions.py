"""Versions of an output root: names, ``CURRENT``, the refresh lock, retention and readers' leases.

A refresh job builds complete versions under one output root (any fsspec URL) and publishes them atomically::

    <root>/CURRENT                       {"version": "<name>", "previous": "<name or null>", "published_at": "...Z"}
    <root>/versions/<name>/              one complete version (embeddings/, index/, eval/, changes/, ...)
    <root>/versions/<name>/refresh.json  written last in a version: at least {"published": bool, "complete": bool}
    <root>/versions/<name>/_readers/     readers' leases, one small JSON per reader
    <root>/_refresh/lock.json            the refresh lock

Versions are a storage concern: this module alone knows them. Stages read and write an output root and never
learn which version it is; :func:`resolve_root` turns a root into the one they should read.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
import socket
import time
import uuid
from datetime import datetime, timezone
from typing import Iterator

import fsspec.core

from . import storage

logger = logging.getLogger(__name__)

CURRENT = "CURRENT"
VERSIONS_DIR = "versions"
REFRESH_RECORD = "refresh.json"
READERS_DIR = "_readers"
LOCK_PATH = "_refresh/lock.json"  # the refresh lock
JOB_LOCK_PATH = "_lock.json"  # the lock of the jobs that write under a root (encode ... train, pipeline)
_NAME = re.compile(r"^v(\d{6,})-(\d{8}T\d{6}Z)$")
# Protocols whose URLs hold a plain path (``memory://a/b`` is the path ``/a/b``); elsewhere the first component
# after ``://`` is a bucket or host that a relative path may not climb out of.
_PATH_PROTOCOLS = frozenset({"file", "local", "memory"})


class LockedError(RuntimeError):
    """A lock (the refresh lock, or a root's job lock) is held by another process; the message names the holder and
    how to take over."""


class VersionError(ValueError):
    """A version name is malformed, unknown or not complete; the message names it and the valid ones."""


# ---------------------------------------------------------------------------------------------------- names

def parse_version_seq(name: str) -> int:
    """The sequence number of a version name ``v{seq:06d}-{yyyymmddTHHMMSSZ}``."""
    match = _NAME.fullmatch(name)
    if not match:
        raise VersionError(f"'{name}' is not a version name (expected v<6+ digits>-<yyyymmddTHHMMSSZ>, "
                           "e.g. v000001-20240101T000000Z)")
    return int(match.group(1))


def is_version_name(name: str) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def sort_versions(names: list[str]) -> list[str]:
    """Version names oldest first (by sequence number, so order holds past v999999)."""
    return sorted(names, key=lambda n: (parse_version_seq(n), n))


def version_root(root: str, name: str) -> str:
    """The output root of one version: ``<root>/versions/<name>``. ``name`` must be a version name, whoever wrote
    it (CURRENT, a build record, a manifest, the config): a value such as ``../../x`` never leads out of the root."""
    parse_version_seq(name if isinstance(name, str) else repr(name))
    return storage.join(root, VERSIONS_DIR, name)


def list_versions(root: str, storage_options: dict | None = None) -> list[str]:
    """The version names under ``<root>/versions/``, oldest first, complete or not (other entries ignored)."""
    names = storage.list_names(storage.join(root, VERSIONS_DIR), storage_options)
    return sort_versions([n for n in names if is_version_name(n)])


def new_version_name(root: str, storage_options: dict | None = None, now: datetime | None = None) -> str:
    """A new name ``v{seq:06d}-{UTC yyyymmddTHHMMSSZ}`` with seq one above the highest under ``versions/``.

    Names are unique and sort by creation as long as only one process creates versions at a time: call it while
    holding the refresh lock (:func:`locked`). ``now`` defaults to the current time; a naive datetime is UTC.
    """
    existing = list_versions(root, storage_options)
    seq = 1 + max((parse_version_seq(n) for n in existing), default=0)
    moment = now or datetime.now(timezone.utc)
    moment = moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
    return f"v{seq:06d}-{moment.strftime('%Y%m%dT%H%M%SZ')}"


# ---------------------------------------------------------------------------------------------------- CURRENT

def _utc_now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: str) -> float:
    """Seconds since the epoch of an ISO time; a value without a zone is UTC."""
    moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def read_refresh_record(root: str, name: str, storage_options: dict | None = None) -> dict | None:
    """``versions/<name>/refresh.json``, or None when the version has none (yet)."""
    url = storage.join(version_root(root, name), REFRESH_RECORD)
    if not storage.exists(url, storage_options):
        return None
    record = storage.read_json(url, storage_options)
    return record if isinstance(record, dict) else None


def is_complete(root: str, name: str, storage_options: dict | None = None) -> bool:
    """True when the version's ``refresh.json`` says ``"complete": true``."""
    record = read_refresh_record(root, name, storage_options)
    return bool(record) and record.get("complete") is True


def complete_versions(root: str, storage_options: dict | None = None) -> list[str]:
    """The complete versions, oldest first."""
    return [n for n in list_versions(root, storage_options) if is_complete(root, n, storage_options)]


def read_current(root: str, storage_options: dict | None = None) -> dict | None:
    """The content of ``<root>/CURRENT``, or None when the root has none."""
    url = storage.join(root, CURRENT)
    if not storage.exists(url, storage_options):
        return None
    current = storage.read_json(url, storage_options)
    if not isinstance(current, dict) or not isinstance(current.get("version"), str):
        raise VersionError(f"'{url}' is not a CURRENT record (expected {{\"version\": ...}}, found {current!r})")
    return current


def publish(root: str, name: str, storage_options: dict | None = None, previous: str | None = None) -> dict:
    """Point ``<root>/CURRENT`` at the complete version ``name`` with one atomic write; returns what was written.

    ``previous`` defaults to the version CURRENT named until now (None for the first publication). A version
    whose ``refresh.json`` does not say ``"complete": true`` is refused. ``refresh.json`` itself is not changed.
    """
    parse_version_seq(name)
    if not is_complete(root, name, storage_options):
        record_url = storage.join(version_root(root, name), REFRESH_RECORD)
        raise VersionError(f"cannot publish version '{name}': '{record_url}' is missing or does not say "
                           "\"complete\": true")
    if previous is None:
        old = read_current(root, storage_options)
        previous = old["version"] if old and old["version"] != name else (old or {}).get("previous")
    record = {"version": name, "previous": previous, "published_at": _utc_now_iso()}
    storage.write_json_atomic(storage.join(root, CURRENT), record, storage_options)
    return record


def rollback(root: str, name: str, storage_options: dict | None = None) -> dict:
    """Point CURRENT at another complete version (published before or not); returns the new CURRENT."""
    complete = complete_versions(root, storage_options)
    if name not in complete:
        state = "is not complete" if name in list_versions(root, storage_options) else "does not exist"
        raise VersionError(f"cannot roll back to version '{name}': it {state} under "
                           f"'{storage.join(root, VERSIONS_DIR)}'; complete versions: {complete or 'none'}")
    return publish(root, name, storage_options)


def resolve_root(root: str, storage_options: dict | None = None, version: str = "") -> tuple[str, str | None]:
    """The root the stages read and its version name: with ``version`` that version; else the version CURRENT
    names; else (a root written by the plain jobs, without versions) ``root`` itself and None."""
    if version:
        if not is_version_name(version) or not storage.exists(path := version_root(root, version), storage_options):
            raise VersionError(f"version '{version}' does not exist under '{storage.join(root, VERSIONS_DIR)}'; "
                               f"versions: {list_versions(root, storage_options) or 'none'}")
        return path, version
    current = read_current(root, storage_options)
    if current is None:
        return root, None
    name = current["version"]
    path = version_root(root, name)
    if not storage.exists(path, storage_options):
        raise VersionError(f"'{storage.join(root, CURRENT)}' names version '{name}' but '{path}' does not exist")
    return path, name


# ---------------------------------------------------------------------------------------------------- lock

def lock_url(root: str, path: str = LOCK_PATH) -> str:
    return storage.join(root, path)


def _this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _read_lock(url: str, storage_options: dict | None) -> dict | None:
    """The lock record, None when there is no lock; an unreadable record is held by an unknown holder."""
    try:
        record = storage.read_json(url, storage_options)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        record = None
    return record if isinstance(record, dict) else {"host": "?", "pid": "?", "started_at": None, "token": None}


def _lock_age(record: dict) -> float:
    """Seconds since the lock was taken; infinite when its start time cannot be read (a broken record)."""
    try:
        return time.time() - _parse_iso(record["started_at"])
    except (KeyError, TypeError, ValueError):
        return float("inf")


def _holder_gone(record: dict) -> bool:
    """The lock was taken on this host by a process that no longer runs (a refresh killed with SIGKILL, say)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it runs, as another user
        return False
    return False


def _describe(record: dict) -> str:
    return f"host {record.get('host')} pid {record.get('pid')} since {record.get('started_at')}"


def _judge(held: dict, url: str, what: str, timeout_s: float) -> None:
    """Raise :class:`LockedError` when the lock ``held`` is live; warn that a stale one is taken over."""
    age = _lock_age(held)
    if age < timeout_s and not _holder_gone(held):
        raise LockedError(
            f"the {what} lock '{url}' is held by {_describe(held)} (age {age:.0f}s, taken over after "
            f"{timeout_s:g}s): wait for that {what} to finish, or, if that process is gone, remove "
            f"'{url}' and run again")
    logger.warning("taking over the stale %s lock '%s' held by %s (age %.0fs, timeout %gs%s)",
                   what, url, _describe(held), age, timeout_s,
                   "; that process no longer runs on this host" if _holder_gone(held) else "")


def acquire_lock(root: str, storage_options: dict | None = None, timeout_s: float = 3600.0,
                 owner: dict | None = None, settle_s: float = 0.0, path: str = LOCK_PATH,
                 what: str = "refresh") -> dict:
    """Take ``<root>/<path>`` (the refresh lock unless ``path`` says otherwise; ``what`` names it in messages: the
    work it guards); returns the record written (host, pid, started_at, token, owner's keys).

    A lock younger than ``timeout_s`` raises :class:`LockedError` naming its holder; an older one is taken over
    with a warning. ``owner`` adds fields to the record (and may replace host/pid). The record is created only if
    absent (a local file's exclusive create; S3's conditional PUT, ``If-None-Match: *``); on a store without
    create-if-absent it is written and read back (after ``settle_s`` seconds, which narrows the window in which two
    writers can both read their own token), and a lost race is a LockedError.
    """
    url = lock_url(root, path)
    record = {**_this_process(), "started_at": _utc_now_iso(), **(owner or {}), "token": uuid.uuid4().hex}
    data = json.dumps(record, indent=2, sort_keys=True).encode()
    for _ in range(2):  # a second pass after removing a stale lock
        held = _read_lock(url, storage_options)
        if held is not None:
            _judge(held, url, what, timeout_s)
            if _read_lock(url, storage_options) == held:  # still the stale one: remove it, then race fairly
                storage.remove(url, storage_options)
            continue
        created = storage.create_exclusive(url, data, storage_options)
        if created is None:  # a store without create-if-absent: write, then read back (below)
            storage.write_bytes_atomic(url, data, storage_options)
        elif not created:
            continue  # another process created it in between: judge that one
        break
    else:
        held = _read_lock(url, storage_options) or {}
        raise LockedError(f"the {what} lock '{url}' was taken by {_describe(held)} while this process "
                          f"took it over; wait, or, if that process is gone, remove '{url}'")
    if settle_s > 0 and storage.local_path(url, storage_options) is None:
        time.sleep(settle_s)
    held = _read_lock(url, storage_options) or {}
    if held.get("token") != record["token"]:
        raise LockedError(f"the {what} lock '{url}' was taken by {_describe(held)} at the same time as this "
                          f"process; wait for it, or, if that process is gone, remove '{url}'")
    return record


def release_lock(root: str, storage_options: dict | None, lock: dict, path: str = LOCK_PATH) -> bool:
    """Remove the lock if it still holds ``lock``'s token; False (and a warning) when another holder has it."""
    url = lock_url(root, path)
    held = _read_lock(url, storage_options)
    if held is None:
        logger.warning("the lock '%s' was already gone when released", url)
        return False
    if held.get("token") != lock.get("token"):
        logger.warning("not releasing the lock '%s': it is now held by %s", url, _describe(held))
        return False
    storage.remove(url, storage_options)
    return True


@contextlib.contextmanager
def locked(root: str, storage_options: dict | None = None, timeout_s: float = 3600.0,
           owner: dict | None = None, path: str = LOCK_PATH, what: str = "refresh") -> Iterator[dict]:
    """Hold a lock (the refresh lock unless ``path`` says otherwise) for the ``with`` block (released whatever
    happens); yields the lock record."""
    lock = acquire_lock(root, storage_options, timeout_s, owner, path=path, what=what)
    try:
        yield lock
    finally:
        release_lock(root, storage_options, lock, path)


# ---------------------------------------------------------------------------------------------------- retention

def versions_to_delete(names: list[str], current: str | None, keep: int, in_use: set[str]) -> list[str]:
    """The versions (complete or not) older than the newest ``keep``, except ``current`` and those ``in_use``;
    oldest first."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    ordered = sort_versions(list(names))
    older = ordered[:max(0, len(ordered) - keep)]
    return [n for n in older if n != current and n not in in_use]


def delete_version_files(root: str, name: str, storage_options: dict | None = None,
                         referenced: set[str] | frozenset[str] = frozenset()) -> int:
    """Delete the files under ``versions/<name>/`` except the URLs in ``referenced`` (files that kept versions
    still share); the directory goes when nothing is left. Returns how many files were deleted."""
    parse_version_seq(name)
    fs, path = storage.filesystem(version_root(root, name), storage_options)
    if not fs.exists(path):
        return 0
    keep = {fsspec.core.strip_protocol(u).rstrip("/") for u in referenced}
    files = [p for p in fs.find(path) if p.rstrip("/") not in keep]
    for p in files:
        fs.rm_file(p)
    storage.forget_listings(fs, path)
    remaining = fs.find(path)
    if not remaining:
        storage.remove(version_root(root, name), storage_options)
    elif not storage.is_object_store(fs):  # prune the directories emptied (object stores have none)
        dirs = [p for p, info in fs.find(path, withdirs=True, detail=True).items() if info["type"] == "directory"]
        for d in sorted(dirs, key=lambda p: p.count("/"), reverse=True):
            if not fs.ls(d, detail=False):
                fs.rmdir(d)
    return len(files)


# ---------------------------------------------------------------------------------------------------- readers

def register_reader(root: str, name: str, storage_options: dict | None = None) -> str:
    """Write a lease saying this process reads version ``name`` (retention spares it); returns the lease URL.
    A long reader renews it with :func:`renew_reader` more often than the ``max_age_s`` retention uses."""
    if not storage.exists(version_root(root, name), storage_options):
        raise VersionError(f"cannot register a reader of version '{name}': '{version_root(root, name)}' "
                           "does not exist")
    me = _this_process()
    host = re.sub(r"[^A-Za-z0-9._-]", "_", me["host"])
    url = storage.join(version_root(root, name), READERS_DIR, f"{host}-{me['pid']}-{uuid.uuid4().hex}.json")
    renew_reader(url, storage_options, version=name)
    return url


def renew_reader(url: str, storage_options: dict | None = None, version: str | None = None) -> None:
    """(Re)write a reader's lease with the current time."""
    record = {**_this_process(), "heartbeat_at": _utc_now_iso()}
    if version:
        record["version"] = version
    storage.write_json_atomic(url, record, storage_options)


def release_reader(url: str, storage_options: dict | None = None) -> None:
    """Remove a reader's lease (nothing happens when it is gone)."""
    storage.remove(url, storage_options)


def readers_in_use(root: str, storage_options: dict | None = None, max_age_s: float = 3600.0) -> set[str]:
    """The versions with a reader's lease younger than ``max_age_s`` (older or unreadable leases are ignored)."""
    in_use: set[str] = set()
    now = time.time()
    for name in list_versions(root, storage_options):
        readers = storage.join(version_root(root, name), READERS_DIR)
        for lease in storage.list_names(readers, storage_options):
            if not lease.endswith(".json") or storage.TMP_MARK in lease:
                continue
            try:
                record = storage.read_json(storage.join(readers, lease), storage_options)
                age = now - _parse_iso(record["heartbeat_at"])
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                continue
            if age < max_age_s:
                in_use.add(name)
                break
    return in_use


# ---------------------------------------------------------------------------------------------------- relative paths

def _split_url(url: str) -> tuple[str, str, str, str]:
    """(``proto://`` or '', fixed authority (bucket or host, '' when none), leading slashes, path below)."""
    if "://" not in url:
        lead = "/" if url.startswith("/") else ""
        return "", "", lead, url.lstrip("/")
    protocol, rest = url.split("://", 1)
    if protocol.lower() in _PATH_PROTOCOLS or rest.startswith("/"):
        lead = rest[:len(rest) - len(rest.lstrip("/"))]
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
    same = (from_prefix.lower() == to_prefix.lower() and from_authority == to_authority
            and (bool(from_lead) == bool(to_lead) or from_prefix.lower() == "memory://"))
    if not same:
        raise ValueError(f"'{target}' and '{from_dir}' are not on the same protocol and bucket: no relative path "
                         "joins them")
    start = _normalize_below(from_below, from_dir, can_climb=not from_prefix and not from_lead) or "."
    end = _normalize_below(to_below, target, can_climb=not to_prefix and not to_lead) or "."
    return posixpath.relpath(end, start)
