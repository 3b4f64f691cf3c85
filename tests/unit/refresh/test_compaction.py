"""What a night compacts: runs of consecutive shared segments, past the dead-row threshold or small, within a shard
of live rows and within the budget, the deadest first."""

from retrieval_core.refresh.compaction import compaction_plan
from retrieval_core.refresh.refreshing import RefreshPlan


def plan(segments, snapshot_rows=1000, reuse=True) -> RefreshPlan:
    return RefreshPlan(
        version="v000002-x",
        root="/r",
        version_root="/r/versions/v2",
        previous="v1",
        previous_root="/r/versions/v1",
        reuse=reuse,
        buckets=1,
        rows_per_shard=100,
        snapshot_rows=snapshot_rows,
        next_row_id=0,
        shards=(),
        segments=tuple(segments),
        identity={},
    )


def segments(*specs):
    """(name, live rows, dead rows) -> consecutive segments of ``live + dead`` rows each."""
    out, start = [], 0
    for name, rows, deleted in specs:
        out.append(
            {"name": name, "rows": rows, "deleted": deleted, "row_start": start, "row_stop": start + rows + deleted}
        )
        start += rows + deleted
    return out


def runs(result):
    return [[s["name"] for s in c.segments] for c in result]


def test_dead_segments_are_rewritten_deadest_first_within_the_budget():
    shared = segments(("a", 90, 10), ("b", 70, 30), ("c", 85, 15), ("d", 50, 50), ("e", 100, 0))
    lost = {"a": 15, "e": 21}  # a: 25% dead after tonight, b 30%, c 15% (stays), d 50%, e 21%
    # live rows: a 75, b 70 (a run of both would hold 145 > 100), d 50, e 79
    assert runs(compaction_plan(plan(shared), lost, 0.2, 1.0)) == [["a"], ["b"], ["d"], ["e"]]
    assert runs(compaction_plan(plan(shared), lost, 0.2, 0.15)) == [["b"], ["d"]]  # d 50 + b 70 fit 150; a no more
    assert runs(compaction_plan(plan(shared), lost, 0.2, 0.13)) == [["b"], ["d"]]  # then e (79) does not fit either
    assert runs(compaction_plan(plan(shared), lost, 0.2, 0.1)) == [["d"]]  # b does not fit: a and e neither
    assert runs(compaction_plan(plan(shared), lost, 0.4, 1.0)) == [["d"]]
    assert compaction_plan(plan(shared), lost, 0.2, 0.0) == []  # 0 = never


def test_small_neighbours_join_into_one_segment_with_the_rows_between_them():
    shared = segments(("a", 100, 0), ("b", 20, 0), ("c", 30, 5), ("d", 10, 0), ("e", 100, 0), ("f", 30, 0))
    result = compaction_plan(plan(shared), {}, 0.2, 1.0)
    assert runs(result) == [["b", "c", "d"]]  # f is small but alone: nothing to gain
    assert result[0].name == "v000002-compact-00000"


def test_nothing_is_compacted_when_nothing_is_shared_and_a_segment_gone_whole_parts_no_run():
    assert compaction_plan(plan(segments(("a", 50, 50)), reuse=False), {}, 0.2, 1.0) == []
    shared = segments(("a", 20, 0), ("b", 50, 0), ("c", 20, 0))
    assert runs(compaction_plan(plan(shared), {"b": 50}, 0.2, 1.0)) == [["a", "c"]]


def test_a_run_too_large_for_what_is_left_of_the_budget_lets_a_smaller_one_through():
    shared = segments(("x", 95, 95), ("y", 20, 10))  # x 50% dead, y 33%; together 115 live rows: two runs
    assert runs(compaction_plan(plan(shared), {}, 0.2, 0.08)) == [["y"]]  # x's 95 rows exceed the 80 left
