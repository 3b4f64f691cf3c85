"""Bad input, one case per kind, each with its expected outcome: a row rejected with its reason (and rows in =
rows accepted + rows rejected), or an error that names what is wrong and where (file, line or row, key). No Ray."""

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_jsonl, write_parquet, write_synthetic_embeddings

from retrieval_core.config import ConfigError, CorpusConfig, MineConfig, ModelConfig, load_config
from retrieval_core.encode import embeddings, encoding
from retrieval_core.index import faiss_index
from retrieval_core.io import corpus, id_check, judgements, storage, versions
from retrieval_core.io.folder import Folder
from retrieval_core.io.sharding import plan_shards
from retrieval_core.mine import inputs as mine_input
from retrieval_core.refresh import refreshing

GOOD = [{"id": "g1", "text": "a good first text"}, {"id": "g2", "text": "a good last text"}]


def read_all(cfg: CorpusConfig) -> corpus.ShardRows:
    out = corpus.ShardRows()
    for shard in plan_shards(corpus.inspect_corpus(cfg), 2):
        part = corpus.read_shard(shard, cfg)
        for name in ("row_ids", "doc_ids", "texts", "rejects"):
            getattr(out, name).extend(getattr(part, name))
    return out


# ------------------------------------------------------------------------------------------- rows: rejects

ROW_CASES = {
    "null text": ({"id": "b", "text": None}, "null text"),
    "missing text key": ({"id": "b"}, "null text"),
    "empty text": ({"id": "b", "text": ""}, "empty text"),
    "whitespace-only text": ({"id": "b", "text": " \t\n "}, "empty text"),
    "zero-width-only text": ({"id": "b", "text": "\u200b\ufeff \u2060"}, "empty text"),
    "text of megabytes": ({"id": "b", "text": "x" * 2_000_001}, "2000001 characters, over corpus.max_text_chars"),
    "number as text": ({"id": "b", "text": 12}, "text is a int, not a string"),
    "list as text": ({"id": "b", "text": ["x"]}, "text is a list, not a string"),
    "object as text": ({"id": "b", "text": {"x": 1}}, "text is a dict, not a string"),
    "number as title": ({"id": "b", "text": "t", "title": 3.5}, "title is a float, not a string"),
    "null id": ({"id": None, "text": "t"}, "null or empty id"),
    "empty id": ({"id": "", "text": "t"}, "null or empty id"),
    "float id": ({"id": 1.0, "text": "t"}, "id is a float, not a string or integer"),
    "bool id": ({"id": True, "text": "t"}, "id is a bool, not a string or integer"),
    "object id": ({"id": {"a": 1}, "text": "t"}, "id is a dict, not a string or integer"),
}


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_a_bad_row_is_a_reject_with_its_reason(tmp_path, case):
    row, reason = ROW_CASES[case]
    path = write_jsonl(tmp_path / "c.jsonl", [{**GOOD[0], "title": None}, row, GOOD[1]])
    got = read_all(CorpusConfig(path=str(path), title_column="title"))
    assert got.doc_ids == ["g1", "g2"] and got.texts == [g["text"] for g in GOOD]
    assert len(got.rejects) == 1 and len(got.doc_ids) + len(got.rejects) == 3
    reject = got.rejects[0]
    assert reason in reject["reason"] and reject["row_id"] == 1 and reject["source"] == str(path)


@pytest.mark.parametrize(
    "line, reason",
    [
        (b'{"id": "b", "text": "caf\xe9 latin-1"}', "not UTF-8 text"),
        (b'{"id": "b", "text": "\\ud800 lone surrogate"}', "unpaired surrogate"),
        (b'{"id": "b", "text": "cut sh', "invalid JSON line"),
        (b'["not", "an", "object"]', "not a JSON object"),
    ],
    ids=["invalid-utf8", "lone-surrogate", "truncated-line", "not-an-object"],
)
def test_a_bad_jsonl_line_is_a_reject_not_the_end_of_the_job(tmp_path, line, reason):
    path = tmp_path / "c.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode() + b"\n" + json.dumps(GOOD[1]).encode() + b"\n" + line + b"\n")
    got = read_all(CorpusConfig(path=str(path)))
    assert got.doc_ids == ["g1", "g2"]
    assert [r["row_id"] for r in got.rejects] == [2] and reason in got.rejects[0]["reason"]


def test_a_text_limit_of_zero_accepts_long_texts(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "b", "text": "x" * 1_500_000}])
    assert read_all(CorpusConfig(path=str(path), max_text_chars=0)).doc_ids == ["b"]
    assert read_all(CorpusConfig(path=str(path))).rejects[0]["doc_id"] == "b"


# ------------------------------------------------------------------------------------------- files: errors


def _not_gzip(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    path.write_text(json.dumps(GOOD[0]) + "\n")
    return path


def _truncated_gzip(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    data = gzip.compress(("\n".join(json.dumps({"id": f"d{i}", "text": "t " * 50}) for i in range(500))).encode())
    path.write_bytes(data[: len(data) // 2])
    return path


def _junk_parquet(tmp_path):
    path = tmp_path / "c.parquet"
    path.write_bytes(os.urandom(3000))
    return path


def _cut_parquet(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", GOOD * 50)
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _latin1_first_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"id": "a", "text": "caf\xe9"}\n')
    return path


def _int_text_column(tmp_path):
    return write_parquet(tmp_path / "c.parquet", [{"id": "a", "text": 1}])


def _float_id_column(tmp_path):
    return write_parquet(tmp_path / "c.parquet", [{"id": 1.5, "text": "t"}])


def _mixed_id_types(tmp_path):
    write_parquet(tmp_path / "c" / "a.parquet", [{"id": 1, "text": "t"}])
    write_parquet(tmp_path / "c" / "b.parquet", [{"id": "2", "text": "t"}])
    return tmp_path / "c"


def _text_type_in_one_file(tmp_path):
    write_parquet(tmp_path / "c" / "a.parquet", GOOD)
    write_parquet(tmp_path / "c" / "b.parquet", [{"id": "x", "text": 7}])
    return tmp_path / "c"


def _no_match(tmp_path):
    return tmp_path / "nothing-*.parquet"


FILE_CASES = {
    "gzip that is not gzip": (_not_gzip, corpus.CorpusError, r"c\.jsonl\.gz' could not be read: BadGzipFile"),
    "gzip cut short": (_truncated_gzip, corpus.CorpusError, r"c\.jsonl\.gz' could not be read: EOFError"),
    "binary junk named .parquet": (_junk_parquet, corpus.CorpusError, r"c\.parquet' is not a readable Parquet file"),
    "Parquet cut mid-file": (_cut_parquet, corpus.CorpusError, r"c\.parquet' is not a readable Parquet file"),
    "JSONL first line not UTF-8": (_latin1_first_line, corpus.CorpusError, r"c\.jsonl': the first line is not UTF-8"),
    "text column not a string": (_int_text_column, corpus.CorpusError, r"c\.parquet': column 'text' is int64"),
    "id column of floats": (_float_id_column, corpus.CorpusError, r"id column 'id' is double; expected strings"),
    "ids of mixed types across files": (
        _mixed_id_types,
        corpus.CorpusError,
        r"integer values in '.*a\.parquet' and string values in '.*b\.parquet'",
    ),
    "files with different text types": (
        _text_type_in_one_file,
        corpus.CorpusError,
        r"b\.parquet': column 'text' is int64",
    ),
    "a path with no matches": (_no_match, FileNotFoundError, r"nothing-\*\.parquet' matches no file"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_an_unreadable_or_mistyped_file_is_an_error_naming_it(tmp_path, case):
    make, error, message = FILE_CASES[case]
    with pytest.raises(error, match=message):
        read_all(CorpusConfig(path=str(make(tmp_path))))


def test_duplicate_ids_within_and_across_files_are_found(tmp_path):
    write_parquet(tmp_path / "c" / "a.parquet", [{"id": "x", "text": "t"}, {"id": "x", "text": "u"}])
    write_parquet(tmp_path / "c" / "b.parquet", [{"id": "y", "text": "t"}, {"id": "z", "text": "u"}])
    write_parquet(tmp_path / "c" / "c.parquet", [{"id": "y", "text": "v"}])
    cfg = CorpusConfig(path=str(tmp_path / "c"))
    scratch = Folder(str(tmp_path / "out" / "_id_check"))
    assert sorted(id_check.find_duplicate_ids(corpus.inspect_corpus(cfg), cfg, scratch)) == ["x", "y"]


def test_an_empty_file_among_good_ones_is_skipped(tmp_path):
    write_parquet(tmp_path / "c" / "a.parquet", GOOD)
    write_parquet(tmp_path / "c" / "b.parquet", [], schema=pa.schema([("id", pa.string()), ("text", pa.string())]))
    (tmp_path / "c" / "c.jsonl").write_text("\n\n")
    assert read_all(CorpusConfig(path=str(tmp_path / "c"))).doc_ids == ["g1", "g2"]


def test_an_empty_corpus_is_an_error_before_any_work(tmp_path):
    from jobs import encode

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text("")
    cfg = load_config(None, [f"corpus.path={tmp_path / 'c'}", f"output.root={tmp_path / 'out'}"])
    with pytest.raises(corpus.CorpusError, match="holds no rows"):
        encode.run(cfg)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- queries, qrels and pairs


def test_queries_that_are_empty_or_not_gzip_or_not_parquet_name_the_file(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"_id": "1", "text": "fine"}, {"_id": "2", "text": "   "}])
    with pytest.raises(judgements.EvaluationDataError, match=r"q\.jsonl' line 2: field 'text' of query '2' must be"):
        judgements.read_queries(str(tmp_path / "q.jsonl"))
    (tmp_path / "q.jsonl.gz").write_text('{"_id": "1", "text": "fine"}\n')
    with pytest.raises(judgements.EvaluationDataError, match=r"q\.jsonl\.gz' could not be read after line 0"):
        judgements.read_queries(str(tmp_path / "q.jsonl.gz"))
    (tmp_path / "q.parquet").write_bytes(b"PAR1 junk")
    with pytest.raises(judgements.EvaluationDataError, match=r"q\.parquet' is not a readable Parquet file"):
        judgements.read_queries(str(tmp_path / "q.parquet"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("q1\td1\t1\nq2\td2\n", r"qrels\.tsv' line 3: expected 3 tab-separated fields"),
        ("q1\td1\tx\n", r"qrels\.tsv' line 2: .*score must be an integer"),
    ],
)
def test_malformed_qrels_lines_name_file_and_line(tmp_path, text, message):
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + text)
    with pytest.raises(judgements.EvaluationDataError, match=message):
        judgements.read_qrels(str(tmp_path / "qrels.tsv"))


@pytest.mark.parametrize(
    "row, message",
    [
        ({"query": "   ", "positive": "d1"}, r"'query' must be a non-empty string"),
        ({"query": "q", "positive": 1.0}, r"'positive' must hold a doc id"),
        ({"query": "q", "positive": [{"id": "d1"}]}, r"'positive' must hold a doc id"),
        ({"query": "q", "positive": []}, r"'positive' must hold a doc id"),
    ],
)
def test_bad_pairs_name_the_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"query": "fine", "positive": "d0"}, row])
    with pytest.raises(mine_input.PairsError, match=rf"pairs\.jsonl' line 2: {message}"):
        mine_input.load_queries(MineConfig(pairs_path=str(path)))


def test_positives_missing_from_the_corpus_are_rejects():
    queries = [mine_input.MiningQuery("q1", "text", ["d1", "gone"]), mine_input.MiningQuery("q2", "text", ["gone"])]
    kept, rejects = mine_input.resolve_positives(queries, {"d1": 0})
    assert [q.query_id for q in kept] == ["q1"]
    assert [(r["query_id"], r["doc_id"], r["reason"]) for r in rejects] == [
        ("q1", "gone", "positive not in corpus"),
        ("q2", "gone", "positive not in corpus"),
    ]


# ----------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.batchsize=8", r"unknown config key 'model.batchsize'; did you mean 'model.batch_size'"),
        ("model.batch_size=many", r"'model.batch_size' = 'many': expected an integer"),
        ("runtime.rows_per_shard=-5", r"'runtime.rows_per_shard' = -5: expected >= 0"),
        ("model.batch_size=0", r"'model.batch_size' = 0: expected a positive integer"),
        ("index.type=HNSW0", r"HNSW0 needs HNSW<n> with n >= 2"),
        ("index.type=IVF0,Flat", r"IVF0 needs IVF<n> with n >= 1"),
        ("corpus.path=[1, 2]", r"'corpus.path' = \[1, 2\]: expected a path or URL"),
        ("model.name=''", r"'model.name' is empty"),
    ],
)
def test_a_bad_config_value_names_the_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"model:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c\.yaml' is not UTF-8 text"):
        load_config(str(tmp_path / "c.yaml"))


def test_an_index_type_faiss_rejects_is_named():
    from retrieval_core.index.faiss_index import IndexTypeError

    with pytest.raises(IndexTypeError, match=r"index.type = 'IVF8,Bogus' is not a FAISS factory string"):
        faiss_index.new_index("IVF8,Bogus", 8, "ip")


# ------------------------------------------------------------------------------------ models and vectors


@pytest.mark.parametrize("files", [{}, {"config.json": "{}", "modules.json": "[]"}], ids=["empty", "config-only"])
def test_a_model_directory_without_weights_is_refused_before_any_work(tmp_path, files):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match="holds no weight files"):
        encoding.encoder_identity(ModelConfig(name=str(tmp_path)))


def test_query_vectors_of_another_dimension_are_an_error_naming_both():
    index = faiss_index.new_index("Flat", 8, "ip")
    with pytest.raises(ValueError, match=r"shape \(2, 4\) for an index of 8-dimensional vectors"):
        faiss_index.search(index, np.zeros((2, 4), np.float32), 1)


def test_embeddings_of_another_dimension_than_the_manifest_are_an_error_naming_the_shard(tmp_path):
    manifest = write_synthetic_embeddings(tmp_path, np.eye(8, dtype=np.float32), shard_rows=4)
    with pytest.raises(embeddings.IncompatibleOutputError, match=r"shard-00000\.parquet' holds 8-dimensional vectors"):
        embeddings.read_shard_vectors(Folder(str(tmp_path)), manifest["shards"][0], 4)


# ------------------------------------------------------------------- the output root: nothing leads out of it


def test_a_tampered_current_cannot_lead_out_of_the_root(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "CURRENT").write_text(json.dumps({"version": "../../victim"}))
    with pytest.raises(versions.VersionError, match="is not a version name"):
        versions.resolve_root(Folder(str(tmp_path / "root")))


def test_a_tampered_build_record_cannot_remove_outside_the_root(tmp_path):
    root, victim = tmp_path / "root", tmp_path / "victim"
    (root / "versions").mkdir(parents=True)
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    storage.write_json_atomic(str(root / refreshing.BUILD_RECORD), {"version": "../../victim", "identity": {}})
    cfg = load_config(None, [f"output.root={root}"])
    with pytest.raises(versions.VersionError, match="is not a version name"):
        refreshing._resume_or_start(cfg, {"other": "identity"})
    assert (victim / "keep.txt").read_text() == "precious"


def test_a_manifest_naming_a_shard_outside_the_root_is_refused(tmp_path):
    """In the shard table (refused as it is read) and in a manifest holding its shards inline (as it is opened)."""
    write_synthetic_embeddings(tmp_path, np.eye(8, dtype=np.float32), shard_rows=4)
    table_url = tmp_path / "embeddings" / "_shard_list.parquet"
    table = pq.read_table(table_url)
    names = table.column("name").to_pylist()
    pq.write_table(table.set_column(0, "name", pa.array(["../../escape", *names[1:]])), table_url)
    shards = embeddings.read_embeddings_manifest(Folder(str(tmp_path)))["shards"]
    with pytest.raises(embeddings.IncompatibleOutputError, match=r"names shards \['../../escape'\]"):
        list(shards)
    inline = tmp_path / "inline"
    write_synthetic_embeddings(inline, np.eye(8, dtype=np.float32), shard_rows=4, inline=True)
    url = inline / "embeddings" / "_manifest.json"
    manifest = json.loads(url.read_text())
    manifest["shards"][0]["name"] = "../../escape"
    url.write_text(json.dumps(manifest))
    with pytest.raises(embeddings.IncompatibleOutputError, match=r"names shards \['../../escape'\]"):
        embeddings.read_embeddings_manifest(Folder(str(inline)))


def test_ids_that_look_like_paths_stay_data(tmp_path, tiny_model):
    """Doc ids never become file names: the encode job (in this process) writes only under its root."""
    from jobs import encode

    ids = ["../../escape", "/etc/passwd", "a/b", "..", "C:\\x"]
    path = write_jsonl(tmp_path / "corpus" / "c.jsonl", [{"id": i, "text": f"text {n}"} for n, i in enumerate(ids)])
    cfg = load_config(
        None,
        [
            f"corpus.path={path}",
            f"output.root={tmp_path / 'out'}",
            f"model.name={tiny_model}",
            "runtime.progress=false",
        ],
    )
    encode.run(cfg)
    assert embeddings.load_embeddings(Folder(str(tmp_path / "out")))[2] == ids
    written = {os.path.relpath(os.path.join(d, f), tmp_path) for d, _, names in os.walk(tmp_path) for f in names}
    assert all(w.startswith(("out/", "corpus/")) for w in written), written


def test_remote_code_stays_off_unless_set():
    assert ModelConfig().trust_remote_code is False
    assert load_config(None, []).model.trust_remote_code is False


def test_more_ivf_lists_than_training_vectors_is_named_before_training(tmp_path):
    from retrieval_core.index import indexing
    from retrieval_core.index.faiss_index import IndexTypeError

    write_synthetic_embeddings(tmp_path, np.eye(20, 8, dtype=np.float32) + 0.01, shard_rows=10, normalized=False)
    cfg = load_config(None, [f"output.root={tmp_path}", "index.type=IVF64,Flat", "index.metric=l2"])
    with pytest.raises(IndexTypeError, match=r"'IVF64,Flat' has 64 IVF lists but only 20 training vectors"):
        indexing.prepare(cfg)


@pytest.mark.parametrize(
    ("setting", "module", "extra"),
    [
        ("model.provider=openai", "openai", "openai"),
        ("output.root=s3://bucket/out", "s3fs", "s3"),
        ("model.backend=openvino", "openvino", "openvino"),
    ],
)
def test_a_setting_whose_extra_is_not_installed_is_refused_in_one_line_naming_the_extra(
    monkeypatch, tmp_path, setting, module, extra
):
    from jobs import encode
    from retrieval_core.config import rules

    monkeypatch.setattr(rules, "installed", lambda name: name != module)
    argv = ["--set", f"output.root={tmp_path / 'out'}", "--set", setting]
    if "provider" in setting:
        argv += ["--set", "model.name=text-embedding-3-small"]
    with pytest.raises(SystemExit) as stopped:
        encode.main(argv)
    message = str(stopped.value.code)
    assert message.startswith("config error: ") and "\n" not in message
    assert f"needs the package '{module}', which is not installed: pip install 'ray-retrieval-jobs[{extra}]'" in message
    assert not (tmp_path / "out").exists()
