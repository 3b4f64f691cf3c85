"""Bring every serving sink (``serve.sinks``) to the version CURRENT names, from the versions' change files.

Reads:  <output.root>/CURRENT, the versions' refresh.json, changes/ and embeddings/ files.
Writes: the stores; <output.root>/sinks/<name>.json (the version each holds, and its last sync).
The refresh runs this after every published version and every --rollback; run it by hand to retry a sink that
failed (or after adding one: an empty store is loaded whole). Each sink is synced under a lease of its own
(<output.root>/sinks/<name>.lease): a second sync of the same sink waits for the first.
Exit status: 0 every sink holds CURRENT; 3 a sink failed (each is named; the others are still synced); 1 another
error (no CURRENT, a bad setting); 128 + N stopped by signal N (a rerun finishes the step it stopped in).
"""

from __future__ import annotations

import logging
import sys
import time

from jobs import _cli, _metrics, _progress
from retrieval_core.config import Config
from retrieval_core.config.sinks import sink_specs
from retrieval_core.encode import embeddings
from retrieval_core.io import versions
from retrieval_core.io.folder import Folder
from retrieval_core.serve import syncing
from retrieval_core.serve.sinks import store_of
from retrieval_core.serve.stores import open_sink

log = logging.getLogger("jobs.sync")
KEYS = ("output.root", "serve.sinks", "serve.batch_size", "serve.max_retries")
SINK_FAILED = 3  # exit status: the version is published, a sink is not in step with it
ROUNDS = 5  # syncs of one sink in a row while CURRENT keeps moving under it (a rollback during the sync)


def run(cfg: Config, only: tuple[str, ...] = ()) -> dict:
    """Sync every sink (or those named in ``only``) to CURRENT; returns ``{"version", "sinks": {name: record}}``,
    a failed sink's record holding ``error`` (its exception is logged, the other sinks go on)."""
    folder = Folder.output(cfg.output)
    _current(folder)  # a root without CURRENT is refused before any store is opened
    specs = _chosen(sink_specs(cfg.serve.sinks, cfg.serve.batch_size), only)
    results = {spec["name"]: _sync_one(cfg, folder, spec) for spec in specs}
    return {"version": _current(folder), "sinks": results}


def _current(folder: Folder) -> str:
    current = versions.read_current(folder)
    if current is None:
        raise versions.VersionError(f"'{folder.url}' has no CURRENT: no published version to sync sinks to")
    return current["version"]


def _chosen(specs: list[dict], only: tuple[str, ...]) -> list[dict]:
    names = [s["name"] for s in specs]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"--sink {unknown[0]!r}: no such sink in serve.sinks (sinks: {', '.join(names) or 'none'})")
    return [s for s in specs if not only or s["name"] in only]


def _sync_one(cfg: Config, folder: Folder, spec: dict) -> dict:
    """One sink brought to CURRENT under its lease; CURRENT is read once the lease is held, and again after the
    sync: a sync that a rollback (or a refresh) overtook goes on to the new CURRENT."""
    started, pu, name = time.perf_counter(), cfg.publish, spec["name"]
    try:
        with versions.leased(
            folder, pu.lease_expiry, pu.lease_renew, {"job": "jobs.sync"}, f"sinks/{name}.lease", f"sink {name}", True
        ):
            for _ in range(ROUNDS):
                target = _current(folder)
                record = _sync_to(cfg, folder, spec, target)
                if _current(folder) == target:
                    break
            return {**record, "lag": _lag(folder, record["holds"], _current(folder))}
    except Exception as exc:  # noqa: BLE001 - a sink's failure is reported with its name; the others go on
        log.error("sink %s failed after %.1f s: %s: %s", name, time.perf_counter() - started, type(exc).__name__, exc)
        state = syncing.read_state(folder, name)
        state = state if state.get("store") == store_of(spec) else {}  # a record of another store says nothing here
        return {
            **state,
            "error": f"{type(exc).__name__}: {exc}",
            "lag": _lag(folder, state.get("holds"), _current(folder)),
        }


def _sync_to(cfg: Config, folder: Folder, spec: dict, target: str) -> dict:
    manifest = embeddings.read_embeddings_manifest(syncing.version_folder(folder, target))
    sink = open_sink(spec, manifest["dim"], manifest.get("normalized", True), cfg.serve.max_retries)
    try:
        bar = _progress.bar(cfg.runtime, 0, f"sync: {spec['name']}", "row")
        try:
            return syncing.sync(sink, folder, target, bar.update)
        finally:
            bar.close()
    finally:
        sink.close()


def _lag(folder: Folder, held: str | None, target: str) -> int | None:
    """Published versions the store is behind CURRENT (None: unknown, it holds nothing we can place)."""
    if held == target:
        return 0
    found = syncing.chain(folder, target, held) if held else None
    return len(found) - 1 if found else None


def failed(result: dict) -> list[str]:
    return [name for name, record in result["sinks"].items() if "error" in record]


def describe(result: dict) -> str:
    lines = []
    for name, record in result["sinks"].items():
        if "error" in record:
            lines.append(
                f"sync: sink {name} FAILED ({record['error']}); it holds {record.get('holds') or 'nothing known'}, "
                f"CURRENT is {result['version']}; the version stays published: run python -m jobs.sync to retry"
            )
            continue
        last = record["last_sync"]
        steps = ", ".join(f"{s['kind']} {s['version']}" for s in last["steps"]) or "already in step"
        lines.append(
            f"sync: sink {name} holds {record['holds']} ({steps}; {last['upserted']:,} upserted, "
            f"{last['deleted']:,} deleted, {last.get('rows', '?')} rows, in {last['seconds']} s)"
        )
    return "\n".join(lines) or f"sync: no sinks configured (serve.sinks); CURRENT is {result['version']}"


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser(__doc__, "python -m jobs.sync", KEYS)
    p.add_argument("--sink", action="append", default=[], metavar="NAME", help="sync only this sink (repeatable)")
    args = p.parse_args(argv)
    cfg = _cli.config_from_args(args)
    outcome: dict = {}
    started = time.perf_counter()

    def report(result: dict) -> None:
        print(describe(result))
        outcome["failed"] = failed(result)
        summary, samples = _metrics.sink_samples(result)
        status = "ok" if not outcome["failed"] else "sink failed"
        seconds = time.perf_counter() - started
        _metrics.report(cfg, "jobs.sync", status, seconds, {"version": result["version"], "sinks": summary}, samples)

    def errored(exc: BaseException) -> None:
        summary = {"error": _metrics.error_line(exc)}
        _metrics.report(cfg, "jobs.sync", "failed", time.perf_counter() - started, summary, [])

    code = _cli.run_guarded(cfg, lambda: run(cfg, tuple(args.sink)), report, failed=errored)
    return SINK_FAILED if code == 0 and outcome.get("failed") else code


if __name__ == "__main__":
    sys.exit(main())
