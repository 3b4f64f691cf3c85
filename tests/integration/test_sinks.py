"""Serving sinks kept in step with CURRENT: a LanceDB table (embedded, on a local path and on the local S3 server)
and a Qdrant collection (the client's local mode on a path), compared row by row with the CURRENT version's
vectors after every night, rollback, crash and rerun.

The same tests run against a Qdrant server: start one (``docker run -p 6333:6333 qdrant/qdrant``) and set
``QDRANT_TEST_URL=http://127.0.0.1:6333``; the Qdrant sink then talks to it instead of the local mode."""

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import make_docs
from test_refresh import SETTINGS, by_doc, day1, day2, snapshot

from jobs import refresh
from jobs import sync as sync_job
from retrieval_core.config.sinks import sink_specs
from retrieval_core.io import versions
from retrieval_core.io.folder import Folder
from retrieval_core.serve import syncing
from retrieval_core.serve.qdrant_sink import point_id
from retrieval_core.serve.stores import open_sink

pytestmark = pytest.mark.usefixtures("ray_cluster")
COMPACTING = {"refresh__compact_dead_fraction": 0.05, "refresh__compact_budget": 0.5}


def day3() -> list[dict]:
    """Day 2 with more churn: texts revised, documents gone and new ones."""
    docs = [dict(d) for d in day2() if not d["id"].endswith("37")]
    for d in docs[1::9]:
        d["text"] += " third night"
    return docs + make_docs(9, seed=13, prefix="third")


def day4() -> list[dict]:
    docs = [dict(d) for d in day3()]
    for d in docs[::7]:
        d["text"] += " fourth night"
    return docs


def sinks_for(tmp, name: str = "", lance_options: dict | None = None, lance_uri: str = "") -> list[dict]:
    server = os.environ.get("QDRANT_TEST_URL")  # a server is shared by the tests: a collection of each test's own
    qdrant_url = server or str(tmp / f"qdrant{name}")
    name = f"{name}-{hashlib.sha1(str(tmp).encode()).hexdigest()[:8]}" if server else name
    lance = {"kind": "lance", "uri": lance_uri or str(tmp / "lance"), "table": f"docs{name}", "batch_size": 7}
    if lance_options:
        lance["storage_options"] = lance_options
    qdrant = {"kind": "qdrant", "url": qdrant_url, "collection": f"docs{name}", "batch_size": 5}
    return [lance, qdrant]


def argv(corpus, root, model, sinks: list[dict], *extra: str) -> list[str]:
    sets = {
        "corpus.path": corpus,
        "output.root": root,
        "model.name": model,
        "runtime.progress": "false",
        **{k.replace("__", "."): v for k, v in {**SETTINGS, **COMPACTING}.items()},
        "serve.sinks": json.dumps(sinks),
    }
    return [a for key, value in sets.items() for a in ("--set", f"{key}={value}")] + list(extra)


def store_rows(spec: dict, dim: int) -> dict[str, np.ndarray]:
    """doc_id -> vector, everything the store holds."""
    sink = open_sink(spec, dim, True)
    try:
        if spec["kind"] == "lance":
            table = sink._table().to_arrow()
            vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(len(table), dim)
            return dict(zip(table.column("doc_id").to_pylist(), vectors))
        rows, offset = {}, None
        while True:
            points, offset = sink.client.scroll(spec["collection"], limit=256, offset=offset, with_vectors=True)
            for point in points:
                assert point.id == point_id(point.payload["doc_id"])
                rows[point.payload["doc_id"]] = np.asarray(point.vector, dtype=np.float32)
            if offset is None:
                return rows
    finally:
        sink.close()


def assert_store_is_current(root, spec: dict) -> str:
    """The store holds exactly the CURRENT version's documents, each with its vector; returns that version."""
    folder = Folder(str(root))
    current = versions.read_current(folder)["version"]
    expected = by_doc(versions.version_root(str(root), current))
    found = store_rows(spec, len(next(iter(expected.values()))))
    assert sorted(found) == sorted(expected), spec["name"]
    for doc_id, vector in expected.items():
        np.testing.assert_allclose(found[doc_id], vector, rtol=0, atol=1e-7, err_msg=f"{spec['name']} {doc_id}")
    assert syncing.read_state(folder, spec["name"])["holds"] == current
    return current


def last_steps(root, spec: dict) -> list[str]:
    return [s["kind"] for s in syncing.read_state(Folder(str(root)), spec["name"])["last_sync"]["steps"]]


@pytest.fixture(scope="module")
def nights(tmp_path_factory, tiny_model):
    """Three nights and two rollbacks on one root with both sinks, checking the stores after each step."""
    tmp = tmp_path_factory.mktemp("sinks")
    root, sinks = tmp / "nightly", sinks_for(tmp)
    specs = sink_specs(sinks, 1000)
    published, steps = [], {}
    for day, docs in (("day1", day1()), ("day2", day2()), ("day3", day3())):
        assert refresh.main(argv(snapshot(tmp, day, docs), root, tiny_model, sinks)) == 0
        published.append(versions.read_current(Folder(str(root)))["version"])
        for spec in specs:
            assert assert_store_is_current(root, spec) == published[-1]
            steps[(day, spec["kind"])] = last_steps(root, spec)
    for back in (published[1], published[0]):
        assert (
            refresh.main(
                ["--set", f"output.root={root}", "--set", f"serve.sinks={json.dumps(sinks)}", "--rollback", back]
            )
            == 0
        )
        for spec in specs:
            assert assert_store_is_current(root, spec) == back
            steps[(f"back to {back}", spec["kind"])] = last_steps(root, spec)
    return {"tmp": tmp, "root": root, "sinks": sinks, "specs": specs, "published": published, "steps": steps}


def test_three_nights_and_two_rollbacks_keep_both_stores_equal_to_current(nights):
    steps, (v1, v2, _) = nights["steps"], nights["published"]
    for kind in ("lance", "qdrant"):
        assert steps[("day1", kind)] == ["load"]  # a first sync of an empty store loads the whole version
        assert steps[("day2", kind)] == steps[("day3", kind)] == ["apply"]  # a night: its changes only
    assert steps[(f"back to {v2}", "qdrant")] == steps[(f"back to {v1}", "qdrant")] == ["undo"]
    assert steps[(f"back to {v2}", "lance")] == steps[(f"back to {v1}", "lance")] == ["restore"]


def test_the_undone_nights_compacted_segments(nights):
    """The rollbacks above crossed compacted segments (rows copied with their row ids), so the undo's row-id
    comparison was tested on them."""
    root = str(nights["root"])
    from retrieval_core.encode import embeddings

    compacted = 0
    for version in nights["published"][1:]:
        manifest = embeddings.read_embeddings_manifest(Folder(versions.version_root(root, version)))
        compacted += manifest["totals"]["shards_compacted"]
    assert compacted >= 1


def test_a_night_after_a_rollback_and_a_lagging_sink_catch_up(nights, tiny_model):
    """CURRENT is day 1 after the rollbacks; a new night built on it is applied; a sink that missed two published
    versions gets both, in order."""
    tmp, root, sinks, specs = nights["tmp"], nights["root"], nights["sinks"], nights["specs"]
    assert refresh.main(argv(snapshot(tmp, "day4", day4()), root, tiny_model, sinks)) == 0
    for spec in specs:
        assert_store_is_current(root, spec)
        assert last_steps(root, spec) == ["apply"]
    late = sinks_for(tmp, "-late")
    assert sync_job.main(argv(snapshot(tmp, "day4", day4()), root, tiny_model, late)) == 0  # loads CURRENT
    for spec in sink_specs(late, 1000):
        assert last_steps(root, spec) == ["load"]
    assert refresh.main(argv(snapshot(tmp, "day5", day2()), root, tiny_model, [])) == 0  # sinks not told
    assert refresh.main(argv(snapshot(tmp, "day6", day1()), root, tiny_model, [])) == 0
    assert sync_job.main(argv(snapshot(tmp, "day6", day1()), root, tiny_model, late)) == 0
    for spec in sink_specs(late, 1000):
        assert_store_is_current(root, spec)
        assert last_steps(root, spec) == ["apply", "apply"]


def test_a_sync_killed_half_way_and_run_again_ends_equal(nights, tiny_model, monkeypatch):
    """A store that fails in the middle of a step (after two batches) is left recorded as being moved; the version
    stays published and the sync exits 3 naming the sink; a second run does the step again and ends equal."""
    tmp, root, sinks, specs = nights["tmp"], nights["root"], nights["sinks"], nights["specs"]
    folder = Folder(str(root))
    cfg_args = ["--set", f"output.root={root}", "--set", f"serve.sinks={json.dumps(sinks)}"]
    assert sync_job.main(cfg_args) == 0  # in step with CURRENT first
    held = versions.read_current(folder)["version"]
    assert refresh.main(argv(snapshot(tmp, "day7", day3()), root, tiny_model, [])) == 0  # stores not told
    current = versions.read_current(folder)["version"]
    from retrieval_core.serve import lance_sink, qdrant_sink

    def failing_after_two(original):  # a store (or the connection to it) lost after two batches of a step
        def upsert_all(self, batches):
            def two_then_lost():
                for i, batch in enumerate(batches):
                    if i == 2:
                        raise ConnectionError("store went away")
                    yield batch

            return original(self, two_then_lost())

        return upsert_all

    for cls in (lance_sink.LanceSink, qdrant_sink.QdrantSink):  # LanceDB: one merge insert; Qdrant: a request a batch
        monkeypatch.setattr(cls, "upsert_all", failing_after_two(cls.upsert_all))
    assert sync_job.main(cfg_args) == sync_job.SINK_FAILED
    assert versions.read_current(folder)["version"] == current  # the version stays published
    for spec in specs:
        state = syncing.read_state(folder, spec["name"])
        assert state["holds"] == held and state["toward"] == {"kind": "apply", "version": current, "reaches": current}
        assert sorted(store_rows(spec, _dim(root))) != sorted(by_doc(versions.version_root(str(root), current)))
    monkeypatch.undo()
    assert sync_job.main(cfg_args) == 0
    for spec in specs:
        assert_store_is_current(root, spec)
        assert last_steps(root, spec) == ["apply"]


def test_applying_a_version_twice_changes_nothing(nights):
    """A step done again (as after a crash, or twice over) leaves the store as it was; a sync of a store in step
    does nothing."""
    root, specs = nights["root"], nights["specs"]
    folder = Folder(str(root))
    current = versions.read_current(folder)["version"]

    def state(spec):
        return syncing.read_state(folder, spec["name"])

    assert syncing.previous_of(folder, current)  # the version has a previous one: its changes are a real step
    step = syncing.Step("apply", current, current)
    for spec in specs:
        for _ in range(2):
            with_sink(
                spec, root, lambda sink, spec=spec: syncing._run_step(sink, folder, state(spec), step, syncing.Tally())
            )
            assert_store_is_current(root, spec)
        assert state(spec)["toward"] == dataclasses.asdict(step)  # recorded as under way, and the store
        record = with_sink(spec, root, lambda sink: syncing.sync(sink, folder, current))  # says it finished:
        assert record["last_sync"]["steps"] == [] and record["toward"] is None  # nothing is done a third time
        assert_store_is_current(root, spec)
        record = with_sink(spec, root, lambda sink: syncing.sync(sink, folder, current))
        assert record["last_sync"]["steps"] == [] and record["last_sync"]["upserted"] == 0


def with_sink(spec: dict, root, work):
    """``work(sink)`` with the sink open (Qdrant's local mode allows one client at a time)."""
    sink = open_sink(spec, _dim(root), True)
    try:
        return work(sink)
    finally:
        sink.close()


def _dim(root) -> int:
    current = versions.read_current(Folder(str(root)))["version"]
    return len(next(iter(by_doc(versions.version_root(str(root), current)).values())))


def test_a_lance_table_on_s3_follows_the_nights(tmp_path, tiny_model, s3_options, s3_endpoint):
    import s3fs

    s3fs.S3FileSystem(**s3_options).mkdir("sinks-bucket")
    options = {
        "aws_access_key_id": s3_options["key"],
        "aws_secret_access_key": s3_options["secret"],
        "aws_endpoint": s3_endpoint,
        "aws_region": "us-east-1",
        "allow_http": "true",
    }
    sinks = sinks_for(tmp_path, lance_options=options, lance_uri="s3://sinks-bucket/lance")[:1]
    spec = sink_specs(sinks, 1000)[0]
    root, steps = tmp_path / "nightly", []
    for day, docs in (("day1", day1()), ("day2", day2()), ("day3", day3())):
        assert refresh.main(argv(snapshot(tmp_path, day, docs), root, tiny_model, sinks)) == 0
        assert_store_is_current(root, spec)
        steps.append(last_steps(root, spec))
    v3 = versions.read_current(Folder(str(root)))["version"]
    v2 = syncing.previous_of(Folder(str(root)), v3)
    assert (
        refresh.main(["--set", f"output.root={root}", "--set", f"serve.sinks={json.dumps(sinks)}", "--rollback", v2])
        == 0
    )
    assert_store_is_current(root, spec)
    assert steps + [last_steps(root, spec)] == [["load"], ["apply"], ["apply"], ["restore"]]
    assert s3fs.S3FileSystem(**s3_options).ls("sinks-bucket/lance")  # the table's files are on the server


def test_a_night_with_another_encoder_is_loaded_whole_never_mixed(nights, tiny_model_without_dropout):
    """A version that encoded everything anew (another model) is not applied in place, where the store would hold
    two encoders' vectors for a while: it is loaded whole, replacing the content in one step."""
    tmp, root, sinks, specs = nights["tmp"], nights["root"], nights["sinks"], nights["specs"]
    assert refresh.main(argv(snapshot(tmp, "day8", day2()), root, tiny_model_without_dropout, sinks)) == 0
    current = versions.read_current(Folder(str(root)))["version"]
    assert versions.read_refresh_record(Folder(str(root)), current)["reencoded_all"]
    for spec in specs:
        assert_store_is_current(root, spec)
        assert last_steps(root, spec) == ["load"]


def test_a_load_killed_while_its_indexes_build_or_its_collection_fills_is_finished_by_the_next_run(
    tmp_path, tiny_model, monkeypatch
):
    """A whole load is recorded as under way before it starts: LanceDB killed while building its indexes (the data
    committed and tagged) checks the tagged version out on the next run; Qdrant killed while filling the new
    collection (the alias still on the old one) loads again, and the half-filled collection is dropped."""
    from retrieval_core.serve import lance_sink, qdrant_sink

    root, sinks = tmp_path / "nightly", sinks_for(tmp_path)
    specs = sink_specs(sinks, 1000)
    assert refresh.main(argv(snapshot(tmp_path, "day1", day1()), root, tiny_model, [])) == 0

    def killed(*args, **kwargs):
        raise ConnectionError("killed")

    monkeypatch.setattr(lance_sink.LanceSink, "_maybe_index", killed)  # after the doc_id index committed
    monkeypatch.setattr(qdrant_sink.QdrantSink, "_set_version", killed)
    cfg_args = ["--set", f"output.root={root}", "--set", f"serve.sinks={json.dumps(sinks)}"]
    assert sync_job.main(cfg_args) == sync_job.SINK_FAILED
    for spec in specs:
        assert syncing.read_state(Folder(str(root)), spec["name"])["toward"]["kind"] == "load"
    monkeypatch.undo()
    assert sync_job.main(cfg_args) == 0
    for spec, finished_by in zip(specs, (["restore"], ["load"])):
        assert_store_is_current(root, spec)
        assert last_steps(root, spec) == finished_by
    collections = with_sink(specs[1], root, lambda sink: [c.name for c in sink.client.get_collections().collections])
    assert len([c for c in collections if c.startswith(specs[1]["collection"] + "--")]) == 1  # half-filled: dropped


def test_lance_without_its_tags_undoes_a_rollback_in_place(tmp_path, tiny_model):
    """A table that lost the tag of the version rolled back to (tags removed by hand, say) is brought back by the
    undo, as Qdrant is; and an unfinished step whose files retention removed is replaced by a whole load."""
    root, sinks = tmp_path / "nightly", sinks_for(tmp_path)[:1]
    (spec,) = sink_specs(sinks, 1000)
    for day, docs in (("day1", day1()), ("day2", day2()), ("day3", day3())):
        assert refresh.main(argv(snapshot(tmp_path, day, docs), root, tiny_model, sinks)) == 0
    folder = Folder(str(root))
    v3 = versions.read_current(folder)["version"]
    v2 = syncing.previous_of(folder, v3)
    v1 = syncing.previous_of(folder, v2)
    with_sink(spec, root, lambda sink: sink.forget({v3}))  # only the tag of the version it holds is left
    assert (
        refresh.main(["--set", f"output.root={root}", "--set", f"serve.sinks={json.dumps(sinks)}", "--rollback", v1])
        == 0
    )
    assert_store_is_current(root, spec)
    assert last_steps(root, spec) == ["undo", "undo"]  # two versions undone, newest first
    state = syncing.read_state(folder, spec["name"])
    gone = syncing.Step("apply", v2, v2)
    storage_path = Path(versions.version_root(str(root), v2)) / "changes" / "upserts.parquet"
    storage_path.unlink()  # as if retention had removed the version's files
    syncing._write_state(
        folder, with_sink(spec, root, lambda sink: sink), {**state, "toward": dataclasses.asdict(gone)}
    )
    assert (
        refresh.main(["--set", f"output.root={root}", "--set", f"serve.sinks={json.dumps(sinks)}", "--rollback", v3])
        == 0
    )
    assert_store_is_current(root, spec)
    assert last_steps(root, spec) == ["restore"]  # the table still has v3's tag: checked out, no replay needed
    gone = syncing.Step("undo", v3, v2)
    (Path(versions.version_root(str(root), v3)) / "changes" / "upserts.parquet").unlink()
    state = syncing.read_state(folder, spec["name"])
    syncing._write_state(
        folder, with_sink(spec, root, lambda sink: sink), {**state, "toward": dataclasses.asdict(gone)}
    )
    with_sink(spec, root, lambda sink: sink.forget(set()))  # no tag left: nothing to check out
    assert sync_job.main(["--set", f"output.root={root}", "--set", f"serve.sinks={json.dumps(sinks)}"]) == 0
    assert_store_is_current(root, spec)
    assert last_steps(root, spec) == ["load"]  # what it holds is unknown: loaded whole
