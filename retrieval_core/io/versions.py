"""Versions of an output root: names, ``CURRENT`` (moved by compare-and-set), states, retention, readers' leases.

A refresh job builds complete versions under one output root (any fsspec URL) and publishes them atomically::

    <root>/CURRENT                       {"version", "previous", "published_at", "by", "history"}
    <root>/versions/<name>/              one complete version (embeddings/, index/, eval/, changes/, ...)
    <root>/versions/<name>/refresh.json  written last in a version: {"complete", "gates_passed", "published", ...}
    <root>/versions/<name>/_readers/     readers' leases, one small JSON per reader
    <root>/_refresh/lease/               the refresh lease (see :mod:`leases`)
    <root>/_refresh/build.json           the version being built

Versions are a storage concern: this module alone knows them. Stages read and write an output root and never
learn which version it is; :func:`resolve_root` turns a root into the one they should read.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Iterator

import fsspec.core

from retrieval_core.io import leases, storage
from retrieval_core.io.folder import Folder
from retrieval_core.io.leases import LockedError
from retrieval_core.io.leases import parse_iso as _parse_iso
from retrieval_core.io.leases import this_process as _this_process
from retrieval_core.io.leases import utc_now_iso as _utc_now_iso

logger = logging.getLogger(__name__)

CURRENT = "CURRENT"
VERSIONS_DIR = "versions"
REFRESH_RECORD = "refresh.json"
READERS_DIR = "_readers"
BUILD_RECORD = "_refresh/build.json"  # the version a refresh is building (a rerun on the same snapshot resumes it)
HISTORY_KEEP = 100  # moves of CURRENT kept in its history
_NAME = re.compile(r"^v(\d{6,})-(\d{8}T\d{6}Z)$")


__all__ = ["LockedError", "VersionError", "CurrentMovedError"]


class VersionError(ValueError):
    """A version name is malformed, unknown or not complete; the message names it and the valid ones."""


class CurrentMovedError(RuntimeError):
    """CURRENT no longer names the version a writer started from (a rollback moved it): nothing was published; the
    message names the version CURRENT names now and who moved it when."""


# ---------------------------------------------------------------------------------------------------- names


def parse_version_seq(name: str) -> int:
    """The sequence number of a version name ``v{seq:06d}-{yyyymmddTHHMMSSZ}``."""
    match = _NAME.fullmatch(name)
    if not match:
        raise VersionError(
            f"'{name}' is not a version name (expected v<6+ digits>-<yyyymmddTHHMMSSZ>, e.g. v000001-20240101T000000Z)"
        )
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


def list_versions(folder: Folder) -> list[str]:
    """The version names under ``<root>/versions/``, oldest first, complete or not (other entries ignored)."""
    root, storage_options = folder.url, folder.storage_options
    names = storage.list_names(storage.join(root, VERSIONS_DIR), storage_options)
    return sort_versions([n for n in names if is_version_name(n)])


def new_version_name(folder: Folder, now: datetime | None = None) -> str:
    """A new name ``v{seq:06d}-{UTC yyyymmddTHHMMSSZ}`` with seq one above the highest under ``versions/``.

    Names are unique and sort by creation as long as only one process creates versions at a time: call it while
    holding the refresh lease (:func:`leased`). ``now`` defaults to the current time; a naive datetime is UTC.
    """
    existing = list_versions(folder)
    seq = 1 + max((parse_version_seq(n) for n in existing), default=0)
    moment = now or datetime.now(timezone.utc)
    moment = moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
    return f"v{seq:06d}-{moment.strftime('%Y%m%dT%H%M%SZ')}"


# ---------------------------------------------------------------------------------------------------- CURRENT


def read_refresh_record(folder: Folder, name: str) -> dict | None:
    """``versions/<name>/refresh.json``, or None when the version has none (yet)."""
    root, storage_options = folder.url, folder.storage_options
    url = storage.join(version_root(root, name), REFRESH_RECORD)
    if not storage.exists(url, storage_options):
        return None
    record = storage.read_json(url, storage_options)
    return record if isinstance(record, dict) else None


def is_complete(folder: Folder, name: str) -> bool:
    """True when the version's ``refresh.json`` says ``"complete": true``."""
    record = read_refresh_record(folder, name)
    return record is not None and record.get("complete") is True


def read_current(folder: Folder) -> dict | None:
    """The content of ``<root>/CURRENT``, or None when the root has none."""
    root, storage_options = folder.url, folder.storage_options
    url = storage.join(root, CURRENT)
    if not storage.exists(url, storage_options):
        return None
    current = storage.read_json(url, storage_options)
    if not isinstance(current, dict) or not isinstance(current.get("version"), str):
        raise VersionError(f"'{url}' is not a CURRENT record (expected {{\"version\": ...}}, found {current!r})")
    return current


_ANY = object()


def publish(
    folder: Folder,
    name: str,
    expected=_ANY,
    by: dict | None = None,
    lease: leases.Lease | None = None,
) -> dict:
    """Point ``<root>/CURRENT`` at the complete version ``name`` with one atomic write; returns what was written.

    Compare-and-set: with ``expected`` (a version name, or None for a root without CURRENT yet), CURRENT must still
    name that version, else :class:`CurrentMovedError` names what it names now and who moved it. ``by`` (the
    action, and who) goes into the record and its ``history`` (the last :data:`HISTORY_KEEP` moves). With
    ``lease``, its fence is checked just before the write. The version's ``refresh.json`` then records that it was
    published. A version whose ``refresh.json`` does not say ``"complete": true`` is refused.
    """
    root, storage_options = folder.url, folder.storage_options
    parse_version_seq(name)
    if lease is not None:
        lease.check("reading CURRENT")  # a holder that lost its lease learns that first, not that CURRENT moved
    if not is_complete(folder, name):
        record_url = storage.join(version_root(root, name), REFRESH_RECORD)
        raise VersionError(
            f"cannot publish version '{name}': '{record_url}' is missing or does not say \"complete\": true"
        )
    old = read_current(folder)
    if expected is not _ANY and (old or {}).get("version") != expected:
        raise CurrentMovedError(moved_message(root, old, expected, name))
    previous = old["version"] if old and old["version"] != name else (old or {}).get("previous")
    now = _utc_now_iso()
    move = {"version": name, "at": now, **_this_process(), **(by or {})}
    if lease is not None:
        move["generation"] = lease.generation
    history = ((old or {}).get("history") or [])[-(HISTORY_KEEP - 1) :] + [move]
    record = {"version": name, "previous": previous, "published_at": now, "by": move, "history": history}
    if lease is not None:
        lease.check("writing CURRENT")
    storage.write_json_atomic(storage.join(root, CURRENT), record, storage_options)
    _mark_published(folder, name, now)
    return record


def moved_message(root: str, current: dict | None, expected: str | None, name: str) -> str:
    by = (current or {}).get("by") or {}
    who = (
        (
            f" by {by.get('action', 'a move')} on host {by.get('host')} pid {by.get('pid')} user {by.get('user')} at "
            f"{by.get('at')}"
        )
        if by
        else ""
    )
    return (
        f"not publishing {name}: CURRENT of '{root}' was expected to name {expected or 'nothing'} (the version "
        f"this run started from) but names {(current or {}).get('version') or 'nothing'}, moved{who}; the "
        f"version stays on disk, unpublished"
    )


def _mark_published(folder: Folder, name: str, when: str) -> None:
    """``refresh.json`` of a version records when CURRENT first named it."""
    root, storage_options = folder.url, folder.storage_options
    url = storage.join(version_root(root, name), REFRESH_RECORD)
    record = storage.read_json(url, storage_options)
    if record.get("published") is not True or not record.get("published_at"):
        storage.write_json_atomic(url, {**record, "published": True, "published_at": when}, storage_options)


def mark_abandoned(folder: Folder, name: str, reason: str) -> None:
    """A complete version that will not be published (CURRENT moved under its refresh) says why."""
    root, storage_options = folder.url, folder.storage_options
    url = storage.join(version_root(root, name), REFRESH_RECORD)
    if storage.exists(url, storage_options):
        storage.write_json_atomic(
            url, {**storage.read_json(url, storage_options), "abandoned": reason}, storage_options
        )


# ---------------------------------------------------------------------------------------------------- states


def failed_gates(record: dict) -> list[dict]:
    return [g for g in record.get("gates") or [] if not g.get("passed", True)]


def gate_text(gate: dict) -> str:
    """A failed gate as a listing shows it: its message (with counts) or ``<gate> <value> vs <threshold>``."""
    return gate.get("message") or f"{gate['gate']} {gate.get('value')} (limit {gate.get('threshold')})"


def version_state(name: str, record: dict | None, current: dict | None, building: str | None) -> dict:
    """One version's state from its ``refresh.json``, CURRENT and the pending build:

    ``current`` (CURRENT names it), ``published`` (CURRENT named it once), ``failed`` (a gate refused it),
    ``incomplete`` (the build a rerun resumes: unfinished, or finished and not yet published), ``abandoned``
    (unfinished and no longer being built, or finished but refused because CURRENT moved under its refresh).
    """
    history = {m.get("version") for m in (current or {}).get("history") or []}
    record = record or {}
    complete = record.get("complete") is True
    if (current or {}).get("version") == name:
        state, detail = "current", ""
    elif complete and (record.get("published") is True or name in history):
        state, detail = "published", ""
    elif complete and failed_gates(record):
        state, detail = "failed", "; ".join(gate_text(g) for g in failed_gates(record))
    elif name == building:
        state, detail = "incomplete", "finished, not yet published" if complete else "being built or resumable"
    else:
        state = "abandoned"
        detail = record.get("abandoned") or ("finished but never published" if complete else "never finished")
    if state in ("current", "published") and complete and failed_gates(record):
        detail = "forced past: " + "; ".join(gate_text(g) for g in failed_gates(record))
    return {
        "version": name,
        "state": state,
        "detail": detail,
        "complete": complete,
        "counts": record.get("counts") or {},
        "written_at": record.get("written_at"),
        "published_at": record.get("published_at"),
    }


def building_version(folder: Folder) -> str | None:
    """The version the pending refresh build is making (its record ``_refresh/build.json``), or None."""
    root, storage_options = folder.url, folder.storage_options
    url = storage.join(root, BUILD_RECORD)
    if not storage.exists(url, storage_options):
        return None
    name = storage.read_json(url, storage_options).get("version")
    return name if is_version_name(name) else None


def states(folder: Folder) -> list[dict]:
    """Every version under the root with its state (see :func:`version_state`), oldest first."""
    current = read_current(folder)
    building = building_version(folder)
    return [version_state(n, read_refresh_record(folder, n), current, building) for n in list_versions(folder)]


def state_line(state: dict) -> str:
    """``v000003-...  failed: deleted 3,112 of 5,183 documents (60.0%) > 10%  documents 2,071 ...``"""
    label = state["state"] + (f": {state['detail']}" if state["detail"] else "")
    counts = state["counts"]
    numbers = (
        ""
        if not counts
        else (
            f"documents {counts.get('documents', 0):,}, encoded {counts.get('encoded', 0):,}"
            f", reused {counts.get('reused', 0):,}"
        )
    )
    date = state.get("published_at") or state.get("written_at") or ""
    return "  ".join(part for part in (state["version"], label, numbers, date) if part)


def rollback_target(folder: Folder, name: str, force: bool = False) -> dict:
    """The state of version ``name`` if a rollback may publish it, else :class:`VersionError` saying why: an
    unknown or unfinished version never (it cannot be read whole); one that failed a gate, or that was abandoned,
    only with ``force``."""
    root = folder.url
    parse_version_seq(name)
    found = {s["version"]: s for s in states(folder)}
    if name not in found or not found[name]["complete"]:
        servable = [n for n, s in found.items() if s["state"] in ("current", "published")]
        state = "does not exist" if name not in found else f"is {found[name]['state']} (never finished)"
        raise VersionError(
            f"cannot roll back to version '{name}': it {state} under "
            f"'{storage.join(root, VERSIONS_DIR)}'; published versions: {servable or 'none'}"
        )
    target = found[name]
    if target["state"] in ("failed", "abandoned") and not force:
        raise VersionError(
            f"cannot roll back to version '{name}': it {target['state']}"
            f"{': ' + target['detail'] if target['detail'] else ''}; add --force to publish it anyway"
        )
    return target


def resolve_root(folder: Folder, version: str = "") -> tuple[str, str | None]:
    """The root the stages read and its version name: with ``version`` that version; else the version CURRENT
    names; else (a root written by the plain jobs, without versions) ``root`` itself and None."""
    root, storage_options = folder.url, folder.storage_options
    if version:
        if not is_version_name(version) or not storage.exists(path := version_root(root, version), storage_options):
            raise VersionError(
                f"version '{version}' does not exist under '{storage.join(root, VERSIONS_DIR)}'; "
                f"versions: {list_versions(folder) or 'none'}"
            )
        return path, version
    current = read_current(folder)
    if current is None:
        return root, None
    name = current["version"]
    path = version_root(root, name)
    if not storage.exists(path, storage_options):
        raise VersionError(f"'{storage.join(root, CURRENT)}' names version '{name}' but '{path}' does not exist")
    return path, name


# ---------------------------------------------------------------------------------------------------- leases


def lease_dir(root: str, path: str = leases.REFRESH_LEASE) -> str:
    """The directory of a root's lease: the refresh lease (whatever moves CURRENT) unless ``path`` says otherwise
    (:data:`leases.JOB_LEASE`, the lease of the jobs that write the root itself)."""
    return storage.join(root, path)


@contextlib.contextmanager
def leased(
    folder: Folder,
    expiry_s: float = 600.0,
    renew_s: float = 60.0,
    owner: dict | None = None,
    path: str = leases.REFRESH_LEASE,
    what: str = "refresh",
    wait: bool = False,
) -> Iterator[leases.Lease]:
    """Hold a root's lease for the ``with`` block, renewed in the background and released whatever happens."""
    root, storage_options = folder.url, folder.storage_options
    lease = leases.acquire(lease_dir(root, path), storage_options, expiry_s, renew_s, owner, what, wait)
    try:
        yield lease
    finally:
        lease.release()


# ---------------------------------------------------------------------------------------------------- retention

SERVED = ("current", "published")
KEPT_FOR_INSPECTION = ("failed", "abandoned")


def versions_to_delete(
    version_states: list[dict], keep_published: int, keep_failed: int, protected: set[str]
) -> list[str]:
    """The versions retention deletes, oldest first: published ones older than the newest ``keep_published``
    published, and failed or abandoned ones older than the newest ``keep_failed`` of those, never one in
    ``protected`` (CURRENT's version and its previous, those a reader holds, the pending build). A failed version
    never counts against the published ones, so failed nights cannot push out the version a rollback needs;
    incomplete ones (the pending build) are never deleted."""
    if keep_published < 1 or keep_failed < 0:
        raise ValueError(f"keep_published must be >= 1 and keep_failed >= 0, got {keep_published}, {keep_failed}")
    doomed = []
    for group, keep in ((SERVED, keep_published), (KEPT_FOR_INSPECTION, keep_failed)):
        names = sort_versions([s["version"] for s in version_states if s["state"] in group])
        doomed += names[: max(0, len(names) - keep)]
    return sort_versions([n for n in doomed if n not in protected])


def protected_versions(folder: Folder) -> set[str]:
    """What retention never deletes: CURRENT's version, its previous, and the pending build."""
    current = read_current(folder) or {}
    return {n for n in (current.get("version"), current.get("previous"), building_version(folder)) if n}


def delete_version_files(folder: Folder, name: str, referenced: set[str] | frozenset[str] = frozenset()) -> int:
    """Delete the files under ``versions/<name>/`` except the URLs in ``referenced`` (files that kept versions
    still share); the directory goes when nothing is left. Returns how many files were deleted."""
    root, storage_options = folder.url, folder.storage_options
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


def register_reader(folder: Folder, name: str) -> str:
    """Write a lease saying this process reads version ``name`` (retention spares it); returns the lease URL.
    A long reader renews it with :func:`renew_reader` more often than the ``max_age_s`` retention uses."""
    root, storage_options = folder.url, folder.storage_options
    if not storage.exists(version_root(root, name), storage_options):
        raise VersionError(f"cannot register a reader of version '{name}': '{version_root(root, name)}' does not exist")
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


def keep_reader_renewed(url: str, storage_options: dict | None, version: str, every_s: float) -> threading.Event:
    """Renew a reader's lease every ``every_s`` seconds from a daemon thread, until the returned event is set."""
    stop = threading.Event()

    def renew_until_stopped() -> None:
        while not stop.wait(every_s):
            try:
                renew_reader(url, storage_options, version)
            except Exception as exc:  # noqa: BLE001 - retried at the next interval
                logger.warning("could not renew the reader's lease '%s': %s", url, exc)

    threading.Thread(target=renew_until_stopped, name="reader-lease", daemon=True).start()
    return stop


def release_reader(url: str, storage_options: dict | None = None, renewing: threading.Event | None = None) -> None:
    """Remove a reader's lease (nothing happens when it is gone), after stopping its renewal."""
    if renewing is not None:
        renewing.set()
    storage.remove(url, storage_options)


def readers_in_use(folder: Folder, max_age_s: float = 3600.0) -> set[str]:
    """The versions with a reader's lease younger than ``max_age_s`` (older or unreadable leases are ignored)."""
    root, storage_options = folder.url, folder.storage_options
    in_use: set[str] = set()
    now = time.time()
    for name in list_versions(folder):
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
