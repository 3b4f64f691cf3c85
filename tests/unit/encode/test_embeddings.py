"""The encode stage's library half, run in-process without Ray."""

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import config, make_docs, write_parquet

from retrieval_core.config import ModelConfig
from retrieval_core.encode import embeddings
from retrieval_core.encode.encoding import SentenceTransformerEncoder, encoder_identity
from retrieval_core.io import corpus, storage
from retrieval_core.io.folder import Folder
from retrieval_core.io.manifest import IncompatibleOutputError


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model):
    return SentenceTransformerEncoder(ModelConfig(name=tiny_model))


def run_stage(cfg, encoder, rows_per_shard=8):
    files = corpus.inspect_corpus(cfg.corpus)
    identity = encoder_identity(cfg.model)
    shards = embeddings.prepare_plan(cfg, files, identity, lambda: rows_per_shard)
    pending = embeddings.pending_shards(shards, embeddings.layout_of(cfg))
    for shard in pending:
        embeddings.encode_shard(shard, embeddings.shard_work(cfg), encoder, identity)
    embeddings.write_manifest(cfg, shards, identity, encoder.dim, 0.0)
    return shards, pending


@pytest.fixture
def corpus_file(tmp_path):
    docs = make_docs(30)
    docs[3]["text"] = ""
    docs[17]["text"] = None
    return write_parquet(tmp_path / "corpus.parquet", docs, row_group_size=7), docs


def test_output_matches_direct_encoding(tmp_path, corpus_file, tiny_model, tiny_encoder):
    path, docs = corpus_file
    cfg = config(path, tmp_path / "out", tiny_model, corpus__title_column="title")
    shards, pending = run_stage(cfg, tiny_encoder)
    assert len(shards) == 4 and list(pending) == list(shards)
    row_ids, vectors, doc_ids = embeddings.load_embeddings(Folder(cfg.output.root))
    kept = [i for i in range(30) if i not in (3, 17)]
    assert row_ids.tolist() == kept
    assert doc_ids == [docs[i]["id"] for i in kept]
    expected = tiny_encoder.encode_documents([f"{docs[i]['title']} {docs[i]['text']}" for i in kept])
    assert np.abs(vectors - expected).max() < 1e-5
    manifest = embeddings.read_embeddings_manifest(Folder(cfg.output.root))
    assert manifest["totals"] == {"rows_in": 30, "rows_encoded": 28, "rows_rejected": 2, "shards": 4}
    assert manifest["dim"] == 32 and manifest["fingerprint"] == encoder_identity(cfg.model)["fingerprint"]
    meta = pq.read_schema(str(tmp_path / "out" / "embeddings" / "shard-00000.parquet")).metadata
    assert meta[b"fingerprint"].decode() == manifest["fingerprint"]
    rejects = pq.read_table(str(tmp_path / "out" / "rejects" / "encode" / "shard-00000.parquet")).to_pylist()
    assert [(r["row_id"], r["doc_id"], r["reason"]) for r in rejects] == [(3, "doc00003", "empty text")]
    assert manifest["shards"][2]["rejects_path"] == "../rejects/encode/shard-00002.parquet"
    assert "rejects_path" not in manifest["shards"][1]  # an entry holds the fields it has


def test_resume_redoes_only_uncommitted_shards(tmp_path, corpus_file, tiny_model, tiny_encoder):
    path, _ = corpus_file
    cfg = config(path, tmp_path / "out", tiny_model)
    run_stage(cfg, tiny_encoder)
    before = embeddings.load_embeddings(Folder(cfg.output.root))
    layout = embeddings.layout_of(cfg)
    storage.remove(layout.record_file("shard-00002"))
    storage.remove(layout.manifest)
    (tmp_path / "out" / "embeddings" / f"shard-00002.parquet{storage.TMP_MARK}dead").write_bytes(b"half")
    _, pending = run_stage(cfg, tiny_encoder)
    assert [s.name for s in pending] == ["shard-00002"]
    assert not any(storage.TMP_MARK in p.name for p in (tmp_path / "out" / "embeddings").iterdir())
    after = embeddings.load_embeddings(Folder(cfg.output.root))
    assert after[0].tolist() == before[0].tolist() and after[2] == before[2]
    assert np.array_equal(after[1], before[1])


def test_other_settings_are_refused_then_overwritten(tmp_path, corpus_file, tiny_model, tiny_encoder):
    path, _ = corpus_file
    cfg = config(path, tmp_path / "out", tiny_model)
    run_stage(cfg, tiny_encoder)
    changed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, document_prompt="passage: "))
    with pytest.raises(
        IncompatibleOutputError,
        match=r"(?s)encoder.document_prompt: existing \"\", this run "
        r"\"passage: \".*output.overwrite=true",
    ):
        run_stage(changed, tiny_encoder)
    overwrite = dataclasses.replace(changed, output=dataclasses.replace(changed.output, overwrite=True))
    _, pending = run_stage(overwrite, tiny_encoder)
    assert len(pending) == 4
    assert embeddings.read_embeddings_manifest(Folder(cfg.output.root))["encoder"]["document_prompt"] == "passage: "


def test_changed_corpus_is_refused(tmp_path, corpus_file, tiny_model, tiny_encoder):
    path, docs = corpus_file
    cfg = config(path, tmp_path / "out", tiny_model)
    run_stage(cfg, tiny_encoder)
    write_parquet(path, docs + make_docs(2, prefix="new"), row_group_size=7)
    with pytest.raises(IncompatibleOutputError, match="corpus.files"):
        run_stage(cfg, tiny_encoder)


def test_memory_url_and_float16(tiny_model, tiny_encoder, corpus_file):
    path, _ = corpus_file
    cfg = config(path, "memory://enc-test/out", tiny_model, output__embedding_dtype="float16")
    run_stage(cfg, tiny_encoder)
    row_ids, vectors, _ = embeddings.load_embeddings(Folder(cfg.output.root))
    assert vectors.dtype == np.float32 and len(row_ids) == 28
    table = storage.read_parquet("memory://enc-test/out/embeddings/shard-00000.parquet")
    embedding_type = table.schema.field("embedding").type
    assert embedding_type.value_type == pa.float16() and embedding_type.list_size == 32
    storage.remove("memory://enc-test")


def test_manifest_refuses_missing_shards(tmp_path, corpus_file, tiny_model, tiny_encoder):
    path, _ = corpus_file
    cfg = config(path, tmp_path / "out", tiny_model)
    files = corpus.inspect_corpus(cfg.corpus)
    identity = encoder_identity(cfg.model)
    shards = embeddings.prepare_plan(cfg, files, identity, lambda: 8)
    embeddings.encode_shard(shards[0], embeddings.shard_work(cfg), tiny_encoder, identity)
    with pytest.raises(RuntimeError, match="shards not committed"):
        embeddings.write_manifest(cfg, shards, identity, 32, 0.0)


def test_vector_bytes_per_row_sizes_automatic_shards(tmp_path):
    """Known only when the config fixes the dimension; else the automatic shard size assumes 768 float32."""
    assert embeddings.vector_bytes_per_row(config(tmp_path / "c", tmp_path / "out")) is None
    cfg = config(tmp_path / "c", tmp_path / "out", model__truncate_dim=256, output__embedding_dtype="float16")
    assert embeddings.vector_bytes_per_row(cfg) == 512
    assert embeddings.vector_bytes_per_row(config(tmp_path / "c", tmp_path / "out", model__truncate_dim=256)) == 1024
