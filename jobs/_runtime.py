"""Ray session handling: a local single-node cluster, or the cluster named by runtime.address / RAY_ADDRESS."""
from __future__ import annotations

import contextlib
import logging
import os

import ray

from retrieval_core.config import RuntimeConfig

log = logging.getLogger(__name__)


def cluster_address(rt: RuntimeConfig) -> str:
    """``runtime.address`` when set, else ``RAY_ADDRESS`` (set by ``ray job submit``), else '' (local)."""
    return rt.address or os.environ.get("RAY_ADDRESS", "")


@contextlib.contextmanager
def ray_session(rt: RuntimeConfig):
    """Connect to (or start) Ray for the duration of a job; a session already open is reused and left open."""
    if ray.is_initialized():
        yield
        return
    address = cluster_address(rt)
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # address="local": always a new local cluster, never one a `ray start` on this machine left behind
        ray.init(address="local", num_cpus=rt.num_cpus or None, include_dashboard=False,
                 logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


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


def run_on_actors(actors: list, method: str, items: list, args: tuple, on_done, item_arg=None) -> None:
    """Call ``actor.<method>(item_arg(item), *args)`` for every item (``item_arg`` defaults to the item itself),
    one call in flight per actor, the next item going to whichever actor finishes first (load balance);
    ``on_done(item, result)`` runs in the driver as results come.
    """
    queue = list(items)
    in_flight = {}
    item_arg = item_arg or (lambda item: item)
    for actor in actors:
        if queue:
            item = queue.pop(0)
            in_flight[getattr(actor, method).remote(item_arg(item), *args)] = (actor, item)
    while in_flight:
        done, _ = ray.wait(list(in_flight), num_returns=1)
        actor, item = in_flight.pop(done[0])
        on_done(item, ray.get(done[0]))
        if queue:
            next_item = queue.pop(0)
            in_flight[getattr(actor, method).remote(item_arg(next_item), *args)] = (actor, next_item)


def largest_node_cpus() -> int:
    """CPUs of the biggest alive node: a task that needs a whole node asks for this many."""
    cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    return max(1, int(max(cpus, default=1)))


def run_tasks(futures: dict, on_done) -> None:
    """Wait for ``{object_ref: item}``; ``on_done(item, result)`` runs in the driver as each finishes."""
    pending = dict(futures)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        item = pending.pop(done[0])
        on_done(item, ray.get(done[0]))
