"""Pure shard planning from file metadata: no data is read here.

A corpus is an ordered list of files; each file is a list of row blocks (Parquet row groups, or blocks of JSONL
lines with their byte offsets). Rows get global ids ``0..N-1`` in file order, and a shard is a contiguous range of
global ids, split into pieces that each lie inside one file.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

MIN_AUTO_ROWS_PER_SHARD = 64
MAX_AUTO_ROWS_PER_SHARD = 1_000_000  # never above what AUTO_SHARD_BYTES allows for the vectors' size
AUTO_SHARDS_PER_WORKER = 4  # at least this many automatic shards per worker (load balance)
AUTO_SHARD_SECONDS = 120  # work per automatic shard for one worker: a stop or a kill loses about this much per worker
AUTO_SHARD_BYTES = 256 * 2**20  # at most this much of vectors in one automatic shard's embeddings file
DEFAULT_EMBEDDING_BYTES_PER_ROW = 768 * 4  # assumed when the vectors' size is not known before encoding


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


def auto_rows_per_shard(
    total_rows: int,
    num_workers: int,
    docs_per_s_per_worker: float = math.inf,
    embedding_bytes_per_row: int | None = None,
) -> int:
    """Shards sized for the cluster: the fewest rows of

    - an even share giving at least ``AUTO_SHARDS_PER_WORKER`` (4) shards per worker (load balance);
    - about ``AUTO_SHARD_SECONDS`` (120 s) of one worker's work at ``docs_per_s_per_worker``: a stop or a kill
      loses at most one shard per worker, about 2 minutes of work;
    - ``AUTO_SHARD_BYTES`` (256 MiB) of vectors at ``embedding_bytes_per_row`` (when not known, 768 float32 = 3,072
      bytes: 87,381 rows), so one shard's embeddings file, and a worker's vectors in memory, stay moderate;
    - ``MAX_AUTO_ROWS_PER_SHARD`` (1,000,000);

    and at least ``MIN_AUTO_ROWS_PER_SHARD`` (64), unless the byte cap allows fewer (vectors over 4 MiB a row).

    In numbers, one CPU per worker at the default model's 12 docs/s: 1,440 rows (2.2 MB of 384 float32) per shard,
    69,445 shards for 100M documents (the old 30 s rule gave 360 rows and 277,778 shards). One GPU at 1,200 docs/s:
    144,000 rows by time, capped at 87,381 by the bytes when the size is not known (1,145 shards for 100M
    documents). With many workers the share governs: 100M documents on 400 workers give at most 62,500 rows.
    """
    per_shard = math.ceil(total_rows / max(1, num_workers * AUTO_SHARDS_PER_WORKER))
    by_time = docs_per_s_per_worker * AUTO_SHARD_SECONDS  # infinite when the rate is not known
    by_bytes = max(1, AUTO_SHARD_BYTES // max(1, embedding_bytes_per_row or DEFAULT_EMBEDDING_BYTES_PER_ROW))
    rows = min(per_shard, MAX_AUTO_ROWS_PER_SHARD)
    if by_time < rows:
        rows = int(by_time)
    return min(by_bytes, max(MIN_AUTO_ROWS_PER_SHARD, rows))


def plan_shards(files: list[FileMeta], rows_per_shard: int) -> list[Shard]:
    """Cut the concatenated rows of ``files`` into shards of ``rows_per_shard`` rows (the last may be shorter), all
    of them in a list (see :class:`ShardPlan` for the same shards made on demand)."""
    return list(ShardPlan(files, rows_per_shard))


class ShardPlan(Sequence[Shard]):
    """The shards of a corpus, made on demand from its files' row counts: a driver walking 100,000 shards holds the
    files' metadata and one shard, not a :class:`Shard` per shard. Iterating is one sweep over the shards and the
    files together, O(shards + files); ``plan[i]`` finds shard ``i``'s first file by bisection, O(log files)."""

    def __init__(self, files: list[FileMeta], rows_per_shard: int):
        if rows_per_shard <= 0:
            raise ValueError(f"rows_per_shard = {rows_per_shard}: expected a positive integer")
        self.files, self.rows_per_shard = files, rows_per_shard
        self.sizes = [meta.num_rows for meta in files]
        self.starts = list(itertools.accumulate(self.sizes, initial=0))  # each file's first global row, then N
        self.num_rows = self.starts[-1]

    def __len__(self) -> int:
        return -(-self.num_rows // self.rows_per_shard)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"shard {index} of a plan of {len(self)}")
        start = index * self.rows_per_shard
        return self._shard(index, bisect.bisect_right(self.starts, start) - 1)[0]

    def __iter__(self) -> Iterator[Shard]:
        file_index = 0
        for index in range(len(self)):
            shard, file_index = self._shard(index, file_index)
            yield shard

    def _shard(self, index: int, file_index: int) -> tuple[Shard, int]:
        """Shard ``index``, its files looked for from ``file_index`` on (at or before its first row's file); with
        the file index where the next shard's search starts."""
        start = index * self.rows_per_shard
        stop = min(start + self.rows_per_shard, self.num_rows)
        pieces, row = [], start
        while row < stop:
            while self.starts[file_index + 1] <= row:  # files ending at or before this row (empty ones too)
                file_index += 1
            piece_stop = min(stop, self.starts[file_index + 1])
            file_start = self.starts[file_index]
            pieces.append(Piece(self.files[file_index], row - file_start, piece_stop - file_start))
            row = piece_stop
        return Shard(index, start, stop, tuple(pieces)), file_index


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
