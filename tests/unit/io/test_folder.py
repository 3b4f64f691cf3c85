import pyarrow as pa
import pytest

from retrieval_core.encode import embeddings
from retrieval_core.index import indexing
from retrieval_core.io.folder import Folder, StageLayout
from retrieval_core.mine import mining
from retrieval_core.refresh import diffing


@pytest.fixture(params=["local", "memory"])
def folder(request, tmp_path):
    url = str(tmp_path / "f") if request.param == "local" else f"memory://folder-test/{tmp_path.name}"
    return Folder(url, {})


def test_a_folder_reads_back_what_it_wrote(folder):
    folder.write_json({"a": 1}, "x", "record.json")
    folder.write_bytes(b"raw", "x", "blob.bin")
    folder.write_parquet(pa.table({"n": [1, 2]}), "x", "t.parquet")
    assert folder.exists("x", "record.json") and not folder.exists("x", "missing.json")
    assert folder.read_json("x", "record.json") == {"a": 1}
    assert folder.read_bytes("x", "blob.bin") == b"raw"
    assert folder.read_parquet("x", "t.parquet", columns=["n"]).column("n").to_pylist() == [1, 2]
    sub = folder.sub("x")
    assert sub.storage_options is folder.storage_options and sub.read_json("record.json") == {"a": 1}
    assert sorted(sub.list_names()) == ["blob.bin", "record.json", "t.parquet"]
    with folder.open_atomic("y.bin") as handle:
        handle.write(b"whole")
    assert folder.read_bytes("y.bin") == b"whole"


def test_storage_options_stay_out_of_reprs():
    secret = {"key": "AKIA-SECRET"}
    assert "AKIA" not in repr(Folder("s3://b/p", secret))
    assert "AKIA" not in repr(StageLayout("s3://b/p", "embeddings", secret))


def test_every_stage_keeps_its_documented_paths():
    """One StageLayout gives each stage the paths its docs (and every earlier run's files) name."""
    enc = embeddings.layout_at("/r")
    assert (enc.plan, enc.manifest) == ("/r/embeddings/_plan.json", "/r/embeddings/_manifest.json")
    assert enc.data_file("shard-00003") == "/r/embeddings/shard-00003.parquet"
    assert enc.record_file("shard-00003") == "/r/embeddings/_shards/shard-00003.json"
    assert enc.rejects_file("shard-00003") == "/r/rejects/encode/shard-00003.parquet"
    ix = indexing.layout_at("/r")
    assert (ix.dir, ix.manifest) == ("/r/index", "/r/index/manifest.json")
    assert ix.file("merged.faiss") == "/r/index/merged.faiss"
    assert ix.record_file("shard-00001") == "/r/index/_shards/shard-00001.json"
    mi = mining.layout_at("/r")
    assert mi.data_file(7) == "/r/negatives/part-00007.parquet"
    assert mi.record_file(7) == "/r/negatives/_parts/part-00007.json"
    assert mi.manifest == "/r/negatives/_manifest.json"
    diff = diffing.layout_at("/r/versions/v1")
    assert diff.record_file(2) == "/r/versions/v1/_diff/_buckets/b00002.json"
    assert diffing.bucket_file(diff, "encode", 2) == "/r/versions/v1/_diff/encode/b00002.parquet"
    assert diffing.map_record(diff, "new", "shard-00000") == "/r/versions/v1/_diff/new/_done/shard-00000.json"
    assert (
        diffing.tombstone_file(diff, "shard-00004", 2) == "/r/versions/v1/_diff/tombstones/shard-00004/b00002.parquet"
    )


def test_a_stage_without_rejects_says_so():
    with pytest.raises(ValueError, match="/r/index keeps no rejects"):
        _ = indexing.layout_at("/r").rejects_dir
