"""What every job reports at its end (jobs._metrics): the Prometheus text file, the one-line JSON summary, the
samples read out of each stage's result, and that no metrics failure fails a job. No Ray (named test_job_metrics:
tests/unit/evaluate holds a test_metrics.py)."""

import json
import logging
import os
import re

import pytest
from helpers import REPO
from prometheus_client.parser import text_string_to_metric_families

from jobs import _metrics, encode, index, mine
from retrieval_core.config import load_config
from retrieval_core.encode import embeddings

SAMPLES = [
    ("retrieval_rows_encoded", {"stage": "encode"}, 247.0),
    ("retrieval_rows_encoded", {"stage": "reencode"}, 12.0),
    ("retrieval_eval_ndcg_at_10", {"stage": "evaluate"}, 0.6125),
    ("retrieval_tuples_mined", {"stage": "mine", "format": "n-tuple"}, 90.0),
    ("retrieval_sink_rows_applied", {"sink": "lance", "op": "delete"}, 3.0),
    ("retrieval_refresh_published", {}, 1.0),
]


def cfg_of(tmp_path, *items):
    return load_config(None, [f"output.root={tmp_path / 'out'}", *items])


def parsed(text: str) -> dict:
    """{family name: (type, help, {(sample name, sorted labels): value})}"""
    return {
        f.name: (f.type, f.documentation, {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples})
        for f in text_string_to_metric_families(text)
    }


def test_prometheus_text_parses_back_to_the_samples():
    families = parsed(_metrics.prometheus_text(SAMPLES))
    assert set(families) == {name for name, _, _ in SAMPLES}
    for name, labels, value in SAMPLES:
        kind, help_text = _metrics.CATALOGUE[name]
        exposed = f"{name}_total" if kind == "counter" else name
        assert families[name][:2] == (kind, help_text)
        assert families[name][2][(exposed, tuple(sorted(labels.items())))] == value
    assert sum(len(series) for _, _, series in families.values()) == len(SAMPLES)


def test_label_values_are_escaped():
    awkward = 'a "quoted" back\\slash\nand a newline'
    text = _metrics.prometheus_text([("retrieval_sink_failed", {"sink": awkward}, 1.0)])
    assert 'sink="a \\"quoted\\" back\\\\slash\\nand a newline"' in text
    assert parsed(text)["retrieval_sink_failed"][2] == {("retrieval_sink_failed", (("sink", awkward),)): 1.0}


def test_same_series_twice_is_merged():
    twice = [("retrieval_rows_encoded", {"stage": "encode"}, 2.0)] * 2 + [("retrieval_job_success", {}, 0.0)] * 2
    families = parsed(_metrics.prometheus_text(twice))
    assert families["retrieval_rows_encoded"][2] == {("retrieval_rows_encoded_total", (("stage", "encode"),)): 4.0}
    assert families["retrieval_job_success"][2] == {("retrieval_job_success", ()): 0.0}


def test_metrics_file_is_replaced_whole_and_readable_by_all(tmp_path):
    path = tmp_path / "retrieval.prom"
    path.write_text("old\n")
    _metrics.write_metrics_file(str(path), SAMPLES)
    assert os.listdir(tmp_path) == ["retrieval.prom"]  # no temporary left
    assert path.stat().st_mode & 0o777 == 0o644
    assert path.read_text() == _metrics.prometheus_text(SAMPLES)


def test_report_writes_summary_line_and_metrics(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    cfg = cfg_of(tmp_path, f"runtime.metrics_file={tmp_path / '{job}.prom'}")
    line = _metrics.report(cfg, "jobs.encode", "ok", 2.5, {"rows_encoded": 247, "note": "two\nlines"}, SAMPLES[:1])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and json.loads(printed[0]) == line
    assert list(line)[:5] == ["job", "status", "seconds", "finished", "output_root"]
    assert line["job"] == "jobs.encode" and line["seconds"] == 2.5 and line["finished"].endswith("+00:00")
    assert line["output_root"] == str(tmp_path / "out") and line["note"] == "two\nlines"
    written = (tmp_path / "out" / "_runs" / "jobs.encode.json").read_text()
    assert written == printed[0] + "\n" and written.count("\n") == 1
    families = parsed((tmp_path / "jobs.encode.prom").read_text())
    job = (("job", "jobs.encode"),)
    assert families["retrieval_rows_encoded"][2] == {("retrieval_rows_encoded_total", (*job, ("stage", "encode"))): 247}
    assert families["retrieval_job_success"][2] == {("retrieval_job_success", job): 1}
    assert families["retrieval_job_duration_seconds"][2] == {("retrieval_job_duration_seconds", job): 2.5}
    assert "retrieval_job_last_run_timestamp_seconds" in families


def test_summary_keys_do_not_replace_the_fixed_fields(tmp_path, capsys):
    line = _metrics.report(cfg_of(tmp_path), "jobs.index", "failed", 1.0, {"status": "fine", "seconds": 9}, [])
    assert line["status"] == "failed" and line["seconds"] == 1.0


def test_failure_before_any_output_writes_no_root(tmp_path, capsys):
    cfg = cfg_of(tmp_path, f"runtime.metrics_file={tmp_path / 'm.prom'}")
    _metrics.report(cfg, "jobs.encode", "failed", 0.1, {"error": "no corpus"}, [])
    assert not (tmp_path / "out").exists()
    assert json.loads(capsys.readouterr().out)["error"] == "no corpus"
    assert parsed((tmp_path / "m.prom").read_text())["retrieval_job_success"][2] == {
        ("retrieval_job_success", (("job", "jobs.encode"),)): 0
    }


def test_a_run_that_never_held_the_root_writes_nothing_there(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    cfg = cfg_of(tmp_path, f"runtime.metrics_file={tmp_path / 'm.prom'}")
    _metrics.report(cfg, "jobs.encode", "failed", 0.1, {"error": "the job lease ... is held"}, [], in_root=False)
    assert os.listdir(tmp_path / "out") == [] and (tmp_path / "m.prom").exists()
    assert json.loads(capsys.readouterr().out)["status"] == "failed"


@pytest.mark.parametrize(
    "sample, message",
    [
        (("retrieval_rows_encodid", {"stage": "encode"}, 1.0), "unknown metric 'retrieval_rows_encodid'"),
        (("retrieval_rows_encoded", {}, 1.0), "takes the labels ['stage']"),
        (("retrieval_sink_failed", {"sink": "a", "extra": "b"}, 1.0), "takes the labels ['sink']"),
        (("retrieval_rows_encoded", {"stage": "encode"}, -1.0), "a counter counts from 0 up"),
    ],
)
def test_bad_samples_are_refused_before_anything_is_written(tmp_path, capsys, sample, message):
    cfg = cfg_of(tmp_path, f"runtime.metrics_file={tmp_path / 'm.prom'}")
    with pytest.raises(ValueError, match=re.escape(message)):
        _metrics.report(cfg, "jobs.encode", "ok", 1.0, {}, [sample])
    assert not (tmp_path / "m.prom").exists() and capsys.readouterr().out == ""


@pytest.mark.parametrize("where", ["missing/m.prom", "a-file/m.prom"])
def test_unwritable_metrics_file_warns_and_the_report_goes_on(tmp_path, capsys, caplog, where):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "out").mkdir()
    cfg = cfg_of(tmp_path, f"runtime.metrics_file={tmp_path / where}")
    with caplog.at_level(logging.WARNING, logger="jobs.metrics"):
        line = _metrics.report(cfg, "jobs.encode", "ok", 1.0, {}, SAMPLES[:1])
    assert line["status"] == "ok" and json.loads(capsys.readouterr().out) == line
    assert f"could not write the metrics file {tmp_path / where}" in caplog.text
    assert (tmp_path / "out" / "_runs" / "jobs.encode.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["a-file", "out"]


def test_unwritable_output_root_warns(tmp_path, capsys, caplog):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_runs").write_text("a file where the directory goes")
    with caplog.at_level(logging.WARNING, logger="jobs.metrics"):
        _metrics.report(cfg_of(tmp_path), "jobs.encode", "ok", 1.0, {}, [])
    assert "could not write the run summary of jobs.encode" in caplog.text
    assert json.loads(capsys.readouterr().out)["status"] == "ok"


# ---------------------------------------------------------------------------------- samples of each stage's result


def values(samples) -> dict:
    """{(name, sorted labels without stage) or name: value} of one stage's samples."""
    out = {}
    for name, labels, value in samples:
        rest = tuple(sorted((k, v) for k, v in labels.items() if k != "stage"))
        out[(name, rest) if rest else name] = value
    return out


def encode_result(shards_run: int = 8, api: bool = False) -> dict:
    tally = embeddings.Tally()
    for _ in range(shards_run):
        record = {"rows": 30, "rejected": 1, "dim": 384}
        if api:
            record["api_usage"] = {"provider": "openai", "requests": 2, "retries": 1, "tokens": 900, "truncated": 0}
        tally.add(record)
    manifest = {
        "totals": {"rows_in": 248, "rows_encoded": 240, "rows_rejected": 8, "shards": 8},
        "fingerprint": "f" * 32,
    }
    return encode._summary(manifest, tally, 4.0, "/out/embeddings")


def index_manifest() -> dict:
    return {
        "type": "IVF16,Flat",
        "metric": "ip",
        "ntotal": 240,
        "shard_count": 8,
        "recall": {"recall_at_10": 0.97},
        "search_parameters": {"nprobe": 4},
        "timings_s": {"total": 3.2},
    }


def mine_manifest() -> dict:
    return {
        "input_queries": 100,
        "totals": {"written": 95, "complete": 90, "incomplete": 5, "without_negatives": 3},
        "rejected_positives": 2,
        "filtered": {"margin": 4},
        "exports": {"triplet": {"path": "exports/triplet.parquet", "rows": 300}, "n-tuple": {"rows": 90}},
        "seconds": 5.0,
        "identity": {},
    }


EVAL_RESULT = {
    "metrics": {"ndcg@10": 0.61, "recall@10": 0.8, "recall@100": 0.95, "mrr@10": 0.55, "queries": 40},
    "index_type": "Flat",
    "relevant_not_indexed": 0,
    "identity": {"index": "x"},
    "reused": False,
}
TRAIN_RECORD = {
    "examples": 90,
    "held_out_examples": 10,
    "output": "/out/model",
    "history": {
        "steps": 30,
        "resumed_from_step": 10,
        "losses": [1.0, 0.5],
        "evaluations": [{"step": 0, "ndcg@10": 0.4}, {"step": 30, "ndcg@10": 0.6}],
    },
    "reused": False,
}


def test_encode_samples():
    summary, samples = _metrics.samples_of("jobs.encode", encode_result(api=True))
    assert summary["rows_encoded"] == 240 and summary["api_usage"]["tokens"] == 8 * 900
    assert values(samples) == {
        "retrieval_rows_encoded": 240,
        "retrieval_shards_committed": 8,
        "retrieval_embedding_rows": 240,
        "retrieval_rejected_rows": 8,
        "retrieval_stage_reused": 0,
        "retrieval_api_requests": 16,
        "retrieval_api_retries": 8,
        "retrieval_api_tokens": 7200,
    }
    assert {labels["stage"] for _, labels, _ in samples} == {"encode"}
    _, reused = _metrics.samples_of("jobs.encode", encode_result(shards_run=0))
    assert values(reused)["retrieval_rows_encoded"] == 0 and values(reused)["retrieval_stage_reused"] == 1


def test_index_samples():
    summary, samples = _metrics.samples_of("jobs.index", index._summary(index_manifest(), reused=False))
    assert summary["ntotal"] == 240 and summary["recall_at_10"] == 0.97
    assert values(samples) == {
        "retrieval_vectors_indexed": 240,
        "retrieval_shards_committed": 8,
        "retrieval_index_vectors": 240,
        "retrieval_index_recall_at_10": 0.97,
        "retrieval_stage_reused": 0,
    }
    manifest = {**index_manifest(), "recall": {"recall_at_10": None}}
    _, reused = _metrics.samples_of("jobs.index", index._summary(manifest, reused=True))
    assert "retrieval_index_recall_at_10" not in values(reused) and values(reused)["retrieval_vectors_indexed"] == 0


def test_evaluate_samples():
    summary, samples = _metrics.samples_of("jobs.evaluate", EVAL_RESULT)
    assert summary["metrics"] == EVAL_RESULT["metrics"] and "identity" not in summary
    assert values(samples) == {
        "retrieval_eval_ndcg_at_10": 0.61,
        "retrieval_eval_recall_at_10": 0.8,
        "retrieval_eval_recall_at_100": 0.95,
        "retrieval_eval_mrr_at_10": 0.55,
        "retrieval_eval_queries": 40,
        "retrieval_stage_reused": 0,
    }


def test_mine_samples():
    summary, samples = _metrics.samples_of("jobs.mine", mine._summary(mine_manifest(), False))
    assert summary["written"] == 95 and summary["export_rows"] == {"triplet": 300, "n-tuple": 90}
    assert values(samples) == {
        "retrieval_queries_mined": 95,
        "retrieval_queries_without_negatives": 3,
        "retrieval_negatives_mined": 300,
        ("retrieval_tuples_mined", (("format", "triplet"),)): 300,
        ("retrieval_tuples_mined", (("format", "n-tuple"),)): 90,
        "retrieval_stage_reused": 0,
    }


def test_train_samples():
    summary, samples = _metrics.samples_of("jobs.train", TRAIN_RECORD)
    assert summary["steps"] == 30 and summary["heldout_ndcg_at_10"] == [0.4, 0.6]
    assert values(samples) == {
        "retrieval_training_steps": 20,  # 10 of the 30 were taken by the run it resumed
        "retrieval_training_examples": 90,
        "retrieval_training_heldout_ndcg_at_10": 0.6,
        "retrieval_training_loss": 0.5,
        "retrieval_stage_reused": 0,
    }


def test_search_samples():
    summary, samples = _metrics.samples_of("jobs.search", [[{"rank": 1}], [{"rank": 1}, {"rank": 2}]])
    assert summary == {"queries": 2, "hits": 3} and values(samples) == {"retrieval_queries_searched": 2}


def test_pipeline_samples_carry_each_stage():
    results = {"encode": (encode_result(), 4.0), "evaluate": (EVAL_RESULT, 2.0), "reencode": (encode_result(), 3.5)}
    summary, samples = _metrics.samples_of("jobs.pipeline", results)
    assert list(summary["stages"]) == ["encode", "evaluate", "reencode"]
    assert summary["stages"]["reencode"]["seconds"] == 3.5 and summary["stages"]["encode"]["rows_encoded"] == 240
    stages = {(name, labels["stage"]): value for name, labels, value in samples}
    assert stages[("retrieval_rows_encoded", "reencode")] == 240 and stages[("retrieval_eval_ndcg_at_10", "evaluate")]
    assert stages[("retrieval_stage_duration_seconds", "reencode")] == 3.5
    assert [_metrics._checked(sample) for sample in samples]  # all in the catalogue, with their labels


@pytest.mark.parametrize(
    "job, result",
    [
        ("jobs.encode", None),
        ("jobs.encode", {"rows_in": 3}),
        ("jobs.index", [1, 2]),
        ("jobs.train", {"history": {"steps": 3, "evaluations": []}, "reused": False, "examples": 4}),
        ("jobs.pipeline", {"encode": "not a pair"}),
        ("jobs.search", {"queries": 2}),
        ("jobs.version_admin", {"anything": 1}),
    ],
)
def test_unknown_result_shapes_give_nothing(job, result):
    assert _metrics.samples_of(job, result) == ({}, [])


def test_every_stage_sample_is_valid():
    results = {
        "jobs.encode": encode_result(api=True),
        "jobs.index": index._summary(index_manifest(), reused=False),
        "jobs.evaluate": EVAL_RESULT,
        "jobs.mine": mine._summary(mine_manifest(), False),
        "jobs.train": TRAIN_RECORD,
    }
    for job, result in results.items():
        _, samples = _metrics.samples_of(job, result)
        assert samples and all(_metrics._checked(sample) for sample in samples)


def test_docs_page_lists_the_catalogue():
    page = (REPO / "docs" / "metrics.md").read_text()
    assert _metrics.catalogue_markdown() in page
    assert all(f"`{name}`" in page for name in _metrics.CATALOGUE)
