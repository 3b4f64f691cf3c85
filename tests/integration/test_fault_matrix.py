"""The fault matrix: stage by stage, a fault strikes at a chosen point (tests/conftest.py ``faults``, through the
fault points of retrieval_core.io.faults) and the output after recovery equals a clean run's, compared by content
(vectors, search results, mined tuples), not by counts. The README's "Faults" table lists the rows.

- worker killed mid-task (SIGKILL inside an actor or task): retried by Ray, the run finishes;
- retries exhausted (runtime.max_restarts = max_task_retries = 0): the job fails naming the stage, the shard and
  the cause, and a rerun redoes only what is unfinished;
- driver crash at a commit point (before any commit, between commits, while writing a manifest, during the index
  merge, during a publish): nothing half-written reads as complete, and a rerun completes;
- storage refusing a write (a full disk): a clear error naming the file, nothing incomplete committed, a rerun
  completes.
"""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import faults_fired
from helpers import DEMO_CORPUS, REPO, config

from jobs import encode, index, mine, refresh
from jobs.ray import dispatch
from retrieval_core.encode import embeddings
from retrieval_core.index import indexing
from retrieval_core.io import versions
from retrieval_core.io.faults import InjectedCrash
from retrieval_core.io.folder import Folder
from retrieval_core.mine import mining

pytestmark = pytest.mark.usefixtures("ray_cluster")
DEMO = REPO / "examples" / "demo"
SHARDS = 4  # the demo corpus's 247 rows, 64 per shard


def matrix_config(tiny_model, root, **extra):
    return config(
        DEMO_CORPUS,
        root,
        tiny_model,
        corpus__title_column="title",
        runtime__rows_per_shard=64,
        index__type="Flat",
        mine__pairs_path=str(DEMO / "pairs.jsonl"),
        mine__query_id_column="query_id",
        mine__queries_per_part=40,
        mine__relative_margin="null",  # a random model's scores: no margin
        **extra,
    )


@pytest.fixture(scope="module")
def clean_root(tiny_model, tmp_path_factory):
    """Encode, index and mine without faults."""
    cfg = matrix_config(tiny_model, tmp_path_factory.mktemp("clean") / "out")
    encode.run(cfg)
    index.run(cfg)
    mine.run(cfg)
    return Path(cfg.output.root)


@pytest.fixture(scope="module")
def clean(clean_root):
    """What every recovered run must equal."""
    return snapshot(str(clean_root))


def snapshot(root) -> dict:
    """The content of a root's outputs that exist: vectors and ids, the index's answers to every vector, the
    mined tuples."""
    out = {}
    row_ids, vectors, doc_ids = embeddings.load_embeddings(Folder(str(root)))
    out["embeddings"] = (row_ids.tolist(), doc_ids, vectors)
    try:
        idx, _ = indexing.load_index(Folder(str(root)))
    except FileNotFoundError:
        return out
    out["index"] = idx.search(vectors, 5)
    try:
        out["mine"] = mining.read_parts(Folder(str(root))).to_pylist()
    except FileNotFoundError:
        pass
    exports = sorted((Path(root) / "negatives" / "exports").glob("*"))
    if exports:  # the mined tuples with their texts
        out["exports"] = {
            p.name: pq.read_table(p).to_pylist() if p.suffix == ".parquet" else p.read_text() for p in exports
        }
    return out


def assert_same(got: dict, want: dict) -> None:
    for key in got:
        if key == "embeddings":
            assert got[key][:2] == want[key][:2]
            np.testing.assert_allclose(got[key][2], want[key][2], atol=1e-6)
        elif key == "index":
            np.testing.assert_array_equal(got[key][1], want[key][1])
            np.testing.assert_allclose(got[key][0], want[key][0], atol=1e-5)
        elif key == "mine":  # the same tuples; scores up to float noise (queries encoded in other batches)
            assert [_exact(r) for r in got[key]] == [_exact(r) for r in want[key]]
            for column in ("positive_scores", "negative_scores"):
                np.testing.assert_allclose(_flat(got[key], column), _flat(want[key], column), atol=1e-5)
        else:
            assert got[key] == want[key]


def _exact(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.endswith("scores")}


def _flat(rows: list[dict], column: str) -> list[float]:
    return [score for row in rows for score in row[column]]


def kill(match: str, point: str = "write", **extra) -> list[dict]:
    return [{"point": point, "match": match, "action": "kill", **extra}]


# ---------------------------------------------------------------------------------- a worker killed mid-task


def encoded_copy(clean_root, cfg) -> None:
    """The clean run's embeddings under ``cfg``'s root: the index stage's faults strike the index stage alone."""
    import shutil

    shutil.copytree(clean_root, cfg.output.root, ignore=shutil.ignore_patterns("index", "negatives"))


def test_index_task_killed_mid_add_is_retried(tiny_model, tmp_path, clean_root, clean, faults):
    cfg = matrix_config(tiny_model, tmp_path / "out", runtime__inline_rows=0)
    encoded_copy(clean_root, cfg)
    faults(kill("index/shard-00002.faiss"))
    index.run(cfg)
    assert_same(snapshot(cfg.output.root), clean)


def test_mine_searcher_killed_mid_search_is_restarted(tiny_model, tmp_path, clean_root, clean, faults):
    import shutil

    cfg = matrix_config(tiny_model, tmp_path / "out", runtime__inline_rows=0, runtime__num_workers=1)
    shutil.copytree(clean_root, cfg.output.root, ignore=shutil.ignore_patterns("negatives"))  # encoded and indexed
    faults(kill("search", point="search", skip=1))  # one worker: its second part
    mine.run(cfg)
    assert_same(snapshot(cfg.output.root), clean)


def test_mine_worker_killed_mid_text_join_is_restarted(tiny_model, tmp_path, clean_root, clean, faults):
    """The mine workers join the exports' texts once their parts are committed: one killed while committing a text
    group is restarted, the call retried, and the exports equal a clean run's."""
    import shutil

    cfg = matrix_config(tiny_model, tmp_path / "out", runtime__inline_rows=0, runtime__num_workers=1)
    shutil.copytree(clean_root, cfg.output.root, ignore=shutil.ignore_patterns("negatives"))  # encoded and indexed
    faults(kill("negatives/_texts/g-00000.json"))
    mine.run(cfg)
    assert faults_fired() == 1  # the worker was killed once, in the text join
    assert_same(snapshot(cfg.output.root), clean)


# ------------------------------------------------------------------------------------- retries exhausted


def test_encode_retries_exhausted_fail_naming_the_shard_and_a_rerun_redoes_only_the_rest(
    tiny_model, tmp_path, clean, faults
):
    faults(kill("embeddings/shard-00002.parquet"))
    cfg = matrix_config(
        tiny_model,
        tmp_path / "out",
        runtime__inline_rows=0,
        runtime__max_restarts=0,
        runtime__max_task_retries=0,
        runtime__num_workers=1,
    )
    with pytest.raises(
        dispatch.StageFailed,
        match=r"encode of shard-00002 failed: ActorDiedError.*run the same "
        r"command again",
    ):
        encode.run(cfg)
    committed = embeddings.committed_records(embeddings.layout_of(cfg))
    assert sorted(committed) == ["shard-00000", "shard-00001"]
    summary = encode.run(cfg)
    assert (summary["shards_run"], summary["shards_skipped"]) == (SHARDS - 2, 2)
    assert_same(snapshot(cfg.output.root), clean)


def test_index_retries_exhausted_fail_naming_the_shard_and_a_rerun_completes(
    tiny_model, tmp_path, clean_root, clean, faults
):
    cfg = matrix_config(tiny_model, tmp_path / "out", runtime__max_task_retries=0, runtime__inline_rows=0)
    encoded_copy(clean_root, cfg)
    faults(kill("index/shard-00001.faiss"))
    with pytest.raises(dispatch.StageFailed, match=r"index: adding embeddings of shard-00001 failed"):
        index.run(cfg)
    index.run(cfg)
    assert_same(snapshot(cfg.output.root), clean)


# --------------------------------------------------------------------------- the driver crashing at a commit

DRIVER_CRASHES = {
    # stage: [(where the driver crashes, what must not read as complete afterwards)]
    "encode, before any commit": ("encode", "embeddings/shard-00000.parquet"),
    "encode, between commits": ("encode", "embeddings/_shards/shard-00002.json"),
    "encode, writing its manifest": ("encode", "embeddings/_manifest.json"),
    "index, during the merge": ("index", "index/merged.faiss"),
    "index, writing its manifest": ("index", "index/manifest.json"),
    "mine, between parts": ("mine", "negatives/_parts/part-00001.json"),
    "mine, joining the texts": ("mine", "negatives/_texts/g-00000.json"),
    "mine, between parts' exports": ("mine", "negatives/_exports/part-00001.triplet.parquet"),
    "mine, writing its manifest": ("mine", "negatives/_manifest.json"),
}


def _run_stage(cfg, stage: str) -> None:
    """The stage ``stage`` in this process (the index in this process too, so the crash is the driver's)."""
    if stage == "encode":
        encode.run(cfg)
    elif stage == "index":
        index.run(cfg, in_process=True)
    else:
        mine.run(cfg)


@pytest.mark.parametrize("case", list(DRIVER_CRASHES))
def test_a_driver_crash_at_a_commit_point_leaves_nothing_complete_and_a_rerun_equals_a_clean_run(
    tiny_model, tmp_path, clean_root, clean, faults, case
):
    """The stage runs on the clean run's earlier stages (copied): their own crashes are their own cases."""
    import shutil

    stage, where = DRIVER_CRASHES[case]
    cfg = matrix_config(tiny_model, tmp_path / "out")
    if stage != "encode":
        later = ["index", "negatives"] if stage == "index" else ["negatives"]
        shutil.copytree(clean_root, cfg.output.root, ignore=shutil.ignore_patterns(*later))
    faults([{"point": "write", "match": where, "action": "crash"}])
    with pytest.raises(InjectedCrash):
        _run_stage(cfg, stage)
    readers = {
        "encode": embeddings.read_embeddings_manifest,
        "index": indexing.read_index_manifest,
        "mine": mining.read_mine_manifest,
    }
    with pytest.raises(FileNotFoundError):  # the stage's output does not read as complete
        readers[stage](Folder(str(cfg.output.root)))
    _run_stage(cfg, stage)
    got = snapshot(cfg.output.root)
    assert set(got) >= {"embeddings"} and ("mine" in got or stage != "mine")
    assert stage != "mine" or sum(len(row["negative_ids"]) for row in got["mine"]) > 0
    assert_same(got, clean)


def test_a_driver_crash_during_a_publish_keeps_current_and_a_rerun_publishes(tiny_model, tmp_path, clean, faults):
    cfg = matrix_config(tiny_model, tmp_path / "nightly")
    faults([{"point": "write", "match": "nightly/CURRENT", "action": "crash"}])
    with pytest.raises(InjectedCrash):
        refresh.run(cfg)
    assert versions.read_current(Folder(str(cfg.output.root))) is None  # never half-published
    faults([])
    record = refresh.run(cfg)
    assert versions.read_current(Folder(str(cfg.output.root)))["version"] == record["version"]
    got = snapshot(versions.version_root(str(cfg.output.root), record["version"]))
    assert_same({k: got[k] for k in ("embeddings", "index")}, clean)


# -------------------------------------------------------------------------------------- storage refusing writes


def test_a_full_disk_fails_the_job_naming_the_file_and_a_rerun_completes(tiny_model, tmp_path, clean, faults):
    faults([{"point": "write", "match": "embeddings/_shards/shard-00001.json", "action": "oserror"}])
    cfg = matrix_config(tiny_model, tmp_path / "out")
    with pytest.raises(OSError, match=r"No space left on device \(injected at write .*shard-00001\.json\)"):
        encode.run(cfg)
    layout = embeddings.layout_of(cfg)
    assert sorted(embeddings.committed_records(layout)) == ["shard-00000"]  # shard-00001 is not committed
    assert not list((tmp_path / "out").rglob("*.tmp-*"))  # the failed write left nothing behind
    assert encode.run(cfg)["shards_run"] == SHARDS - 1
    assert_same(snapshot(cfg.output.root), clean)
