"""Command-line handling shared by every stage: ``--config F``, repeatable ``--set key=value``, help that lists
the stage's main keys with their defaults, one-line errors, and a clean stop on Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Iterable

from jobs import _metrics
from jobs.ray import cluster, dispatch
from retrieval_core.config import Config, ConfigError, default_value, load_config
from retrieval_core.config import rules as config_rules
from retrieval_core.io import leases, manifest, storage, versions
from retrieval_core.io.folder import Folder

REFERENCE = (
    "Every key with its default: configs/demo.yaml. Full reference: README.md, section 'Configuration reference'."
)


def parser(description: str, prog: str, keys: Iterable[str] = ()) -> argparse.ArgumentParser:
    """The stage's parser; its help shows ``prog`` (e.g. ``python -m jobs.encode``), ``description`` as written,
    and ``keys`` with their built-in defaults."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description.strip(),
        epilog=_keys_help(keys),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        help="YAML config file or fsspec URL (default: the built-in defaults, which equal configs/demo.yaml)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set model.batch_size=64 (repeatable; value parsed as YAML)",
    )
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p


def _keys_help(keys: Iterable[str]) -> str:
    keys = list(keys)
    if not keys:
        return REFERENCE
    width = max(len(k) for k in keys)
    lines = [f"  {key:<{width}}  {json.dumps(default_value(key))}" for key in keys]
    return "main keys (--set KEY=VALUE) and their defaults:\n" + "\n".join(lines) + "\n\n" + REFERENCE


def config_from_args(args: argparse.Namespace) -> Config:
    """Logging set up, the config loaded and checked for this run's place (local or cluster); exits with one
    line on a configuration error."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        config_rules.check_cluster_paths(cfg, cluster.cluster_address(cfg.runtime))
        config_rules.check_extras(cfg)
        cfg = cluster.resolve_auto(cfg)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
    return cfg


# Errors a job reports as one line (exit status 1): bad input or settings, incompatible or missing outputs, storage
# that cannot be read or written (OSError: its message names the path).
JOB_ERRORS = (OSError, ValueError, RuntimeError)


def run_job(
    description: str,
    run: Callable[[Config], Any],
    describe: Callable[[Any], str],
    argv: list[str] | None = None,
    keys: Iterable[str] = (),
) -> int:
    """The ``main`` of a stage: parse ``--config`` / ``--set``, run, print ``describe(result)`` and report the run
    (:func:`jobs._metrics.report`: its JSON line, run summary and metrics). Exit status 1 on errors (reported as
    failed); on Ctrl-C or SIGTERM one line saying what is committed, then 128 + the signal number."""
    job = _module_name(run)
    args = parser(description, f"python -m {job}", keys).parse_args(argv)
    cfg = config_from_args(args)
    started = time.perf_counter()

    def succeeded(result: Any) -> None:
        print(describe(result))
        _metrics.report(cfg, job, "ok", time.perf_counter() - started, *_metrics.samples_of(job, result))

    def failed(exc: BaseException) -> None:
        summary = {"error": _metrics.error_line(exc)}
        theirs = isinstance(exc, (leases.LockedError, leases.LeaseLost))  # the root is another job's: not written
        _metrics.report(cfg, job, "failed", time.perf_counter() - started, summary, [], in_root=not theirs)

    return run_guarded(cfg, lambda: _locked_run(cfg, run, job), succeeded, failed=failed)


def _locked_run(cfg: Config, run: Callable[[Config], Any], job: str) -> Any:
    """``run(cfg)`` holding the output root's job lease: a second job writing the same root at the same time (two
    overlapping cron runs, say) is refused, naming the holder. The lease is renewed in the background
    (``publish.lease_renew``); one left by a killed job is taken over when its process is gone from this host, or
    once it has not been renewed for ``publish.lease_expiry`` seconds. A job whose lease was taken over (it was
    paused past the expiry) fails instead of reporting success."""
    local = storage.local_path(cfg.output.root, cfg.output.storage_options)
    made_root = local is not None and not os.path.exists(local)
    pu = cfg.publish
    with versions.leased(
        Folder.output(cfg.output),
        pu.lease_expiry,
        pu.lease_renew,
        owner={"job": job},
        path=leases.JOB_LEASE,
        what="job",
    ) as lease:
        try:
            result = run(cfg)
        except BaseException:
            if made_root and local:  # a job that failed before writing anything leaves no root made for its lease
                lease.on_release = lambda: _remove_lease_only_root(local, lease.url)
            raise
        lease.check("reporting success")
        return result


def _remove_lease_only_root(root: str, lease_file: str) -> None:
    """Remove this job's own lease record and the directories left empty, up to the root it made; a directory
    holding anything else (another job's lease, output) stays."""
    with contextlib.suppress(OSError):
        os.remove(lease_file)
    directory = os.path.dirname(lease_file)
    while True:
        with contextlib.suppress(OSError):
            os.rmdir(directory)  # only if empty
        if os.path.abspath(directory) == os.path.abspath(root) or os.path.exists(directory):
            return
        directory = os.path.dirname(directory)


def _module_name(run: Callable) -> str:
    """``jobs.encode`` for ``jobs.encode.run``, also when that module runs as ``python -m jobs.encode``."""
    if run.__module__ != "__main__":
        return run.__module__
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec.name if spec else "jobs"


def run_guarded(
    cfg: Config,
    work: Callable[[], Any],
    report: Callable[[Any], None],
    committed: Callable[[], str] | None = None,
    failed: Callable[[BaseException], None] | None = None,
) -> int:
    """Run ``work()`` with the job's error and signal handling; ``report(result)`` on success. A job error (one of
    ``JOB_ERRORS``) is logged on one line, passed to ``failed`` and returns 1. A stop prints one line (what
    ``committed()`` says is committed, by default the work under ``output.root``) and returns 128 + the signal,
    wherever it landed: also when the signal surfaced as another error from inside a library call (a
    ``SystemError`` out of Ray's wait, say)."""
    try:
        with dispatch.stop_on_signals():
            result = work()
    except BaseException as exc:  # noqa: BLE001 - sorted below: a stop, a job error, or raised again
        stop = exc if isinstance(exc, dispatch.Stopped) else dispatch.stop_received()
        if stop is not None:
            print(stopped_message(cfg, stop.signal_name, committed), file=sys.stderr)
            return stop.exit_code
        if isinstance(exc, JOB_ERRORS):
            logging.getLogger("jobs").error("%s", exc)
            if failed:
                failed(exc)
            return 1
        raise
    report(result)
    return 0


def stopped_message(cfg: Config, signal_name: str, committed: Callable[[], str] | None = None) -> str:
    """One line: the signal, the work committed (under ``output.root``, or what ``committed()`` says), and that a
    rerun resumes."""
    try:
        done = committed() if committed else manifest.committed_work(cfg.output.root, cfg.output.storage_options)
    except Exception as exc:  # noqa: BLE001 - a stop report never fails on its own
        done = f"could not list the committed work ({type(exc).__name__})"
    return (
        f"stopped by {signal_name}: workers stopped; committed under {cfg.output.root}: {done or 'nothing yet'}. "
        f"Run the same command again to resume from there."
    )
