"""The jobs on object storage: a real S3 protocol server (moto's server mode on 127.0.0.1, ``s3_endpoint``), the
corpus, queries, qrels and pairs in one bucket, the output in another, credentials in ``*.storage_options``.

Every stage runs on S3 (the pipeline: encode, index, evaluate, mine, train, reencode, reindex, reevaluate) and is
compared by content with the same pipeline on local paths; a killed encode driver resumes on S3; and the fake
secret of the credentials appears in nothing the jobs write or print.
"""

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import DEMO_CORPUS, REPO, config, make_docs, write_parquet

from jobs import encode, pipeline, search, train
from retrieval_core.config import PIPELINE_STAGES, REDACTED, ConfigError, ModelConfig, load_config
from retrieval_core.encode import embeddings, encoding, model_files
from retrieval_core.index import faiss_index, indexing, lookup
from retrieval_core.io import storage
from retrieval_core.io.folder import Folder
from retrieval_core.mine import mining

pytestmark = pytest.mark.usefixtures("ray_cluster")
DEMO = REPO / "examples" / "demo"
INPUTS = {"corpus": "corpus.parquet", "queries": "queries.jsonl", "qrels": "qrels.tsv", "pairs": "pairs.jsonl"}
IN, OUT, SCRATCH = "rj-input", "rj-output", "rj-scratch"
S3_ROOT = f"s3://{OUT}/run"
SETTINGS = {
    "corpus__title_column": "title",
    "runtime__rows_per_shard": 32,
    "index__type": "Flat",
    "mine__query_id_column": "query_id",
    "mine__relative_margin": "null",
    "mine__input_mb_per_bucket": 0.004,  # 3 input buckets: the input planned by the shuffle, on S3
    "train__batch_size": 8,
    "train__max_steps": 3,
    "train__learning_rate": 1e-3,
    "train__eval_fraction": 0.2,
}
SECTIONS_WITH_OPTIONS = ("corpus", "output", "eval", "mine")
DEMO_ROWS = pq.read_metadata(DEMO_CORPUS).num_rows


def s3fs_of(options: dict):
    """An s3fs file system of its own (not fsspec's shared instance): what another process would see."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **options)


@pytest.fixture(scope="module")
def buckets(s3_options):
    """The input bucket holding the demo corpus, queries, qrels and pairs; an empty output bucket; a scratch one."""
    fs = s3fs_of(s3_options)
    for bucket in (IN, OUT, SCRATCH):
        fs.mkdir(bucket)
    for name in INPUTS.values():
        fs.put_file(str(DEMO / name), f"{IN}/demo/{name}")
    return fs


def pipeline_config(inputs: dict, root, model: str, options: dict | None = None, **extra):
    paths = {
        "eval__queries_path": inputs["queries"],
        "eval__qrels_path": inputs["qrels"],
        "mine__pairs_path": inputs["pairs"],
    }
    secrets = {f"{s}__storage_options": json.dumps(options) for s in SECTIONS_WITH_OPTIONS} if options else {}
    return config(inputs["corpus"], root, model=model, **SETTINGS, **paths, **secrets, **extra)


@pytest.fixture(scope="module")
def runs(buckets, tmp_path_factory, tiny_model_without_dropout, s3_options):
    """The whole pipeline on local paths and on S3, with the same settings: {"local"|"s3": (config, results)}."""
    local_inputs = {key: str(DEMO / name) for key, name in INPUTS.items()}
    s3_inputs = {key: f"s3://{IN}/demo/{name}" for key, name in INPUTS.items()}
    local = pipeline_config(local_inputs, tmp_path_factory.mktemp("local") / "run", tiny_model_without_dropout)
    remote = pipeline_config(s3_inputs, S3_ROOT, tiny_model_without_dropout, s3_options)
    return {"local": (local, pipeline.run(local)), "s3": (remote, pipeline.run(remote))}


def roots(runs, sub: str = "") -> tuple[tuple[str, dict], tuple[str, dict]]:
    """((local root, {}), (S3 root, storage options)) of the base run (sub "") or the re* stages ("trained")."""
    return tuple(
        (storage.join(str(cfg.output.root), sub) if sub else str(cfg.output.root), cfg.output.storage_options)
        for cfg, _ in (runs["local"], runs["s3"])
    )


def read_json(root: str, options: dict, *parts: str):
    return storage.read_json(storage.join(root, *parts), options)


def test_every_stage_runs_on_s3(runs):
    assert list(runs["s3"][1]) == list(runs["local"][1]) == list(PIPELINE_STAGES)
    encoded = runs["s3"][1]["encode"][0]
    assert encoded["rows_encoded"] == DEMO_ROWS
    assert encoded["shards"] == encoded["shards_run"] == -(-DEMO_ROWS // 32)


@pytest.mark.parametrize("sub", ["", "trained"])
def test_embeddings_on_s3_equal_local(runs, sub):
    (local, _), (remote, options) = roots(runs, sub)
    ids_l, vectors_l, docs_l = embeddings.load_embeddings(Folder(local))
    ids_s, vectors_s, docs_s = embeddings.load_embeddings(Folder(remote, options))
    assert ids_s.tolist() == ids_l.tolist() == list(range(DEMO_ROWS)) and docs_s == docs_l
    assert vectors_s.tobytes() == vectors_l.tobytes()


@pytest.mark.parametrize("sub", ["", "trained"])
def test_index_on_s3_answers_as_local(runs, sub):
    (local, _), (remote, options) = roots(runs, sub)
    index_l, manifest_l = indexing.load_index(Folder(local))
    index_s, manifest_s = indexing.load_index(Folder(remote, options))
    assert manifest_s["ntotal"] == manifest_l["ntotal"] == DEMO_ROWS
    assert manifest_s["search_parameters"] == manifest_l["search_parameters"]
    queries = embeddings.load_embeddings(Folder(local))[1][::7]
    scores_l, ids_l = faiss_index.search(index_l, queries, 10)
    scores_s, ids_s = faiss_index.search(index_s, queries, 10)
    assert np.array_equal(ids_s, ids_l) and np.array_equal(scores_s, scores_l)


def test_an_index_on_s3_is_memory_mapped_from_one_node_copy(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_FILE_CACHE", str(tmp_path / "cache"))
    (local, _), (remote, options) = roots(runs)
    mapped, _ = indexing.load_index(Folder(remote, options), mmap=True)
    again, _ = indexing.load_index(Folder(remote, options), mmap=True)
    copies = [p for p in (tmp_path / "cache").iterdir() if p.name.endswith("-merged.faiss")]
    assert len(copies) == 1  # downloaded once
    assert copies[0].read_bytes() == (Path(local) / "index" / "merged.faiss").read_bytes()
    queries = embeddings.load_embeddings(Folder(local))[1][::7]
    want = faiss_index.search(indexing.load_index(Folder(local))[0], queries, 10)[1]
    assert np.array_equal(faiss_index.search(mapped, queries, 10)[1], want)
    assert np.array_equal(faiss_index.search(again, queries, 10)[1], want)


def test_a_streamed_write_uploads_in_parts_and_an_error_leaves_no_object(buckets, s3_options):
    """open_atomic on S3 sends blocks as they fill (a multipart upload above the block size): the object appears
    whole on success; an error aborts the upload, leaving neither an object nor an unfinished upload."""
    options = {**s3_options, "default_block_size": 5 * 2**20}  # S3's smallest part
    chunk = os.urandom(2**20)
    url = f"s3://{SCRATCH}/streamed/whole.bin"
    with storage.open_atomic(url, options) as out:
        for _ in range(12):
            out.write(chunk)
    fs = s3fs_of(s3_options)
    assert fs.cat_file(f"{SCRATCH}/streamed/whole.bin") == chunk * 12
    with pytest.raises(RuntimeError, match="cut"):
        with storage.open_atomic(f"s3://{SCRATCH}/streamed/cut.bin", options) as out:
            for _ in range(12):
                out.write(chunk)
            raise RuntimeError("cut")
    assert not fs.exists(f"{SCRATCH}/streamed/cut.bin")
    assert not fs.list_multipart_uploads(SCRATCH)


def test_search_job_on_s3_returns_the_local_hits_with_texts(runs):
    query = ["Which company beat revenue estimates?"]
    hits_l = search.run(runs["local"][0], query, 5)
    hits_s = search.run(runs["s3"][0], query, 5)
    assert hits_s == hits_l and all(hit["text"] for hit in hits_s[0])


@pytest.mark.parametrize("sub", ["", "trained"])
def test_metrics_on_s3_equal_local(runs, sub):
    (local, _), (remote, options) = roots(runs, sub)
    assert (
        read_json(remote, options, "eval", "metrics.json")["metrics"]
        == read_json(local, {}, "eval", "metrics.json")["metrics"]
    )
    assert read_json(remote, options, "eval", "per_query.json") == read_json(local, {}, "eval", "per_query.json")


def test_mining_on_ray_workers_on_s3_equals_the_local_run(runs):
    """runtime.inline_rows=0: the input planned by the shuffle's tasks, the parts searched and selected and the
    exports' texts joined by a mine worker, every file on S3; the same negatives and the same exports, to the byte,
    as the local run mined in its own process."""
    import dataclasses

    from jobs import mine

    (local, _), (remote, options) = roots(runs)
    target = f"s3://{OUT}/mined-on-workers"
    fs = s3fs_of(options)
    for stage in ("embeddings", "index"):  # the S3 run's corpus vectors and index, under a root of its own
        fs.copy(f"{remote[len('s3://') :]}/{stage}", f"{target[len('s3://') :]}/{stage}", recursive=True)
    cfg = runs["s3"][0]
    cfg = dataclasses.replace(
        cfg,
        output=dataclasses.replace(cfg.output, root=target),
        runtime=dataclasses.replace(cfg.runtime, inline_rows=0, num_workers=1),
    )
    mine.run(cfg)
    manifest = mining.read_mine_manifest(Folder(target, options))
    assert manifest["input_buckets"] == 3 and manifest["text_join"]["groups"] >= 1
    on_workers, in_process = (
        mining.read_parts(Folder(target, options)).to_pylist(),
        mining.read_parts(Folder(local)).to_pylist(),
    )
    scores = [k for k in in_process[0] if k.endswith("_scores")]  # queries encoded on 1 thread or several
    assert [{k: v for k, v in row.items() if k not in scores} for row in on_workers] == [
        {k: v for k, v in row.items() if k not in scores} for row in in_process
    ] and in_process
    for key in ("positive_scores", "negative_scores"):
        np.testing.assert_allclose(
            np.concatenate([row[key] for row in on_workers]),
            np.concatenate([row[key] for row in in_process]),
            atol=1e-5,
        )
    for name in ("triplet.parquet", "n-tuple.parquet", "flag.jsonl"):  # the same bytes
        url = ("negatives", "exports", name)
        assert storage.read_bytes(storage.join(target, *url), options) == storage.read_bytes(storage.join(local, *url))


def test_negatives_and_exports_on_s3_equal_local(runs):
    (local, _), (remote, options) = roots(runs)
    parts_s = mining.read_parts(Folder(remote, options)).to_pylist()
    assert parts_s == mining.read_parts(Folder(local)).to_pylist() and parts_s
    for name in ("triplet.parquet", "n-tuple.parquet", "flag.jsonl"):
        url = ("negatives", "exports", name)
        assert storage.read_bytes(storage.join(remote, *url), options) == storage.read_bytes(storage.join(local, *url))
    assert storage.read_parquet(storage.join(remote, "negatives", "rejects.parquet"), options).equals(
        pq.read_table(Path(local, "negatives", "rejects.parquet"))
    )
    assert mining.read_mine_manifest(Folder(remote, options))["input_buckets"] == 3


def model_state(path: str) -> dict:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu")
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=atol, err_msg=name)


def test_model_trained_on_s3_equals_local_and_loads_from_s3(runs):
    (local, _), (remote, options) = roots(runs)
    record_l, record_s = (
        read_json(local, {}, "model", "training.json"),
        read_json(remote, options, "model", "training.json"),
    )
    assert record_s["history"]["losses"] == record_l["history"]["losses"] and len(record_s["history"]["losses"]) == 3
    assert record_s["history"]["evaluations"] == record_l["history"]["evaluations"]
    assert record_s["history"]["evaluations"][0]["queries"] > 0
    downloaded = model_files.resolve_model_path(storage.join(remote, "model"), options)
    assert_same_weights(model_state(downloaded), model_state(str(Path(local, "model"))), atol=1e-6)
    reencoded = runs["s3"][1]["reencode"][0]
    assert reencoded["rows_encoded"] == DEMO_ROWS
    assert reencoded["output"] == storage.join(remote, "trained", "embeddings")


def test_ray_train_workers_on_s3_compute_the_single_worker_model_even_after_a_worker_is_killed(
    runs, tiny_model_without_dropout, faults
):
    """Two Ray Train workers with their run directory and checkpoints on S3 (a pyarrow file system over s3fs)
    train the model the one-worker training of the pipeline trained. A worker is killed after the checkpoint of
    step 2: Ray Train restarts the worker group, which resumes from that checkpoint."""
    import dataclasses

    cfg = runs["s3"][0]
    faults([{"point": "train", "match": "step-2", "action": "kill"}])
    two = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, output=f"{S3_ROOT}/model-two-workers", checkpoint_steps=1),
        runtime=dataclasses.replace(cfg.runtime, num_workers=2),
    )
    record = train.run(two)
    assert record["history"]["steps"] == 3 and record["history"]["resumed_from_step"] == 2 and not record["reused"]
    options, fs = cfg.output.storage_options, s3fs_of(cfg.output.storage_options)
    assert not fs.exists(f"{OUT}/run/model-two-workers/_checkpoints"), "checkpoints are removed once it commits"
    one = model_state(model_files.resolve_model_path(f"{S3_ROOT}/model", options))
    both = model_state(model_files.resolve_model_path(f"{S3_ROOT}/model-two-workers", options))
    # the same updates, up to the order of float sums (gathered embeddings, averaged gradients): AdamW turns a
    # rounding difference in a gradient near 0 into an update difference of up to its step, so a rare element
    # differs by a few 1e-5; a wrong share of a batch would move most elements by about the learning rate
    assert_same_weights(both, one, atol=1e-4)
    far = sum(int(np.sum(np.abs(both[name] - one[name]) > 2e-5)) for name in one)
    assert far <= 1e-3 * sum(one[name].size for name in one), far
    base = model_state(tiny_model_without_dropout)
    assert any(not np.allclose(one[name], base[name], atol=1e-4) for name in one)  # it trained
    assert fs.find(f"{OUT}/run/_ray_train"), "Ray Train's run directory is on S3"


def test_objects_are_written_whole_without_temporaries(runs, s3_options):
    names = s3fs_of(s3_options).find(OUT)
    assert any(n.endswith("embeddings/_manifest.json") for n in names)
    assert not [n for n in names if storage.TMP_MARK in n]


def test_listings_cached_by_the_driver_never_hide_what_others_wrote(buckets, s3_options):
    """fsspec shares one s3fs instance per options in a process, and s3fs caches listings: a record written by
    another process after a listing must still be found, and an overwritten object read whole."""
    where = f"s3://{SCRATCH}/listing"
    storage.write_json_atomic(f"{where}/a.json", {"n": 1}, s3_options)
    assert storage.list_names(where, s3_options) == ["a.json"]  # the listing is now cached
    other = s3fs_of(s3_options)
    other.pipe_file(f"{SCRATCH}/listing/b.json", b'{"n": 2}')
    other.pipe_file(f"{SCRATCH}/listing/a.json", b'{"n": 1000000}')
    assert storage.exists(f"{where}/b.json", s3_options)
    assert storage.list_names(where, s3_options) == ["a.json", "b.json"]
    assert storage.read_json(f"{where}/a.json", s3_options) == {"n": 1000000}


def test_model_at_a_url_is_downloaded_once_and_again_when_it_changes(
    buckets, s3_options, tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setenv(model_files.MODEL_CACHE_ENV, str(tmp_path / "cache"))
    url = f"s3://{SCRATCH}/models/tiny"
    storage.upload_dir(tiny_model, url, s3_options)
    first = model_files.resolve_model_path(url, s3_options)
    stamps = {p: p.stat().st_mtime_ns for p in Path(first).rglob("*") if p.is_file()}
    assert Path(first).parent == tmp_path / "cache" and stamps
    assert model_files.resolve_model_path(url, s3_options) == first
    assert {p: p.stat().st_mtime_ns for p in Path(first).rglob("*") if p.is_file()} == stamps
    assert model_files.model_files_hash(first) == model_files.model_files_hash(tiny_model)
    at_url, local = ModelConfig(name=url, storage_options=s3_options), ModelConfig(name=tiny_model)
    assert encoding.encoder_identity(at_url)["weights_sha256"] == encoding.encoder_identity(local)["weights_sha256"]
    assert encoding.estimated_docs_per_s(at_url, 1, 0) == encoding.estimated_docs_per_s(local, 1, 0)
    s3fs_of(s3_options).pipe_file(f"{SCRATCH}/models/tiny/README.md", b"changed")
    changed = model_files.resolve_model_path(url, s3_options)
    assert changed != first and (Path(changed) / "README.md").read_bytes() == b"changed"
    with pytest.raises(ValueError, match=f"s3://{SCRATCH}/models/none") as error:
        model_files.resolve_model_path(f"s3://{SCRATCH}/models/none", s3_options)
    assert s3_options["secret"] not in "".join(traceback.format_exception(error.value))


def test_a_cross_encoder_at_a_url_scores_as_its_local_copy(buckets, s3_options, tmp_path, monkeypatch):
    """mine.cross_encoder as an s3:// URL (read with model.storage_options): the same identity and the same scores
    as the directory it was uploaded from, and no secret in the identity."""
    import dataclasses

    from helpers import build_tiny_cross_encoder

    from retrieval_core.config import MineConfig
    from retrieval_core.mine import rescoring

    monkeypatch.setenv(model_files.MODEL_CACHE_ENV, str(tmp_path / "cache"))
    local = str(build_tiny_cross_encoder(tmp_path / "ce"))
    url = f"s3://{SCRATCH}/models/ce"
    storage.upload_dir(local, url, s3_options)
    at_url = (dataclasses.replace(MineConfig(), cross_encoder=url), ModelConfig(storage_options=s3_options))
    here = (dataclasses.replace(MineConfig(), cross_encoder=local), ModelConfig())
    identity = rescoring.cross_encoder_identity(*at_url)
    assert identity["weights_sha256"] == rescoring.cross_encoder_identity(*here)["weights_sha256"]
    assert s3_options["secret"] not in json.dumps(identity)
    pairs = [("which company beat estimates", "Northwind beat revenue estimates"), ("a query", "another text")]
    np.testing.assert_allclose(
        rescoring.CrossEncoderScorer(*at_url).score(pairs), rescoring.CrossEncoderScorer(*here).score(pairs), atol=1e-6
    )


def test_configs_keep_credentials_for_the_job_and_out_of_records_reprs_and_errors(s3_options):
    secret = s3_options["secret"]
    cfg = config(
        DEMO_CORPUS,
        S3_ROOT,
        output__storage_options=json.dumps(s3_options),
        model__storage_options=json.dumps(s3_options),
    )
    assert cfg.output.storage_options == cfg.model.storage_options == s3_options
    assert cfg.to_dict()["model"]["storage_options"] == dict.fromkeys(s3_options, REDACTED)
    assert secret not in json.dumps(cfg.to_dict()) and secret not in repr(cfg)
    with pytest.raises(ConfigError, match="'corpus.storage_options' = <redacted>: expected a dict") as error:
        load_config(None, [f"corpus.storage_options={secret}"])
    assert secret not in str(error.value)


def config_file(path: Path, options: dict, **sections) -> Path:
    """A YAML config (credentials in a file, not on the command line)."""
    data = {name: dict(values) for name, values in sections.items()}
    for name in ("corpus", "output"):
        data.setdefault(name, {})["storage_options"] = options
    path.write_text(yaml.safe_dump(data))
    return path


def test_missing_bucket_errors_name_the_path_not_the_secret(buckets, s3_options, tiny_model, tmp_path):
    missing = "s3://rj-no-such-bucket/corpus.parquet"
    cfg = config(missing, f"s3://{OUT}/never", model=tiny_model, corpus__storage_options=json.dumps(s3_options))
    with pytest.raises(FileNotFoundError, match=missing) as error:
        encode.run(cfg)
    assert s3_options["secret"] not in "".join(traceback.format_exception(error.value))
    target = "s3://rj-no-such-bucket/out/_plan.json"
    with pytest.raises(FileNotFoundError, match=target) as error:
        storage.write_json_atomic(target, {}, s3_options)
    assert s3_options["secret"] not in "".join(traceback.format_exception(error.value))
    assert not s3fs_of(s3_options).exists("rj-no-such-bucket"), "a write must not create the bucket"
    command = [
        sys.executable,
        "-m",
        "jobs.encode",
        "--config",
        str(
            config_file(
                tmp_path / "c.yaml",
                s3_options,
                corpus={"path": missing},
                output={"root": f"s3://{OUT}/never"},
                model={"name": tiny_model},
            )
        ),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and missing in result.stderr
    assert s3_options["secret"] not in result.stdout + result.stderr


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited; a process gone between the two looks reads as ESRCH
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return True  # no /proc here: the signal said it is alive
    except ProcessLookupError:
        return False


def wait_for_exit(pids: set[int], seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), f"workers {pids} still running"


def committed_records(root: str, options: dict) -> dict[str, dict]:
    records = storage.join(root, "embeddings", "_shards")
    return {
        name: storage.read_json(storage.join(records, name), options)
        for name in storage.list_names(records, options)
        if name.endswith(".json")
    }


def test_killed_encode_driver_resumes_on_s3_with_the_remaining_shards(
    buckets, s3_options, tiny_model, tmp_path, ray_cluster
):
    docs = make_docs(600, seed=5)
    local_corpus = write_parquet(tmp_path / "corpus.parquet", docs)
    buckets.put_file(str(local_corpus), f"{IN}/big/corpus.parquet")
    root, shards = f"s3://{OUT}/killed", 30
    path = config_file(
        tmp_path / "job.yaml",
        s3_options,
        corpus={"path": f"s3://{IN}/big/corpus.parquet"},
        output={"root": root},
        model={"name": tiny_model},
        runtime={"rows_per_shard": 20, "num_workers": 1, "address": ray_cluster, "progress": False, "inline_rows": 0},
    )  # encoder actors write the shards to S3
    command = [sys.executable, "-m", "jobs.encode", "--config", str(path)]
    with open(tmp_path / "killed.log", "w+") as log:
        driver = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while time.time() < deadline and not committed_records(root, s3_options):
            assert driver.poll() is None, Path(log.name).read_text()
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
        killed_output = Path(log.name).read_text()
    wait_for_exit({r["pid"] for r in committed_records(root, s3_options).values()})
    before = committed_records(root, s3_options)
    assert 1 <= len(before) < shards, "the driver was to be killed midway"
    assert not storage.exists(storage.join(root, "embeddings", "_manifest.json"), s3_options)
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    after = committed_records(root, s3_options)
    assert len(after) == shards and {name: after[name] for name in before} == before  # not encoded again
    killed_pids = {r["pid"] for r in before.values()}
    assert not [name for name in after if name not in before and after[name]["pid"] in killed_pids]
    clean = config(local_corpus, tmp_path / "clean", model=tiny_model, runtime__rows_per_shard=20)
    encode.run(clean)
    ids_c, vectors_c, docs_c = embeddings.load_embeddings(Folder(str(clean.output.root)))
    ids_s, vectors_s, docs_s = embeddings.load_embeddings(Folder(root, s3_options))
    assert ids_s.tolist() == ids_c.tolist() and docs_s == docs_c and vectors_s.tobytes() == vectors_c.tobytes()
    for text in (killed_output, rerun.stdout, rerun.stderr):
        assert s3_options["secret"] not in text


def every_local_file(*directories: Path):
    for directory in directories:
        if directory.is_dir():
            yield from (p for p in directory.rglob("*") if p.is_file() and not p.is_symlink())


def test_credentials_are_in_nothing_the_jobs_wrote(runs, s3_options):
    """Runs last: every object of the output bucket, the models downloaded from S3, and the Ray session's logs
    (the workers' output) are free of the secret; the manifests keep the option names with redacted values."""
    import ray

    fs = s3fs_of(s3_options)
    objects = fs.find(OUT)
    assert len(objects) > 50
    leaking = [name for name in objects if s3_options["secret"].encode() in fs.cat_file(name)]
    assert not leaking
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = list(every_local_file(model_files.model_cache_dir(), logs, Path(str(runs["local"][0].output.root))))
    assert files and not [p for p in files if s3_options["secret"].encode() in p.read_bytes()]
    for stage_file in (
        "embeddings/_manifest.json",
        "embeddings/_plan.json",
        "index/manifest.json",
        "negatives/_manifest.json",
        "model/training.json",
        "trained/embeddings/_manifest.json",
    ):
        written = read_json(S3_ROOT, s3_options, stage_file)["config"]
        for section in SECTIONS_WITH_OPTIONS:
            assert written[section]["storage_options"] == dict.fromkeys(s3_options, REDACTED), stage_file
    assert read_json(S3_ROOT, s3_options, "negatives", "_manifest.json")["settings"][
        "storage_options"
    ] == dict.fromkeys(s3_options, REDACTED)


def test_refresh_on_s3_equals_local_and_writes_no_secret(buckets, s3_options, tiny_model, tmp_path, monkeypatch):
    """...and a version's texts, looked up through its doc map, equal local ones: the doc map's buckets are read
    from the node's copies, fetched once."""
    monkeypatch.setenv("RETRIEVAL_FILE_CACHE", str(tmp_path / "cache"))
    """Two nights of jobs.refresh with the snapshots and the versions on S3, every step in Ray tasks and actors: the
    same counts, vectors and changes as on local paths in the job's own process; CURRENT names the new version; the
    secret is in no object of the refreshed root."""
    from jobs import refresh
    from retrieval_core.io import versions

    day1 = make_docs(80, seed=5)
    day2 = [dict(d, text=d["text"] + " revised") if i % 10 == 0 else d for i, d in enumerate(day1[4:])]
    day2 += make_docs(3, seed=6, prefix="new")
    settings = dict(
        corpus__title_column="title",
        runtime__rows_per_shard=16,
        refresh__diff_buckets=2,
        eval__queries_path="",
        index__type="Flat",
        index__recall_queries=20,
    )
    results = {}
    for where in ("local", "s3"):
        root = str(tmp_path / "nightly") if where == "local" else f"s3://{OUT}/nightly"
        extra = (
            {}
            if where == "local"
            else {
                **{f"{s}__storage_options": json.dumps(s3_options) for s in ("corpus", "output")},
                "runtime__inline_rows": 0,
                "refresh__inline_snapshot_rows": 0,
                "runtime__num_workers": 1,
            }
        )  # one encoder actor: one model load
        for night, docs in (("day1", day1), ("day2", day2)):
            local = write_parquet(tmp_path / where / night / "corpus.parquet", docs)
            corpus = str(local)
            if where == "s3":
                corpus = f"s3://{IN}/{night}/corpus.parquet"
                buckets.put_file(str(local), corpus[len("s3://") :])
            results[where, night] = refresh.run(config(corpus, root, model=tiny_model, **settings, **extra))
        options = extra and s3_options
        version_root, _ = versions.resolve_root(Folder(root, options or None))
        row_ids, vectors, doc_ids = embeddings.load_embeddings(Folder(version_root, options or None))
        upserts = storage.read_parquet(storage.join(version_root, "changes", "upserts.parquet"), options or None)
        results[where] = (dict(zip(doc_ids, vectors)), sorted(upserts.column("doc_id").to_pylist()))
        copies = []
        for _ in range(2):  # the second lookup reads the same copies of the doc map's buckets (not fetched again)
            found = lookup.texts_for_rows(Folder(version_root, options or None), row_ids.tolist(), options or None)
            results[where, "texts"] = {doc: found[row] for row, doc in zip(row_ids.tolist(), doc_ids)}
            copies.append({p.name: p.stat().st_ino for p in (tmp_path / "cache").glob("*-b*.parquet")})
        assert copies[0] == copies[1]
        results[where, "cached"] = sorted(copies[1])
    for key in ("documents", "unchanged", "changed", "added", "deleted", "encoded"):
        assert results["local", "day2"]["counts"][key] == results["s3", "day2"]["counts"][key], key
    assert results["s3", "day2"]["counts"]["changed"] == 8 and results["s3", "day2"]["counts"]["deleted"] == 4
    assert results["s3", "texts"] == results["local", "texts"] and len(results["s3", "texts"]) == len(doc_ids)
    assert results["local", "cached"] == [] and results["s3", "cached"]  # a local root is read in place
    local_vectors, local_upserts = results["local"]
    s3_vectors, s3_upserts = results["s3"]
    assert sorted(local_vectors) == sorted(s3_vectors) and local_upserts == s3_upserts
    for doc_id, vector in local_vectors.items():
        np.testing.assert_allclose(s3_vectors[doc_id], vector, atol=1e-5)
    fs = s3fs_of(s3_options)
    assert json.loads(fs.cat_file(f"{OUT}/nightly/CURRENT"))["version"] == results["s3", "day2"]["version"]
    synced = sinks_from_s3_versions(tmp_path, f"s3://{OUT}/nightly", s3_options, tiny_model, results)
    assert synced == [["load"], ["undo"]]
    assert s3_options["secret"].encode() not in b"".join(fs.cat_file(path) for path in fs.find(f"{OUT}/nightly"))


def sinks_from_s3_versions(tmp_path, root: str, s3_options: dict, model: str, results: dict) -> list[list[str]]:
    """A Qdrant sink (local mode) fed from the versions on S3: loaded with day 2, then day 1 after a rollback (an
    undo reading both versions' files on S3); each time it holds the version's vectors exactly."""
    from jobs import sync, version_admin
    from retrieval_core.config.sinks import sink_specs
    from retrieval_core.io import versions
    from retrieval_core.serve import syncing
    from retrieval_core.serve.stores import open_sink

    sinks = [{"kind": "qdrant", "url": str(tmp_path / "qdrant"), "collection": "docs"}]
    options, sinks_setting = json.dumps(s3_options), json.dumps(sinks)
    cfg = config("unused", root, model=model, output__storage_options=options, serve__sinks=sinks_setting)
    (spec,) = sink_specs(cfg.serve.sinks, cfg.serve.batch_size)
    steps = []
    for version in (results["s3", "day2"]["version"], results["s3", "day1"]["version"]):
        if version != versions.read_current(Folder(root, s3_options))["version"]:
            version_admin.rollback(cfg, version)
        record = sync.run(cfg)["sinks"]["qdrant-docs"]
        assert "error" not in record, record
        steps.append([s["kind"] for s in record["last_sync"]["steps"]])
        version_root = versions.version_root(root, version)
        _, vectors, doc_ids = embeddings.load_embeddings(Folder(version_root, s3_options))
        sink = open_sink(spec, vectors.shape[1], True)
        try:
            points, _ = sink.client.scroll("docs", limit=1000, with_vectors=True)
        finally:
            sink.close()
        found = {p.payload["doc_id"]: np.asarray(p.vector, dtype=np.float32) for p in points}
        assert sorted(found) == sorted(doc_ids)
        for doc_id, vector in zip(doc_ids, vectors):
            np.testing.assert_allclose(found[doc_id], vector, rtol=0, atol=1e-7)
        assert syncing.read_state(Folder(root, s3_options), "qdrant-docs")["holds"] == version
    return steps


@pytest.fixture(scope="module")
def flaky(s3_endpoint):
    """The moto server behind a proxy that answers the requests a test picks with 500s and 503s."""
    from flaky_store import FlakyStore

    store = FlakyStore(s3_endpoint).start()
    yield store
    store.stop()


def test_a_store_failing_past_its_retries_commits_nothing_and_one_failing_for_a_while_is_retried(
    runs, flaky, s3_options, tiny_model_without_dropout
):
    """First every PUT of one shard answers 500 (past the 2 attempts these options allow): the job fails naming the
    object, and neither that shard nor the manifest is committed. Then, with the default retries, the rerun goes
    through 500s and 503s on writes and reads, encodes only what was not committed, and equals the clean run."""
    inputs = {key: f"s3://{IN}/demo/{name}" for key, name in INPUTS.items()}
    through = {**s3_options, "client_kwargs": {"endpoint_url": flaky.endpoint}}
    impatient = {**through, "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}
    root = f"s3://{SCRATCH}/flaky"
    flaky.fail("PUT", 500, when="embeddings/shard-00001", times=None)
    with pytest.raises(OSError, match=r"cannot write 's3://rj-scratch/flaky/embeddings/shard-00001.*internal error"):
        encode.run(pipeline_config(inputs, root, tiny_model_without_dropout, impatient))
    committed = committed_records(root, s3_options)
    assert "shard-00001.json" not in committed and len(committed) >= 1
    assert not storage.exists(storage.join(root, "embeddings", "_manifest.json"), s3_options)
    flaky.heal()
    flaky.fail("PUT", 500, times=3)
    flaky.fail("GET", 503, times=3)
    flaky.fail("PUT", 503, when="embeddings/_manifest.json", times=2)
    result = encode.run(pipeline_config(inputs, root, tiny_model_without_dropout, through))
    assert len(flaky.failed) == 8 and result["shards_run"] == result["shards"] - len(committed)
    ids_c, vectors_c, docs_c = embeddings.load_embeddings(Folder(*roots(runs)[1]))
    ids_s, vectors_s, docs_s = embeddings.load_embeddings(Folder(root, s3_options))
    assert ids_s.tolist() == ids_c.tolist() and docs_s == docs_c and vectors_s.tobytes() == vectors_c.tobytes()


def test_twenty_contenders_on_an_expired_s3_lease_exactly_one_wins(buckets, s3_options):
    """Taking over an expired lease is the conditional creation (If-None-Match: *) of the next generation's
    object: of 20 contenders at once exactly one wins; the others are refused naming it; its release is seen."""
    import threading

    from retrieval_core.io import leases

    directory = f"s3://{SCRATCH}/contenders/{leases.REFRESH_LEASE}"
    stale = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    storage.write_json_atomic(
        leases.generation_url(directory, 7),
        {"generation": 7, "host": "gone-host", "pid": 1, "renewed_at": stale, "expiry_s": 600},
        s3_options,
    )
    results, barrier = [], threading.Barrier(20)

    def contend():
        barrier.wait()
        try:
            results.append(leases.acquire(directory, s3_options, expiry_s=600, renew_s=60, owner={"job": "refresh"}))
        except leases.LockedError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=contend) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [r for r in results if isinstance(r, leases.Lease)]
    assert len(results) == 20 and len(winners) == 1 and winners[0].generation == 8
    assert leases.newest(directory, s3_options)[1]["token"] == winners[0].record["token"]
    assert all("generation 8" in r and "is held by" in r for r in results if isinstance(r, str))
    assert winners[0].release()
    again = leases.acquire(directory, s3_options, expiry_s=600, renew_s=60)
    assert again.generation == 9
    again.release()


def test_a_failed_multipart_upload_is_aborted_and_leaves_no_object(buckets, flaky, s3_options):
    """A write above the block size goes up in parts; when a part fails past the retries, the upload is aborted:
    no object (not even one made of the parts sent), and no multipart upload left open in the bucket."""
    through = {
        **s3_options,
        "client_kwargs": {"endpoint_url": flaky.endpoint},
        "default_block_size": 5 * 2**20,
        "skip_instance_cache": True,
    }
    url = f"s3://{SCRATCH}/multipart/big.bin"
    flaky.fail("PUT", 500, when="partNumber=", times=None)
    try:
        with pytest.raises(OSError, match="cannot write 's3://rj-scratch/multipart/big.bin'"):
            storage.write_bytes_atomic(url, os.urandom(11 * 2**20), through)
    finally:
        flaky.heal()
    fs = s3fs_of(s3_options)
    assert not fs.exists(f"{SCRATCH}/multipart/big.bin")
    assert fs.call_s3("list_multipart_uploads", Bucket=SCRATCH).get("Uploads", []) == []
    storage.write_bytes_atomic(url, b"whole", through)  # the store itself is fine
    assert storage.read_bytes(url, s3_options) == b"whole"
