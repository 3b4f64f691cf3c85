"""Pure shard planning from file metadata: no data is read here.

A corpus is an ordered list of files; each file is a list of row blocks (Parquet row groups, or blocks of JSONL
lines with their byte offsets). Rows get global ids ``0..N-1`` in file order, and a shard is a contiguous range of
global ids, split into pieces that each lie inside one file.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

MIN_AUTO_ROWS_PER_SHARD = 64
MAX_AUTO_ROWS_PER_SHARD = 50_000
AUTO_SHARDS_PER_WORKER = 4
AUTO_SHARD_SECONDS = 30  # work per automatic shard for one worker: a stop or a kill loses about this much per worker


@dataclass(frozen=True)
class FileMeta:
    """What planning knows of one file: its rows per block (and for JSONL, each block's byte offset)."""

    url: str
    format: str
    block_rows: tuple[int, ...]
    block_offsets: tuple[int, ...] = ()

    @property
    def num_rows(self) -> int:
        return sum(self.block_rows)


@dataclass(frozen=True)
class Piece:
    """Rows ``[row_start, row_stop)`` of one file (file-local row numbers)."""

    file: FileMeta
    row_start: int
    row_stop: int

    @property
    def num_rows(self) -> int:
        return self.row_stop - self.row_start


@dataclass(frozen=True)
class Shard:
    """Global rows ``[row_start, row_stop)``: the unit of work, retry and commit."""

    index: int
    row_start: int
    row_stop: int
    pieces: tuple[Piece, ...]

    @property
    def num_rows(self) -> int:
        return self.row_stop - self.row_start

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


def auto_rows_per_shard(total_rows: int, num_workers: int, docs_per_s_per_worker: float = math.inf) -> int:
    """At least four shards per worker (load balance), and no more rows than one worker encodes in about
    ``AUTO_SHARD_SECONDS`` at ``docs_per_s_per_worker`` (so a stop or a kill loses little), within [64, 50,000]."""
    per_shard = math.ceil(total_rows / max(1, num_workers * AUTO_SHARDS_PER_WORKER))
    by_time = docs_per_s_per_worker * AUTO_SHARD_SECONDS
    rows = min(per_shard, int(by_time) if by_time < MAX_AUTO_ROWS_PER_SHARD else MAX_AUTO_ROWS_PER_SHARD)
    return max(MIN_AUTO_ROWS_PER_SHARD, min(MAX_AUTO_ROWS_PER_SHARD, rows))


def plan_shards(files: list[FileMeta], rows_per_shard: int) -> list[Shard]:
    """Cut the concatenated rows of ``files`` into shards of ``rows_per_shard`` rows (the last may be shorter)."""
    if rows_per_shard <= 0:
        raise ValueError(f"rows_per_shard = {rows_per_shard}: expected a positive integer")
    file_starts = []
    total = 0
    for meta in files:
        file_starts.append(total)
        total += meta.num_rows
    shards = []
    for index, start in enumerate(range(0, total, rows_per_shard)):
        stop = min(start + rows_per_shard, total)
        shards.append(Shard(index, start, stop, _pieces(files, file_starts, start, stop)))
    return shards


def _pieces(files: list[FileMeta], file_starts: list[int], start: int, stop: int) -> tuple[Piece, ...]:
    pieces = []
    for meta, file_start in zip(files, file_starts):
        file_stop = file_start + meta.num_rows
        lo, hi = max(start, file_start), min(stop, file_stop)
        if lo < hi:
            pieces.append(Piece(meta, lo - file_start, hi - file_start))
    return tuple(pieces)


def blocks_for_range(block_rows: tuple[int, ...], row_start: int, row_stop: int) -> tuple[list[int], int]:
    """Indexes of the blocks overlapping file rows ``[row_start, row_stop)``, and the first one's first row."""
    chosen, first_row, position = [], None, 0
    for index, rows in enumerate(block_rows):
        if position < row_stop and position + rows > row_start and rows > 0:
            chosen.append(index)
            if first_row is None:
                first_row = position
        position += rows
    return chosen, (first_row if first_row is not None else row_start)


def buckets_of(doc_ids: list[str], buckets: int) -> np.ndarray:
    """The bucket of each doc id: 64 bits of BLAKE2b of its UTF-8 bytes, modulo ``buckets`` (stable everywhere)."""
    hashes = np.fromiter(
        (int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8).digest(), "little") for d in doc_ids),
        dtype=np.uint64,
        count=len(doc_ids),
    )
    return (hashes % np.uint64(buckets)).astype(np.int32)
