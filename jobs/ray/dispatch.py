"""Dispatch: where a step runs (:func:`runs_here`), calls on actors and Ray tasks, waiting on them, their failures
named, and the stop signal.

Only ``jobs.ray`` imports ray; the stage drivers say what to run and this module decides where and runs it.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import signal
import time
from collections.abc import Iterable
from typing import Any

import ray

log = logging.getLogger(__name__)


def runs_here(work: int, limit: int) -> bool:
    """The one rule for where a step runs, for every stage: in the job's own process when its work (rows to encode,
    vectors to index, queries to encode or mine, bytes to plan) is at most ``limit`` (``runtime.inline_rows``,
    ``refresh.inline_snapshot_rows``, ...), because starting Ray and loading a model in each actor would cost more
    than the work; else on Ray actors and tasks. A limit of 0 sends all work to Ray (none is ever here when the
    step has any)."""
    return work <= limit


def put(value):
    """``value`` in the object store, once; tasks get the reference."""
    return ray.put(value)


def call(remote_function, *args):
    """Run a Ray remote function (or ``function`` made remote with one CPU) once and wait for its result."""
    return ray.get(remote_function.remote(*args))


def wait_ready(actors: list) -> None:
    """Wait until every actor has answered ``ready()`` (its model and index loaded)."""
    ray.get([actor.ready.remote() for actor in actors])


def call_in_task(function, *args, num_cpus: int = 1):
    """``function(*args)`` in one Ray task of ``num_cpus`` CPUs; its result."""
    return ray.get(ray.remote(function).options(num_cpus=num_cpus).remote(*args))


def each_in_tasks(function, items: list, args: tuple, on_done, work: str, max_retries: int) -> None:
    """``function(item, *args)`` for every item, one Ray task (one CPU) each, ``args`` put in the object store once;
    ``on_done(item, result)`` in the driver as each finishes (see :func:`run_tasks`)."""
    remote = ray.remote(function).options(num_cpus=1, max_retries=max_retries)
    refs = tuple(ray.put(arg) for arg in args)
    run_tasks(lambda item: remote.remote(item, *refs), items, on_done, work)


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


def run_on_actors(
    actors: list,
    method: str,
    items: Iterable,
    args: tuple,
    on_done,
    item_arg=None,
    work: str = "",
    speculation: float = 0.0,
) -> None:
    """Call ``actor.<method>(item_arg(item), *args)`` for every item (``item_arg`` defaults to the item itself),
    one call in flight per actor, the next item going to whichever actor finishes first (load balance);
    ``on_done(item, result)`` runs in the driver as results come, once per item. A failure is
    :class:`StageFailed` naming ``work`` (default: the method) and the item. Items are read as actors free up (an
    iterator of 100,000 shards is never made a list), and the driver holds the calls in flight and the durations
    of the last ``DURATIONS_KEPT`` finished ones.

    ``speculation`` > 0: once nothing is left to hand out, an item running longer than ``speculation`` times the
    median time of the finished ones (and at least ``MIN_SPECULATION_S``) is started again on an idle actor, and
    the first result wins, as Spark's speculative execution does. This finishes the work of an actor whose node was
    lost and that cannot be restarted for want of room, and of a straggler; the work must be idempotent (a shard
    commit is: the same content under the same name).
    """
    if not actors:
        raise ValueError(f"run_on_actors({method!r}): no actors to run on")
    calls = _Calls(actors, method, args, item_arg or (lambda item: item))
    queue = iter(enumerate(items))
    durations: collections.deque[float] = collections.deque(maxlen=DURATIONS_KEPT)
    left = True  # items not handed out yet
    while left or calls.unfinished():
        while left and calls.idle:
            numbered = next(queue, None)
            if numbered is None:
                left = False
                break
            calls.start(calls.idle.pop(0), *numbered)
        if not left and calls.idle and speculation > 0 and durations:
            median = sorted(durations)[len(durations) // 2]
            calls.speculate(max(MIN_SPECULATION_S, speculation * median))
        if not calls.in_flight:
            continue
        ref = calls.next_done(timeout=1.0 if speculation > 0 else None)
        if ref is None:
            continue
        number, item, seconds = calls.finish(ref)
        if number in calls.finished_copies:
            calls.finished_copies.discard(number)  # the copy that lost the race
            continue
        try:
            result = _result(ref, work or method, item)
        except StageFailed:
            if calls.running(number):  # another copy may still succeed
                continue
            raise
        if calls.running(number):
            calls.finished_copies.add(number)  # its other copy's result, when it comes, is dropped
        durations.append(seconds)
        on_done(item, result)


DURATIONS_KEPT = 1001  # finished calls whose durations set the speculation's median


class _Calls:
    """The calls in flight of :func:`run_on_actors`: which actor runs which item since when, and the idle actors."""

    def __init__(self, actors: list, method: str, args: tuple, item_arg):
        self.idle = list(actors)
        self.method, self.args, self.item_arg = method, args, item_arg
        self.in_flight: dict = {}  # ref -> (actor, item number, item, started)
        self.copied: set[int] = set()  # items started twice (speculation), at most one per actor at a time
        self.finished_copies: set[int] = set()  # items done whose other copy still runs

    def start(self, actor, number: int, item) -> None:
        ref = getattr(actor, self.method).remote(self.item_arg(item), *self.args)
        self.in_flight[ref] = (actor, number, item, time.monotonic())

    def speculate(self, after_s: float) -> None:
        now = time.monotonic()
        for _actor, number, item, started in sorted(self.in_flight.values(), key=lambda v: v[3]):
            if not self.idle:
                return
            if number not in self.finished_copies and number not in self.copied and now - started > after_s:
                log.warning(
                    "%s has run %.0f s (over %.0f s): starting it again on an idle worker",
                    _name_of(item),
                    now - started,
                    after_s,
                )
                self.copied.add(number)
                self.start(self.idle.pop(0), number, item)

    def next_done(self, timeout: float | None):
        done, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=timeout)
        return done[0] if done else None

    def finish(self, ref) -> tuple[int, Any, float]:
        actor, number, item, started = self.in_flight.pop(ref)
        self.idle.append(actor)
        if not self.running(number):
            self.copied.discard(number)
        return number, item, time.monotonic() - started

    def running(self, number: int) -> bool:
        return any(n == number for _, n, _, _ in self.in_flight.values())

    def unfinished(self) -> bool:
        """Whether a call in flight is for an item without a result yet (a copy that lost the race is not waited
        for: its actor may be on a lost node)."""
        return any(n not in self.finished_copies for _, n, _, _ in self.in_flight.values())


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
        raise StageFailed(
            f"{work} of {_name_of(item)} failed: {type(cause).__name__}: {' '.join(text)[:1500]}. "
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


def window_size(cpus_per_task: float = 1) -> int:
    """Tasks the driver keeps in flight: two per slot of the cluster as it is now (a slot: ``cpus_per_task`` CPUs),
    at least 2, so that a slot starts its next task as soon as one ends while the driver waits on a few tasks, not
    on all of them."""
    cpus = ray.cluster_resources().get("CPU", 1)
    return max(2, int(2 * cpus / max(cpus_per_task, 0.01)))


def largest_node_gpus() -> int:
    """GPUs of the alive node that has the most (0 on a CPU cluster): a task that needs a node's GPUs asks this."""
    gpus = [node["Resources"].get("GPU", 0) for node in ray.nodes() if node.get("Alive")]
    return int(max(gpus, default=0))


def run_tasks(submit, items, on_done, work: str = "task", window: int | None = None) -> None:
    """``submit(item)`` (a remote call: its object ref) for every item of ``items``, an iterable read as tasks are
    started, with at most ``window`` (default :func:`window_size`) in flight; ``on_done(item, result)`` runs in the
    driver as each finishes (a failure is :class:`StageFailed` naming ``work`` and the item). The driver's time and
    memory per task do not grow with the number of tasks: it holds and waits on the window only. Large arguments
    should be object refs made once (:func:`put`), so that a task carries a reference, not a copy."""
    window = window or window_size()
    source, pending = iter(items), dict[object, object]()

    def top_up() -> None:
        for item in itertools.islice(source, max(0, window - len(pending))):
            pending[submit(item)] = item

    top_up()
    while pending:
        ray.wait(list(pending), num_returns=1)
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in ready:
            item = pending.pop(ref)
            on_done(item, _result(ref, work, item))
        top_up()


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


def stopping_allowed() -> bool:
    """Within :func:`stop_on_signals`: a SIGTERM is this job's stop."""
    return _stop_handlers_on


def stop_from(signum: int) -> Stopped:
    """The stop of signal ``signum``, noted as received (for a signal Ray's own handler caught first)."""
    return _stop(signum)


def handle_sigterm() -> None:
    """Put this job's SIGTERM handler back (``ray.init`` replaces it with its own ``sys.exit``)."""
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
