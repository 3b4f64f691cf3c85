"""The Ray session: a local single-node cluster, or the cluster named by runtime.address / RAY_ADDRESS; how many
workers it holds; the job's own encoder for work too small for Ray; the version a reading job reads."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import logging
import os
import signal
from typing import Any

import ray

from jobs.ray import dispatch
from retrieval_core.config import Config, ModelConfig, RuntimeConfig
from retrieval_core.encode import encoding, hardware
from retrieval_core.io import versions
from retrieval_core.io.folder import Folder

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
                ray.init(
                    address="local",
                    num_cpus=rt.num_cpus or None,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                )
    except SystemExit as exc:  # ray.init installs a SIGTERM handler of its own that calls sys.exit(SIGTERM)
        if dispatch.stopping_allowed() and exc.code == signal.SIGTERM:
            raise dispatch.stop_from(signal.SIGTERM) from None
        raise
    dispatch.handle_sigterm()  # ray.init replaces the SIGTERM handler with its own sys.exit
    try:
        yield
    finally:
        ray.shutdown()


AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"


@contextlib.contextmanager
def _without_local_auth_notice():
    """Drop Ray's warning that it turned token auth on by default (printed by every local ``ray.init``)."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")

    def notice(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(AUTH_NOTICE)

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


def resolve_auto(cfg: Config) -> Config:
    """``cfg`` with ``model.backend`` / ``model.precision`` ``auto`` replaced: by what the output's embeddings were
    encoded with, when they exist (a resume, a reading stage on other hardware, a refresh night on another node
    kind keep their fingerprint); else by the pick for the workers' hardware: this machine's for a local run, one
    worker's (a task with a worker's CPUs and GPUs) on a cluster."""
    m, rt = cfg.model, cfg.runtime
    if m.provider != "local" or "auto" not in (m.backend, m.precision):
        return cfg
    recorded = _recorded_path(cfg)
    if recorded:
        picked = (
            recorded[0] if m.backend == "auto" else m.backend,
            recorded[1] if m.precision == "auto" else m.precision,
        )
        log.info("model.backend / model.precision = auto: %s/%s, as the output's embeddings were encoded", *picked)
        return dataclasses.replace(cfg, model=dataclasses.replace(m, backend=picked[0], precision=picked[1]))
    if cluster_address(rt):
        with ray_session(rt):
            log.info("asking a worker of the cluster what it encodes on (model.backend / model.precision = auto)")
            probe: Any = ray.remote(num_cpus=rt.cpus_per_worker, num_gpus=rt.gpus_per_worker)(hardware.this_machine)
            hw = ray.get(probe.remote(rt.gpus_per_worker))
    else:
        hw = hardware.this_machine(rt.gpus_per_worker)
    return dataclasses.replace(cfg, model=hardware.resolved(m, hw))


def _recorded_path(cfg: Config) -> tuple[str, str] | None:
    """(backend, precision) the output's embeddings (the version CURRENT names, on a refreshed root) were encoded
    with, or None where there are none yet."""
    from retrieval_core.encode.embeddings import read_embeddings_manifest

    so = cfg.output.storage_options
    try:
        root, _ = versions.resolve_root(Folder(cfg.output.root, so), cfg.output.version)
        if not Folder(root, so).exists("embeddings", "_manifest.json"):
            return None
        encoder = read_embeddings_manifest(Folder(root, so))["encoder"]
    except (OSError, ValueError, KeyError):  # no output yet, or one of an older layout: pick afresh
        return None
    return encoder.get("backend", "torch"), encoder.get("precision", "fp32")


def inline_encoder(cfg: Config) -> encoding.Encoder:
    """The job's own encoder, for texts few enough (``runtime.inline_rows``) that starting Ray and loading the
    model in actors would cost more than encoding them here; loaded once per process, encoding on every core."""
    return _inline_encoder(cfg.model, cfg.runtime.gpus_per_worker)


@functools.lru_cache(maxsize=1)
def _inline_encoder(model: ModelConfig, gpus: float) -> encoding.Encoder:
    return encoding.load_encoder(model, gpus, threads=encoding.cpu_count())


def read_version(cfg: Config) -> Config:
    """The config a reading stage (search, evaluate, mine, train) runs with: on a root that a refresh publishes
    versions under, ``output.root`` becomes the version CURRENT names (or ``output.version``); a root written by
    the plain jobs is read as it is."""
    so = cfg.output.storage_options
    root, version = versions.resolve_root(Folder(cfg.output.root, so), cfg.output.version)
    if version:
        log.info("reading version %s of %s", version, cfg.output.root)
        # a lease the refresh's retention respects, renewed every publish.lease_renew until this process ends
        lease = versions.register_reader(Folder(cfg.output.root, so), version)
        renewing = versions.keep_reader_renewed(lease, so, version, cfg.publish.lease_renew)
        atexit.register(versions.release_reader, lease, so, renewing)
    return dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, root=root, version=""))
