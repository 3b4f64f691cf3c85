"""`ray job submit` of a small pipeline to a real Ray head started with `ray start --head` (token auth on)."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import DEMO_CORPUS, REPO

RAY = str(Path(sys.executable).parent / "ray")
GCS_PORT, DASHBOARD_PORT, METRICS_PORT = "6391", "8267", "8268"
ADDRESS = f"http://127.0.0.1:{DASHBOARD_PORT}"


def ray_env() -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    return env


def ray_cli(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=ray_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def head():
    """A Ray head on 127.0.0.1 with the dashboard (the job server); stopped, with everything it started, at the
    end. Its token is the user's (~/.ray/auth_token, created when missing), as in the README."""
    ray_cli("get-auth-token", "--generate")
    proc = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={GCS_PORT}",
            "--num-cpus=2",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={DASHBOARD_PORT}",
            f"--metrics-export-port={METRICS_PORT}",
            "--disable-usage-stats",
        ],
        env=ray_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while ray_cli("job", "list", "--address", ADDRESS).returncode != 0:
            assert proc.poll() is None and time.time() < deadline, "the Ray head did not come up"
            time.sleep(2)
        yield ADDRESS
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        current = Path("/tmp/ray/ray_current_cluster")  # the head's address file, left behind by a killed head
        if current.exists() and current.read_text().strip().endswith(f":{GCS_PORT}"):
            current.unlink()


def test_submitted_pipeline_succeeds_and_writes_its_outputs(head, tmp_path, tiny_model_without_dropout):
    root = tmp_path / "submitted"
    overrides = [
        f"output.root={root}",
        f"model.name={tiny_model_without_dropout}",
        "runtime.progress=false",
        "corpus.title_column=title",
        "runtime.rows_per_shard=32",
        "mine.query_id_column=query_id",
        "mine.relative_margin=null",
        "pipeline.stages=[encode,index,evaluate,mine]",
        "runtime.inline_rows=100",
    ]  # the 247 documents on the cluster's actors and tasks, the queries here
    # training and the re-* stages run on Ray the same way as these (tests/integration/test_train_pipeline.py)
    entrypoint = [sys.executable, "-m", "jobs.pipeline", "--config", "configs/demo.yaml"]
    for item in overrides:
        entrypoint += ["--set", item]
    job_id = f"test-{uuid.uuid4().hex[:8]}"
    deadline = time.time() + 300
    while True:  # a loaded machine may answer `job list` long before the head's job agent takes submissions
        submitted = ray_cli(
            "job",
            "submit",
            "--address",
            head,
            "--working-dir",
            str(REPO),
            "--submission-id",
            job_id,
            "--no-wait",
            "--",
            *entrypoint,
            timeout=120,
        )
        if "No available agent" not in submitted.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    deadline, status = time.time() + 600, ""
    while time.time() < deadline:
        out = ray_cli("job", "status", "--address", head, job_id)
        status = (out.stdout + out.stderr).lower()
        if any(word in status for word in ("succeeded", "failed", "stopped")):
            break
        time.sleep(3)
    logs = ray_cli("job", "logs", "--address", head, job_id).stdout
    assert "succeeded" in status, f"{status}\n{logs[-3000:]}"
    assert "connecting to the Ray cluster" in logs and "mine" in logs
    import pyarrow.parquet as pq

    qrels = [line.split("\t") for line in (REPO / "examples" / "demo" / "qrels.tsv").read_text().splitlines()[1:]]
    metrics = json.loads((root / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["queries"] == len({q for q, _, score in qrels if int(score) > 0})
    index = json.loads((root / "index" / "manifest.json").read_text())
    assert index["ntotal"] == pq.read_metadata(DEMO_CORPUS).num_rows
    assert (root / "negatives" / "exports" / "triplet.parquet").exists()
    # the job's metrics reach the head's Prometheus endpoint (recorded after its session closed, reconnecting)
    line = next(s for s in scraped_until("ray_retrieval_rows_encoded_total") if 'job="jobs.pipeline"' in s)
    assert float(line.rsplit(" ", 1)[1]) == index["ntotal"] and 'stage="encode"' in line
    summary = json.loads((root / "_runs" / "jobs.pipeline.json").read_text())
    assert summary["status"] == "ok" and summary["job"] == "jobs.pipeline"


def scraped_until(name: str, seconds: float = 60) -> list[str]:
    """The lines of the head's metrics endpoint naming ``name``, once there are any (Ray's agent exports them
    periodically)."""
    import urllib.request

    deadline = time.time() + seconds
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
        lines = [line for line in text.splitlines() if line.startswith(name + "{")]
        if lines or time.time() > deadline:
            assert lines, f"{name} never appeared on the metrics endpoint"
            return lines
        time.sleep(2)
