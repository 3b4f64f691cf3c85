"""The merge of the shard indexes into ``merged.faiss``.

IVF types whose lists stream (``IndexPlan.lists``; see :mod:`retrieval_core.index.ivf_lists`) merge in three steps
that each hold a bounded amount, whatever the corpus:

1. :func:`plan_merge` reads the shard files' headers, a batch at a time, twice: to count each list's entries and
   cut the lists into ranges of at most half of ``index.merge_memory`` bytes of codes and ids, then to find where
   each range lies in each shard file. It writes ``_merge/totals.npy`` (entries per list), ``_merge/files.json``
   (the shard files: the range tasks read one file, not a commit record per shard) and ``_merge/spans.bin`` (per
   range, per shard: the slice of the header and the payload offset; one row per range). Memory: one count per
   list, a batch of headers and 32 bytes per range and shard.
2. :func:`merge_range`, one task per range, reads its row of ``spans.bin`` and, from each shard file, its slice of
   the header and its payload, leaves out the ids the shard's tombstone file names (the rows of a refresh's
   shared shard index that are dead in this version), and writes ``_merge/range-<first list>-<end>.bin``, then
   its lists' sizes (``.sizes.npy``, its commit). Memory: about ``index.merge_memory`` (the range's entries, never
   a whole header) and one shard's dead ids. A range already written is kept on a rerun.
3. :func:`assemble` writes ``merged.faiss`` from the trained index, the ranges' sizes and the range files, then
   removes ``_merge/``. Memory: the trained index, one size a list and one copy buffer.

Other mergeable types (flat codes: ``Flat``, ``SQ8``, ``PQm``, and IVF types whose lists do not stream) merge in
one process, holding the merged index (:func:`merge_in_memory`); a shard's dead ids are removed as it is read.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np

from retrieval_core.config.rules import parse_memory
from retrieval_core.index import faiss_index, ivf_lists
from retrieval_core.index.index_files import (
    dead_ids,
    read_index_file,
    shard_index_url,
    shard_records,
    tombstone_url,
    without_dead,
    write_index_file,
)
from retrieval_core.io import storage

MERGE_DIR = "_merge"


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """The ranges of lists the merge is cut into; the per-list counts are in ``_merge/totals.npy``, where each range
    lies in each shard file in ``_merge/spans.bin``."""

    ranges: tuple[tuple[int, int], ...]
    ntotal: int
    shards: int
    code_size: int


def shard_files(plan) -> tuple[list[str], list[str | None]]:
    """URLs of the committed shard index files, in shard order (their commit records read in parallel), and of
    their tombstone files (the ids a refresh's shared shard index holds that are dead in this version; None for
    most)."""
    files, tombstones = [], []
    for record in shard_records(plan):
        files.append(shard_index_url(plan.out.dir, record))
        tombstones.append(tombstone_url(plan.out.dir, record))
    return files, tombstones


def _totals_url(plan) -> str:
    return plan.out.file(MERGE_DIR, "totals.npy")


def _files_url(plan) -> str:
    return plan.out.file(MERGE_DIR, "files.json")


def _spans_url(plan) -> str:
    return plan.out.file(MERGE_DIR, "spans.bin")


def range_url(plan, lo: int, hi: int, suffix: str = "bin") -> str:
    """A range's file, named by its lists: a rerun with other ranges (another ``index.merge_memory``) never takes a
    file of the run before for one of its own. ``suffix`` "sizes.npy": its lists' sizes, written after it (the
    range's commit)."""
    return plan.out.file(MERGE_DIR, f"range-{lo:06d}-{hi:06d}.{suffix}")


def plan_merge(plan) -> MergePlan:
    """Count each list's entries over all shard files (headers only, read in parallel batches), cut the lists into
    ranges of at most half of ``index.merge_memory`` bytes (a range task holds its range once, plus one shard's
    share of it), and record where each range lies in each shard file."""
    layout, (urls, tombstones) = plan.out, shard_files(plan)
    so = layout.storage_options
    totals, entry_bytes = ivf_lists.list_totals(urls, so)
    budget = max(1, parse_memory(plan.ix.merge_memory, "index.merge_memory") // 2)
    ranges = ivf_lists.plan_ranges(totals, entry_bytes, budget)
    spans = ivf_lists.range_spans(urls, ranges, len(totals), so)
    with storage.open_atomic(_totals_url(plan), so) as out:
        np.save(out, totals)
    storage.write_bytes_atomic(_spans_url(plan), spans.reshape(-1).view(np.uint8).data, so)  # one row per range
    files = {"files": urls, "tombstones": tombstones}
    storage.write_json_atomic(_files_url(plan), files, so)  # read once by each range task
    return MergePlan(tuple(ranges), int(totals.sum()), len(urls), entry_bytes - ivf_lists.ID_BYTES)


def merge_range(plan, merge: MergePlan, number: int) -> dict:
    """Write range ``number`` of ``merge`` (kept when a run before wrote it), leaving out the ids dead in this
    version (a shard's tombstone file, read when the shard is); returns its lists and peak memory."""
    lo, hi = merge.ranges[number]
    layout, url, sizes_url = plan.out, range_url(plan, lo, hi), range_url(plan, lo, hi, "sizes.npy")
    so = layout.storage_options
    if not storage.exists(sizes_url, so):
        files = storage.read_json(_files_url(plan), so)  # one read, not a record per shard
        row = merge.shards * ivf_lists.SPAN_FIELDS * 8
        spans = np.frombuffer(storage.read_range(_spans_url(plan), number * row, (number + 1) * row, so), np.int64)
        counts = np.load(io.BytesIO(storage.read_bytes(_totals_url(plan), so)))[lo:hi]
        tombstones = files["tombstones"]
        sizes = ivf_lists.merge_range(
            files["files"],
            spans.reshape(merge.shards, -1),
            lo,
            counts,
            merge.code_size,
            url,
            so,
            lambda shard: dead_ids(tombstones[shard], so),
        )
        with storage.open_atomic(sizes_url, so) as out:
            np.save(out, sizes)
    from retrieval_core.io.manifest import peak_memory_mb

    return {"range": number, "lists": [lo, hi], "peak_memory_mb": peak_memory_mb()}


def assemble(plan, merge: MergePlan, trained: bytes) -> int:
    """Write ``merged.faiss`` from the trained index and the range files, then remove ``_merge/``; returns the
    merged index's vectors."""
    layout = plan.out
    totals = np.concatenate(
        [
            np.load(io.BytesIO(storage.read_bytes(range_url(plan, lo, hi, "sizes.npy"), layout.storage_options)))
            for lo, hi in merge.ranges
        ]
    )  # the lists' sizes less the dead ids: one int64 a list
    prefix = ivf_lists.merged_prefix(faiss_index.deserialize(trained), totals)
    ranges = [range_url(plan, lo, hi) for lo, hi in merge.ranges]
    ivf_lists.assemble(prefix, ranges, layout.file("merged.faiss"), layout.storage_options)
    storage.remove(layout.file(MERGE_DIR), layout.storage_options)
    return int(totals.sum())


def merge_all(plan, trained: bytes) -> None:
    """Every step of the merge in this process (one range after another)."""
    if not plan.lists:
        merge_in_memory(plan)
        return
    merge = plan_merge(plan)
    for number in range(len(merge.ranges)):
        merge_range(plan, merge, number)
    assemble(plan, merge, trained)


def merge_in_memory(plan) -> None:
    """Merge shard index files holding whole indexes (flat-code types) in shard order into ``merged.faiss``.
    Memory: the merged index."""
    layout, so = plan.out, plan.out.storage_options
    files, tombstones = shard_files(plan)
    index = faiss_index.merge(
        without_dead(read_index_file(url, so), dead_ids(gone, so)) for url, gone in zip(files, tombstones)
    )
    write_index_file(index, layout.file("merged.faiss"), layout.storage_options)
