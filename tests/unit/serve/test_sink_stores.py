"""The sinks on their own (no versions, no Ray): settings refused with the entry named, LanceDB's tags, history and
indexes, Qdrant's alias, point ids and retries."""

import httpx
import numpy as np
import pytest
from qdrant_client.http.exceptions import UnexpectedResponse

from retrieval_core.config import ConfigError, load_config
from retrieval_core.config.sinks import sink_specs
from retrieval_core.serve.qdrant_sink import point_id
from retrieval_core.serve.stores import open_sink


@pytest.mark.parametrize(
    "sinks, message",
    [
        ([{"kind": "pinecone"}], "'serve.sinks[0]': kind = 'pinecone': expected one of lance, qdrant"),
        ([{"kind": "lance", "uri": "/x"}], "'serve.sinks[0]': a lance sink needs `table`"),
        ([{"kind": "qdrant", "url": "u", "colection": "c"}], "unknown key 'colection' for a qdrant sink"),
        ([{"kind": "lance", "uri": "/x", "table": "t", "index_growth": -1}], "index_growth = -1"),
        ([{"kind": "qdrant", "url": "u", "collection": "c", "distance": "manhattan"}], "distance = 'manhattan'"),
        ([{"kind": "qdrant", "url": "u", "collection": "c", "parallel": 0}], "parallel = 0: expected a positive"),
        ([{"kind": "lance", "uri": "/a", "table": "t"}, {"kind": "lance", "uri": "/b", "table": "t"}], "'lance-t'"),
        ([{"kind": "lance", "uri": "/a", "table": "t", "name": "../up"}], "name = '../up'"),
        (["lance"], "'serve.sinks[0]' = 'lance': expected a mapping"),
    ],
)
def test_bad_sink_settings_are_refused_naming_the_entry(sinks, message):
    with pytest.raises(ConfigError, match=None) as caught:
        sink_specs(sinks, 1000)
    assert message in str(caught.value)


def test_sink_defaults_fill_name_and_batch_size():
    cfg = load_config(None, ['serve.sinks=[{kind: qdrant, url: ":memory:", collection: docs}]', "serve.batch_size=64"])
    (spec,) = sink_specs(cfg.serve.sinks, cfg.serve.batch_size)
    assert spec["name"] == "qdrant-docs" and spec["batch_size"] == 64 and spec["distance"] == "auto"


def lance(tmp_path, **extra):
    spec = sink_specs([{"kind": "lance", "uri": str(tmp_path / "lance"), "table": "docs", **extra}], 100)[0]
    return open_sink(spec, 8, True)


def rows(sink) -> dict:
    table = sink._table().to_arrow()
    vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(len(table), -1)
    return dict(zip(table.column("doc_id").to_pylist(), vectors.tolist()))


def test_lance_tags_say_what_the_table_holds_and_restore_brings_a_version_back(tmp_path):
    sink, rng = lance(tmp_path), np.random.default_rng(0)
    first = rng.random((3, 8), dtype=np.float32)
    sink.replace("v1", [(["a", "b'quote", "c"], first)])
    assert sink.holds() == "v1" and sorted(rows(sink)) == ["a", "b'quote", "c"]
    sink.delete(["b'quote", "missing"])  # a quote in an id, an id the table lacks
    sink.upsert(["a", "d"], np.ones((2, 8), np.float32))
    assert sink.holds() is None  # changed since the tag: mid-step
    sink.mark("v2")
    assert sink.holds() == "v2" and rows(sink)["a"] == [1.0] * 8 and sorted(rows(sink)) == ["a", "c", "d"]
    assert sink.can_restore("v1") and not sink.can_restore("v3")
    assert sink.restore("v1")
    assert sink.holds() == "v1" and rows(sink)["a"] == pytest.approx(first[0].tolist())
    sink.forget({"v1"})
    assert not sink.can_restore("v2") and sink.can_restore("v1")


def test_lance_builds_its_vector_index_at_min_rows_and_rebuilds_it_after_growth(tmp_path):
    sink, rng = lance(tmp_path, index_growth=0.5, index_min_rows=300), np.random.default_rng(1)

    def indexed():
        found = [i for i in sink._table().list_indices() if i.columns == ["vector"]]
        return sink._table().index_stats(found[0].name).num_indexed_rows if found else None

    sink.replace("v1", [([f"d{i}" for i in range(200)], rng.random((200, 8), dtype=np.float32))])
    assert indexed() is None  # under index_min_rows
    sink.upsert([f"e{i}" for i in range(200)], rng.random((200, 8), dtype=np.float32))
    sink.mark("v2")
    assert indexed() == 400
    sink.upsert([f"f{i}" for i in range(100)], rng.random((100, 8), dtype=np.float32))
    sink.mark("v3")
    assert indexed() == 400  # 100 new rows: a quarter, under the growth of a half (searched exactly meanwhile)
    sink.upsert([f"g{i}" for i in range(150)], rng.random((150, 8), dtype=np.float32))
    sink.mark("v4")
    assert indexed() == 650  # 250 past it: rebuilt


def qdrant(tmp_path, **extra):
    spec = sink_specs([{"kind": "qdrant", "url": str(tmp_path / "q"), "collection": "docs", **extra}], 100)[0]
    return open_sink(spec, 4, True, max_retries=3)


def test_qdrant_points_are_stable_uuids_behind_an_alias_a_load_moves(tmp_path):
    sink = qdrant(tmp_path)
    try:
        assert point_id("doc-1") == point_id("doc-1") != point_id("doc-2")
        sink.replace("v1", [(["doc-1", "doc-2"], np.eye(4, dtype=np.float32)[:2])])
        first = sink.stats()["collection"]
        sink.replace("v2", [(["doc-3"], np.eye(4, dtype=np.float32)[2:3])])
        assert sink.holds() == "v2" and sink.stats()["rows"] == 1
        names = [c.name for c in sink.client.get_collections().collections]
        assert first not in names and names == [sink.stats()["collection"]]  # the old collection dropped
        (point,) = sink.client.retrieve("docs", [point_id("doc-3")], with_vectors=True)
        assert point.payload == {"doc_id": "doc-3"} and point.vector == [0.0, 0.0, 1.0, 0.0]
    finally:
        sink.close()


def test_qdrant_refuses_a_plain_collection_of_its_name(tmp_path):
    sink = qdrant(tmp_path)
    try:
        from qdrant_client import models

        sink.client.create_collection("docs", vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT))
        with pytest.raises(ValueError, match="has a collection named 'docs' that is not an alias"):
            sink.holds()
    finally:
        sink.close()


def response(status: int) -> UnexpectedResponse:
    return UnexpectedResponse(status, "error", b"{}", httpx.Headers())


@pytest.mark.parametrize("status, retried", [(429, True), (503, True), (400, False), (404, False)])
def test_qdrant_requests_are_retried_on_rate_limits_and_server_errors_only(tmp_path, monkeypatch, status, retried):
    sink = qdrant(tmp_path)
    monkeypatch.setattr("time.sleep", lambda s: None)
    try:
        sink.replace("v1", [])
        calls = []
        real = sink.client.upsert

        def flaky(*args, **kwargs):
            calls.append(1)
            if len(calls) <= 2:
                raise response(status)
            return real(*args, **kwargs)

        monkeypatch.setattr(sink.client, "upsert", flaky)
        if retried:
            sink.upsert(["a"], np.ones((1, 4), np.float32))
            assert len(calls) == 3 and sink.stats()["rows"] == 1
        else:
            with pytest.raises(UnexpectedResponse):
                sink.upsert(["a"], np.ones((1, 4), np.float32))
            assert len(calls) == 1
    finally:
        sink.close()


def test_qdrant_api_key_variable_must_be_set(monkeypatch):
    monkeypatch.delenv("QDRANT_KEY_FOR_TEST", raising=False)
    spec = sink_specs(
        [{"kind": "qdrant", "url": "http://127.0.0.1:1", "collection": "d", "api_key_env": "QDRANT_KEY_FOR_TEST"}], 10
    )[0]
    with pytest.raises(ValueError, match="api_key_env = 'QDRANT_KEY_FOR_TEST', which is not set"):
        open_sink(spec, 4, True)
