"""The nightly refresh: versions, reuse of unchanged vectors, changes files, gates, rollback, lock, resume."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import arm_faults, disarm_faults, faults_fired
from helpers import REPO, clear_encoded, config, encoded_hashes, make_docs, write_parquet

from jobs import refresh, version_admin
from jobs.ray import cluster
from retrieval_core.encode import embeddings
from retrieval_core.index import faiss_index, indexing
from retrieval_core.io import versions
from retrieval_core.io.corpus import assemble_text, text_hash
from retrieval_core.io.folder import Folder

pytestmark = pytest.mark.usefixtures("ray_cluster")
SETTINGS = dict(
    corpus__title_column="title",
    runtime__rows_per_shard=24,
    refresh__diff_buckets=3,
    eval__queries_path="",
    index__type="Flat",
    index__recall_queries=50,
)
ON_RAY = dict(runtime__inline_rows=0, refresh__inline_snapshot_rows=0)  # every step in Ray tasks and actors


def day1() -> list[dict]:
    return make_docs(200, seed=11)


def day2() -> list[dict]:
    """Day 1 with 5% changed, 3% added and 2% deleted documents."""
    docs = [dict(d) for d in day1()]
    deleted = {d["id"] for d in docs[5::50]}  # 4
    docs = [d for d in docs if d["id"] not in deleted]
    for d in docs[3::20]:  # 10
        d["text"] = d["text"] + " revised"
    return docs + make_docs(6, seed=12, prefix="new")  # 6


def hashes(docs: list[dict]) -> dict[str, str]:
    return {d["id"]: text_hash(assemble_text(d["title"], d["text"])) for d in docs}


def snapshot(tmp_path: Path, name: str, docs: list[dict]) -> Path:
    return write_parquet(tmp_path / "snapshots" / name / "corpus.parquet", docs, row_group_size=16)


def refresh_config(corpus, root, model, **extra):
    return config(corpus, root, model=model, **{**SETTINGS, **extra})


def by_doc(root: str) -> dict[str, np.ndarray]:
    _, vectors, doc_ids = embeddings.load_embeddings(Folder(root))
    return dict(zip(doc_ids, vectors))


def search_all(root: str, queries: np.ndarray, k: int = 10):
    index, _ = indexing.load_index(Folder(root))
    scores, ids = faiss_index.search(index, queries, k)
    _, _, doc_ids = embeddings.load_embeddings(Folder(root))
    row_ids = embeddings.load_embeddings(Folder(root))[0]
    doc_of = dict(zip(row_ids.tolist(), doc_ids))
    return scores, [[doc_of[int(r)] for r in row] for row in ids]


def never_on_ray(*args):
    raise AssertionError("a refresh this small must not need Ray")


@pytest.fixture(scope="module")
def two_days(tmp_path_factory, tiny_model, encode_log):
    """Day 1 then day 2 refreshed on one root, in the job's own process (small enough: Ray is never asked for),
    and day 2 built from scratch on another root with every step on Ray tasks and actors, one of which is killed."""
    tmp = tmp_path_factory.mktemp("refresh")
    s1, s2 = snapshot(tmp, "day1", day1()), snapshot(tmp, "day2", day2())
    root = tmp / "nightly"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cluster.LazyRaySession, "ensure", never_on_ray)
        first = refresh.run(refresh_config(s1, root, tiny_model))
        clear_encoded(encode_log)
        second = refresh.run(refresh_config(s2, root, tiny_model))
    encoded = encoded_hashes(encode_log)
    # the fault matrix's "worker killed" row for refresh: an encoder actor dies writing a segment; Ray restarts it
    arm_faults([{"point": "write", "match": "-shard-00002.parquet", "action": "kill"}])
    try:
        scratch = refresh.run(refresh_config(s2, tmp / "scratch", tiny_model, **ON_RAY))
        assert faults_fired() == 1
    finally:
        disarm_faults()
    return {
        "root": root,
        "s1": s1,
        "s2": s2,
        "first": first,
        "second": second,
        "encoded": encoded,
        "scratch": scratch,
        "tmp": tmp,
    }


def test_day2_equals_a_from_scratch_build_and_encodes_only_the_change(two_days):
    root, first, second = two_days["root"], two_days["first"], two_days["second"]
    assert first["published"] and first["previous"] is None and first["counts"]["added"] == 200
    assert versions.read_current(Folder(str(root), None))["version"] == second["version"] != first["version"]
    c = second["counts"]
    assert (c["unchanged"], c["changed"], c["added"], c["deleted"], c["encoded"]) == (186, 10, 6, 4, 16)

    old, new = hashes(day1()), hashes(day2())
    changed_or_added = sorted(h for i, h in new.items() if old.get(i) != h)
    assert sorted(two_days["encoded"]) == changed_or_added  # counted through the encoder, in every worker

    version_root = versions.version_root(str(root), second["version"])
    scratch_root = versions.version_root(str(two_days["tmp"] / "scratch"), two_days["scratch"]["version"])
    refreshed, scratch = by_doc(version_root), by_doc(scratch_root)
    assert sorted(refreshed) == sorted(scratch) == sorted(new)
    for doc_id, vector in scratch.items():
        np.testing.assert_allclose(refreshed[doc_id], vector, atol=1e-5)
    previous = by_doc(versions.version_root(str(root), first["version"]))
    unchanged = [i for i in new if old.get(i) == new[i]]
    assert all(np.array_equal(refreshed[i], previous[i]) for i in unchanged)  # reused bit for bit

    queries = np.stack([scratch[i] for i in sorted(scratch)[::9]])
    scores_a, docs_a = search_all(version_root, queries)
    scores_b, docs_b = search_all(scratch_root, queries)
    assert docs_a == docs_b
    np.testing.assert_allclose(scores_a, scores_b, atol=1e-5)


def test_versions_share_unchanged_segments_and_write_the_changes(two_days):
    root, second = two_days["root"], two_days["second"]
    version_root = Path(versions.version_root(str(root), second["version"]))
    manifest = embeddings.read_embeddings_manifest(Folder(str(version_root)))
    shared = [s for s in manifest["shards"] if s.get("shared_from")]
    assert shared and all(s["path"].startswith("../../") for s in shared)
    assert manifest["totals"]["rows_encoded_now"] == 16 and manifest["totals"]["rows_encoded"] == 202
    old, new = hashes(day1()), hashes(day2())
    upserts = pq.read_table(version_root / "changes" / "upserts.parquet")
    assert sorted(upserts.column("doc_id").to_pylist()) == sorted(i for i in new if old.get(i) != new[i])
    vectors = by_doc(str(version_root))
    for doc_id, vector in zip(upserts.column("doc_id").to_pylist(), upserts.column("embedding").to_pylist()):
        np.testing.assert_array_equal(np.asarray(vector, np.float32), vectors[doc_id])
    deletes = pq.read_table(version_root / "changes" / "deletes.parquet").column("doc_id").to_pylist()
    assert sorted(deletes) == sorted(i for i in old if i not in new)
    record = json.loads((version_root / "refresh.json").read_text())
    assert record["published"] is True and record["previous"] == two_days["first"]["version"]
    assert {g["gate"] for g in record["gates"]} >= {"publish.min_recall", "publish.max_deleted_fraction"}
    assert not (version_root / "_diff" / "new").exists()  # the snapshot's texts do not stay in the version


def test_texts_of_a_version_are_its_snapshots(two_days):
    """In a version, row ids are not snapshot positions: texts are found through the doc map, by a mine worker's
    row lookup (from the values it already found) and by the direct lookup alike."""
    from retrieval_core.index import lookup

    version_root = versions.version_root(str(two_days["root"]), two_days["second"]["version"])
    row_ids = embeddings.load_embeddings(Folder(version_root))[0].tolist()
    rows = lookup.RowLookup(Folder(version_root))
    values = rows.values(row_ids + [-1])
    expected = {d["id"]: assemble_text(d["title"], d["text"]) for d in day2()}
    texts = rows.texts_of(values)
    assert sorted(texts) == sorted(row_ids) and len(texts) == len(expected)
    assert {values[r][0]: t for r, t in texts.items()} == expected
    assert lookup.texts_for_rows(Folder(version_root), row_ids) == texts


def test_search_reads_current_and_rollback_moves_it(two_days, tiny_model):
    from jobs import search

    root = two_days["root"]
    cfg = refresh_config(two_days["s2"], root, tiny_model)
    hits = search.run(cfg, ["revised alpha"], k=5)[0]
    assert hits and any(h["doc_id"].startswith("doc") for h in hits)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.refresh",
            "--set",
            f"output.root={root}",
            "--rollback",
            two_days["first"]["version"],
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert versions.read_current(Folder(str(root), None))["version"] == two_days["first"]["version"]
    day1_ids = {h["doc_id"] for h in search.run(cfg, ["new"], k=200)[0]}
    assert not any(d.startswith("new") for d in day1_ids)  # day 1 had none of the added documents
    current = version_admin.rollback(cfg, two_days["second"]["version"])
    assert current["version"] == two_days["second"]["version"] and current["by"]["action"] == "rollback"
    assert [m["action"] for m in current["history"]][-3:] == ["refresh", "rollback", "rollback"]


def test_an_unchanged_snapshot_publishes_nothing(two_days, tiny_model, encode_log):
    clear_encoded(encode_log)
    again = refresh.run(refresh_config(two_days["s2"], two_days["root"], tiny_model))
    assert again["unchanged"] and not again["published"] and again["counts"]["encoded"] == 0
    assert encoded_hashes(encode_log) == []
    assert versions.read_current(Folder(str(two_days["root"]), None))["version"] == two_days["second"]["version"]
    assert len(versions.list_versions(Folder(str(two_days["root"])))) == 2


def test_a_failing_gate_keeps_current_and_the_version_stays_for_inspection(two_days, tiny_model):
    truncated = snapshot(two_days["tmp"], "truncated", day2()[:120])  # 40% of the documents vanished
    root = two_days["root"]
    before = versions.read_current(Folder(str(root), None))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.refresh",
            "--set",
            f"corpus.path={truncated}",
            "--set",
            f"output.root={root}",
            "--set",
            f"model.name={tiny_model}",
            *[f"--set={k.replace('__', '.')}={v}" for k, v in SETTINGS.items()],
            "--set",
            "runtime.progress=false",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "deleted 82 of 202 documents (40.6%) > 10%" in result.stderr  # counts as well as the fraction
    assert versions.read_current(Folder(str(root), None)) == before
    failed = [s for s in versions.states(Folder(str(root))) if s["state"] == "failed"]
    assert len(failed) == 1 and failed[0]["detail"] == "deleted 82 of 202 documents (40.6%) > 10%"
    record = versions.read_refresh_record(Folder(str(root)), failed[0]["version"])
    gate = next(g for g in record["gates"] if g["gate"] == "publish.max_deleted_fraction")
    assert gate == {
        "gate": "publish.max_deleted_fraction",
        "threshold": 0.1,
        "value": 0.405941,
        "passed": False,
        "message": "deleted 82 of 202 documents (40.6%) > 10%",
    }
    assert record["published"] is False and record["gates_passed"] is False
    # stderr is a pipe here, as under cron: no progress bars, one line per step with its count and time
    assert "\r" not in result.stderr and "it/s]" not in result.stderr
    assert "jobs.progress: refresh: diff: snapshot: " in result.stderr and " shard in " in result.stderr


def test_a_second_refresh_on_a_leased_root_is_refused(two_days, tiny_model):
    root = str(two_days["root"])
    with versions.leased(Folder(root, None), 600, 60, owner={"host": "nightly-7", "pid": 4242, "job": "jobs.refresh"}):
        with pytest.raises(versions.LockedError, match="nightly-7 pid 4242 \\(jobs.refresh\\)"):
            refresh.run(refresh_config(two_days["s2"], root, tiny_model))


def test_a_killed_refresh_resumes_and_ends_as_an_uninterrupted_run(two_days, tiny_model, tmp_path):
    """Day 1 published, then day 2's refresh killed (SIGKILL) once its first new shard is committed: the rerun
    redoes only what was not committed and gives the uninterrupted run's vectors and changes."""
    root = tmp_path / "killed"
    refresh.run(refresh_config(two_days["s1"], root, tiny_model))
    command = [
        sys.executable,
        "-m",
        "jobs.refresh",
        "--set",
        f"corpus.path={two_days['s2']}",
        "--set",
        f"output.root={root}",
        "--set",
        f"model.name={tiny_model}",
        "--set",
        "runtime.rows_per_shard=4",
        "--set",
        "runtime.num_workers=1",
        *[f"--set={k.replace('__', '.')}={v}" for k, v in SETTINGS.items() if k != "runtime__rows_per_shard"],
    ]
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and not list(root.glob("versions/v000002-*/embeddings/_shards/*.json")):
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    committed = {p.name: p.read_text() for p in root.glob("versions/v000002-*/embeddings/_shards/*.json")}
    assert committed and versions.read_current(Folder(str(root), None))["version"].startswith("v000001")
    resumed = refresh.run(refresh_config(two_days["s2"], root, tiny_model, runtime__rows_per_shard=4))
    assert resumed["version"].startswith("v000002") and resumed["published"]
    records = root.glob(f"versions/{resumed['version']}/embeddings/_shards/*.json")
    assert {p.name: p.read_text() for p in records if p.name in committed} == committed  # not redone
    reference = by_doc(versions.version_root(str(two_days["root"]), two_days["second"]["version"]))
    got = by_doc(versions.version_root(str(root), resumed["version"]))
    assert sorted(got) == sorted(reference)
    for doc_id, vector in reference.items():
        np.testing.assert_allclose(got[doc_id], vector, atol=1e-5)


def test_another_encoder_re_encodes_everything_and_says_so(two_days, tiny_model, encode_log):
    clear_encoded(encode_log)
    # no speculative copies: on a loaded machine a slow segment would be encoded twice, which is right but not
    # what this test counts (each document encoded once)
    changed = refresh.run(
        refresh_config(
            two_days["s2"], two_days["root"], tiny_model, model__max_seq_length=32, runtime__speculation=0, **ON_RAY
        )
    )
    c = changed["counts"]
    assert changed["published"] and changed["reencoded_all"] is True
    assert (c["unchanged"], c["changed"], c["added"], c["deleted"]) == (202, 0, 0, 0)
    assert c["encoded"] == 202 and c["reused"] == 0 and len(encoded_hashes(encode_log)) == 202
    manifest = embeddings.read_embeddings_manifest(
        Folder(versions.version_root(str(two_days["root"]), changed["version"]))
    )
    assert not any(s.get("shared_from") for s in manifest["shards"])


def test_ivf_quantizer_reused_without_retraining_and_old_versions_retired(two_days, tiny_model, tmp_path):
    """IVF4,Flat searched over all 4 lists (exact): day 2 reuses day 1's trained quantizer byte for byte, its
    results equal the from-scratch Flat build, and with keep_versions 1 day 1 stays while it is CURRENT's previous,
    then is retired by day 3 except the files days 2 and 3 still share."""
    root = tmp_path / "ivf"
    ivf = dict(
        index__type="IVF4,Flat",
        index__nprobe=4,
        index__train_size=200,
        refresh__retrain="never",
        publish__keep_versions=1,
    )
    first = refresh.run(refresh_config(two_days["s1"], root, tiny_model, **ivf))
    trained = Path(versions.version_root(str(root), first["version"]), "index", "trained.faiss").read_bytes()
    second = refresh.run(refresh_config(two_days["s2"], root, tiny_model, **ivf))
    assert second["retrain"] == {"retrain": False, "reusable": True, "reason": "refresh.retrain = never"}
    v1, v2 = (Path(versions.version_root(str(root), r["version"])) for r in (first, second))
    assert second["deleted_versions"] == [] and (v1 / "refresh.json").exists()  # CURRENT's previous stays
    assert (v2 / "index" / "trained.faiss").read_bytes() == trained
    scratch_root = versions.version_root(str(two_days["tmp"] / "scratch"), two_days["scratch"]["version"])
    queries = np.stack(list(by_doc(scratch_root).values())[::9])
    scores_a, docs_a = search_all(str(v2), queries)
    scores_b, docs_b = search_all(scratch_root, queries)
    assert docs_a == docs_b
    np.testing.assert_allclose(scores_a, scores_b, atol=1e-5)
    third = refresh.run(refresh_config(two_days["s1"], root, tiny_model, **ivf))  # back to day 1's texts
    v3 = Path(versions.version_root(str(root), third["version"]))
    assert third["deleted_versions"] == [first["version"]] and not (v1 / "refresh.json").exists()
    for version in (v2, v3):
        shared = [
            s for s in embeddings.read_embeddings_manifest(Folder(str(version)))["shards"] if s.get("shared_from")
        ]
        assert shared and all((version / "embeddings" / s["path"]).resolve().exists() for s in shared)


def test_recall_under_target_at_the_stored_nprobe_retrains_the_quantizer(two_days, tiny_model, tmp_path):
    """auto's second criterion: day 1 tuned nprobe for a low target; day 2 asks for recall 1.0, which the stored
    nprobe misses, so day 2 trains its quantizer anew (no drift involved) and records why."""
    root = tmp_path / "recall"
    ivf = dict(
        index__type="IVF4,Flat",
        index__train_size=200,
        refresh__retrain="auto",
        refresh__retrain_drift=100,
        publish__min_recall=0.05,
    )
    first = refresh.run(refresh_config(two_days["s1"], root, tiny_model, index__target_recall=0.05, **ivf))
    v1 = Path(versions.version_root(str(root), first["version"]))
    stored = json.loads((v1 / "index" / "manifest.json").read_text())["search_parameters"]["nprobe"]
    assert stored < 4
    second = refresh.run(refresh_config(two_days["s2"], root, tiny_model, index__target_recall=1.0, **ivf))
    decision = second["retrain"]
    assert decision["retrain"] is True and decision["growth"] < 100 and decision["recall"]["fell"] is True
    assert decision["recall"]["stored"] == stored and decision["recall"]["recall_at_stored"] < 1.0
    assert decision["reason"].startswith(f"recall@10 at the stored nprobe = {stored} fell under")
    v2 = Path(versions.version_root(str(root), second["version"]))
    assert (v2 / "index" / "trained.faiss").read_bytes() != (v1 / "index" / "trained.faiss").read_bytes()
    manifest = json.loads((v2 / "index" / "manifest.json").read_text())
    assert manifest["recall"]["recall_at_10"] == 1.0 and manifest["training"]["reused"] is False
    records = (v2 / "index" / "_shards").glob("*.json")
    assert not any(json.loads(r.read_text()).get("shared_from") for r in records)  # nothing of day 1's index
