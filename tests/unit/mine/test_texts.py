"""The text join of the mining exports (mine_texts) against direct lookups, without Ray."""

import pyarrow.parquet as pq

from retrieval_core.io import storage
from retrieval_core.mine import texts as mine_texts


class Rows:
    """A row lookup's values and texts, counting the rows each call asks for."""

    def __init__(self, rows: int):
        self.text = {r: f"text of row {r}" for r in range(rows)}
        self.asked: list[set] = []
        self.looked_up: list[set] = []

    def values(self, rows):
        self.looked_up.append(set(rows))
        return {r: (f"d{r}", f"h{r}") for r in rows}

    def texts_of(self, values):
        self.asked.append(set(values))
        return {r: self.text[r] for r in values}


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


def test_each_part_gets_the_rows_it_asked_and_each_group_reads_its_rows_once(tmp_path):
    directory, starts, rows = str(tmp_path / "_texts"), [0, 10, 20], Rows(30)
    asked = {0: [1, 12, 25, -1, 12], 1: [12, 13], 2: [], 3: [29, 1]}  # -1: no result; 12 twice
    groups = {part: mine_texts.write_requests(directory, part, wanted, starts) for part, wanted in asked.items()}
    assert groups == {0: [0, 1, 2], 1: [1], 2: [], 3: [0, 2]}
    requests = pq.ParquetFile(mine_texts.request_file(directory, 0))
    assert requests.metadata.num_row_groups == 3  # one per group: a group's task reads its own
    requesting = mine_texts.groups_to_join(directory, list(groups.items()))
    assert requesting == {0: [0, 3], 1: [0, 1], 2: [0, 3]}
    records = [mine_texts.resolve_group(directory, g, parts, rows) for g, parts in requesting.items()]
    assert [r["texts"] for r in records] == [2, 3, 2] and [r["read"] for r in records] == [1, 2, 2]
    assert rows.asked == rows.looked_up == [{1}, {12, 13}, {25, 29}]  # each row once per group, whatever the parts
    assert mine_texts.groups_to_join(directory, list(groups.items())) == {}  # all committed
    for part, wanted in asked.items():
        expected = {f"d{r}": rows.text[r] for r in wanted if r >= 0}
        assert mine_texts.part_texts(directory, part, groups[part]) == expected
        table = mine_texts.part_rows(directory, part, groups[part])
        assert sorted(table.column("row").to_pylist()) == sorted({r for r in wanted if r >= 0})
        assert table.column("text_hash").to_pylist() == [f"h{r}" for r in table.column("row").to_pylist()]
    by_part = pq.ParquetFile(mine_texts.group_file(directory, 1))
    assert by_part.metadata.num_row_groups == 2  # parts 0 and 1: a part reads its own row group
    assert storage.read_parquet_where(mine_texts.group_file(directory, 1), "part", 1).column("doc_id").to_pylist() == [
        "d12",
        "d13",
    ]


def test_a_join_without_texts_reads_no_text(tmp_path):
    directory, rows = str(tmp_path / "_candidates"), Rows(30)
    groups = mine_texts.write_requests(directory, 0, [3, 17], [0, 10, 20])
    for g in groups:
        mine_texts.resolve_group(directory, g, [0], rows, texts=False)
    table = mine_texts.part_rows(directory, 0, groups)
    assert rows.asked == [] and table.column("doc_id").to_pylist() == ["d3", "d17"]
    assert table.column("text").null_count == 2
