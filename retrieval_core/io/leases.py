"""Leases on an output root: which one process may change it, fenced by a generation number.

A lease lives in a directory of the root, one small JSON file per generation::

    <root>/_refresh/lease/g000000042.json   the refresh lease (refreshes and rollbacks: whatever moves CURRENT)
    <root>/_jobs/lease/g000000007.json      the job lease (encode ... train, pipeline writing the root itself)

The newest generation is the lease. Its holder rewrites its own file every ``renew_s`` seconds from a background
thread (``renewed_at``); a lease not renewed for ``expiry_s`` seconds has expired. Taking a lease, fresh or over an
expired one, is the exclusive creation of the next generation's file (a local file's hard link, S3's conditional
PUT ``If-None-Match: *``): of any number of contenders exactly one creates it, and the others see it held. A
release marks the file released instead of deleting it, so generations only grow.

The generation is the fencing token: before each step that changes shared state the holder calls
:meth:`Lease.check`, which fails with :class:`LeaseLost` once a newer generation exists (a process that was paused
past its expiry and taken over) or once this process itself could not renew in time. Between that check and the
write that follows there is still one write's window; storage that compared the token itself would close it,
and fsspec's stores do not.

Clocks: expiry is judged by the reader's clock against the holder's ``renewed_at``, so hosts need clocks within
a small fraction of ``expiry_s`` of each other (NTP gives milliseconds).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, TypeGuard

from retrieval_core.io import storage

logger = logging.getLogger(__name__)

REFRESH_LEASE = "_refresh/lease"
JOB_LEASE = "_jobs/lease"
_FILE = re.compile(r"^g(\d{9,})\.json$")
POLL_S = 2.0  # how often a waiting contender looks again


class LockedError(RuntimeError):
    """The lease is held by another live process; the message names the holder and what to do."""


class LeaseLost(RuntimeError):
    """This process no longer holds its lease (taken over after it expired, or not renewed in time); it must stop
    changing shared state. The message names the new holder when there is one."""


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def precise_now_iso() -> str:
    """The current UTC time to the millisecond: a lease's expiry is judged against it (whole seconds would make a
    record look up to a second older than it is)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_iso(text: str) -> float:
    """Seconds since the epoch of an ISO time; a value without a zone is UTC."""
    moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def this_process() -> dict:
    """Who holds a lease or moves CURRENT: host, pid and user."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid) and no USER variable
        user = str(os.getuid()) if hasattr(os, "getuid") else "?"
    return {"host": socket.gethostname(), "pid": os.getpid(), "user": user}


def describe(record: dict) -> str:
    job = f" ({record['job']})" if record.get("job") else ""
    return (
        f"host {record.get('host')} pid {record.get('pid')}{job}, generation {record.get('generation')}, "
        f"since {record.get('acquired_at')}"
    )


def generation_url(directory: str, generation: int) -> str:
    return storage.join(directory, f"g{generation:09d}.json")


def generations(directory: str, storage_options: dict | None = None) -> list[int]:
    """The generations with a file in ``directory``, oldest first."""
    found = (_FILE.fullmatch(n) for n in storage.list_names(directory, storage_options))
    return sorted(int(m.group(1)) for m in found if m)


def read_record(directory: str, generation: int, storage_options: dict | None = None) -> dict | None:
    """A generation's record; None when its file is gone; an unreadable file reads as an expired record."""
    try:
        record = storage.read_json(generation_url(directory, generation), storage_options)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict):
        return {"generation": generation, "host": "?", "pid": "?", "renewed_at": None, "expiry_s": 0}
    return record


def newest(directory: str, storage_options: dict | None = None) -> tuple[int, dict | None]:
    """The newest generation and its record ((0, None) when there has never been a lease)."""
    for generation in reversed(generations(directory, storage_options)):
        record = read_record(directory, generation, storage_options)
        if record is not None:
            return generation, record
    return 0, None


def silent_for(record: dict) -> float:
    """Seconds since the record was last renewed (infinite when that cannot be read)."""
    try:
        return time.time() - parse_iso(record["renewed_at"])
    except (KeyError, TypeError, ValueError):
        return float("inf")


def holder_gone(record: dict) -> bool:
    """The lease was taken on this host by a process that no longer runs (killed with SIGKILL, say)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    if record["pid"] == os.getpid():
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it runs, as another user
        return False
    return False


def is_live(record: dict | None) -> TypeGuard[dict]:
    """Held: not released, renewed within its expiry, and not left by a process gone from this host."""
    if record is None or record.get("released"):
        return False
    expiry = record.get("expiry_s")
    return isinstance(expiry, (int, float)) and silent_for(record) < expiry and not holder_gone(record)


@dataclass
class Lease:
    """A lease this process holds; renewed in the background while :meth:`start_renewing` runs."""

    directory: str
    storage_options: dict
    generation: int
    record: dict
    renew_s: float
    what: str = "refresh"
    lost: str = ""  # why the lease is lost ('' while held)
    on_release: Callable[[], None] | None = None  # run after a successful release (e.g. tidying what it made)
    _renewed: float = field(default_factory=time.monotonic)  # this process's clock at the last renewal
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return generation_url(self.directory, self.generation)

    @property
    def expiry_s(self) -> float:
        return float(self.record["expiry_s"])

    def ensure(self) -> None:
        """Raise :class:`LeaseLost` when the renewer found the lease lost or this process's own clock says it has
        expired; no I/O (cheap enough for every finished shard)."""
        if not self.lost and time.monotonic() - self._renewed >= self.expiry_s:
            self.lost = (
                f"this process could not renew it for {time.monotonic() - self._renewed:.0f}s "
                f"(expiry {self.expiry_s:g}s)"
            )
        if self.lost:
            raise LeaseLost(
                f"lost the {self.what} lease '{self.url}' (generation {self.generation}): {self.lost}; "
                f"this process stops without changing anything more"
            )

    def check(self, step: str = "") -> None:
        """The fence, before a step that changes shared state: no newer generation exists (any: the one right after
        may already be pruned), this generation's record is still there, and this process's lease has not
        expired; else :class:`LeaseLost` (naming the new holder and ``step``)."""
        self._look_for_newer()
        self.ensure()
        logger.debug("lease generation %d checked before %s", self.generation, step or "a step")

    def _look_for_newer(self) -> None:
        """Mark the lease lost when a newer generation exists or this generation's record is gone."""
        found = generations(self.directory, self.storage_options)
        newer = [g for g in found if g > self.generation]
        if newer:
            holder = read_record(self.directory, newer[-1], self.storage_options) or {"generation": newer[-1]}
            self.lost = self.lost or f"taken over by {describe(holder)}"
        elif self.generation not in found:
            self.lost = self.lost or "its record is gone"

    def renew(self) -> None:
        """Rewrite this generation's record with the current time, after checking that it is still the newest and
        that this process did not miss its own expiry (a lease once expired stays lost: another may hold it)."""
        self._look_for_newer()
        if not self.lost and time.monotonic() - self._renewed >= self.expiry_s:
            self.lost = f"this process could not renew it within its expiry ({self.expiry_s:g}s)"
        if self.lost:
            return
        started = time.monotonic()
        self.record = {**self.record, "renewed_at": precise_now_iso()}
        storage.write_json_atomic(self.url, self.record, self.storage_options)
        self._renewed = started

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name=f"{self.what}-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s) and not self.lost:
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried; ensure() judges the expiry
                logger.warning(
                    "could not renew the %s lease '%s': %s: %s", self.what, self.url, type(exc).__name__, exc
                )
        if self.lost:
            logger.error("the %s lease '%s' is lost: %s", self.what, self.url, self.lost)

    def release(self) -> bool:
        """Stop renewing and mark the record released (the next contender takes the lease at once); False when a
        newer generation holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.renew_s)  # a renewal stuck in a store's call must not hang a stop
        if any(g > self.generation for g in generations(self.directory, self.storage_options)):
            logger.warning("not releasing the %s lease '%s': a newer generation holds it", self.what, self.url)
            return False
        storage.write_json_atomic(
            self.url, {**self.record, "released": True, "released_at": utc_now_iso()}, self.storage_options
        )
        if self.on_release is not None:
            self.on_release()
        return True


def acquire(
    directory: str,
    storage_options: dict | None = None,
    expiry_s: float = 600.0,
    renew_s: float = 60.0,
    owner: dict | None = None,
    what: str = "refresh",
    wait: bool = False,
    settle_s: float = 0.0,
) -> Lease:
    """Take the lease in ``directory``: create the generation after the newest one, if that one is released or
    expired. A live holder raises :class:`LockedError` naming it, or with ``wait`` is waited for (polling). The
    lease is renewed in the background until :meth:`Lease.release`.

    On a store without create-if-absent the record is written and read back after ``settle_s`` seconds, which
    narrows but does not close the window in which two contenders both win.
    """
    so = storage_options or {}
    announced = False
    while True:
        generation, held = newest(directory, so)
        if is_live(held):
            if not wait:
                raise LockedError(_held_message(directory, generation, held, what))
            if not announced:
                logger.info("waiting for the %s lease: %s", what, _held_message(directory, generation, held, what))
                announced = True
            time.sleep(POLL_S)
            continue
        if held is not None and not held.get("released"):
            logger.warning(
                "taking over the expired %s lease '%s' held by %s (last renewed %s, %.0fs ago; expiry %ss%s)",
                what,
                generation_url(directory, generation),
                describe(held),
                held.get("renewed_at"),
                silent_for(held),
                held.get("expiry_s"),
                "; that process no longer runs on this host" if holder_gone(held) else "",
            )
        lease = _create(directory, so, generation + 1, expiry_s, renew_s, owner, what, settle_s)
        if lease is not None:
            try:
                _prune(directory, so, generation)
                lease.start_renewing()
            except BaseException:  # a stop right after winning: the lease is released, not left to expire
                lease.release()
                raise
            return lease


def _held_message(directory: str, generation: int, held: dict, what: str) -> str:
    left = max(0.0, float(held.get("expiry_s") or 0) - silent_for(held))
    return (
        f"the {what} lease '{generation_url(directory, generation)}' is held by {describe(held)}, last renewed "
        f"{held.get('renewed_at')}: wait for that {what} to finish (--wait, where the job offers it); if that "
        f"process is gone, its lease expires {left:.0f}s after its last renewal (publish.lease_expiry)"
    )


def _create(
    directory: str,
    so: dict,
    generation: int,
    expiry_s: float,
    renew_s: float,
    owner: dict | None,
    what: str,
    settle_s: float,
) -> Lease | None:
    """Create generation ``generation``: the Lease when this process won, None when another one did."""
    now = precise_now_iso()
    record = {
        **this_process(),
        **(owner or {}),
        "generation": generation,
        "token": uuid.uuid4().hex,
        "acquired_at": now,
        "renewed_at": now,
        "expiry_s": expiry_s,
        "renew_s": renew_s,
    }
    url = generation_url(directory, generation)
    data = json.dumps(record, indent=2, sort_keys=True).encode()
    created = storage.create_exclusive(url, data, so)
    if created is None:  # no conditional create on this store: write, wait, read back
        storage.write_bytes_atomic(url, data, so)
        if settle_s > 0:
            time.sleep(settle_s)
        created = (read_record(directory, generation, so) or {}).get("token") == record["token"]
    if not created:
        return None
    return Lease(directory, so, generation, record, renew_s, what)


def _prune(directory: str, so: dict, keep_from: int) -> None:
    """Remove generations older than ``keep_from`` (the one just taken over stays, for the record)."""
    for generation in generations(directory, so):
        if generation < keep_from:
            try:
                storage.remove(generation_url(directory, generation), so)
            except OSError as exc:  # best effort: an old record left costs one listing entry
                logger.warning("could not remove the old lease record %s: %s", generation, exc)
