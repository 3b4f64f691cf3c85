import pickle

import pytest

from retrieval_core.io import shard_list
from retrieval_core.io.folder import NameSet
from retrieval_core.io.manifest import IncompatibleOutputError, read_manifest, write_streamed
from retrieval_core.io.schemas import EMBEDDINGS_SHARD_ENTRY, SCHEMA_VERSION


def entries(count):
    return [
        {"name": f"shard-{i:05d}", "path": f"shard-{i:05d}.parquet", "row_start": 10 * i, "row_stop": 10 * i + 10}
        | {"rows": 10 - i % 3, "rejected": i % 3}
        | ({"rejects_path": f"../rejects/encode/shard-{i:05d}.parquet"} if i % 3 else {})
        for i in range(count)
    ]


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(shard_list, "BATCH", 4)  # several row groups from a few entries


def write_manifest(tmp_path, items):
    url = str(tmp_path / "_manifest.json")
    written = write_streamed(url, iter(items), lambda: {"schema_version": SCHEMA_VERSION}, EMBEDDINGS_SHARD_ENTRY)
    return written, read_manifest(url)


@pytest.mark.parametrize("count", [0, 1, 4, 11])
def test_a_shard_table_reads_back_the_entries_written(tmp_path, small_batches, count):
    written, manifest = write_manifest(tmp_path, entries(count))
    shards = manifest["shards"]
    assert isinstance(shards, shard_list.ShardList) and "shards" not in written
    assert written["shard_list"]["count"] == len(shards) == count
    assert list(shards) == entries(count)  # fields an entry lacked stay absent
    assert [len(batch) for batch in shards.batches()] == [4] * (count // 4) + ([count % 4] if count % 4 else [])
    order = [count - 1 - i for i in range(count)] + list(range(0, count, 3))
    assert [shards[i] for i in order] == [entries(count)[i] for i in order]
    assert shards[1:-1:2] == entries(count)[1:-1:2]
    assert list(pickle.loads(pickle.dumps(shards))) == entries(count)  # a task reads the table itself
    with pytest.raises(IndexError):
        shards[count]


def test_the_digest_follows_the_content(tmp_path):
    first, _ = write_manifest(tmp_path / "a", entries(5))
    same, _ = write_manifest(tmp_path / "b", entries(5))
    changed = entries(5)
    changed[2]["rows"] += 1
    other, _ = write_manifest(tmp_path / "c", changed)
    assert first["shard_list"]["digest"] == same["shard_list"]["digest"] != other["shard_list"]["digest"]


def test_an_entry_with_a_field_the_table_lacks_is_refused_and_no_manifest_is_written(tmp_path):
    bad = entries(3)
    bad[1]["color"] = "blue"
    with pytest.raises(ValueError, match=r"fields \['color'\]"):
        write_manifest(tmp_path, bad)
    assert not (tmp_path / "_manifest.json").exists()


def test_non_empty_view_and_pending_walk_without_lists(tmp_path, small_batches):
    items = entries(10)
    for i in (0, 4, 5, 9):
        items[i]["rows"] = 0
    _, manifest = write_manifest(tmp_path, items)
    with_rows = shard_list.NonEmpty(manifest["shards"])
    expected = [e for e in items if e["rows"]]
    assert len(with_rows) == 6 and list(with_rows) == expected
    assert [with_rows[i] for i in (5, 0, 3)] == [expected[5], expected[0], expected[3]]
    done = NameSet(["shard-00002", "shard-00007", "shard-00004"])
    pending = shard_list.pending(with_rows, done, lambda e: e["name"], lambda e: e["rows"])
    left = [e for e in expected if e["name"] not in ("shard-00002", "shard-00007")]
    assert len(pending) == 4 and list(pending) == left and pending.num_rows == sum(e["rows"] for e in left)


def test_a_name_set_answers_membership():
    names = [f"shard-{i:05d}" for i in range(0, 3000, 3)]
    held = NameSet(names + names[:10])
    assert len(held) == 1000
    assert all(n in held for n in names)
    assert not any(f"shard-{i:05d}" in held for i in range(1, 3000, 3))


def test_bounds_are_read_once_and_a_replaced_table_or_a_bad_file_name_is_refused(tmp_path, small_batches):
    written, manifest = write_manifest(tmp_path, entries(9))
    shards = manifest["shards"]
    starts, stops = shard_list.row_bounds(shards)
    assert starts.tolist() == [10 * i for i in range(9)] and stops.tolist() == [10 * i + 10 for i in range(9)]
    assert shard_list.row_bounds(shards)[0] is starts  # kept
    assert [a.tolist() for a in shard_list.row_bounds(entries(9))] == [starts.tolist(), stops.tolist()]
    write_manifest(tmp_path / "other", entries(5))
    (tmp_path / "_shard_list.parquet").write_bytes((tmp_path / "other" / "_shard_list.parquet").read_bytes())
    with pytest.raises(IncompatibleOutputError, match="holds 5 entries in 2 row groups, its manifest 9"):
        list(read_manifest(str(tmp_path / "_manifest.json"))["shards"])
    with pytest.raises(IncompatibleOutputError, match="outside its folder"):
        shard_list.attach({"shard_list": {**written["shard_list"], "file": "../x.parquet"}}, str(tmp_path / "m.json"))


def test_pending_refuses_a_one_pass_iterator():
    with pytest.raises(TypeError, match="not an iterator"):
        shard_list.pending(iter(entries(3)), NameSet([]), lambda e: e["name"], lambda e: e["rows"])
