"""The duplicate-id check's map/reduce (retrieval_core.io.id_check) against a plain Counter over every id."""

import pickle
from collections import Counter

import numpy as np
import pytest
from helpers import make_docs, write_parquet

from retrieval_core.config import CorpusConfig
from retrieval_core.io import corpus, id_check
from retrieval_core.io.folder import Folder

REAL_HASH = corpus._id_hash


def reference(ids: list) -> list[str]:
    """The ids occurring more than once (valid ids, as strings), in the order of their second occurrence."""
    valid = [str(i) for i in ids if corpus._valid_id(i)]
    seen: Counter = Counter()
    order = []
    for doc_id in valid:
        seen[doc_id] += 1
        if seen[doc_id] == 2:
            order.append(doc_id)
    assert set(order) == {d for d, n in Counter(valid).items() if n > 1}
    return order


def write_corpus(root, docs: list[dict], cuts: list[int], row_group_size: int = 4) -> CorpusConfig:
    """``docs`` cut into Parquet files at ``cuts`` (several files, several row groups each)."""
    bounds = [0, *cuts, len(docs)]
    for n, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        write_parquet(root / "c" / f"part-{n}.parquet", docs[lo:hi], row_group_size=row_group_size)
    return CorpusConfig(path=str(root / "c"))


def synthetic(n: int = 90) -> list[dict]:
    """Duplicates across files and within one file, an id three times, and invalid ids (null, empty)."""
    docs = make_docs(n, seed=3)
    for copy, original in ((5, 1), (8, 6), (33, 3), (47, 3), (61, 22), (89, 40), (70, 12), (71, 12), (30, 29)):
        docs[copy]["id"] = docs[original]["id"]
    for blank, value in ((15, None), (16, None), (50, ""), (51, "")):
        docs[blank]["id"] = value
    return docs


def recording(steps: list[str]):
    """A ``run`` like the Ray one: each step's arguments go through pickle (as to another process); steps noted."""

    def run(step, function, items, args, on_done):
        steps.append(step)
        function, args = pickle.loads(pickle.dumps((function, args)))
        for item in items:
            on_done(item, function(item, *args))

    return run


@pytest.mark.parametrize("rows", [7, 13, 40, 1000])
@pytest.mark.parametrize("on_tasks", [False, True])
def test_the_partitioned_check_equals_a_counter_over_every_id(tmp_path, monkeypatch, rows, on_tasks):
    docs = synthetic()
    cfg = write_corpus(tmp_path, docs, [20, 45, 46, 72])
    monkeypatch.setattr(id_check, "ID_CHECK_ROWS", rows)  # 90 rows: 13, 7, 3 and 1 groups and partitions
    metas = corpus.inspect_corpus(cfg)
    assert id_check.plan_check(metas, cfg, Folder("unused")).partitions == -(-90 // rows)
    scratch = Folder(str(tmp_path / "out" / "embeddings" / id_check.SCRATCH))
    run = recording([]) if on_tasks else None
    expected = reference([d["id"] for d in docs])
    assert expected == ["doc00001", "doc00006", "doc00029", "doc00003", "doc00022", "doc00012", "doc00040"]
    assert id_check.find_duplicate_ids(metas, cfg, scratch, examples=100, run=run) == expected
    assert id_check.find_duplicate_ids(metas, cfg, scratch, run=run) == expected[:5]
    assert not (tmp_path / "out").exists()  # the scratch folder and the folders made for it are gone


def test_a_corpus_of_unique_ids_has_none_and_needs_no_naming(tmp_path, monkeypatch):
    cfg = write_corpus(tmp_path, make_docs(30), [10, 20])
    monkeypatch.setattr(id_check, "ID_CHECK_ROWS", 8)
    steps: list[str] = []
    found = id_check.find_duplicate_ids(
        corpus.inspect_corpus(cfg), cfg, Folder(str(tmp_path / "s")), run=recording(steps)
    )
    assert found == [] and not (tmp_path / "s").exists()
    assert steps == ["hashing the doc ids of group", "finding repeated id hashes in partition"]


def collide(pairs: dict[str, str]):
    """An id hash under which each key of ``pairs`` hashes as its value does (a 64-bit collision)."""
    return lambda doc_id: REAL_HASH(pairs.get(str(doc_id), doc_id))


@pytest.mark.parametrize("on_tasks", [False, True])
def test_a_hash_collision_is_not_a_duplicate(tmp_path, monkeypatch, on_tasks):
    docs = make_docs(40)
    docs[37]["id"] = docs[9]["id"]  # one real duplicate
    cfg = write_corpus(tmp_path, docs, [15, 30])
    monkeypatch.setattr(id_check, "ID_CHECK_ROWS", 10)
    monkeypatch.setattr(corpus, "_id_hash", collide({"doc00025": "doc00002", "doc00031": "doc00017"}))
    metas, scratch = corpus.inspect_corpus(cfg), Folder(str(tmp_path / "out" / id_check.SCRATCH))
    steps: list[str] = []
    run = recording(steps) if on_tasks else None
    assert id_check.find_duplicate_ids(metas, cfg, scratch, run=run) == ["doc00009"]
    docs[37]["id"] = "doc00037"  # only the collisions are left: suspects, named, and not reported
    cfg = write_corpus(tmp_path, docs, [15, 30])
    assert id_check.find_duplicate_ids(corpus.inspect_corpus(cfg), cfg, scratch, run=run) == []
    assert not on_tasks or steps.count("naming the duplicate ids of group") == 2
    assert not (tmp_path / "out").exists()


def test_suspects_are_named_in_rounds_past_collisions(tmp_path, monkeypatch):
    """On tasks the caller holds ``SUSPECTS_PER_ROUND`` suspects at a time, smallest hashes first: rounds of
    collisions alone go on to the next suspects until the examples are named or none is left."""
    docs = make_docs(60)
    for copy, original in ((40, 4), (45, 11), (58, 23)):
        docs[copy]["id"] = docs[original]["id"]
    cfg = write_corpus(tmp_path, docs, [20, 41])
    pairs = {f"doc{50 + k:05d}": f"doc{30 + k:05d}" for k in range(6)}  # 6 collisions
    monkeypatch.setattr(corpus, "_id_hash", collide(pairs))
    monkeypatch.setattr(id_check, "ID_CHECK_ROWS", 9)
    monkeypatch.setattr(id_check, "SUSPECTS_PER_ROUND", 2)
    metas, scratch = corpus.inspect_corpus(cfg), Folder(str(tmp_path / "s"))
    steps: list[str] = []
    assert id_check.find_duplicate_ids(metas, cfg, scratch, 100, recording(steps)) == reference([d["id"] for d in docs])
    assert steps.count("naming the duplicate ids of group") == 5  # 9 suspects, 2 a round
    steps.clear()
    two = id_check.find_duplicate_ids(metas, cfg, scratch, 2, recording(steps))
    assert len(two) == 2 and set(two) <= {"doc00004", "doc00011", "doc00023"}
    assert two == sorted(two, key=[d["id"] for d in docs[40:]].index)  # in corpus order
    assert id_check.find_duplicate_ids(metas, cfg, scratch, 100) == ["doc00004", "doc00011", "doc00023"]


def test_every_partition_holds_the_duplicates_of_its_hashes(tmp_path, monkeypatch):
    docs = make_docs(60)
    for copy, original in ((5, 1), (17, 3), (30, 3), (41, 22), (59, 40), (50, 8)):
        docs[copy]["id"] = docs[original]["id"]
    cfg = write_corpus(tmp_path, docs, [25], row_group_size=7)
    monkeypatch.setattr(id_check, "ID_CHECK_ROWS", 20)
    plan = id_check.plan_check(corpus.inspect_corpus(cfg), cfg, Folder(str(tmp_path / "s")))
    assert plan.partitions == 3 and [g.num_rows for g in plan.groups] == [20, 20, 20]
    hashed = [id_check.map_group(g, plan)["ids"] for g in range(3)]
    assert hashed == [20, 20, 20]
    found = {p: id_check.reduce_partition(p, plan, None, None)["smallest"] for p in range(3)}
    duplicated = ["doc00001", "doc00003", "doc00008", "doc00022", "doc00040"]
    assert sorted(h for part in found.values() for h in part) == sorted(REAL_HASH(d) for d in duplicated)
    assert all(h % 3 == p for p, part in found.items() for h in part)
    assert sum(bool(part) for part in found.values()) >= 2  # the ids really spread over the partitions
    assert id_check.reduce_partition(0, plan, None, 1)["suspects"] == len(found[0])
    assert len(id_check.reduce_partition(0, plan, None, 1)["smallest"]) == min(1, len(found[0]))
    assert id_check.id_check_partitions(id_check.ID_CHECK_ROWS) == 1
    assert id_check.id_check_partitions(id_check.ID_CHECK_ROWS + 1) == 2


def test_duplicate_ids_are_found_with_examples_in_corpus_order(tmp_path):
    docs = make_docs(20)
    docs[5]["id"] = docs[3]["id"]
    docs[17]["id"] = docs[1]["id"]
    docs[12]["id"] = docs[0]["id"]
    write_parquet(tmp_path / "a.parquet", docs[:10], row_group_size=4)
    write_parquet(tmp_path / "b.parquet", docs[10:], row_group_size=4)
    cfg = CorpusConfig(path=[str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")])
    scratch = Folder(str(tmp_path / "s"))
    assert id_check.find_duplicate_ids(corpus.inspect_corpus(cfg), cfg, scratch) == ["doc00003", "doc00000", "doc00001"]
    assert id_check.find_duplicate_ids(corpus.inspect_corpus(cfg), cfg, scratch, examples=2) == ["doc00003", "doc00000"]
    unique = CorpusConfig(path=str(tmp_path / "a.parquet"))
    write_parquet(tmp_path / "a.parquet", make_docs(10), row_group_size=4)
    assert id_check.find_duplicate_ids(corpus.inspect_corpus(unique), unique, scratch) == []


def test_integer_ids_are_compared_as_their_strings(tmp_path, monkeypatch):
    rows = [{"id": i % 23, "text": "t"} for i in range(30)]  # 0..6 twice
    write_parquet(tmp_path / "c" / "a.parquet", rows[:12])
    write_parquet(tmp_path / "c" / "b.parquet", rows[12:])
    cfg = CorpusConfig(path=str(tmp_path / "c"))
    monkeypatch.setattr(id_check, "ID_CHECK_ROWS", 11)
    found = id_check.find_duplicate_ids(corpus.inspect_corpus(cfg), cfg, Folder(str(tmp_path / "s")), 100)
    assert found == reference([r["id"] for r in rows]) == [str(i) for i in range(7)]


def test_the_scratch_folder_goes_whatever_the_result_and_a_killed_checks_files_first(tmp_path, monkeypatch):
    cfg = write_corpus(tmp_path, make_docs(30), [10])
    metas = corpus.inspect_corpus(cfg)
    out = tmp_path / "out"
    stale = out / "embeddings" / id_check.SCRATCH / "part-00000" / "map-00099.npy"
    stale.parent.mkdir(parents=True)
    np.save(stale, np.array([REAL_HASH("doc00001")], dtype=np.uint64))  # a killed check's file: not read
    scratch = Folder(str(out / "embeddings" / id_check.SCRATCH))
    assert id_check.find_duplicate_ids(metas, cfg, scratch) == []
    assert (out / "embeddings").is_dir() and not (out / "embeddings" / id_check.SCRATCH).exists()

    def failing(partition, plan, after, limit):
        raise OSError("the store went away")

    monkeypatch.setattr(id_check, "reduce_partition", failing)
    with pytest.raises(OSError, match="went away"):
        id_check.find_duplicate_ids(metas, cfg, Folder(str(tmp_path / "new" / "embeddings" / id_check.SCRATCH)))
    assert not (tmp_path / "new").exists()
    assert (out / "embeddings").is_dir() and not (out / "embeddings" / id_check.SCRATCH).exists()


def test_memory_urls(tmp_path, monkeypatch):
    docs = make_docs(25)
    docs[20]["id"] = docs[2]["id"]
    cfg = write_corpus(tmp_path, docs, [12])
    monkeypatch.setattr(id_check, "ID_CHECK_ROWS", 6)
    scratch = Folder("memory://id-check-test/out/embeddings/_id_check")
    assert id_check.find_duplicate_ids(corpus.inspect_corpus(cfg), cfg, scratch) == ["doc00002"]
    assert not scratch.exists()
