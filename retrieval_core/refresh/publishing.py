"""Publishing a refresh's version: the gates, ``refresh.json``, and retention of older versions."""

from __future__ import annotations

from retrieval_core.config import Config
from retrieval_core.encode.embeddings import read_embeddings_manifest, shard_url
from retrieval_core.index.index_files import shard_index_url
from retrieval_core.index.indexing import read_index_manifest
from retrieval_core.io import leases, storage, versions
from retrieval_core.io.folder import Folder
from retrieval_core.io.manifest import stamp
from retrieval_core.refresh.refreshing import RefreshPlan


class GateError(RuntimeError):
    """A new version failed a publish gate; CURRENT was left where it was."""


def gates(
    cfg: Config, counts: dict, recall: float | None, ndcg: float | None, previous_ndcg: float | None, first: bool
) -> list[dict]:
    """Each publish gate with its threshold, value, verdict and a message with the counts behind the value
    ("deleted 3,112 of 5,183 documents (60.0%) > 10%"). The deleted and added fractions apply from the second
    version on (the first adds everything); the nDCG drop when both versions were evaluated."""
    pu = cfg.publish
    documents = max(1, counts["unchanged"] + counts["changed"] + counts["deleted"])
    snapshot = max(1, counts["snapshot_rows"])
    rows = [
        (
            "min_recall",
            pu.min_recall,
            recall,
            True,
            lambda sign: f"recall@10 of the index {recall:.4f} {sign} {pu.min_recall}",
        ),
        (
            "max_reject_fraction",
            pu.max_reject_fraction,
            counts["rejected"] / snapshot,
            False,
            lambda sign: _share(
                "rejected", counts["rejected"], snapshot, "snapshot rows", sign, pu.max_reject_fraction
            ),
        ),
    ]
    if not first:
        rows += [
            (
                "max_deleted_fraction",
                pu.max_deleted_fraction,
                counts["deleted"] / documents,
                False,
                lambda sign: _share(
                    "deleted", counts["deleted"], documents, "documents", sign, pu.max_deleted_fraction
                ),
            ),
            (
                "max_added_fraction",
                pu.max_added_fraction,
                counts["added"] / documents,
                False,
                lambda sign: _share("added", counts["added"], documents, "documents", sign, pu.max_added_fraction),
            ),
        ]
    if ndcg is not None and previous_ndcg is not None:
        drop = round(previous_ndcg - ndcg, 6)
        rows.append(
            (
                "max_ndcg_drop",
                pu.max_ndcg_drop,
                drop,
                False,
                lambda sign: f"nDCG@10 fell {drop:.4f} ({previous_ndcg:.4f} -> {ndcg:.4f}) {sign} {pu.max_ndcg_drop}",
            )
        )
    return [_gate(name, threshold, value, at_least, message) for name, threshold, value, at_least, message in rows]


def _gate(name: str, threshold: float, value: float | None, at_least: bool, message) -> dict:
    passed = value is None or (value >= threshold if at_least else value <= threshold)
    sign = (">=" if passed else "<") if at_least else ("<=" if passed else ">")
    return {
        "gate": f"publish.{name}",
        "threshold": threshold,
        "value": None if value is None else round(value, 6),
        "passed": passed,
        "message": "not measured" if value is None else message(sign),
    }


def _share(what: str, count: int, total: int, of: str, sign: str, limit: float) -> str:
    return f"{what} {count:,} of {total:,} {of} ({count / total:.1%}) {sign} {limit * 100:g}%"


def write_refresh_record(p: RefreshPlan, record: dict, so: dict) -> None:
    """``refresh.json``, written last in a version."""
    storage.write_json_atomic(
        storage.join(p.version_root, "refresh.json"),
        {**stamp(), "version": p.version, "previous": p.previous, **record},
        so,
    )


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
        for shard in read_embeddings_manifest(Folder(base, so))["shards"]:
            out.add(shard_url(base, shard))
            if shard.get("deleted_path"):
                out.add(shard_url(base, shard, "deleted_path"))
    if storage.exists(storage.join(base, "index", "manifest.json"), so):
        out |= {
            shard_index_url(storage.join(base, "index"), s) for s in read_index_manifest(Folder(base, so))["shards"]
        }
    return out


def apply_retention(cfg: Config, lease: leases.Lease | None = None) -> list[str]:
    """Delete published versions older than the newest ``publish.keep_versions`` published ones, and failed or
    abandoned ones older than the newest ``publish.keep_failed`` of those (never CURRENT's version or its previous,
    never one a reader holds a fresh lease on, never the pending build), keeping the files that kept versions still
    share; returns the versions deleted. With ``lease``, its fence is checked before each deletion."""
    root, so = cfg.output.root, cfg.output.storage_options
    found = versions.states(Folder(root, so))
    protected = versions.protected_versions(Folder(root, so)) | versions.readers_in_use(
        Folder(root, so), cfg.publish.lease_expiry
    )
    doomed = versions.versions_to_delete(found, cfg.publish.keep_versions, cfg.publish.keep_failed, protected)
    kept = [s["version"] for s in found if s["version"] not in doomed]
    referenced = set().union(*(referenced_files(root, n, so) for n in kept)) if kept else set()
    for name in doomed:
        if lease is not None:
            lease.check(f"deleting version {name}")
        versions.delete_version_files(Folder(root, so), name, referenced)
    return doomed
