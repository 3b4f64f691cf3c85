"""The refresh's version administration: the root's refresh lease, rolling CURRENT back to an earlier version, and
the list of versions (``python -m jobs.refresh --rollback V`` and ``--list``). Nothing here encodes or indexes.
"""

from __future__ import annotations

import json
import logging

from retrieval_core.config import Config
from retrieval_core.io import versions
from retrieval_core.io.folder import Folder

log = logging.getLogger("jobs.refresh")


def lease_of(cfg: Config, job: str, wait: bool = False):
    """The root's refresh lease, held for a ``with`` block (a refresh or a rollback)."""
    pu = cfg.publish
    return versions.leased(
        Folder.output(cfg.output),
        pu.lease_expiry,
        pu.lease_renew,
        owner={"job": job},
        wait=wait,
    )


def rollback(cfg: Config, name: str, wait: bool = False, force: bool = False) -> dict:
    """Point CURRENT at version ``name`` holding the refresh lease (refused while a refresh or another rollback
    holds it, unless ``wait``); a failed or abandoned version only with ``force``. Returns the new CURRENT."""
    root, so = cfg.output.root, cfg.output.storage_options
    with lease_of(cfg, "rollback", wait) as lease:
        target = versions.rollback_target(Folder(root, so), name, force)
        forced = target["state"] in versions.KEPT_FOR_INSPECTION
        if forced:
            log.warning("refresh: --force: publishing %s, which is %s: %s", name, target["state"], target["detail"])
        current = versions.read_current(Folder(root, so))
        return versions.publish(
            Folder(root, so),
            name,
            expected=(current or {}).get("version"),
            by={"action": "rollback", **({"forced": target["detail"]} if forced else {})},
            lease=lease,
        )


def rollback_summary(current: dict) -> str:
    by = current["by"]
    forced = f" (forced past: {by['forced']})" if by.get("forced") else ""
    return (
        f"refresh: CURRENT now names {current['version']} (was {current['previous'] or 'nothing'}){forced}; "
        f"rolled back by {by['user']}@{by['host']} at {by['at']}"
    )


def list_versions(cfg: Config, as_json: bool) -> str:
    """Every version of the root with its state, counts and date; JSON with ``as_json``."""
    found = versions.states(Folder.output(cfg.output))
    if as_json:
        return json.dumps({"root": cfg.output.root, "versions": found}, indent=2)
    if not found:
        return f"no versions under {cfg.output.root}"
    return "\n".join(versions.state_line(s) for s in found)
