"""Stage manifests and the identity checks that keep incompatible outputs from mixing."""

from __future__ import annotations

import json
import posixpath
import resource
import sys
import time
from typing import Any

from retrieval_core.io import shard_list, storage
from retrieval_core.io.schemas import SCHEMA_VERSION, IncompatibleOutputError

__all__ = ["IncompatibleOutputError"]  # raised here and by the readers of stage outputs


def identity_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two identity dicts, one line per changed key."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines.extend(identity_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            lines.append(f"{prefix}{key}: existing {_short(a)}, this run {_short(b)}")
    return lines


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def check_same_identity(old: dict, new: dict, where: str) -> None:
    differences = identity_differences(old, new)
    if differences:
        raise IncompatibleOutputError(
            f"the output at '{where}' was made with other settings:\n  "
            + "\n  ".join(differences)
            + "\nset output.overwrite=true to replace it, or choose another output.root"
        )


def digest(content: Any) -> str:
    """32 hex digits of SHA-256 over ``content`` as JSON with sorted keys: the identities' and fingerprints' hash."""
    import hashlib

    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]


def stamp() -> dict:
    """Fields every manifest carries."""
    return {"schema_version": SCHEMA_VERSION, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def read_manifest(url: str, storage_options: dict | None = None, stage: str = "") -> dict:
    if not storage.exists(url, storage_options):
        raise FileNotFoundError(f"no manifest at '{url}': has the {stage or 'previous'} stage completed?")
    manifest = storage.read_json(url, storage_options)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise IncompatibleOutputError(f"'{url}' has schema version {version}; this code reads {SCHEMA_VERSION}")
    return shard_list.attach(manifest, url, storage_options)


def claim_stage_dir(
    stage_dir: str, identity: dict, plan: dict, overwrite: bool, storage_options: dict | None = None
) -> None:
    """Before a stage writes into ``stage_dir``: an earlier ``_plan.json`` with another identity is refused (each
    difference listed), or with ``overwrite`` the directory is cleared; a new plan (``identity`` plus ``plan``)
    is written; temporaries a killed run left are removed."""
    plan_url = storage.join(stage_dir, "_plan.json")
    previous = storage.read_json(plan_url, storage_options) if storage.exists(plan_url, storage_options) else None
    if previous and overwrite:
        storage.remove(stage_dir, storage_options)
        previous = None
    if previous:
        check_same_identity(previous["identity"], identity, stage_dir)
    else:
        storage.write_json_atomic(plan_url, {**stamp(), "identity": identity, **plan}, storage_options)
    storage.remove_temporaries(stage_dir, storage_options)


# stage directory -> (its completion manifest, its commit records directory, plan key holding the work list, unit)
STAGE_DIRS = {
    "embeddings": ("_manifest.json", "_shards", "shards", "shards"),
    "index": ("manifest.json", "_shards", "shards", "shards"),
    "negatives": ("_manifest.json", "_parts", "parts", "parts"),
}


def committed_work(root: str, storage_options: dict | None = None) -> str:
    """What a stopped run left committed under ``root`` (and ``root/trained``), e.g. ``'embeddings complete,
    index 3 of 8 shards'``; '' when nothing was planned yet. Reads plans and lists commit records only."""
    found = []
    for base, label in ((root, ""), (storage.join(root, "trained"), "trained ")):
        for stage, (final, records, key, unit) in STAGE_DIRS.items():
            stage_dir = storage.join(base, stage)
            plan_url = storage.join(stage_dir, "_plan.json")
            if not storage.exists(plan_url, storage_options):
                continue
            if storage.exists(storage.join(stage_dir, final), storage_options):
                found.append(f"{label}{stage} complete")
                continue
            planned = storage.read_json(plan_url, storage_options).get(key)
            total = planned if isinstance(planned, int) else len(planned or [])
            done = count_records(storage.join(stage_dir, records), storage_options)
            found.append(f"{label}{stage} {done} of {total} {unit}")
    return ", ".join(found)


def count_records(directory: str, storage_options: dict | None = None) -> int:
    """The commit records (``*.json``, no temporaries) in a directory; 0 when it does not exist."""
    return sum(
        1 for n in storage.list_names(directory, storage_options) if n.endswith(".json") and storage.TMP_MARK not in n
    )


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB. Linux: VmHWM of /proc/self/status (ru_maxrss would
    carry over the memory of the parent a process was forked from, e.g. a benchmark that launched the job);
    elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


def write_streamed(url: str, entries, fields, schema, storage_options: dict | None = None) -> dict:
    """Write a stage's manifest: its shard entries (an iterable of dicts, consumed once) streamed into the shard table
    beside it (``shard_list.SHARD_LIST_FILE``, rows of ``schema``), so that the writer holds one batch; then the
    manifest itself, ``fields()`` (called after the last entry, so it may report totals over them) plus
    ``shard_list`` (the table's file, count and digest). Returns the manifest without its entries. An error on the
    way leaves no manifest."""
    table = shard_list.write(
        storage.join(posixpath.dirname(url.rstrip("/")), shard_list.SHARD_LIST_FILE), entries, schema, storage_options
    )
    done = {**fields(), "shard_list": table}
    storage.write_json_atomic(url, done, storage_options)
    return done
