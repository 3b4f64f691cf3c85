"""The shuffle that plans the mining input (mine_shuffle), without Ray, against reading the input per bucket: the
same queries and positives per bucket, with each input file and each embedding shard read once."""

import json

import numpy as np
import pytest
from helpers import config, write_synthetic_embeddings

from retrieval_core.index import lookup
from retrieval_core.io.folder import Folder
from retrieval_core.io.sharding import buckets_of
from retrieval_core.mine import inputs as mine_input
from retrieval_core.mine import mining
from retrieval_core.mine import plan as mine_plan
from retrieval_core.mine import shuffle as mine_shuffle

BUCKETS = 4


def _pairs(n: int) -> list[dict]:
    """Queries with 1-3 positives among doc0..doc299 (some absent: doc900+), rows of a query repeated apart."""
    rng = np.random.default_rng(3)
    rows = [
        {
            "query_id": f"q{i}",
            "query": f"query {i}",
            "positive": [f"doc{d}" for d in rng.choice(320, rng.integers(1, 4), replace=False).tolist()],
        }
        for i in range(n)
    ]
    for row in rows:
        row["positive"] = [d if int(d[3:]) < 300 else f"doc9{d[3:]}" for d in row["positive"]]
    return rows + [{"query_id": "q3", "query": "query 3", "positive": "doc5000"}]  # absent from the corpus


def _shuffled(cfg, emb, monkeypatch):
    """Run the shuffle's steps in this process, counting the reads of each input file and each embedding shard;
    returns (shuffle plan, reads of input files, reads of shards)."""
    files, shards = [], []
    read_rows, read_shard = mine_shuffle.input_rows, mine_shuffle.read_shard_table
    monkeypatch.setattr(mine_shuffle, "input_rows", lambda mi, kind, url: files.append(url) or read_rows(mi, kind, url))
    monkeypatch.setattr(
        mine_shuffle,
        "read_shard_table",
        lambda root, shard, *a: shards.append(shard["name"]) or read_shard(root, shard, *a),
    )
    monkeypatch.setattr(mine_shuffle, "DOC_ROWS_PER_TASK", 70)  # 300 rows: 5 doc buckets, shard groups of 2 shards
    plan = mine_shuffle.shuffle_plan(BUCKETS, emb)
    for i in mine_shuffle.inputs_to_split(mining.work_of(cfg)):
        mine_shuffle.split_input(mining.work_of(cfg), i, plan)
    for g in mine_shuffle.groups_to_partition(mining.work_of(cfg), plan):
        mine_shuffle.partition_corpus(mining.work_of(cfg), g, plan, emb)
    for d in mine_shuffle.doc_buckets_to_join(mining.work_of(cfg), plan):
        mine_shuffle.join_positives(mining.work_of(cfg), d, plan)
    return plan, files, shards


@pytest.mark.parametrize("beir", [False, True])
def test_the_shuffle_gives_each_bucket_its_queries_and_positives_reading_each_file_once(tmp_path, monkeypatch, beir):
    emb = write_synthetic_embeddings(tmp_path / "root", np.eye(300, 8, dtype=np.float32), shard_rows=32)
    pairs = _pairs(150)
    if beir:
        (tmp_path / "queries.jsonl").write_text(
            "".join(json.dumps({"_id": p["query_id"], "text": p["query"]}) + "\n" for p in pairs[:-1])
        )
        positives = [
            (p["query_id"], d)
            for p in pairs
            for d in ([p["positive"]] if isinstance(p["positive"], str) else p["positive"])
        ]
        (tmp_path / "qrels.tsv").write_text(
            "query-id\tcorpus-id\tscore\n"
            + "".join(f"{q}\t{d}\t{1 if i % 9 else 0}\n" for i, (q, d) in enumerate(positives))
        )
        inputs = {
            "mine__pairs_path": "",
            "mine__queries_path": str(tmp_path / "queries.jsonl"),
            "mine__qrels_path": str(tmp_path / "qrels.tsv"),
        }
    else:
        (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        inputs = {"mine__pairs_path": str(tmp_path / "pairs.jsonl"), "mine__query_id_column": "query_id"}
    cfg = config(tmp_path / "corpus.parquet", tmp_path / "root", **inputs)
    plan, files, shards = _shuffled(cfg, emb, monkeypatch)
    assert plan["doc_buckets"] == 5 and [len(g) for g in plan["groups"]] == [2, 2, 2, 2, 2]
    assert sorted(files) == sorted(url for _, url in mine_input.input_files(cfg.mine))  # each file read once
    assert sorted(shards) == sorted(s["name"] for s in emb["shards"])  # each shard's doc ids read once
    everything = mine_input.load_queries(cfg.mine)
    found = lookup.rows_for_doc_ids(Folder(str(tmp_path / "root")), {d for q in everything for d in q.positive_doc_ids})
    assert 0 < len(found) < len({d for q in everything for d in q.positive_doc_ids})  # some positives absent
    seen = []
    for bucket in range(BUCKETS):
        queries, doc_rows = mine_shuffle.bucket_input(mining.work_of(cfg), bucket, plan)
        expected = mine_input.load_queries(
            cfg.mine, keep=lambda q, b=bucket: buckets_of([q], BUCKETS)[0] == b
        )  # the input read for this bucket alone
        assert [vars(q) for q in queries] == [vars(q) for q in expected] and queries
        asked = {d for q in queries for d in q.positive_doc_ids}
        assert doc_rows == {d: r for d, r in found.items() if d in asked}
        seen += [q.query_id for q in queries]
    assert sorted(seen) == sorted(q.query_id for q in everything)
    record = mine_plan.plan_bucket(mining.work_of(cfg), 0, plan)
    assert (
        record["kept"]
        + sum(
            1
            for q in mine_shuffle.bucket_input(mining.work_of(cfg), 0, plan)[0]
            if not any(d in found for d in q.positive_doc_ids)
        )
        == record["input_queries"]
    )
    mine_shuffle.remove_scratch(mining.work_of(cfg))
    assert not any((tmp_path / "root" / "negatives" / "_input" / name).exists() for name in mine_shuffle.SCRATCH)
    assert (tmp_path / "root" / "negatives" / "_input" / "b00000.json").exists()


def test_a_bad_row_names_its_line_and_commits_nothing(tmp_path):
    emb = write_synthetic_embeddings(tmp_path / "root", np.eye(40, 8, dtype=np.float32), shard_rows=16)
    rows = [json.dumps({"query_id": "a", "query": "x", "positive": "doc1"})] * 3 + ['{"query_id": "b"}']
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    cfg = config(
        tmp_path / "corpus.parquet",
        tmp_path / "root",
        mine__pairs_path=str(tmp_path / "pairs.jsonl"),
        mine__query_id_column="query_id",
    )
    plan = mine_shuffle.shuffle_plan(2, emb)
    with pytest.raises(mine_input.PairsError, match=r"pairs\.jsonl' line 4: missing column 'query'"):
        mine_shuffle.split_input(mining.work_of(cfg), 0, plan)
    assert mine_shuffle.inputs_to_split(mining.work_of(cfg)) == [0]
    assert not list((tmp_path / "root" / "negatives" / "_input" / "split").glob("*"))  # no file left behind
