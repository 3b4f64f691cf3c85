"""The encode job on one local Ray cluster (started once per test session)."""

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import DEMO_CORPUS, REPO, config, encode_command, make_docs, write_parquet

from jobs import encode
from retrieval_core.encode import embeddings, encoding
from retrieval_core.io.folder import Folder

pytestmark = pytest.mark.usefixtures("ray_cluster")
DEMO_ROWS = pq.read_metadata(DEMO_CORPUS).num_rows


def demo_shards(rows_per_shard: int) -> int:
    return -(-DEMO_ROWS // rows_per_shard)


def demo_texts():
    table = pq.read_table(DEMO_CORPUS).to_pylist()
    return [r["id"] for r in table], [f"{r['title']} {r['text']}" for r in table]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "out"
    cfg = config(DEMO_CORPUS, root, corpus__title_column="title", runtime__rows_per_shard=32)
    return cfg, encode.run(cfg)


def test_vectors_equal_plain_sentence_transformers(demo_run):
    from sentence_transformers import SentenceTransformer

    from retrieval_core.encode.model_files import resolve_model_path

    cfg, summary = demo_run
    assert summary["rows_encoded"] == DEMO_ROWS and summary["shards"] == summary["shards_run"] == demo_shards(32)
    ids, texts = demo_texts()
    reference = SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu").encode(
        texts, batch_size=32, normalize_embeddings=True
    )
    row_ids, vectors, doc_ids = embeddings.load_embeddings(Folder(cfg.output.root))
    assert row_ids.tolist() == list(range(DEMO_ROWS)) and doc_ids == ids
    cosine = np.sum(vectors * reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.9999
    manifest = embeddings.read_embeddings_manifest(Folder(cfg.output.root))
    assert manifest["config"]["corpus"]["title_column"] == "title"
    assert manifest["encoder"]["max_seq_length"] == 256 and manifest["dim"] == 384


def test_rerun_skips_committed_shards(demo_run):
    cfg, _ = demo_run
    shard_files = sorted(Path(cfg.output.root, "embeddings").glob("shard-*.parquet"))
    before = {p: p.stat().st_mtime_ns for p in shard_files}
    manifest_before = Path(cfg.output.root, "embeddings", "_manifest.json").read_text()
    summary = encode.run(cfg)
    assert summary["shards_run"] == 0 and summary["shards_skipped"] == demo_shards(32)
    assert {p: p.stat().st_mtime_ns for p in shard_files} == before
    assert Path(cfg.output.root, "embeddings", "_manifest.json").read_text() == manifest_before


def test_a_large_corpus_is_checked_for_duplicate_ids_by_tasks(tmp_path, monkeypatch):
    from retrieval_core.io import corpus, id_check

    docs = make_docs(40)
    docs[33]["id"] = docs[2]["id"]
    docs[39]["id"] = docs[12]["id"]
    write_parquet(tmp_path / "docs.parquet", docs, row_group_size=8)
    monkeypatch.setattr(id_check, "ID_CHECK_DRIVER_ROWS", 10)  # 40 rows: checked by Ray tasks,
    monkeypatch.setattr(id_check, "ID_CHECK_ROWS", 15)  # 3 partitions
    with pytest.raises(corpus.CorpusError, match=r"duplicate values in id column 'id', e\.g\. \[") as caught:
        encode.run(config(tmp_path / "docs.parquet", tmp_path / "out"))
    assert sorted(eval(str(caught.value).split("e.g. ")[1])) == ["doc00002", "doc00012"]
    assert not (tmp_path / "out" / "embeddings").exists()


def test_bf16_is_recorded_and_close_to_fp32(tiny_corpus, tiny_model, tiny_clean, tmp_path):
    bf16 = config(tiny_corpus, tmp_path / "bf16", tiny_model, runtime__rows_per_shard=5, model__precision="bf16")
    summary = encode.run(bf16)
    fp32 = config(tiny_corpus, tmp_path / "fp32", tiny_model)
    assert summary["fingerprint"] != encoding.encoder_identity(fp32.model)["fingerprint"]
    assert embeddings.read_embeddings_manifest(Folder(bf16.output.root))["encoder"]["precision"] == "bf16"
    _, a, _ = embeddings.load_embeddings(Folder(str(bf16.output.root)))
    assert np.sum(a * tiny_clean[2], axis=1).min() >= 0.995


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    docs = make_docs(60, seed=5)
    docs[7]["text"] = None
    return write_parquet(tmp_path_factory.mktemp("tiny") / "c.parquet", docs, row_group_size=9)


def outputs(root):
    row_ids, vectors, doc_ids = embeddings.load_embeddings(Folder(str(root)))
    return row_ids.tolist(), doc_ids, vectors


def assert_same_output(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    assert np.abs(a[2] - b[2]).max() < 1e-6


@pytest.fixture(scope="module")
def tiny_clean(tiny_corpus, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("clean") / "out"
    encode.run(config(tiny_corpus, root, tiny_model, runtime__rows_per_shard=5, runtime__inline_rows=0))  # on actors
    return outputs(root)


@pytest.fixture(scope="module")
def demo_clean_8(tmp_path_factory):
    """The demo corpus encoded without interruption, 8 rows per shard: what every stopped-and-resumed run ends as."""
    root = tmp_path_factory.mktemp("clean8") / "out"
    encode.run(config(DEMO_CORPUS, root, runtime__rows_per_shard=8))
    return outputs(root)


# SIGTERM (what schedulers and `ray job stop` send; Ray replaces its handler, which the job restores) shares its
# handler with SIGINT; a SIGKILLed driver is test_s3.py's killed driver, and the fault matrix's crashes
@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_killed_driver_resumes_with_unfinished_shards_only(ray_cluster, sig, tmp_path, demo_clean_8):
    root = tmp_path / "out"
    cfg = config(DEMO_CORPUS, root, runtime__rows_per_shard=8, runtime__num_workers=1)
    command = encode_command(
        f"corpus.path={DEMO_CORPUS}",
        f"output.root={root}",
        "runtime.rows_per_shard=8",
        "runtime.num_workers=1",
        f"runtime.address={ray_cluster}",
        "runtime.progress=false",
    )
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    records_dir = root / "embeddings" / "_shards"
    deadline = time.time() + 120
    while time.time() < deadline and not list(records_dir.glob("*.json")):
        assert driver.poll() is None, driver.stdout.read().decode()
        time.sleep(0.05)
    driver.send_signal(sig)
    driver.wait(timeout=60)
    output = driver.stdout.read().decode()
    before = {p.name: p.read_text() for p in records_dir.glob("*.json")}
    if sig != signal.SIGKILL:  # a stop, not a crash: one line saying what is committed, status 128 + signal
        assert driver.returncode == 128 + sig, output
        assert "Traceback" not in output
        assert f"stopped by {sig.name}: workers stopped; committed under {root}: embeddings {len(before)} of" in output
    assert 1 <= len(before) < demo_shards(8), "the driver was to be stopped midway"
    assert not (root / "embeddings" / "_manifest.json").exists()
    summary = encode.run(cfg)
    assert summary["shards_run"] == demo_shards(8) - len(before)
    assert {name: (records_dir / name).read_text() for name in before} == before
    assert_same_output(outputs(root), demo_clean_8)


def test_a_node_lost_mid_run_leaves_its_work_to_the_other_and_the_output_equals_local(
    tiny_corpus, tiny_model, tiny_clean, tmp_path, faults
):
    """Two nodes of one CPU each, one encoder actor on each, every shard slowed to 0.4 s; once the second node has
    committed a shard it is removed. Its actor cannot restart (no room left), so its shard is started again on the
    head's actor (speculation) and the job ends with every shard, equal to a local run."""
    from ray.cluster_utils import Cluster

    faults([{"point": "encode", "action": "stall", "seconds": 0.4, "times": 10_000}])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    root = tmp_path / "out"
    try:
        node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        command = encode_command(
            f"corpus.path={tiny_corpus}",
            f"output.root={root}",
            f"model.name={tiny_model}",
            "runtime.rows_per_shard=3",
            f"runtime.address={cluster.address}",
            "runtime.progress=false",
            "runtime.inline_rows=0",
        )
        driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while (
            time.time() < deadline
            and driver.poll() is None
            and not any(r["node_id"] == node.node_id for r in shard_records(root))
        ):
            time.sleep(0.05)
        cluster.remove_node(node)
        out, err = driver.communicate(timeout=300)
        assert driver.returncode == 0, out + err
    finally:
        cluster.shutdown()
    assert "60 rows in, 59 encoded, 1 rejected" in out and "starting it again on an idle worker" in err
    records = shard_records(root)
    assert len(records) == 20 and {r["node_id"] for r in records} >= {node.node_id}
    assert_same_output(outputs(root), tiny_clean)


def shard_records(root) -> list[dict]:
    records = []
    for path in (root / "embeddings" / "_shards").glob("*.json"):
        with contextlib.suppress(json.JSONDecodeError, FileNotFoundError):
            records.append(json.loads(path.read_text()))
    return records


def _stop_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("stopped by ")]


@pytest.mark.parametrize("when", ["starting", "waiting", "mid-shard"])
def test_a_sigterm_anywhere_in_an_encode_on_ray_is_one_line_and_status_143(
    ray_cluster, tiny_model, tmp_path, faults, when
):
    """What cron's `timeout`, a scheduler or `ray job stop` send, landing while the driver starts Ray and its
    actors, while it waits on Ray between shards, and while an actor is inside a long shard: one line naming what
    is committed, status 143, no traceback and no notices of Ray retrying the tasks of the actors it stopped."""
    root = tmp_path / "out"
    if when == "mid-shard":
        faults([{"point": "encode", "match": "shard-00003", "action": "stall", "seconds": 20}])
    command = encode_command(
        f"corpus.path={DEMO_CORPUS}",
        f"output.root={root}",
        f"model.name={tiny_model}",
        "runtime.rows_per_shard=2",
        "runtime.inline_rows=0",
        f"runtime.address={ray_cluster}",
    )
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    records, deadline = root / "embeddings" / "_shards", time.time() + 120
    ready = {
        "starting": lambda: (root / "_jobs" / "lease").exists(),
        "waiting": lambda: len(list(records.glob("*.json"))) >= 2,
        "mid-shard": lambda: _fired(0) >= 1,
    }[when]
    while time.time() < deadline and not ready():
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    if when == "mid-shard":
        time.sleep(1.0)  # the driver waits on Ray while the actor stalls in shard-00003
    driver.send_signal(signal.SIGTERM)
    driver.wait(timeout=120)
    output = driver.stdout.read().decode()
    assert driver.returncode == 128 + signal.SIGTERM, output[-3000:]
    for noise in ("Traceback", "SystemError", "(raylet)", "retries remaining"):
        assert noise not in output, output[-3000:]
    lines = _stop_lines(output)
    assert len(lines) == 1 and lines[0].startswith(f"stopped by SIGTERM: workers stopped; committed under {root}: ")
    assert not (root / "embeddings" / "_manifest.json").exists()


def _fired(number: int) -> int:
    from conftest import faults_fired

    return faults_fired(number)
