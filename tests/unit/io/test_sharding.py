import itertools
import random

import pytest

from retrieval_core.io.sharding import FileMeta, auto_rows_per_shard, blocks_for_range, plan_shards


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
    assert auto_rows_per_shard(10**9, 4) == 50_000  # upper bound
    # no more than about 30 s of one worker's work: 12 docs/s -> 360 rows, even with few workers
    assert auto_rows_per_shard(5183, 2, docs_per_s_per_worker=12.0) == 360
    assert auto_rows_per_shard(10**9, 4, docs_per_s_per_worker=1200.0) == 36_000
    assert auto_rows_per_shard(10**6, 4, docs_per_s_per_worker=0.5) == 64  # a slow model: the lower bound
