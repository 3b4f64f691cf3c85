"""Ray session handling: a local single-node cluster, or the cluster named by runtime.address / RAY_ADDRESS."""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import time

import ray

from retrieval_core import encoding, versions
from retrieval_core.config import Config, ConfigError, ModelConfig, RuntimeConfig

log = logging.getLogger(__name__)


def cluster_address(rt: RuntimeConfig) -> str:
    """``runtime.address`` when set, else ``RAY_ADDRESS`` (set by ``ray job submit``), else '' (local)."""
    return rt.address or os.environ.get("RAY_ADDRESS", "")


_kept: contextlib.ExitStack | None = None  # where a pipeline keeps the session a stage opened, for the next stages


@contextlib.contextmanager
def kept_session():
    """Within: a Ray session that a job opens stays open until the end of the block (a pipeline's stages share
    it, and a pipeline whose stages all run in this process never starts Ray)."""
    global _kept
    with contextlib.ExitStack() as stack:
        _kept = stack
        try:
            yield
        finally:
            _kept = None


@contextlib.contextmanager
def ray_session(rt: RuntimeConfig):
    """Connect to (or start) Ray for the duration of a job; a session already open is reused and left open, and
    within :func:`kept_session` one opened here is left open until that block ends."""
    if ray.is_initialized():
        yield
        return
    if _kept is not None:
        _kept.enter_context(_opened(rt))
        yield
        return
    with _opened(rt):
        yield


@contextlib.contextmanager
def _opened(rt: RuntimeConfig):
    address = cluster_address(rt)
    try:
        if address:
            log.info("connecting to the Ray cluster at %s", address)
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # address="local": always a new local cluster, never one a `ray start` on this machine left behind.
            # Token auth stays on (Ray's default); only Ray's notice that it chose it is left out for this cluster,
            # which the job starts for itself and stops at the end.
            with _without_local_auth_notice():
                ray.init(address="local", num_cpus=rt.num_cpus or None, include_dashboard=False,
                         logging_level=logging.WARNING)
    except SystemExit as exc:  # ray.init installs a SIGTERM handler of its own that calls sys.exit(SIGTERM)
        if _stop_handlers_on and exc.code == signal.SIGTERM:
            raise _stop(signal.SIGTERM) from None
        raise
    _handle_sigterm()  # ray.init replaces the SIGTERM handler with its own sys.exit
    try:
        yield
    finally:
        ray.shutdown()


AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"


@contextlib.contextmanager
def _without_local_auth_notice():
    """Drop Ray's warning that it turned token auth on by default (printed by every local ``ray.init``)."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    notice = logging.Filter()
    notice.filter = lambda record: not record.getMessage().startswith(AUTH_NOTICE)
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


class LazyRaySession(contextlib.ExitStack):
    """Opens the Ray session on first need only, so a job with nothing left to do never starts Ray."""

    def __init__(self, rt: RuntimeConfig):
        super().__init__()
        self.rt = rt
        self.opened = False

    def ensure(self) -> None:
        if not self.opened:
            self.enter_context(ray_session(self.rt))
            self.opened = True

    def worker_count(self, work_items: int) -> int:
        self.ensure()
        return worker_count(self.rt, work_items)


def planned_worker_count(rt: RuntimeConfig, session: LazyRaySession, work_items: int) -> int:
    """The workers to plan shards for. A local run without GPUs counts this machine's cores (what its cluster
    would get) and does not start Ray for it; otherwise the cluster is asked."""
    if session.opened or cluster_address(rt) or rt.gpus_per_worker:
        return session.worker_count(work_items)
    wanted = rt.num_workers or (rt.num_cpus or encoding.cpu_count()) // rt.cpus_per_worker
    return max(1, min(wanted, work_items))


def worker_count(rt: RuntimeConfig, work_items: int) -> int:
    """``runtime.num_workers``, or as many workers as the cluster's CPUs (and GPUs) hold; never more than items."""
    if rt.num_workers:
        wanted = rt.num_workers
    else:
        resources = ray.cluster_resources()
        wanted = int(resources.get("CPU", 1) // rt.cpus_per_worker)
        if rt.gpus_per_worker:
            wanted = min(wanted, int(resources.get("GPU", 0) // rt.gpus_per_worker))
    return max(1, min(wanted, work_items))


def inline_encoder(cfg: Config) -> encoding.Encoder:
    """The job's own encoder, for texts few enough (``runtime.inline_rows``) that starting Ray and loading the
    model in actors would cost more than encoding them here; loaded once per process, encoding on every core."""
    return _inline_encoder(cfg.model, cfg.runtime.gpus_per_worker)


@functools.lru_cache(maxsize=1)
def _inline_encoder(model: ModelConfig, gpus: float) -> encoding.Encoder:
    return encoding.load_encoder(model, gpus, threads=encoding.cpu_count())


@contextlib.contextmanager
def released(actors: list):
    """The actors, killed on leaving (an error included), so their CPUs are free for what comes next: a rerun in
    the same process, or the next stage of a pipeline."""
    try:
        yield actors
    finally:
        if stop_received() is None:  # on a stop, the driver's disconnect ends its actors without retry notices
            for actor in actors:
                ray.kill(actor)


MIN_SPECULATION_S = 5.0  # never start a copy of work younger than this


def run_on_actors(actors: list, method: str, items: list, args: tuple, on_done, item_arg=None,
                  work: str = "", speculation: float = 0.0) -> None:
    """Call ``actor.<method>(item_arg(item), *args)`` for every item (``item_arg`` defaults to the item itself),
    one call in flight per actor, the next item going to whichever actor finishes first (load balance);
    ``on_done(item, result)`` runs in the driver as results come, once per item. A failure is
    :class:`StageFailed` naming ``work`` (default: the method) and the item.

    ``speculation`` > 0: once nothing is left to hand out, an item running longer than ``speculation`` times the
    median time of the finished ones (and at least ``MIN_SPECULATION_S``) is started again on an idle actor, and
    the first result wins, as Spark's speculative execution does. This finishes the work of an actor whose node was
    lost and that cannot be restarted for want of room, and of a straggler; the work must be idempotent (a shard
    commit is: the same content under the same name).
    """
    calls = _Calls(actors, method, args, item_arg or (lambda item: item))
    queue, finished, durations = list(range(len(items))), set(), []
    while len(finished) < len(items):
        while queue and calls.idle:
            calls.start(calls.idle.pop(0), queue.pop(0), items)
        if not queue and calls.idle and speculation > 0 and durations:
            median = sorted(durations)[len(durations) // 2]
            calls.speculate(items, finished, max(MIN_SPECULATION_S, speculation * median))
        ref = calls.next_done(timeout=1.0 if speculation > 0 else None)
        if ref is None:
            continue
        number, seconds = calls.finish(ref)
        if number in finished:
            continue  # the copy that lost the race
        try:
            result = _result(ref, work or method, items[number])
        except StageFailed:
            if calls.running(number):  # another copy may still succeed
                continue
            raise
        finished.add(number)
        durations.append(seconds)
        on_done(items[number], result)


class _Calls:
    """The calls in flight of :func:`run_on_actors`: which actor runs which item since when, and the idle actors."""

    def __init__(self, actors: list, method: str, args: tuple, item_arg):
        self.idle = list(actors)
        self.method, self.args, self.item_arg = method, args, item_arg
        self.in_flight: dict = {}  # ref -> (actor, item number, started)
        self.copied: set[int] = set()

    def start(self, actor, number: int, items: list) -> None:
        ref = getattr(actor, self.method).remote(self.item_arg(items[number]), *self.args)
        self.in_flight[ref] = (actor, number, time.monotonic())

    def speculate(self, items: list, finished: set, after_s: float) -> None:
        now = time.monotonic()
        for actor, number, started in sorted(self.in_flight.values(), key=lambda v: v[2]):
            if not self.idle:
                return
            if number not in finished and number not in self.copied and now - started > after_s:
                log.warning("%s has run %.0f s (over %.0f s): starting it again on an idle worker",
                            _name_of(items[number]), now - started, after_s)
                self.copied.add(number)
                self.start(self.idle.pop(0), number, items)

    def next_done(self, timeout: float | None):
        done, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=timeout)
        return done[0] if done else None

    def finish(self, ref) -> tuple[int, float]:
        actor, number, started = self.in_flight.pop(ref)
        self.idle.append(actor)
        return number, time.monotonic() - started

    def running(self, number: int) -> bool:
        return any(n == number for _, n, _ in self.in_flight.values())


class StageFailed(RuntimeError):
    """A unit of work (a shard, a part) failed in Ray after the retries it was allowed; the message names the
    work, the unit and the cause, and says that a rerun redoes only what is unfinished."""


def _result(ref, work: str, item):
    """``ray.get(ref)``, or :class:`StageFailed` naming ``work`` and the item when Ray gives up on it: an actor
    that died more often than ``runtime.max_restarts`` allows, a task that failed more than
    ``runtime.max_task_retries`` times, or an error raised by the library (its message kept). A ``ValueError`` of
    the library (bad input or settings, which a rerun alone would not mend) is raised as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None) or exc
        if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, ValueError):
            raise cause from None
        text = str(cause).strip().splitlines()
        if isinstance(exc, ray.exceptions.RayTaskError) and not isinstance(exc, ray.exceptions.ActorDiedError):
            text = [line for line in text if line.strip()][-1:] or text  # the library's message, not Ray's trace
        raise StageFailed(f"{work} of {_name_of(item)} failed: {type(cause).__name__}: {' '.join(text)[:1500]}. "
                          f"Committed work is kept: run the same command again to redo only what is unfinished"
                          ) from None


def _name_of(item) -> str:
    if isinstance(item, (int, str)):  # a number or a name
        return str(item)
    name = getattr(item, "name", None) or (item.get("name") if isinstance(item, dict) else None)
    return str(name) if name is not None else f"item {item!r}"


def largest_node_cpus() -> int:
    """CPUs of the biggest alive node: a task that needs a whole node asks for this many."""
    cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    return max(1, int(max(cpus, default=1)))


def run_tasks(futures: dict, on_done, work: str = "task") -> None:
    """Wait for ``{object_ref: item}``; ``on_done(item, result)`` runs in the driver as each finishes (a failure is
    :class:`StageFailed` naming ``work`` and the item)."""
    pending = dict(futures)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        item = pending.pop(done[0])
        on_done(item, _result(done[0], work, item))


class Stopped(BaseException):
    """The job received SIGINT (Ctrl-C) or SIGTERM (what a scheduler or ``ray job stop`` sends). A BaseException,
    like KeyboardInterrupt, so that no ``except Exception`` swallows it; context managers still clean up."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum


_received: Stopped | None = None  # the first stop signal of the current stop_on_signals block


def _raise_stopped(signum, frame) -> None:
    """The first signal raises :class:`Stopped`; later ones only note themselves, so that the cleanup the first
    one started (killing actors, shutting Ray down) runs to its end instead of breaking off in a traceback."""
    if _received is not None:
        return
    raise _stop(signum)


def _stop(signum: int) -> Stopped:
    global _received
    _received = Stopped(signum)
    return _received


def stop_received() -> Stopped | None:
    """The stop signal received within the last :func:`stop_on_signals` block, if any: an error raised while it was
    handled (Ray's wait turns an exception raised by the handler into a ``SystemError``) is that stop."""
    return _received


def _handle_sigterm() -> None:
    if _stop_handlers_on:
        signal.signal(signal.SIGTERM, _raise_stopped)


_stop_handlers_on = False


@contextlib.contextmanager
def stop_on_signals():
    """Within: SIGINT and SIGTERM raise :class:`Stopped` in the main thread (the Ray session's own cleanup then
    shuts down the workers); the previous handlers come back after."""
    global _stop_handlers_on, _received
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _received = None
    for s in previous:
        signal.signal(s, _raise_stopped)
    _stop_handlers_on = True
    try:
        yield
    finally:
        _stop_handlers_on = False
        for s, handler in previous.items():
            signal.signal(s, handler)


def check_cluster_paths(cfg: Config) -> None:
    """On a cluster (``runtime.address`` or RAY_ADDRESS), a relative local ``output.root`` would land in each
    node's own working directory (under ``ray job submit --working-dir``, a temporary copy that is deleted when the
    cluster stops), so it is refused, as is a relative corpus path that does not exist where the driver runs."""
    address = cluster_address(cfg.runtime)
    if not address:
        return
    shared = "an absolute path on storage every node shares (e.g. /mnt/shared/run1) or an object store URL " \
             "(e.g. s3://bucket/run1)"
    if _is_relative(cfg.output.root):
        raise ConfigError(f"output.root = {cfg.output.root!r} is a relative path and this job runs on the Ray cluster "
                          f"at {address}: it would resolve to {os.path.abspath(cfg.output.root)!r} on each node "
                          f"that writes, which other nodes cannot read and which is lost when a submitted job's "
                          f"working directory is removed; use {shared}")
    paths = [cfg.corpus.path] if isinstance(cfg.corpus.path, str) else list(cfg.corpus.path)
    for path in paths:
        if _is_relative(path) and not os.path.exists(path) and not any(c in path for c in "*?["):
            raise ConfigError(f"corpus.path {path!r} is a relative path that does not exist here "
                              f"({os.path.abspath(path)!r}), and this job runs on the Ray cluster at {address}; "
                              f"use {shared}")


def _is_relative(path: str) -> bool:
    return "://" not in path and not os.path.isabs(os.path.expanduser(path))


def read_version(cfg: Config) -> Config:
    """The config a reading stage (search, evaluate, mine, train) runs with: on a root that a refresh publishes
    versions under, ``output.root`` becomes the version CURRENT names (or ``output.version``); a root written by
    the plain jobs is read as it is."""
    so = cfg.output.storage_options
    root, version = versions.resolve_root(cfg.output.root, so, cfg.output.version)
    if version:
        log.info("reading version %s of %s", version, cfg.output.root)
        # a lease the refresh's retention respects, renewed every publish.lease_renew until this process ends
        lease = versions.register_reader(cfg.output.root, version, so)
        renewing = versions.keep_reader_renewed(lease, so, version, cfg.publish.lease_renew)
        atexit.register(versions.release_reader, lease, so, renewing)
    return dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, root=root, version=""))
