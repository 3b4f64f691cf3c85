"""The text join of the mining exports (mine_texts) against direct lookups, without Ray."""
import pyarrow.parquet as pq

from retrieval_core import mine_texts, storage


class Rows:
    """A row lookup's texts, counting the rows each call asks for."""

    def __init__(self, rows: int):
        self.text = {r: f"text of row {r}" for r in range(rows)}
        self.asked: list[set] = []

    def texts(self, rows):
        self.asked.append(set(rows))
        return {r: self.text[r] for r in rows}


def test_group_starts_take_whole_shards():
    shards = [{"row_start": s, "row_stop": min(s + 4, 18)} for s in range(0, 18, 4)]  # 4, 4, 4, 4, 2 rows
    manifest = {"shards": list(reversed(shards))}
    assert mine_texts.group_starts(manifest, rows_per_group=8) == [0, 8, 16]
    assert mine_texts.group_starts(manifest, rows_per_group=5) == [0, 8, 16]
    assert mine_texts.group_starts(manifest, rows_per_group=100) == [0]
    assert mine_texts.group_starts(manifest) == [0]  # 18 rows: one group, up to TEXT_GROUP_ROWS
    assert mine_texts.group_starts(manifest, workers=2) == [0, 12]  # at least one group per worker
    assert mine_texts.group_starts(manifest, workers=9) == [0, 4, 8, 12, 16]  # whole shards
    assert mine_texts.group_starts({"shards": []}) == [0]


def test_each_part_gets_the_texts_it_named_and_each_group_reads_its_rows_once(tmp_path):
    directory, starts, rows = str(tmp_path / "_texts"), [0, 10, 20], Rows(30)
    named = {0: {"a": 1, "b": 12, "c": 25}, 1: {"d": 12, "e": 13}, 2: {}, 3: {"f": 29, "a": 1}}
    groups = {part: mine_texts.write_requests(directory, part, docs, starts) for part, docs in named.items()}
    assert groups == {0: [0, 1, 2], 1: [1], 2: [], 3: [0, 2]}
    requests = pq.ParquetFile(mine_texts.request_file(directory, 0))
    assert requests.metadata.num_row_groups == 3  # one per group: a group's task reads its own
    requesting = {g: [p for p in named if g in groups[p]] for g in range(len(starts))}
    records = [mine_texts.resolve_group(directory, g, parts, rows) for g, parts in requesting.items()]
    assert [r["texts"] for r in records] == [2, 3, 2] and [r["read"] for r in records] == [1, 2, 2]
    assert rows.asked == [{1}, {12, 13}, {25, 29}]  # each row once per group, whatever the parts asking
    assert all(mine_texts.group_done(directory, g) for g in requesting)
    for part, docs in named.items():
        assert mine_texts.part_texts(directory, part, groups[part]) == {d: rows.text[r] for d, r in docs.items()}
    by_part = pq.ParquetFile(mine_texts.group_file(directory, 1))
    assert by_part.metadata.num_row_groups == 2  # parts 0 and 1: an export reads its own row group
    assert storage.read_parquet_where(mine_texts.group_file(directory, 1), "part", 1).column("doc_id").to_pylist() \
        == ["d", "e"]
