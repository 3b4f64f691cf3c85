"""Publishing a refresh's version: the gates, ``refresh.json``, and retention of older versions."""
from __future__ import annotations

from . import storage, versions
from .config import Config
from .embeddings import read_embeddings_manifest, shard_url
from .indexing import read_index_manifest, shard_index_url
from .manifest import stamp
from .refreshing import RefreshPlan


class GateError(RuntimeError):
    """A new version failed a publish gate; CURRENT was left where it was."""


def gates(cfg: Config, counts: dict, recall: float | None, ndcg: float | None, previous_ndcg: float | None,
          first: bool) -> list[dict]:
    """Each publish gate with its threshold, value and verdict. The deleted and added fractions apply from the
    second version on (the first adds everything); the nDCG drop when both versions were evaluated."""
    pu = cfg.publish
    documents = max(1, counts["unchanged"] + counts["changed"] + counts["deleted"])
    rows = [("min_recall", pu.min_recall, recall, lambda v, t: v >= t),
            ("max_reject_fraction", pu.max_reject_fraction, counts["rejected"] / max(1, counts["snapshot_rows"]),
             lambda v, t: v <= t)]
    if not first:
        rows += [("max_deleted_fraction", pu.max_deleted_fraction, counts["deleted"] / documents, lambda v, t: v <= t),
                 ("max_added_fraction", pu.max_added_fraction, counts["added"] / documents, lambda v, t: v <= t)]
    if ndcg is not None and previous_ndcg is not None:
        rows.append(("max_ndcg_drop", pu.max_ndcg_drop, round(previous_ndcg - ndcg, 6), lambda v, t: v <= t))
    return [{"gate": f"publish.{name}", "threshold": threshold, "value": None if value is None else round(value, 6),
             "passed": value is None or check(value, threshold)} for name, threshold, value, check in rows]


def write_refresh_record(p: RefreshPlan, record: dict, so: dict) -> None:
    """``refresh.json``, written last in a version."""
    storage.write_json_atomic(storage.join(p.version_root, "refresh.json"),
                              {**stamp(), "version": p.version, "previous": p.previous, **record}, so)


def previous_ndcg(p: RefreshPlan, so: dict) -> float | None:
    url = storage.join(p.previous_root or "", "eval", "metrics.json")
    if not p.previous_root or not storage.exists(url, so):
        return None
    return storage.read_json(url, so)["metrics"]["ndcg@10"]


def referenced_files(root: str, name: str, so: dict) -> set[str]:
    """Files of other versions that version ``name`` reads: shared segments, tombstones, shard indexes."""
    base = versions.version_root(root, name)
    out = set()
    if storage.exists(storage.join(base, "embeddings", "_manifest.json"), so):
        for shard in read_embeddings_manifest(base, so)["shards"]:
            out.add(shard_url(base, shard))
            if shard.get("deleted_path"):
                out.add(shard_url(base, shard, "deleted_path"))
    if storage.exists(storage.join(base, "index", "manifest.json"), so):
        out |= {shard_index_url(storage.join(base, "index"), s) for s in read_index_manifest(base, so)["shards"]}
    return out


def apply_retention(cfg: Config) -> list[str]:
    """Delete the versions older than the newest ``publish.keep_versions`` (never CURRENT's, never one a reader
    holds a fresh lease on), keeping the files that kept versions still share; returns the versions deleted."""
    root, so = cfg.output.root, cfg.output.storage_options
    names = versions.list_versions(root, so)
    current = (versions.read_current(root, so) or {}).get("version")
    doomed = versions.versions_to_delete(names, current, cfg.publish.keep_versions,
                                         versions.readers_in_use(root, so, cfg.publish.lock_timeout))
    kept = [n for n in names if n not in doomed]
    referenced = set().union(*(referenced_files(root, n, so) for n in kept)) if kept else set()
    for name in doomed:
        versions.delete_version_files(root, name, so, referenced)
    return doomed
