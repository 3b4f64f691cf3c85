import itertools
import random

import pytest

from retrieval_core.io.sharding import (
    AUTO_SHARD_BYTES,
    MAX_AUTO_ROWS_PER_SHARD,
    FileMeta,
    Piece,
    Shard,
    ShardPlan,
    auto_rows_per_shard,
    blocks_for_range,
    plan_shards,
)


def check_plan(files, rows_per_shard):
    shards = plan_shards(files, rows_per_shard)
    total = sum(f.num_rows for f in files)
    # contiguous, dense, in order, each at most rows_per_shard rows, all but the last exactly that many
    assert [s.index for s in shards] == list(range(len(shards)))
    position = 0
    for s in shards:
        assert s.row_start == position
        assert 0 < s.num_rows <= rows_per_shard
        position = s.row_stop
    assert position == total
    assert all(s.num_rows == rows_per_shard for s in shards[:-1])
    # pieces map global rows onto file rows exactly once
    file_offsets = {}
    offset = 0
    for f in files:
        file_offsets[f.url] = offset
        offset += f.num_rows
    covered = []
    for s in shards:
        assert sum(p.num_rows for p in s.pieces) == s.num_rows
        for p in s.pieces:
            assert 0 <= p.row_start < p.row_stop <= p.file.num_rows
            covered.extend(range(file_offsets[p.file.url] + p.row_start, file_offsets[p.file.url] + p.row_stop))
        first = s.pieces[0]
        assert file_offsets[first.file.url] + first.row_start == s.row_start
    assert covered == list(range(total))
    return shards


def test_exhaustive_small_layouts():
    block_choices = [(), (0,), (1,), (3,), (2, 5), (4, 0, 4), (1, 1, 1)]
    for layout in itertools.product(block_choices, repeat=3):
        files = [FileMeta(f"f{i}", "parquet", blocks) for i, blocks in enumerate(layout)]
        total = sum(f.num_rows for f in files)
        for rows_per_shard in range(1, total + 3):
            check_plan(files, rows_per_shard)


def test_random_large_layouts():
    rng = random.Random(7)
    for _ in range(200):
        files = [
            FileMeta(f"f{i}", "parquet", tuple(rng.randint(0, 500) for _ in range(rng.randint(0, 6))))
            for i in range(rng.randint(1, 8))
        ]
        check_plan(files, rng.randint(1, 3000))


def test_empty_corpus_has_no_shards():
    assert plan_shards([FileMeta("a", "parquet", ())], 10) == []


def test_shard_names_are_zero_padded():
    shards = plan_shards([FileMeta("a", "parquet", (25,))], 10)
    assert [s.name for s in shards] == ["shard-00000", "shard-00001", "shard-00002"]
    assert [(s.row_start, s.row_stop) for s in shards] == [(0, 10), (10, 20), (20, 25)]


def test_rows_per_shard_must_be_positive():
    with pytest.raises(ValueError, match="rows_per_shard = 0"):
        plan_shards([FileMeta("a", "parquet", (5,))], 0)


def test_blocks_for_range_matches_brute_force():
    for blocks in [(3,), (2, 0, 5), (1, 1, 1, 1), (0, 4, 4), (10, 1)]:
        total = sum(blocks)
        starts = [sum(blocks[:i]) for i in range(len(blocks))]
        for lo in range(total):
            for hi in range(lo + 1, total + 1):
                chosen, first = blocks_for_range(blocks, lo, hi)
                expected = [i for i, (s, n) in enumerate(zip(starts, blocks)) if n and s < hi and s + n > lo]
                assert chosen == expected
                assert first == starts[expected[0]]


def test_auto_rows_per_shard():
    assert auto_rows_per_shard(5183, 2) == 648  # four shards per worker
    assert auto_rows_per_shard(100, 2) == 64  # lower bound
    # about 120 s of one worker's work: 12 docs/s -> 1,440 rows, even with few workers
    assert auto_rows_per_shard(10**6, 2, docs_per_s_per_worker=12.0) == 1_440
    assert auto_rows_per_shard(5183, 2, docs_per_s_per_worker=12.0) == 648  # the share is smaller
    assert auto_rows_per_shard(10**6, 4, docs_per_s_per_worker=0.5) == 64  # a slow model: the lower bound
    # 100M documents on CPUs: 69,445 shards of 1,440 rows (the 30 s rule gave 277,778 of 360)
    assert -(-(10**8) // auto_rows_per_shard(10**8, 100, docs_per_s_per_worker=12.0)) == 69_445
    # many workers: the share of four shards per worker governs
    assert auto_rows_per_shard(10**8, 400, docs_per_s_per_worker=1200.0) == 62_500


def test_auto_rows_per_shard_byte_cap():
    # vectors of unknown size count as 768 float32: 256 MiB / 3,072 bytes = 87,381 rows
    assert auto_rows_per_shard(10**9, 4) == 87_381
    assert auto_rows_per_shard(10**9, 4, docs_per_s_per_worker=1200.0) == 87_381  # 144,000 rows by time
    assert auto_rows_per_shard(10**9, 4, docs_per_s_per_worker=1200.0, embedding_bytes_per_row=384 * 4) == 144_000
    assert auto_rows_per_shard(10**9, 4, embedding_bytes_per_row=1024 * 2) == 131_072
    # small vectors: the upper bound, never above what the bytes allow
    assert auto_rows_per_shard(10**10, 4, embedding_bytes_per_row=16) == MAX_AUTO_ROWS_PER_SHARD
    for bytes_per_row in (4, 64, 268, 3072, 4096 * 4, 2**22, 2**24):
        rows = auto_rows_per_shard(10**12, 1, embedding_bytes_per_row=bytes_per_row)
        assert rows <= MAX_AUTO_ROWS_PER_SHARD and 1 <= rows and rows * bytes_per_row <= AUTO_SHARD_BYTES


def reference_plan(files, rows_per_shard):
    """The earlier planner, O(shards x files): every shard looks at every file."""
    file_starts, total = [], 0
    for meta in files:
        file_starts.append(total)
        total += meta.num_rows
    shards = []
    for index, start in enumerate(range(0, total, rows_per_shard)):
        stop = min(start + rows_per_shard, total)
        pieces = []
        for meta, file_start in zip(files, file_starts):
            lo, hi = max(start, file_start), min(stop, file_start + meta.num_rows)
            if lo < hi:
                pieces.append(Piece(meta, lo - file_start, hi - file_start))
        shards.append(Shard(index, start, stop, tuple(pieces)))
    return shards


def test_plan_equals_the_reference_planner():
    rng = random.Random(11)
    for case in range(200):
        files = [
            FileMeta(
                f"f{i}",
                "parquet",
                tuple(
                    rng.choice((0, 0, 1, rng.randint(1, 20), rng.randint(20, 200))) for _ in range(rng.randint(0, 4))
                ),
            )
            for i in range(rng.randint(0, 30))
        ]
        total = sum(f.num_rows for f in files)
        # shards within one file, and shards spanning many files (empty files among them)
        for rows_per_shard in {rng.randint(1, 3), rng.randint(1, 60), rng.randint(1, total + 2), total + 1, total or 1}:
            reference = reference_plan(files, rows_per_shard)
            assert plan_shards(files, rows_per_shard) == reference, (case, rows_per_shard)
            plan = ShardPlan(files, rows_per_shard)  # made on demand: by position, from the end, by slices
            assert len(plan) == len(reference) and plan.num_rows == total
            order = rng.sample(range(len(plan)), len(plan))
            assert [plan[i] for i in order] == [reference[i] for i in order]
            assert plan[-1:] == reference[-1:] and plan[1::3] == reference[1::3]
    files = [FileMeta("a", "parquet", ())] * 3 + [FileMeta("b", "parquet", (5,)), FileMeta("c", "parquet", ())]
    assert plan_shards(files, 2) == reference_plan(files, 2)
    with pytest.raises(IndexError, match="shard 3 of a plan of 3"):
        ShardPlan(files, 2)[3]
    assert [len(s.pieces) for s in plan_shards(files * 4, 7)] == [len(s.pieces) for s in reference_plan(files * 4, 7)]


def test_billion_row_plan_from_metadata():
    """1,000,000,000 rows in 10,000 Parquet-like files of 100,000 rows (row groups of 10,000), sized automatically
    for 400 workers: the plan is exact. (Seconds: one sweep over shards and files.)"""
    files = [FileMeta(f"s3://bucket/corpus/part-{i:05d}.parquet", "parquet", (10_000,) * 10) for i in range(10_000)]
    total = 10**9
    rows_per_shard = auto_rows_per_shard(total, 400, docs_per_s_per_worker=1200.0)
    assert rows_per_shard == 87_381  # the byte cap (768 float32 assumed)
    shards = plan_shards(files, rows_per_shard)
    assert len(shards) == -(-total // rows_per_shard)
    file_start = {}
    position = 0
    for meta in files:
        file_start[meta.url] = position
        position += 100_000
    position = 0
    for i, shard in enumerate(shards):
        assert shard.index == i and shard.row_start == position and 0 < shard.num_rows <= rows_per_shard
        row = shard.row_start
        for piece in shard.pieces:  # contiguous pieces, each inside its file
            assert 0 <= piece.row_start < piece.row_stop <= 100_000
            assert file_start[piece.file.url] + piece.row_start == row
            row += piece.num_rows
        assert row == shard.row_stop
        position = shard.row_stop
    assert position == total
    assert shards[-1].pieces[-1].file is files[-1] and shards[-1].pieces[-1].row_stop == 100_000
