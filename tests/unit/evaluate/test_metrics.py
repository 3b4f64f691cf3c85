import gzip
import json
import math
import random

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import SCIFACT

from retrieval_core.evaluate import metrics
from retrieval_core.io import judgements
from retrieval_core.io.judgements import EvaluationDataError

# ------------------------------------------------------------------------------------------------------------ nDCG


def test_ndcg_binary_relevant_at_ranks_1_and_3():
    # DCG = 1/log2(2) + 1/log2(4) = 1 + 0.5; IDCG (2 relevant) = 1/log2(2) + 1/log2(3)
    value = metrics.ndcg_at_k(["a", "x", "b", "y"], {"a": 1, "b": 1}, 10)
    assert value == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)), abs=1e-15)
    assert value == pytest.approx(0.9197207891481876, abs=1e-15)


def test_ndcg_graded_uses_linear_gain():
    qrels = {"a": 2, "b": 1}
    # [b, a]: DCG = 1/log2(2) + 2/log2(3); IDCG = 2/log2(2) + 1/log2(3)
    expected = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert metrics.ndcg_at_k(["b", "a"], qrels, 10) == pytest.approx(expected, abs=1e-15)
    assert expected == pytest.approx(0.8597186998521972, abs=1e-15)
    # [x, a]: DCG = 0 + 2/log2(3)
    assert metrics.ndcg_at_k(["x", "a"], qrels, 10) == pytest.approx((2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert metrics.ndcg_at_k(["a", "b"], qrels, 10) == 1.0


def test_ndcg_ideal_is_truncated_at_k_and_ignores_non_positive_scores():
    qrels = {"a": 1, "b": 1, "c": 1, "n": -1, "z": 0}
    # k = 2: IDCG = 1 + 1/log2(3) (only 2 of the 3 relevant fit), DCG of [a, b] equals it
    assert metrics.ndcg_at_k(["a", "b", "c"], qrels, 2) == 1.0
    # [n, a]: the negative score gains 0, so DCG = 1/log2(3); IDCG@2 = 1 + 1/log2(3)
    expected = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert metrics.ndcg_at_k(["n", "a"], qrels, 2) == pytest.approx(expected, abs=1e-15)
    # relevant document at rank 3 is beyond k = 2
    assert metrics.ndcg_at_k(["x", "y", "a"], qrels, 2) == 0.0


def test_ndcg_is_zero_without_positive_qrels_or_ranking():
    assert metrics.ndcg_at_k(["a", "b"], {"a": 0, "b": -2}, 10) == 0.0
    assert metrics.ndcg_at_k([], {"a": 1}, 10) == 0.0


def reference_ndcg(ranked, qrels, k):
    """Independent reference: numpy arrays of gains and discounts."""
    gains = np.array([max(qrels.get(d, 0), 0) for d in ranked[:k]], dtype=np.float64)
    dcg = float(np.sum(gains / np.log2(np.arange(2, len(gains) + 2))))
    ideal = np.sort(np.array([s for s in qrels.values() if s > 0], dtype=np.float64))[::-1][:k]
    idcg = float(np.sum(ideal / np.log2(np.arange(2, len(ideal) + 2))))
    return dcg / idcg if idcg > 0 else 0.0


def test_ndcg_matches_a_reference_on_random_cases():
    rng = random.Random(1234)
    partial = 0
    for _ in range(200):
        pool = [f"d{i}" for i in range(rng.randint(2, 40))]
        ranked = rng.sample(pool, rng.randint(1, len(pool)))
        judged = rng.sample(pool, rng.randint(1, min(len(pool), 15)))
        qrels = {d: rng.choice([-1, 0, 1, 1, 2, 3]) for d in judged}
        k = rng.choice([1, 3, 5, 10, 20, 100])
        expected = reference_ndcg(ranked, qrels, k)
        assert metrics.ndcg_at_k(ranked, qrels, k) == pytest.approx(expected, abs=1e-12, rel=0)
        partial += 0 < expected < 1
    assert partial > 100  # most cases exercise values strictly between 0 and 1, not trivial 0s and 1s


# ------------------------------------------------------------------------------------------------- recall and MRR


def test_recall_counts_relevant_beyond_k_in_the_denominator():
    qrels = {"a": 1, "b": 2, "c": 1, "d": 1, "e": 0}
    ranked = ["a", "e", "x", "b", "c"]
    # 4 relevant (e has score 0); top 3 holds a -> 1/4; top 5 holds a, b, c -> 3/4
    assert metrics.recall_at_k(ranked, qrels, 3) == 0.25
    assert metrics.recall_at_k(ranked, qrels, 5) == 0.75
    assert metrics.recall_at_k(ranked, {"e": 0}, 5) == 0.0


def test_mrr_first_relevant_rank():
    qrels = {"r": 1, "s": 1, "z": 0}
    ranked = ["z", "x", "y", "r", "s"]  # z has score 0: not relevant; first relevant at rank 4 -> 1/4
    assert metrics.mrr_at_k(ranked, qrels, 10) == 0.25
    assert metrics.mrr_at_k(ranked, qrels, 3) == 0.0  # rank 4 is beyond k = 3
    assert metrics.mrr_at_k(["s", "r"], qrels, 1) == 1.0


def test_single_query_functions_reject_duplicates_and_bad_k():
    with pytest.raises(ValueError, match="more than once.*'a'"):
        metrics.ndcg_at_k(["a", "b", "a"], {"a": 1}, 10)
    with pytest.raises(ValueError, match="integer >= 1"):
        metrics.recall_at_k(["a"], {"a": 1}, 0)


# ------------------------------------------------------------------------------------------------------ averaging

RUN = {
    "q1": ["a", "x"],  # relevant a at rank 1: ndcg 1, recall 1, mrr 1
    "q2": ["y", "b", "z", "c"],  # b at rank 2, c at rank 4 of 2 relevant
    "q3": ["d"],  # only score-0 qrels: not evaluated
    "q5": ["a"],  # not in qrels: ignored
}
QRELS = {
    "q1": {"a": 1},
    "q2": {"b": 1, "c": 1},
    "q3": {"d": 0},
    "q4": {"e": 1},  # missing from the run: every metric 0
}


def test_evaluate_run_averages_over_queries_with_relevant_docs():
    result = metrics.evaluate_run(RUN, QRELS, ndcg_ks=(10, 2), recall_ks=(1, 10), mrr_ks=(10,))
    # q2: DCG@10 = 1/log2(3) + 1/log2(5); IDCG = 1 + 1/log2(3)
    q2_ndcg10 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    # q2 @2: DCG = 1/log2(3); IDCG@2 = 1 + 1/log2(3)
    q2_ndcg2 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert result["queries"] == 3  # q1, q2, q4
    assert result["ndcg@10"] == pytest.approx((1 + q2_ndcg10 + 0) / 3, abs=1e-15)
    assert result["ndcg@2"] == pytest.approx((1 + q2_ndcg2 + 0) / 3, abs=1e-15)
    assert result["recall@1"] == pytest.approx((1 + 0 + 0) / 3, abs=1e-15)
    assert result["recall@10"] == pytest.approx((1 + 1 + 0) / 3, abs=1e-15)
    assert result["mrr@10"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-15)
    assert set(result) == {"ndcg@10", "ndcg@2", "recall@1", "recall@10", "mrr@10", "queries"}


def test_evaluate_run_default_keys():
    result = metrics.evaluate_run({"q1": ["a"]}, {"q1": {"a": 1}})
    assert result == {"ndcg@10": 1.0, "recall@10": 1.0, "recall@100": 1.0, "mrr@10": 1.0, "queries": 1}


def test_per_query_metrics_values():
    per_query = metrics.per_query_metrics(RUN, QRELS, ndcg_ks=(), recall_ks=(10,), mrr_ks=(10,))
    assert per_query == {
        "q1": {"recall@10": 1.0, "mrr@10": 1.0},
        "q2": {"recall@10": 1.0, "mrr@10": 0.5},
        "q4": {"recall@10": 0.0, "mrr@10": 0.0},
    }


def test_evaluate_run_rejects_duplicate_ids_naming_the_query():
    with pytest.raises(ValueError, match="query 'q2'.*'b'"):
        metrics.evaluate_run({"q1": ["a"], "q2": ["b", "c", "b"]}, QRELS)


def test_evaluate_run_without_relevant_docs_is_an_error():
    with pytest.raises(EvaluationDataError, match="no query"):
        metrics.evaluate_run({"q3": ["d"]}, {"q3": {"d": 0}})


# -------------------------------------------------------------------------------------------------------- queries


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_read_queries_jsonl_skips_blank_lines(tmp_path):
    url = write_lines(
        tmp_path / "queries.jsonl",
        [
            json.dumps({"_id": "q1", "text": "first", "metadata": {}}),
            "",
            "   ",
            json.dumps({"_id": 7, "text": "seventh"}),  # integer ids become strings
        ],
    )
    assert judgements.read_queries(url) == {"q1": "first", "7": "seventh"}


def test_read_queries_gzip_through_fsspec_memory():
    data = gzip.compress(b'{"qid": "a", "question": "alpha"}\n{"qid": "b", "question": "beta"}\n')
    with fsspec.open("memory://eval/queries.jsonl.gz", "wb") as handle:
        handle.write(data)
    result = judgements.read_queries("memory://eval/queries.jsonl.gz", id_field="qid", text_field="question")
    assert result == {"a": "alpha", "b": "beta"}


def test_read_queries_parquet(tmp_path):
    table = pa.table({"_id": ["q1", "q2"], "text": ["one", "two"], "extra": [1, 2]})
    pq.write_table(table, tmp_path / "queries.parquet")
    assert judgements.read_queries(str(tmp_path / "queries.parquet")) == {"q1": "one", "q2": "two"}


def test_read_queries_parquet_missing_column(tmp_path):
    pq.write_table(pa.table({"id": ["q1"], "text": ["one"]}), tmp_path / "q.pq")
    with pytest.raises(EvaluationDataError) as err:
        judgements.read_queries(str(tmp_path / "q.pq"))
    assert "q.pq" in str(err.value) and "'_id'" in str(err.value) and "['id', 'text']" in str(err.value)


def test_read_queries_invalid_json_names_file_and_line(tmp_path):
    url = write_lines(tmp_path / "bad.jsonl", ['{"_id": "q1", "text": "x"}', "", '{"_id": "q2", "text": '])
    with pytest.raises(EvaluationDataError) as err:
        judgements.read_queries(url)
    assert "bad.jsonl" in str(err.value) and "line 3" in str(err.value) and "invalid JSON" in str(err.value)


def test_read_queries_missing_field_lists_fields_present(tmp_path):
    url = write_lines(tmp_path / "q.jsonl", ['{"_id": "q1", "text": "x"}', '{"_id": "q2", "title": "y"}'])
    with pytest.raises(EvaluationDataError) as err:
        judgements.read_queries(url)
    message = str(err.value)
    assert "q.jsonl" in message and "line 2" in message and "'text'" in message and "['_id', 'title']" in message


def test_read_queries_duplicate_id(tmp_path):
    url = write_lines(tmp_path / "q.jsonl", ['{"_id": "q1", "text": "x"}', '{"_id": "q1", "text": "y"}'])
    with pytest.raises(EvaluationDataError) as err:
        judgements.read_queries(url)
    assert "q.jsonl" in str(err.value) and "line 2" in str(err.value) and "duplicate query id 'q1'" in str(err.value)


def test_read_queries_rejects_non_object_and_bad_values(tmp_path):
    url = write_lines(tmp_path / "q.jsonl", ['["q1", "x"]'])
    with pytest.raises(EvaluationDataError, match="line 1: expected a JSON object"):
        judgements.read_queries(url)
    url = write_lines(tmp_path / "q2.jsonl", ['{"_id": null, "text": "x"}'])
    with pytest.raises(EvaluationDataError, match="line 1: field '_id'"):
        judgements.read_queries(url)
    url = write_lines(tmp_path / "q3.jsonl", ['{"_id": "q", "text": 5}'])
    with pytest.raises(EvaluationDataError, match="line 1: field 'text' of query 'q'"):
        judgements.read_queries(url)


# ---------------------------------------------------------------------------------------------------------- qrels


def test_read_qrels_with_header_keeps_non_positive_rows(tmp_path):
    url = write_lines(
        tmp_path / "test.tsv",
        [
            "query-id\tcorpus-id\tscore",
            "q1\td1\t1",
            "q1\td2\t0",
            "q2\td3\t2",
            "q2\td4\t-1",
            "",
        ],
    )
    assert judgements.read_qrels(url) == {"q1": {"d1": 1, "d2": 0}, "q2": {"d3": 2, "d4": -1}}


def test_read_qrels_without_header(tmp_path):
    url = write_lines(tmp_path / "test.tsv", ["q1\td1\t1", "q1\td1\t1", "q2\td3\t2"])  # same pair twice: read once
    assert judgements.read_qrels(url) == {"q1": {"d1": 1}, "q2": {"d3": 2}}


def test_read_qrels_bad_header(tmp_path):
    url = write_lines(tmp_path / "test.tsv", ["qid\tdocid\trel", "q1\td1\t1"])
    with pytest.raises(EvaluationDataError) as err:
        judgements.read_qrels(url)
    assert "test.tsv" in str(err.value) and "line 1" in str(err.value) and "query-id" in str(err.value)


def test_read_qrels_wrong_field_count_names_line(tmp_path):
    url = write_lines(tmp_path / "test.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1 d2 1"])
    with pytest.raises(EvaluationDataError) as err:
        judgements.read_qrels(url)
    assert "test.tsv" in str(err.value) and "line 3" in str(err.value) and "expected 3" in str(err.value)


def test_read_qrels_non_integer_score_names_line(tmp_path):
    url = write_lines(tmp_path / "test.tsv", ["query-id\tcorpus-id\tscore", "", "q1\td1\t1.5"])
    with pytest.raises(EvaluationDataError) as err:
        judgements.read_qrels(url)
    assert "test.tsv" in str(err.value) and "line 3" in str(err.value) and "'1.5'" in str(err.value)


def test_read_qrels_conflicting_duplicate(tmp_path):
    url = write_lines(tmp_path / "test.tsv", ["q1\td1\t1", "q1\td1\t2"])
    with pytest.raises(EvaluationDataError, match="line 2: query 'q1', document 'd1'.*score 2 \\(earlier 1\\)"):
        judgements.read_qrels(url)


def test_read_qrels_empty_file(tmp_path):
    url = write_lines(tmp_path / "test.tsv", ["query-id\tcorpus-id\tscore"])
    with pytest.raises(EvaluationDataError, match="no qrels rows"):
        judgements.read_qrels(url)


@pytest.mark.skipif(not (SCIFACT / "qrels" / "train.tsv").exists(), reason="SciFact data not present")
def test_read_scifact_train():
    qrels = judgements.read_qrels(str(SCIFACT / "qrels" / "train.tsv"))
    queries = judgements.read_queries(str(SCIFACT / "queries.jsonl"))
    assert qrels["0"] == {"31715818": 1}
    assert queries["0"] == "0-dimensional biomaterials lack inductive properties."
    assert set(qrels) <= set(queries)


def test_means_added_one_query_at_a_time_equal_fsum_over_all():
    rng = np.random.default_rng(7)
    values = [
        {"a": float(x), "b": float(y)}
        for x, y in zip(rng.random(5000) * 10.0 ** rng.integers(-8, 8, 5000), rng.random(5000))
    ]
    values += [{"a": 1e16, "b": 0.1}, {"a": 1.0, "b": 0.2}, {"a": -1e16, "b": 0.3}]  # cancellation: naive sums lose 1.0
    mean = metrics.MeanOf()
    for v in values:
        mean.add(v)
    assert mean.count == len(values)
    assert mean.means() == {k: math.fsum(v[k] for v in values) / len(values) for k in ("a", "b")}
    assert mean.means()["a"] != sum(v["a"] for v in values) / len(values)
