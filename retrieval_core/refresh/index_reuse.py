"""The refresh's index: whether it trains anew or reuses the previous version's quantizer, and the reuse of the
previous version's shard indexes for the segments whose rows did not change."""

from __future__ import annotations

from retrieval_core.config import Config
from retrieval_core.encode.embeddings import shard_url
from retrieval_core.index import faiss_index, index_files, indexing
from retrieval_core.io import storage
from retrieval_core.io.folder import Folder
from retrieval_core.refresh.refreshing import RefreshPlan

DRIFT_SAMPLE = 10_000
RETRAIN_MARK = "_index_retrain.json"  # in the version: the recall check asked for a quantizer trained anew


def retrain_decision(cfg: Config, vcfg: Config, p: RefreshPlan, plan) -> dict:
    """Whether the version's index trains anew or reuses the previous version's trained quantizer, with the
    numbers: ``refresh.retrain`` always / never / auto (auto: retrain when the mean distance of this version's
    vectors to their nearest centroid grew by more than ``refresh.retrain_drift`` since training)."""
    so = cfg.output.storage_options
    mark = storage.join(vcfg.output.root, RETRAIN_MARK)
    if storage.exists(mark, so):  # a run killed after its recall check: keep to what it decided
        return storage.read_json(mark, so)
    if not faiss_index.needs_training(plan.factory, plan.dim):
        return {
            "retrain": False,
            "reusable": _previous_index_matches(p, plan, so),
            "reason": f"{plan.factory} needs no training",
        }
    if not _previous_index_matches(p, plan, so):
        return {"retrain": True, "reusable": False, "reason": "no previous index of this type and encoder"}
    mode = cfg.refresh.retrain
    if mode != "auto":
        return {"retrain": mode == "always", "reusable": True, "reason": f"refresh.retrain = {mode}"}
    previous = indexing.layout_at(p.previous_version_root, so)
    baseline = indexing.read_training_record(previous).get("mean_coarse_distance")
    trained = faiss_index.deserialize(storage.read_bytes(previous.file("trained.faiss"), so))
    _, sample = indexing.read_sample(plan, indexing.sample_positions(plan.ntotal, DRIFT_SAMPLE, plan.seed + 2))
    now = faiss_index.coarse_distance(trained, sample)
    if not baseline or now is None:
        return {"retrain": True, "reusable": True, "reason": "no training baseline recorded", "now": now}
    growth = now / baseline - 1
    return {
        "retrain": growth > cfg.refresh.retrain_drift,
        "reusable": True,
        "baseline": round(baseline, 6),
        "now": round(now, 6),
        "growth": round(growth, 6),
        "threshold": cfg.refresh.retrain_drift,
        "reason": f"mean distance to the nearest centroid {'grew' if growth > 0 else 'changed'} by "
        f"{growth:.1%} (retrain above {cfg.refresh.retrain_drift:.0%})",
    }


def recall_verdict(previous_manifest: dict, manifest: dict, target: float) -> dict:
    """Whether the recall@10 of an index built on the reused quantizer, searched with the previous version's tuned
    setting (nprobe / efSearch), fell under ``target``: the second retrain criterion of ``auto``, read from the
    recall measurement of the index stage (it tries settings from the smallest up, so a setting larger than the
    stored one means the stored one missed the target)."""
    parameter = manifest["recall"].get("parameter")
    stored = previous_manifest.get("search_parameters", {}).get(parameter)
    tried = {t["value"]: t["recall_at_10"] for t in manifest["recall"].get("tried", [])}
    if not parameter or stored is None or manifest["recall"]["recall_at_10"] is None:
        return {"fell": False, "reason": "no recall measured at a stored setting"}
    at_stored = tried.get(stored)
    fell = (at_stored is not None and at_stored < target) or manifest["recall"]["value"] > stored
    return {
        "fell": fell,
        "parameter": parameter,
        "stored": stored,
        "recall_at_stored": at_stored,
        "tuned": manifest["recall"]["value"],
        "target": target,
        "reason": f"recall@10 at the stored {parameter} = {stored} "
        f"{'fell under' if fell else 'reaches'} index.target_recall {target}"
        + (f" (tuned {parameter} now {manifest['recall']['value']})" if fell else ""),
    }


def mark_retrain(vcfg: Config, decision: dict) -> dict:
    """Record that the version's quantizer is trained anew after all (the recall check failed), before its index is
    dropped and built again, so that a run killed in between decides the same; returns the decision."""
    storage.write_json_atomic(storage.join(vcfg.output.root, RETRAIN_MARK), decision, vcfg.output.storage_options)
    return decision


def drop_seeded_index(vcfg: Config, p: RefreshPlan) -> None:
    """Remove the version's index while it still holds anything of the previous version's (its quantizer, or a
    shared shard index): an index trained anew must not mix with them. An index already trained anew stays, so a
    resumed run keeps its committed shards."""
    so = vcfg.output.storage_options
    here, previous = indexing.layout_of(vcfg), indexing.layout_at(p.previous_version_root, so)
    trained = here.file("trained.faiss")
    seeded = storage.exists(trained, so) and storage.read_bytes(trained, so) == storage.read_bytes(
        previous.file("trained.faiss"), so
    )
    shards = storage.join(here.dir, "_shards")
    records = [storage.join(shards, n) for n in storage.list_names(shards, so) if n.endswith(".json")]
    if seeded or any(storage.read_json(r, so).get("shared_from") for r in records):
        storage.remove(here.dir, so)


def _previous_index_matches(p: RefreshPlan, plan, so: dict) -> bool:
    """The previous version has a complete index of the same type, metric and encoder."""
    if not (p.previous_root and p.reuse) or not storage.exists(
        storage.join(p.previous_root, "index", "manifest.json"), so
    ):
        return False
    manifest = indexing.read_index_manifest(Folder(p.previous_version_root, so))
    return (manifest["type"], manifest["metric"], manifest["fingerprint"]) == (
        plan.factory,
        plan.metric,
        plan.identity["fingerprint"],
    ) and (manifest["mergeable"], manifest.get("shard_format", "index")) == (
        plan.mergeable,
        plan.identity["shard_format"],
    )


def seed_index(vcfg: Config, p: RefreshPlan, plan) -> int:
    """Before the index stage runs in the version: copy the previous trained index (a quantizer, small) and commit
    every segment shared with the previous version as a shard index that points at that version's file, with the
    segment's tombstones (every row dead since its file was written), which the merge leaves out by id. So a night
    adds only its new segments and its compactions. Returns the shard indexes shared."""
    so = vcfg.output.storage_options
    previous = indexing.layout_at(p.previous_version_root, so)
    here = indexing.layout_of(vcfg)
    for name in ("trained.json", "trained.faiss"):  # the quantizer's record first: trained.faiss marks it done
        if storage.exists(previous.file(name), so):
            storage.write_bytes_atomic(here.file(name), storage.read_bytes(previous.file(name), so), so)
    if not plan.mergeable:
        return 0
    entries = {e["name"]: e for e in indexing.read_index_manifest(Folder(p.previous_version_root, so))["shards"]}
    shared = 0
    for shard in plan.shards:
        entry = entries.get(shard["name"])
        if entry is None or not shard.get("shared_from"):
            continue
        record = _shared_record(vcfg, p, here.dir, index_files.shard_index_url(previous.dir, entry), shard)
        storage.write_json_atomic(here.record_file(shard["name"]), record, so)
        shared += 1
    return shared


def _shared_record(vcfg: Config, p: RefreshPlan, index_dir: str, shard_file: str, shard: dict) -> dict:
    """The commit record of a shard index shared with the previous version: its file, and the segment's tombstone
    file when rows of it are dead (both relative to this index directory)."""
    record = {
        "name": shard["name"],
        "ntotal": shard["rows"],
        "seconds": 0.0,
        "peak_memory_mb": 0.0,
        "path": storage.relative_to(index_dir, shard_file),
        "shared_from": p.source,
    }
    if shard.get("deleted_path"):
        record["deleted_path"] = storage.relative_to(index_dir, shard_url(vcfg.output.root, shard, "deleted_path"))
    return record
