import json
import threading
import time

import fsspec
import pyarrow as pa
import pytest
from helpers import make_docs, write_jsonl, write_parquet

from retrieval_core.config import CorpusConfig
from retrieval_core.io import corpus, storage
from retrieval_core.io.sharding import plan_shards


def read_all(cfg, rows_per_shard):
    metas = corpus.inspect_corpus(cfg)
    out = corpus.ShardRows()
    for shard in plan_shards(metas, rows_per_shard):
        part = corpus.read_shard(shard, cfg)
        out.row_ids += part.row_ids
        out.doc_ids += part.doc_ids
        out.texts += part.texts
        out.rejects += part.rejects
    return out


@pytest.mark.parametrize("rows_per_shard", [1, 7, 16, 33, 1000])
def test_parquet_shards_reassemble_the_corpus(tmp_path, rows_per_shard):
    docs_a, docs_b = make_docs(45, seed=1, prefix="a"), make_docs(30, seed=2, prefix="b")
    write_parquet(tmp_path / "c" / "part-0.parquet", docs_a, row_group_size=10)
    write_parquet(tmp_path / "c" / "part-1.parquet", docs_b, row_group_size=7)
    cfg = CorpusConfig(path=str(tmp_path / "c"), title_column="title")
    got = read_all(cfg, rows_per_shard)
    docs = docs_a + docs_b
    assert got.row_ids == list(range(len(docs)))
    assert got.doc_ids == [d["id"] for d in docs]
    assert got.texts == [f"{d['title']} {d['text']}" for d in docs]


@pytest.mark.parametrize("rows_per_shard", [1, 5, 13, 200])
def test_jsonl_blocks_and_blank_lines(tmp_path, monkeypatch, rows_per_shard):
    monkeypatch.setattr(corpus, "JSONL_BLOCK_ROWS", 4)
    docs = make_docs(50, seed=3)
    write_jsonl(tmp_path / "c.jsonl", docs, blank_every=6)
    cfg = CorpusConfig(path=str(tmp_path / "c.jsonl"))
    metas = corpus.inspect_corpus(cfg)
    assert metas[0].num_rows == 50 and metas[0].block_rows[0] == 4
    got = read_all(cfg, rows_per_shard)
    assert got.doc_ids == [d["id"] for d in docs]
    assert got.texts == [d["text"] for d in docs]


def test_gzip_jsonl_pieces_are_read_from_one_decompressed_copy(tmp_path, monkeypatch):
    """Each piece of a compressed file seeks in the node's decompressed copy, made once; a rewritten file gets a
    copy of its own."""
    import gzip
    import shutil

    from retrieval_core.io import file_cache

    monkeypatch.setenv("RETRIEVAL_FILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(corpus, "JSONL_BLOCK_ROWS", 4)
    copies, copy = [], shutil.copyfileobj
    monkeypatch.setattr(file_cache.shutil, "copyfileobj", lambda *a: copies.append(1) or copy(*a))
    for day, seed in enumerate((5, 6)):
        docs = make_docs(50 + day, seed=seed)
        write_jsonl(tmp_path / "c.jsonl", docs, blank_every=6)
        (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress((tmp_path / "c.jsonl").read_bytes()))
        got = read_all(CorpusConfig(path=str(tmp_path / "c.jsonl.gz")), 3)  # 17 shards, each seeking
        assert got.doc_ids == [d["id"] for d in docs] and got.texts == [d["text"] for d in docs]
        assert len(copies) == day + 1
    plain = sorted((tmp_path / "cache").glob("*-c.jsonl.gz.plain"), key=lambda p: p.stat().st_mtime)
    assert len(plain) == 2 and plain[-1].read_bytes() == (tmp_path / "c.jsonl").read_bytes()


def test_rejects_carry_reasons_and_rows_add_up(tmp_path):
    docs = make_docs(10)
    docs[2]["text"] = None
    docs[4]["text"] = "   "
    docs[6]["id"] = None
    write_parquet(tmp_path / "c.parquet", docs, row_group_size=3)
    got = read_all(CorpusConfig(path=str(tmp_path / "c.parquet")), 4)
    assert [(r["row_id"], r["reason"]) for r in got.rejects] == [
        (2, "null text"),
        (4, "empty text"),
        (6, "null or empty id"),
    ]
    assert got.rejects[0]["doc_id"] == "doc00002" and got.rejects[0]["source"].endswith("c.parquet")
    assert len(got.row_ids) + len(got.rejects) == 10
    assert 2 not in got.row_ids and got.row_ids[:3] == [0, 1, 3]


def test_invalid_jsonl_line_is_a_reject(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "fine"}\n{not json\n{"id": "c", "text": "also fine"}\n')
    got = read_all(CorpusConfig(path=str(path)), 10)
    assert got.doc_ids == ["a", "c"]
    assert got.rejects[0]["row_id"] == 1 and got.rejects[0]["reason"].startswith("invalid JSON line")


def test_missing_column_lists_columns_present(tmp_path):
    write_parquet(tmp_path / "c.parquet", make_docs(3))
    with pytest.raises(corpus.CorpusError, match=r"no column 'body'; columns present: id, title, text"):
        corpus.inspect_corpus(CorpusConfig(path=str(tmp_path / "c.parquet"), text_column="body"))


def test_path_matching_nothing_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        corpus.inspect_corpus(CorpusConfig(path=str(tmp_path / "nothing-here" / "*.parquet")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        corpus.inspect_corpus(CorpusConfig(path=str(tmp_path / "missing.parquet")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="matches no file"):
        corpus.inspect_corpus(CorpusConfig(path=str(tmp_path / "empty")))


def test_corrupt_parquet_names_the_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(corpus.CorpusError, match="bad.parquet' is not a readable Parquet file"):
        corpus.inspect_corpus(CorpusConfig(path=str(bad)))


def test_glob_list_and_memory_urls():
    fs = fsspec.filesystem("memory")
    docs = make_docs(12)
    for i in range(3):
        with fs.open(f"/corpus-t/p{i}.jsonl", "w") as handle:
            handle.write("\n".join(json.dumps(d) for d in docs[i * 4 : (i + 1) * 4]) + "\n")
    cfg = CorpusConfig(path="memory://corpus-t/p*.jsonl")
    got = read_all(cfg, 5)
    assert got.doc_ids == [d["id"] for d in docs]
    fs.rm("/corpus-t", recursive=True)


def test_integer_ids_become_strings(tmp_path):
    table = pa.table({"id": [10, 11], "text": ["a b", "c d"]})
    import pyarrow.parquet as pq

    pq.write_table(table, str(tmp_path / "c.parquet"))
    assert read_all(CorpusConfig(path=str(tmp_path / "c.parquet")), 5).doc_ids == ["10", "11"]


def test_assemble_text_as_beir():
    assert corpus.assemble_text("A title", "the body") == "A title the body"
    assert corpus.assemble_text(None, "the body") == "the body"
    assert corpus.assemble_text("", "the body") == "the body"


def test_parquet_footers_are_read_concurrently_in_file_order(tmp_path, monkeypatch):
    """Parquet footers are read by a bounded thread pool (on object storage their round trips overlap); the
    metadata keeps the file order, JSONL files among them included, and an unreadable footer is still named."""
    names = [f"part-{i:02d}.{'jsonl' if i % 5 == 2 else 'parquet'}" for i in range(24)]
    for i, name in enumerate(names):
        docs = make_docs(i + 1, seed=i, prefix=f"p{i:02d}-")
        if name.endswith(".jsonl"):
            write_jsonl(tmp_path / "c" / name, docs)
        else:
            write_parquet(tmp_path / "c" / name, docs, row_group_size=3)
    read_footer, lock, in_flight, most = corpus._inspect_parquet, threading.Lock(), [0], [0]

    def slow_footer(url, cfg):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.02)  # a round trip
        try:
            return read_footer(url, cfg)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(corpus, "_inspect_parquet", slow_footer)
    cfg = CorpusConfig(path=str(tmp_path / "c"))
    metas = corpus.inspect_corpus(cfg)
    assert [m.url.rsplit("/", 1)[-1] for m in metas] == names
    assert [m.num_rows for m in metas] == list(range(1, 25))
    assert [m.format for m in metas] == [name.rsplit(".", 1)[-1] for name in names]
    assert 1 < most[0] <= storage.READ_THREADS
    (tmp_path / "c" / "part-17.parquet").write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(corpus.CorpusError, match="part-17.parquet' is not a readable Parquet file"):
        corpus.inspect_corpus(cfg)
