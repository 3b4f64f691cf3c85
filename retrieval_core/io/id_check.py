"""The duplicate-doc-id check of the encode stage: a hash-partitioned map/reduce that scales to 1B rows.

- map (one step per group of ``ID_CHECK_ROWS`` contiguous rows, cut by :func:`sharding.plan_shards`): reads its
  rows' id column alone, hashes each valid id to 64 bits and writes one file per reduce partition (hash modulo the
  number of partitions) of that partition's sorted hashes, under a scratch folder. It holds its rows' hashes.
- reduce (one step per partition): reads its partition's file from every map step and finds the hashes seen more
  than once (suspects: duplicate ids, or two ids whose hashes collide). It holds 8 bytes per row of its partition.
- naming (again one step per group, only when there are suspects): the ids among the group's rows whose hash is a
  suspect, with their counts and first two rows. The caller keeps the ids that really occur more than once, so a
  hash collision alone never fails the check.

The steps are plain functions of an item number and the :class:`IdCheck` plan; a ``run`` function says where they
run: :func:`run_here` in this process (a small corpus), or one Ray task each (``jobs.ray.actors.duplicate_ids``).
Whoever runs them, the caller holds only the plan (one entry per group), counts and at most
``SUSPECTS_PER_ROUND`` suspect hashes with the ids behind them, never anything per row. The scratch folder is
emptied before and removed after the check, whatever its result.
"""

from __future__ import annotations

import contextlib
import io
import math
import posixpath
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from retrieval_core.config import CorpusConfig
from retrieval_core.io import corpus, storage
from retrieval_core.io.folder import Folder
from retrieval_core.io.sharding import FileMeta, Shard, plan_shards

ID_CHECK_DRIVER_ROWS = 1_000_000  # a corpus up to this size is checked for duplicate ids in the job's process
ID_CHECK_ROWS = 25_000_000  # rows of one map group, and of one reduce partition on average (8 bytes each)
SUSPECTS_PER_ROUND = 10_000  # suspect hashes the caller of a check run on tasks holds and names at once
SCRATCH = "_id_check"  # the check's scratch folder, inside the embeddings stage's folder
READ_ROWS = 65536  # rows per batch read from the id column

# run(step, function, items, args, on_done): function(item, *args) for every item, on_done(item, result) as each ends
Run = Callable[[str, Callable[..., dict], list[int], tuple, Callable[[int, dict], None]], None]


@dataclass(frozen=True)
class IdCheck:
    """The plan of one check, given to every step: the corpus section, the scratch folder (reachable from every
    process that runs a step), the number of hash partitions, and the map groups (contiguous rows of the corpus,
    in corpus order)."""

    corpus: CorpusConfig
    scratch: Folder
    partitions: int
    groups: tuple[Shard, ...]


def id_check_partitions(total_rows: int) -> int:
    """How many partitions the duplicate-id check of a corpus of ``total_rows`` rows takes (``ID_CHECK_ROWS`` each)."""
    return max(1, math.ceil(total_rows / ID_CHECK_ROWS))


def plan_check(metas: list[FileMeta], cfg: CorpusConfig, scratch: Folder) -> IdCheck:
    """The check's plan: map groups of ``ID_CHECK_ROWS`` rows and as many partitions as :func:`id_check_partitions`
    gives (read here, in the caller, so that a change of the constants reaches every step)."""
    groups = tuple(plan_shards(metas, ID_CHECK_ROWS))
    return IdCheck(cfg, scratch, id_check_partitions(sum(m.num_rows for m in metas)), groups)


def run_here(step: str, function: Callable[..., dict], items: list[int], args: tuple, on_done) -> None:
    """Run every step in this process, one after the other."""
    for item in items:
        on_done(item, function(item, *args))


def find_duplicate_ids(
    metas: list[FileMeta], cfg: CorpusConfig, scratch: Folder, examples: int = 5, run: Run | None = None
) -> list[str]:
    """Up to ``examples`` doc ids that occur more than once in the corpus ``metas``, in the order of their second
    occurrence (the first ``examples`` such ids in corpus order); [] when every valid id is unique.

    ``run`` None: every step runs in this process, which then holds at most one step's memory (a group's hashes, or
    8 bytes per row of a partition) and every suspect at once, so the examples are exactly the first in corpus
    order. Else ``run`` runs the steps (on Ray tasks, say) and this process holds at most ``SUSPECTS_PER_ROUND``
    suspects at a time; the examples are then the first in corpus order among the smallest suspect hashes that
    name ``examples`` duplicates. ``scratch`` must be reachable from wherever the steps run."""
    plan = plan_check(metas, cfg, scratch)
    with _scratch(scratch):
        (run or run_here)("hashing the doc ids of group", map_group, _numbers(plan.groups), (plan,), _ignore)
        return _name_duplicates(plan, run or run_here, examples, None if run is None else SUSPECTS_PER_ROUND)


def map_group(group: int, plan: IdCheck) -> dict:
    """Map step: the 64-bit hashes of group ``group``'s valid ids, sorted and written as one file per partition.
    Holds the group's hashes (8 bytes per row, and 4 more for their partitions)."""
    hashes = np.fromiter(
        (corpus._id_hash(i) for _, i in _group_ids(plan.groups[group], plan.corpus) if corpus._valid_id(i)),
        dtype=np.uint64,
    )
    hashes.sort()
    partition_of = (hashes % np.uint64(plan.partitions)).astype(np.uint32)
    for partition in range(plan.partitions):
        _write_hashes(plan.scratch, _map_file(partition, group), hashes[partition_of == partition])
    return {"group": group, "ids": int(hashes.size)}


def reduce_partition(partition: int, plan: IdCheck, after: int | None, limit: int | None) -> dict:
    """Reduce step: the hashes of partition ``partition`` seen more than once, from every map step's file. Returns
    how many of them are above ``after`` (all when None) and the ``limit`` smallest of those (all when None).
    Holds 8 bytes per row of the partition (twice that while its files are joined)."""
    parts = [_read_hashes(plan.scratch, _map_file(partition, g)) for g in _numbers(plan.groups)]
    hashes = np.concatenate([np.empty(0, dtype=np.uint64), *parts])
    del parts
    hashes.sort()
    repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    if after is not None:
        repeated = repeated[repeated > np.uint64(after)]
    return {"partition": partition, "suspects": int(repeated.size), "smallest": repeated[:limit].tolist()}


def name_group(group: int, plan: IdCheck, suspects: np.ndarray) -> dict:
    """Naming step: the ids among group ``group``'s rows whose hash is one of ``suspects``, each with
    ``[count in the group, first global row, second global row or -1]``. Holds those ids alone."""
    wanted = set(suspects.tolist())
    found: dict[str, list[int]] = {}
    for row, doc_id in _group_ids(plan.groups[group], plan.corpus):
        if corpus._valid_id(doc_id) and corpus._id_hash(doc_id) in wanted:
            entry = found.setdefault(str(doc_id), [0, row, -1])
            entry[0] += 1
            if entry[0] == 2:
                entry[2] = row
    return {"group": group, "ids": found}


def _name_duplicates(plan: IdCheck, run: Run, examples: int, per_round: int | None) -> list[str]:
    """Rounds of (reduce, naming) over the suspect hashes in increasing order, ``per_round`` at a time (all at once
    when None), until ``examples`` real duplicates are named or no suspect is left. Holds one round's suspects and
    the ids behind them, and the ``examples`` best named so far as (second row, id)."""
    named: list[tuple[int, str]] = []
    after: int | None = None
    while len(named) < examples:
        suspects, left = _suspects(plan, run, after, per_round)
        if not suspects.size:
            break
        ids: dict[str, list[int]] = {}
        run("naming the duplicate ids of group", name_group, _numbers(plan.groups), (plan, suspects), _into(ids))
        named = sorted(named + [(rows[2], i) for i, rows in ids.items() if rows[0] > 1])[:examples]
        if left <= suspects.size:
            break
        after = int(suspects[-1])
    return [doc_id for _, doc_id in named]


def _suspects(plan: IdCheck, run: Run, after: int | None, limit: int | None) -> tuple[np.ndarray, int]:
    """The ``limit`` smallest suspect hashes above ``after`` over every partition, and how many there are."""
    smallest: list[int] = []
    count = 0

    def done(partition: int, result: dict) -> None:
        nonlocal smallest, count
        count += result["suspects"]
        smallest = sorted(smallest + result["smallest"])[:limit]

    run(
        "finding repeated id hashes in partition",
        reduce_partition,
        list(range(plan.partitions)),
        (plan, after, limit),
        done,
    )
    return np.array(smallest, dtype=np.uint64), count


def _into(ids: dict[str, list[int]]):
    """``on_done`` of the naming steps: their ids merged into ``ids`` (counts added, the first two rows kept)."""

    def merge(group: int, result: dict) -> None:
        for doc_id, (count, first, second) in result["ids"].items():
            mine = ids.get(doc_id)
            rows = sorted(r for r in (first, second, *(mine[1:] if mine else ())) if r >= 0)
            ids[doc_id] = [count + (mine[0] if mine else 0), rows[0], rows[1] if len(rows) > 1 else -1]

    return merge


def _ignore(item: int, result: dict) -> None:
    return None


def _numbers(groups: tuple[Shard, ...]) -> list[int]:
    return list(range(len(groups)))


def _group_ids(group: Shard, cfg: CorpusConfig) -> Iterator[tuple[int, object]]:
    """(global row, id value) for every row of ``group``, reading the id column alone, a batch at a time."""
    row = group.row_start
    for piece in group.pieces:
        for _, batch in corpus.iter_piece_batches(piece, [cfg.id_column], cfg.storage_options, READ_ROWS):
            for doc_id in batch[cfg.id_column]:
                yield row, doc_id
                row += 1
    if row != group.row_stop:
        raise corpus.CorpusError(
            f"the duplicate-id check read {row - group.row_start} rows of rows {group.row_start}..{group.row_stop}; "
            "did a corpus file change since planning?"
        )


def _map_file(partition: int, group: int) -> str:
    return f"part-{partition:05d}/map-{group:05d}.npy"


def _write_hashes(scratch: Folder, name: str, hashes: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, hashes, allow_pickle=False)
    scratch.write_bytes(buffer.getbuffer(), name)


def _read_hashes(scratch: Folder, name: str) -> np.ndarray:
    return np.load(io.BytesIO(scratch.read_bytes(name)), allow_pickle=False)


@contextlib.contextmanager
def _scratch(folder: Folder):
    """``folder`` emptied (of what a killed check left) on entry and removed on leaving, whatever the result, with
    the folders above it that did not exist before (on a file system: the stage's folder, the output root of a
    first run), when they are empty."""
    fs, path = storage.filesystem(folder.url, folder.storage_options)
    created = [] if storage.is_object_store(fs) else _missing_parents(fs, path)
    storage.remove(folder.url, folder.storage_options)
    try:
        yield folder
    finally:
        storage.remove(folder.url, folder.storage_options)
        for parent in created:  # deepest first; a folder something else wrote into meanwhile stays
            with contextlib.suppress(OSError):
                fs.rmdir(parent)


def _missing_parents(fs, path: str) -> list[str]:
    """The folders above ``path`` that do not exist, deepest first."""
    missing = []
    parent = posixpath.dirname(path.rstrip("/"))
    while parent and parent != posixpath.dirname(parent) and not fs.exists(parent):
        missing.append(parent)
        parent = posixpath.dirname(parent)
    return missing
