"""The publish gates: each fails on its own threshold, and the ones that need a previous version wait for it."""

import pytest
from helpers import config

from retrieval_core.refresh import publishing

COUNTS = {"snapshot_rows": 1000, "rejected": 5, "unchanged": 900, "changed": 40, "added": 30, "deleted": 20}


def verdicts(cfg, counts=COUNTS, recall=0.97, ndcg=0.70, previous=0.71, first=False) -> dict:
    return {g["gate"]: g for g in publishing.gates(cfg, counts, recall, ndcg, previous, first)}


def test_every_gate_passes_within_its_threshold(tmp_path):
    gates = verdicts(config("c.parquet", tmp_path))
    assert all(g["passed"] for g in gates.values())
    assert gates["publish.max_deleted_fraction"]["value"] == pytest.approx(20 / 960, abs=1e-6)  # values: 6 places
    assert gates["publish.max_added_fraction"]["value"] == pytest.approx(30 / 960, abs=1e-6)
    assert gates["publish.max_reject_fraction"]["value"] == pytest.approx(5 / 1000, abs=1e-6)
    assert gates["publish.max_ndcg_drop"]["value"] == pytest.approx(0.01, abs=1e-6)


@pytest.mark.parametrize(
    "gate, setting, value",
    [
        ("publish.min_recall", "publish__min_recall=0.98", 0.97),
        ("publish.max_reject_fraction", "publish__max_reject_fraction=0.004", 0.005),
        ("publish.max_deleted_fraction", "publish__max_deleted_fraction=0.02", 20 / 960),
        ("publish.max_added_fraction", "publish__max_added_fraction=0.03", 30 / 960),
        ("publish.max_ndcg_drop", "publish__max_ndcg_drop=0.005", 0.01),
    ],
)
def test_each_gate_fails_alone_above_its_threshold(tmp_path, gate, setting, value):
    key, number = setting.split("=")
    gates = verdicts(config("c.parquet", tmp_path, **{key: number}))
    assert [g for g, v in gates.items() if not v["passed"]] == [gate]
    assert gates[gate]["value"] == pytest.approx(value, abs=1e-6) and gates[gate]["threshold"] == float(number)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("publish__min_recall=0.98", "recall@10 of the index 0.9700 < 0.98"),
        ("publish__max_reject_fraction=0.004", "rejected 5 of 1,000 snapshot rows (0.5%) > 0.4%"),
        ("publish__max_deleted_fraction=0.02", "deleted 20 of 960 documents (2.1%) > 2%"),
        ("publish__max_added_fraction=0.03", "added 30 of 960 documents (3.1%) > 3%"),
        ("publish__max_ndcg_drop=0.005", "nDCG@10 fell 0.0100 (0.7100 -> 0.7000) > 0.005"),
    ],
)
def test_a_failed_gate_says_its_counts_as_well_as_its_fraction(tmp_path, setting, message):
    key, number = setting.split("=")
    failed = [g for g in verdicts(config("c.parquet", tmp_path, **{key: number})).values() if not g["passed"]]
    assert [g["message"] for g in failed] == [message]


def test_a_passed_gate_says_so_with_its_counts(tmp_path):
    gates = verdicts(config("c.parquet", tmp_path))
    assert gates["publish.max_deleted_fraction"]["message"] == "deleted 20 of 960 documents (2.1%) <= 10%"
    assert verdicts(config("c.parquet", tmp_path), recall=None)["publish.min_recall"]["message"] == "not measured"


def test_the_first_version_and_unevaluated_versions_skip_the_gates_that_need_a_previous_one(tmp_path):
    cfg = config("c.parquet", tmp_path)
    first = verdicts(cfg, counts={**COUNTS, "unchanged": 0, "changed": 0, "deleted": 0, "added": 995}, first=True)
    assert set(first) == {"publish.min_recall", "publish.max_reject_fraction", "publish.max_ndcg_drop"}
    assert set(verdicts(cfg, previous=None)) == {
        "publish.min_recall",
        "publish.max_reject_fraction",
        "publish.max_deleted_fraction",
        "publish.max_added_fraction",
    }


def recall_manifest(value, tried):
    return {
        "recall": {
            "parameter": "nprobe",
            "value": value,
            "recall_at_10": tried[-1][1],
            "tried": [{"value": v, "recall_at_10": r} for v, r in tried],
        }
    }


@pytest.mark.parametrize(
    "tried, fell",
    [
        ([(1, 0.80), (2, 0.93), (4, 0.97)], True),  # the stored nprobe 2 now misses 0.95: tuning went to 4
        ([(1, 0.90), (2, 0.96)], False),  # the stored nprobe still reaches the target
        ([(1, 0.96)], False),  # a smaller one does too
    ],
)
def test_recall_at_the_stored_nprobe_decides_a_retrain(tried, fell):
    from retrieval_core.refresh import index_reuse as refresh_index

    verdict = refresh_index.recall_verdict(
        {"search_parameters": {"nprobe": 2}}, recall_manifest(tried[-1][0], tried), 0.95
    )
    assert verdict["fell"] is fell and verdict["stored"] == 2 and verdict["tuned"] == tried[-1][0]
    assert verdict["reason"].startswith("recall@10 at the stored nprobe = 2 " + ("fell under" if fell else "reaches"))


def test_no_stored_setting_is_no_recall_verdict():
    from retrieval_core.refresh import index_reuse as refresh_index

    verdict = refresh_index.recall_verdict({"search_parameters": {}}, recall_manifest(2, [(1, 0.5), (2, 0.97)]), 0.95)
    assert verdict["fell"] is False
