"""Storage helpers: parallel reads in order, and the node's file cache of object-store files (io.file_cache)."""

from __future__ import annotations

import os

import fsspec
import pytest

from retrieval_core.io import file_cache, storage


def test_read_json_many_keeps_the_order_of_the_urls(tmp_path):
    urls = [str(tmp_path / f"r{i}.json") for i in range(40)]
    for i, url in enumerate(urls):
        storage.write_json_atomic(url, {"i": i})
    assert [r["i"] for r in storage.read_json_many(list(reversed(urls)))] == list(range(39, -1, -1))


def test_a_local_file_is_its_own_copy(tmp_path):
    path = tmp_path / "merged.faiss"
    path.write_bytes(b"x")
    assert file_cache.local_copy(str(path)) == str(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("RETRIEVAL_FILE_CACHE", str(folder))
    yield folder
    fsspec.filesystem("memory").rm("/cache-test", recursive=True)


def test_an_object_is_downloaded_once_and_again_when_rewritten(cache):
    url = "memory://cache-test/v1/index/merged.faiss"
    storage.write_bytes_atomic(url, b"first")
    copy = file_cache.local_copy(url)
    assert open(copy, "rb").read() == b"first" and os.path.dirname(copy) == str(cache)
    os.utime(copy, (0, 0))
    assert file_cache.local_copy(url) == copy and os.path.getmtime(copy) > 0  # the same copy, marked as used
    storage.write_bytes_atomic(url, b"second, longer")
    again = file_cache.local_copy(url)
    assert again != copy and open(again, "rb").read() == b"second, longer"


def test_the_cache_keeps_the_copies_of_a_name_used_last(cache):
    copies = []
    for version in range(5):
        url = f"memory://cache-test/v{version}/index/merged.faiss"
        storage.write_bytes_atomic(url, f"version {version}".encode())
        copies.append(file_cache.local_copy(url))
        os.utime(copies[-1], (version + 1, version + 1))  # distinct times, in the order used
    other = "memory://cache-test/v0/index/trained.faiss"
    storage.write_bytes_atomic(other, b"trained")
    kept = sorted(os.listdir(cache))
    assert [os.path.exists(c) for c in copies] == [False, False, True, True, True]
    assert os.path.exists(file_cache.local_copy(other)) and len(kept) == 4  # 3 copies + the lock


def test_decompressed_copies_of_files_sharing_a_name_do_not_evict_each_other(tmp_path, monkeypatch):
    """Five nights' part-00000.jsonl.gz in five folders: each keeps its copy (copies are grouped by URL here, by
    name for the downloads of an index's versions), and a second call returns the same copy."""
    import gzip

    monkeypatch.setenv("RETRIEVAL_FILE_CACHE", str(tmp_path / "cache"))
    copies = []
    for night in range(5):
        path = tmp_path / f"day{night}" / "part-00000.jsonl.gz"
        path.parent.mkdir()
        path.write_bytes(gzip.compress(f'{{"id": "{night}"}}\n'.encode()))
        copies.append(file_cache.decompressed_copy(str(path)))
    assert all(os.path.exists(c) for c in copies) and len(set(copies)) == 5
    assert [open(c).read() for c in copies] == [f'{{"id": "{n}"}}\n' for n in range(5)]
    assert [file_cache.decompressed_copy(str(tmp_path / f"day{n}" / "part-00000.jsonl.gz")) for n in range(5)] == copies
