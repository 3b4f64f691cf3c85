"""The jobs report their runs (jobs._metrics): the encode command's metrics file and summary line, every stage of a
pipeline (on the session's Ray cluster, so recorded through Ray's metrics too), a failed job; jobs.ray.metrics with
and without Ray."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from helpers import DEMO_CORPUS, REPO, encode_command, make_docs, write_parquet
from prometheus_client.parser import text_string_to_metric_families

from jobs import _metrics, encode, pipeline
from jobs.ray import metrics as ray_metrics
from retrieval_core.config import PIPELINE_STAGES

DEMO = REPO / "examples" / "demo"
DEMO_ROWS = pq.read_metadata(DEMO_CORPUS).num_rows
PIPELINE_SETTINGS = {
    "corpus.path": DEMO_CORPUS,
    "corpus.title_column": "title",
    "runtime.rows_per_shard": 32,
    "runtime.progress": "false",
    "index.type": "Flat",
    "eval.queries_path": DEMO / "queries.jsonl",
    "eval.qrels_path": DEMO / "qrels.tsv",
    "mine.pairs_path": DEMO / "pairs.jsonl",
    "mine.query_id_column": "query_id",
    "mine.relative_margin": "null",  # the tiny random model scores all documents alike: no margin
    "train.batch_size": 8,
    "train.max_steps": 3,
    "train.eval_fraction": 0.2,
}


def series(path) -> dict:
    """{(metric, stage or None): value} of a metrics file, each sample checked to carry its job."""
    out = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            assert sample.labels["job"].startswith("jobs.")
            out[(family.name, sample.labels.get("stage"))] = sample.value
    return out


def argv(settings: dict) -> list[str]:
    return [part for key, value in settings.items() for part in ("--set", f"{key}={value}")]


def test_encode_command_writes_metrics_and_summary(tmp_path, tiny_model):
    metrics_dir, out = tmp_path / "textfile", tmp_path / "out"
    metrics_dir.mkdir()
    command = encode_command(
        f"corpus.path={DEMO_CORPUS}",
        f"model.name={tiny_model}",
        f"output.root={out}",
        f"runtime.metrics_file={metrics_dir / '{job}.prom'}",
        "runtime.progress=false",
    )
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    *_, description, last = result.stdout.splitlines()
    line = json.loads(last)
    assert description.startswith("encode: ") and line["job"] == "jobs.encode" and line["status"] == "ok"
    assert line["rows_encoded"] == DEMO_ROWS and line["output_root"] == str(out)
    assert (out / "_runs" / "jobs.encode.json").read_text() == last + "\n"
    assert os.listdir(metrics_dir) == ["jobs.encode.prom"]
    found = series(metrics_dir / "jobs.encode.prom")
    assert found[("retrieval_rows_encoded", "encode")] == DEMO_ROWS == found[("retrieval_embedding_rows", "encode")]
    assert found[("retrieval_job_success", None)] == 1 and found[("retrieval_job_duration_seconds", None)] > 0


def test_pipeline_reports_every_stage(tmp_path, tiny_model_without_dropout, ray_cluster, capsys, monkeypatch):
    recorded = []
    record = ray_metrics.record

    def recording(*args):
        recorded.append(record(*args))
        return recorded[-1]

    monkeypatch.setattr(_metrics.ray_metrics, "record", recording)
    metrics_file = tmp_path / "pipeline.prom"
    settings = {
        **PIPELINE_SETTINGS,
        "model.name": tiny_model_without_dropout,
        "output.root": tmp_path / "out",
        "runtime.metrics_file": metrics_file,
    }
    assert pipeline.main(argv(settings)) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    stages = line["stages"]
    assert line["job"] == "jobs.pipeline" and list(stages) == list(PIPELINE_STAGES)
    found = series(metrics_file)
    for stage in ("encode", "reencode"):
        assert found[("retrieval_rows_encoded", stage)] == DEMO_ROWS == stages[stage]["rows_encoded"]
    for stage in ("index", "reindex"):
        assert found[("retrieval_vectors_indexed", stage)] == DEMO_ROWS
    for stage in ("evaluate", "reevaluate"):
        assert found[("retrieval_eval_ndcg_at_10", stage)] == stages[stage]["metrics"]["ndcg@10"]
    assert found[("retrieval_queries_mined", "mine")] == stages["mine"]["written"] > 0
    assert found[("retrieval_training_steps", "train")] == 3 == stages["train"]["steps"]
    assert {stage for name, stage in found if name == "retrieval_stage_duration_seconds"} == set(PIPELINE_STAGES)
    assert found[("retrieval_job_success", None)] == 1
    assert recorded == [True]  # connected to the session's cluster: recorded through Ray's metrics too


def test_failed_job_reports_failure(tmp_path, capsys):
    docs = make_docs(6)
    docs[4]["id"] = docs[2]["id"]
    corpus = write_parquet(tmp_path / "c.parquet", docs)
    settings = {"corpus.path": corpus, "output.root": tmp_path / "out", "runtime.metrics_file": tmp_path / "m.prom"}
    assert encode.main(argv(settings)) == 1
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert line["status"] == "failed" and "duplicate values in id column 'id'" in line["error"]
    assert not (tmp_path / "out").exists()  # no root left behind, no run summary in it
    assert series(tmp_path / "m.prom")[("retrieval_job_success", None)] == 0


def test_record_without_ray_does_nothing():
    code = (
        "from jobs._metrics import CATALOGUE; from jobs.ray import metrics; "
        "print(metrics.record([('retrieval_job_success', {'job': 'jobs.x'}, 1.0)], CATALOGUE), len(metrics._made))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "0"], result.stderr


def test_record_makes_counters_and_gauges_on_ray(ray_cluster):
    from ray.util.metrics import Counter, Gauge

    samples = [
        ("retrieval_rows_encoded", {"job": "jobs.x", "stage": "encode"}, 5.0),
        ("retrieval_rows_encoded", {"job": "jobs.x", "stage": "reencode"}, 0.0),
        ("retrieval_job_success", {"job": "jobs.x"}, 1.0),
    ]
    assert ray_metrics.record(samples, _metrics.CATALOGUE)
    assert isinstance(ray_metrics._made["retrieval_rows_encoded"], Counter)
    assert isinstance(ray_metrics._made["retrieval_job_success"], Gauge)
    assert ray_metrics._made["retrieval_rows_encoded"].info["tag_keys"] == ("job", "stage")
    with pytest.raises(ValueError, match="has the labels"):
        ray_metrics.record([("retrieval_job_success", {"job": "jobs.x", "stage": "encode"}, 1.0)], _metrics.CATALOGUE)
