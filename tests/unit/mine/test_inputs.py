"""Mining input: pairs (JSONL or Parquet, one or many positives), BEIR queries + qrels, and positive resolution."""

import pytest
from helpers import write_jsonl, write_parquet

from retrieval_core.config import load_config
from retrieval_core.mine import inputs as mine_input


def mine_cfg(**settings):
    return load_config(None, [f"mine.{k}={v}" for k, v in settings.items()]).mine


def test_pairs_merge_rows_of_one_query_and_accept_lists(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"qid": "a", "q": "first question", "pos": "d1"},
            {"qid": "b", "q": "second question", "pos": ["d2", "d3"]},
            {"qid": "a", "q": "first question", "pos": ["d4", "d1"]},
        ],
        blank_every=2,
    )
    queries = mine_input.load_queries(
        mine_cfg(pairs_path=str(path), query_id_column="qid", query_column="q", positive_column="pos")
    )
    assert [(q.query_id, q.text, q.positive_doc_ids) for q in queries] == [
        ("a", "first question", ["d1", "d4"]),
        ("b", "second question", ["d2", "d3"]),
    ]


def test_parquet_pairs_without_id_column_get_text_ids(tmp_path):
    path = write_parquet(
        tmp_path / "p.parquet", [{"query": "why?", "positive": "d9"}, {"query": "how?", "positive": "d8"}]
    )
    queries = mine_input.load_queries(mine_cfg(pairs_path=str(path)))
    assert [q.query_id for q in queries] == [mine_input.text_query_id("why?"), mine_input.text_query_id("how?")]
    assert len(queries[0].query_id) == 16


def test_bad_pairs_name_the_file_row_and_column(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"query": "q", "answer": "d1"}])
    with pytest.raises(mine_input.PairsError, match=r"p.jsonl' line 1: missing column 'positive'.*answer"):
        mine_input.load_queries(mine_cfg(pairs_path=str(path)))
    path = write_jsonl(tmp_path / "e.jsonl", [{"query": "q", "positive": []}])
    with pytest.raises(mine_input.PairsError, match="non-empty list"):
        mine_input.load_queries(mine_cfg(pairs_path=str(path)))
    with pytest.raises(mine_input.PairsError, match="does not exist"):
        mine_input.load_queries(mine_cfg(pairs_path=str(tmp_path / "missing.jsonl")))


def test_beir_input_takes_positive_qrels_only(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"_id": "1", "text": "one"}, {"_id": "2", "text": "two"}])
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n1\td1\t1\n1\td2\t0\n2\td3\t0\n")
    queries = mine_input.load_queries(
        mine_cfg(queries_path=str(tmp_path / "q.jsonl"), qrels_path=str(tmp_path / "qrels.tsv"))
    )
    assert [(q.query_id, q.positive_doc_ids) for q in queries] == [("1", ["d1"])]


def test_positives_missing_from_the_corpus_become_rejects():
    queries = [mine_input.MiningQuery("a", "qa", ["d1", "zz"]), mine_input.MiningQuery("b", "qb", ["yy"])]
    kept, rejects = mine_input.resolve_positives(queries, {"d1": 0, "d2": 1})
    assert [(q.query_id, q.positive_rows) for q in kept] == [("a", [0])]
    assert rejects == [
        {"query_id": "a", "doc_id": "zz", "reason": "positive not in corpus"},
        {"query_id": "b", "doc_id": "yy", "reason": "positive not in corpus"},
    ]
