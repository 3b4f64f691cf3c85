"""Versions of an output root: names, CURRENT, rollback, resolve_root, the lock, retention, leases, paths."""
import json
import logging
import os
import socket
import threading
from datetime import datetime, timedelta, timezone

import pytest

from retrieval_core import storage, versions
from retrieval_core.versions import LockedError, VersionError

MEMORY_ROOT = "memory://versions-test/out"


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "out")
        return
    storage.remove("memory://versions-test")
    yield MEMORY_ROOT
    storage.remove("memory://versions-test")


def make_version(root, name, complete=True, published=False, files=("embeddings/shard-00000.parquet",)):
    base = versions.version_root(root, name)
    for f in files:
        storage.write_bytes_atomic(storage.join(base, f), b"data")
    if complete is not None:
        storage.write_json_atomic(storage.join(base, "refresh.json"), {"complete": complete, "published": published})
    return base


def iso(seconds_ago: float) -> str:
    moment = datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------------- names

def test_names_are_sequential_unique_and_sort_by_time(root):
    start = datetime(2024, 1, 31, 23, 59, 59, tzinfo=timezone.utc)
    made = []
    for i in range(12):
        name = versions.new_version_name(root, now=start + timedelta(hours=i))
        make_version(root, name, complete=i % 3 != 0)  # incomplete ones still take their number
        made.append(name)
    assert made[0] == "v000001-20240131T235959Z"
    assert made[1] == "v000002-20240201T005959Z"
    assert [versions.parse_version_seq(n) for n in made] == list(range(1, 13))
    assert len(set(made)) == 12 and made == sorted(made)
    assert versions.list_versions(root) == made


def test_name_with_the_same_second_is_still_unique(root):
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
    first = versions.new_version_name(root, now=now)
    make_version(root, first)
    second = versions.new_version_name(root, now=now)
    assert first != second and versions.list_versions(root + "/") == [first] and second > first


def test_naive_and_other_zone_times_are_utc(root):
    assert versions.new_version_name(root, now=datetime(2024, 1, 1, 10, 0, 0)) == "v000001-20240101T100000Z"
    plus2 = timezone(timedelta(hours=2))
    assert versions.new_version_name(root, now=datetime(2024, 1, 1, 10, 0, 0, tzinfo=plus2)).endswith("T080000Z")


def test_listing_ignores_other_entries_and_orders_past_999999(root):
    make_version(root, "v000002-20240101T000000Z")
    make_version(root, "v1000000-20240102T000000Z")
    make_version(root, "v000010-20240103T000000Z")
    storage.write_bytes_atomic(storage.join(root, "versions", "notes.txt"), b"x")
    assert versions.list_versions(root) == ["v000002-20240101T000000Z", "v000010-20240103T000000Z",
                                            "v1000000-20240102T000000Z"]
    assert versions.new_version_name(root).startswith("v1000001-")
    assert versions.list_versions(storage.join(root, "nothing-here")) == []


def test_parse_rejects_bad_names():
    assert versions.parse_version_seq("v000042-20240101T000000Z") == 42
    for bad in ("v42", "version-1", "v000001-2024", "../v000001-20240101T000000Z"):
        with pytest.raises(VersionError, match=bad.replace(".", r"\.")):
            versions.parse_version_seq(bad)


def test_version_root_is_under_versions(root):
    assert versions.version_root(root, "v000001-20240101T000000Z") == f"{root}/versions/v000001-20240101T000000Z"


# ---------------------------------------------------------------------------------------------------- CURRENT

def test_publish_refuses_incomplete_or_unfinished_versions(root):
    make_version(root, "v000001-20240101T000000Z", complete=False)
    make_version(root, "v000002-20240102T000000Z", complete=None)  # no refresh.json yet
    for name in ("v000001-20240101T000000Z", "v000002-20240102T000000Z", "v000003-20240103T000000Z"):
        with pytest.raises(VersionError, match=name):
            versions.publish(root, name)
    assert versions.read_current(root) is None


def test_publish_writes_current_and_tracks_previous(root):
    a, b = "v000001-20240101T000000Z", "v000002-20240102T000000Z"
    make_version(root, a)
    make_version(root, b)
    first = versions.publish(root, a)
    assert first["version"] == a and first["previous"] is None and first["published_at"].endswith("Z")
    second = versions.publish(root, b)
    assert versions.read_current(root) == second
    assert second["version"] == b and second["previous"] == a
    assert versions.publish(root, b, previous="custom")["previous"] == "custom"


def test_current_is_replaced_atomically_on_disk(tmp_path):
    root = str(tmp_path / "out")
    names = ["v000001-20240101T000000Z", "v000002-20240102T000000Z"]
    for n in names:
        make_version(root, n)
    versions.publish(root, names[0])
    seen, errors, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                with open(os.path.join(root, "CURRENT")) as handle:
                    seen.append(json.load(handle)["version"])
            except Exception as exc:  # a partial or missing file would land here
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(200):
            versions.publish(root, names[(i + 1) % 2])
    finally:
        stop.set()
        thread.join()
    assert errors == [] and seen and set(seen) <= set(names)
    assert sorted(os.listdir(root)) == ["CURRENT", "versions"]  # no temporary left
    assert versions.read_current(root)["version"] == names[0]  # 200 flips end on names[0]


def test_publish_on_memory_leaves_only_the_new_current():
    storage.remove("memory://versions-test")
    try:
        a, b = "v000001-20240101T000000Z", "v000002-20240102T000000Z"
        make_version(MEMORY_ROOT, a)
        make_version(MEMORY_ROOT, b)
        versions.publish(MEMORY_ROOT, a)
        versions.publish(MEMORY_ROOT, b)
        assert storage.list_names(MEMORY_ROOT) == ["CURRENT", "versions"]
        assert storage.read_json(storage.join(MEMORY_ROOT, "CURRENT"))["version"] == b
    finally:
        storage.remove("memory://versions-test")


def test_rollback_to_an_earlier_complete_version(root):
    a, b, c = "v000001-20240101T000000Z", "v000002-20240102T000000Z", "v000003-20240103T000000Z"
    make_version(root, a, published=False)  # complete but never published: still a valid target
    make_version(root, b, published=True)
    make_version(root, c, published=True)
    versions.publish(root, b)
    versions.publish(root, c)
    current = versions.rollback(root, a)
    assert current["version"] == a and current["previous"] == c
    assert versions.read_current(root) == current
    assert versions.resolve_root(root) == (versions.version_root(root, a), a)


def test_rollback_refuses_unknown_and_incomplete_listing_complete_ones(root):
    a, b, bad = "v000001-20240101T000000Z", "v000002-20240102T000000Z", "v000003-20240103T000000Z"
    make_version(root, a)
    make_version(root, b)
    make_version(root, bad, complete=False)
    versions.publish(root, b)
    with pytest.raises(VersionError, match="not complete") as info:
        versions.rollback(root, bad)
    assert bad in str(info.value) and a in str(info.value) and b in str(info.value)
    with pytest.raises(VersionError, match="does not exist") as info:
        versions.rollback(root, "v000009-20240109T000000Z")
    assert "v000009-20240109T000000Z" in str(info.value) and a in str(info.value) and b in str(info.value)
    assert versions.read_current(root)["version"] == b


# ---------------------------------------------------------------------------------------------------- resolve_root

def test_resolve_plain_root_without_versions(root):
    storage.write_json_atomic(storage.join(root, "embeddings", "_manifest.json"), {"n": 1})
    assert versions.resolve_root(root) == (root, None)


def test_resolve_follows_current_and_explicit_versions(root):
    a, b = "v000001-20240101T000000Z", "v000002-20240102T000000Z"
    make_version(root, a)
    make_version(root, b)
    versions.publish(root, a)
    assert versions.resolve_root(root) == (versions.version_root(root, a), a)
    assert versions.resolve_root(root, version=b) == (versions.version_root(root, b), b)


def test_resolve_missing_versions_are_errors(root):
    a = "v000001-20240101T000000Z"
    make_version(root, a)
    with pytest.raises(VersionError, match="v000005-20240105T000000Z") as info:
        versions.resolve_root(root, version="v000005-20240105T000000Z")
    assert a in str(info.value)
    versions.publish(root, a)
    storage.remove(versions.version_root(root, a))
    with pytest.raises(VersionError) as info:
        versions.resolve_root(root)
    assert a in str(info.value) and "CURRENT" in str(info.value) and versions.version_root(root, a) in str(info.value)


# ---------------------------------------------------------------------------------------------------- lock

def test_second_acquire_is_refused_naming_the_holder(root):
    lock = versions.acquire_lock(root, timeout_s=3600, owner={"job": "refresh"})
    assert {"host", "pid", "started_at", "token"} <= set(lock) and lock["job"] == "refresh"
    assert storage.read_json(versions.lock_url(root)) == lock
    with pytest.raises(LockedError) as info:
        versions.acquire_lock(root, timeout_s=3600)
    message = str(info.value)
    for part in (lock["host"], str(lock["pid"]), lock["started_at"], versions.lock_url(root), "remove"):
        assert part in message
    assert versions.release_lock(root, None, lock) is True
    assert not storage.exists(versions.lock_url(root))
    again = versions.acquire_lock(root, timeout_s=3600)
    assert again["token"] != lock["token"]
    versions.release_lock(root, None, again)


def test_stale_lock_is_taken_over_with_a_warning(root, caplog):
    stale = {"host": "old-host", "pid": 4242, "started_at": iso(7200), "token": "old-token"}
    storage.write_json_atomic(versions.lock_url(root), stale)
    with caplog.at_level(logging.WARNING, logger="retrieval_core.versions"):
        lock = versions.acquire_lock(root, timeout_s=3600)
    assert lock["token"] != "old-token"
    assert storage.read_json(versions.lock_url(root))["token"] == lock["token"]
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "old-host" in warning and "4242" in warning and stale["started_at"] in warning


def test_a_lock_whose_process_is_gone_from_this_host_is_taken_over(root, caplog):
    """A refresh killed with SIGKILL leaves its lock; on the same host, a dead pid makes it stale at once."""
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    fresh = {"host": socket.gethostname(), "pid": pid, "started_at": iso(5), "token": "killed-token"}
    storage.write_json_atomic(versions.lock_url(root), fresh)
    with caplog.at_level(logging.WARNING, logger="retrieval_core.versions"):
        lock = versions.acquire_lock(root, timeout_s=3600)
    assert lock["token"] != "killed-token"
    assert "no longer runs on this host" in caplog.text
    versions.release_lock(root, None, lock)
    alive = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": iso(5), "token": "live-token"}
    storage.write_json_atomic(versions.lock_url(root), alive)
    with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
        versions.acquire_lock(root, timeout_s=3600)


def test_unreadable_lock_is_stale(root, caplog):
    storage.write_bytes_atomic(versions.lock_url(root), b"{not json")
    with caplog.at_level(logging.WARNING, logger="retrieval_core.versions"):
        lock = versions.acquire_lock(root, timeout_s=3600)
    assert storage.read_json(versions.lock_url(root))["token"] == lock["token"]
    assert any("stale" in r.getMessage() for r in caplog.records)


def test_release_only_with_our_token(root):
    lock = versions.acquire_lock(root, timeout_s=3600)
    assert versions.release_lock(root, None, {**lock, "token": "someone-else"}) is False
    assert storage.exists(versions.lock_url(root))
    # someone took the lock over from us: our release leaves theirs alone
    theirs = {**lock, "host": "other", "token": "theirs"}
    storage.write_json_atomic(versions.lock_url(root), theirs)
    assert versions.release_lock(root, None, lock) is False
    assert storage.read_json(versions.lock_url(root))["token"] == "theirs"
    storage.remove(versions.lock_url(root))
    assert versions.release_lock(root, None, lock) is False


def test_locked_context_releases_on_error(root):
    with pytest.raises(RuntimeError, match="boom"):
        with versions.locked(root, None, 3600) as lock:
            assert storage.read_json(versions.lock_url(root))["token"] == lock["token"]
            with pytest.raises(LockedError):
                with versions.locked(root, None, 3600):
                    pass
            raise RuntimeError("boom")
    assert not storage.exists(versions.lock_url(root))


def test_local_lock_is_created_exclusively(tmp_path):
    root = str(tmp_path / "out")
    results, barrier = [], threading.Barrier(8)

    def contend():
        barrier.wait()
        try:
            results.append(versions.acquire_lock(root, timeout_s=3600))
        except LockedError:
            results.append(None)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r]
    assert len(results) == 8 and len(winners) == 1
    assert storage.read_json(versions.lock_url(root))["token"] == winners[0]["token"]
    assert os.listdir(tmp_path / "out" / "_refresh") == ["lock.json"]


# ---------------------------------------------------------------------------------------------------- retention

NAMES = [f"v{i:06d}-202401{i:02d}T000000Z" for i in range(1, 8)]


def test_retention_keeps_newest_current_and_in_use():
    assert versions.versions_to_delete(NAMES, NAMES[-1], 3, set()) == NAMES[:4]
    assert versions.versions_to_delete(list(reversed(NAMES)), NAMES[1], 3, {NAMES[2]}) == [NAMES[0], NAMES[3]]
    assert versions.versions_to_delete(NAMES, NAMES[0], 10, set()) == []
    assert versions.versions_to_delete(NAMES, None, 0, set(NAMES[:6])) == [NAMES[6]]
    assert versions.versions_to_delete([], None, 2, set()) == []
    with pytest.raises(ValueError, match="-1"):
        versions.versions_to_delete(NAMES, None, -1, set())


def test_retention_never_deletes_current_or_in_use_whatever_keep():
    for keep in range(0, 9):
        for current in NAMES:
            doomed = versions.versions_to_delete(NAMES, current, keep, {NAMES[3]})
            assert current not in doomed and NAMES[3] not in doomed
            newest = NAMES[max(0, len(NAMES) - keep):]
            assert not set(doomed) & set(newest)
            assert set(doomed) == set(NAMES) - set(newest) - {current, NAMES[3]}


def test_delete_version_files_keeps_referenced_files(root):
    old = "v000001-20240101T000000Z"
    base = make_version(root, old, files=("embeddings/shard-00000.parquet", "embeddings/shard-00001.parquet",
                                          "index/index.faiss", "eval/metrics.json"))
    shared = storage.join(base, "embeddings", "shard-00001.parquet")
    deleted = versions.delete_version_files(root, old, None, referenced={shared})
    assert deleted == 4  # three files and refresh.json
    assert storage.exists(shared)
    assert storage.read_bytes(shared) == b"data"
    assert storage.list_names(base) == ["embeddings"]
    assert storage.list_names(storage.join(base, "embeddings")) == ["shard-00001.parquet"]
    assert versions.delete_version_files(root, old, None, referenced=set()) == 1
    assert not storage.exists(base)
    assert versions.list_versions(root) == []
    assert versions.delete_version_files(root, old, None, referenced=set()) == 0


def test_delete_version_files_matches_referenced_urls_by_location(tmp_path):
    root = str(tmp_path / "out")
    name = "v000001-20240101T000000Z"
    base = make_version(root, name, files=("embeddings/a.parquet", "embeddings/b.parquet"))
    as_file_url = "file://" + storage.join(base, "embeddings", "a.parquet")
    assert versions.delete_version_files(root, name, None, {as_file_url}) == 2
    assert os.listdir(os.path.join(base, "embeddings")) == ["a.parquet"]


# ---------------------------------------------------------------------------------------------------- readers

def test_reader_leases_fresh_and_stale(root):
    a, b, c = "v000001-20240101T000000Z", "v000002-20240102T000000Z", "v000003-20240103T000000Z"
    for n in (a, b, c):
        make_version(root, n)
    lease_a = versions.register_reader(root, a)
    lease_b = versions.register_reader(root, b)
    assert lease_a.startswith(storage.join(versions.version_root(root, a), "_readers") + "/")
    assert storage.read_json(lease_a)["pid"] == os.getpid()
    assert versions.readers_in_use(root, max_age_s=3600) == {a, b}
    record = storage.read_json(lease_b)
    storage.write_json_atomic(lease_b, {**record, "heartbeat_at": iso(7200)})  # b's reader went quiet
    storage.write_bytes_atomic(storage.join(versions.version_root(root, c), "_readers", "x.json"), b"garbage")
    assert versions.readers_in_use(root, max_age_s=3600) == {a}
    versions.renew_reader(lease_b)
    assert versions.readers_in_use(root, max_age_s=3600) == {a, b}
    versions.release_reader(lease_a)
    versions.release_reader(lease_a)  # twice is harmless
    assert versions.readers_in_use(root, max_age_s=3600) == {b}


def test_register_reader_of_a_missing_version_names_it(root):
    with pytest.raises(VersionError, match="v000004-20240104T000000Z"):
        versions.register_reader(root, "v000004-20240104T000000Z")


# ---------------------------------------------------------------------------------------------------- relative paths

def test_resolve_relative_on_s3_keeps_the_protocol():
    got = versions.resolve_relative("s3://b/r/versions/v2/embeddings", "../../v1/embeddings/shard-00001.parquet")
    assert got == "s3://b/r/versions/v1/embeddings/shard-00001.parquet"
    assert versions.resolve_relative("s3://b/r/", "./x/../y") == "s3://b/r/y"
    assert versions.resolve_relative("s3://b", "k") == "s3://b/k"
    assert versions.resolve_relative("gs://b/r", "s3://other/x") == "s3://other/x"  # absolute: as it is
    with pytest.raises(ValueError, match="climbs"):
        versions.resolve_relative("s3://b/r", "../../other-bucket/x")


@pytest.mark.parametrize("from_dir,target", [
    ("s3://b/r/versions/v2/embeddings", "s3://b/r/versions/v1/embeddings/shard-00001.parquet"),
    ("s3://b/r/versions/v2/embeddings", "s3://b/r/versions/v2/embeddings/shard-00001.parquet"),
    ("s3://b/r/versions/v2/embeddings", "s3://b/other/x.parquet"),
    ("s3://b", "s3://b/a/b/c"),
    ("memory://versions-test/out/versions/v2/embeddings", "memory://versions-test/out/versions/v1/e/s.parquet"),
    ("memory:///versions-test/out/versions/v2", "memory:///versions-test/x"),
    ("file:///data/out/versions/v2/embeddings", "file:///data/out/versions/v1/embeddings/s.parquet"),
    ("/data/out/versions/v2/embeddings", "/data/out/versions/v1/embeddings/s.parquet"),
    ("/data/out/versions/v2/embeddings", "/other/s.parquet"),
    ("out/versions/v2/embeddings", "out/versions/v1/embeddings/s.parquet"),
    ("out/versions/v2", "elsewhere/s.parquet"),
])
def test_relative_to_and_resolve_relative_round_trip(from_dir, target):
    relative = versions.relative_to(from_dir, target)
    assert "://" not in relative and not relative.startswith("/")
    assert versions.resolve_relative(from_dir, relative) == target


def test_relative_to_refuses_other_protocols_and_buckets():
    for a, b in (("s3://b/r", "s3://c/r"), ("s3://b/r", "gs://b/r"), ("/data/r", "s3://b/r"),
                 ("/data/r", "relative/r")):
        with pytest.raises(ValueError, match="same protocol"):
            versions.relative_to(a, b)


def test_relative_paths_resolve_to_real_files(root):
    shard = storage.join(versions.version_root(root, "v000001-20240101T000000Z"), "embeddings", "s.parquet")
    storage.write_bytes_atomic(shard, b"shared")
    here = storage.join(versions.version_root(root, "v000002-20240102T000000Z"), "embeddings")
    relative = versions.relative_to(here, shard)
    assert relative == "../../v000001-20240101T000000Z/embeddings/s.parquet"
    assert storage.read_bytes(versions.resolve_relative(here, relative)) == b"shared"


@pytest.mark.parametrize("job", ["encode", "index", "evaluate", "mine", "train", "pipeline"])
def test_a_second_job_writing_the_same_root_is_refused_naming_the_holder(tmp_path, caplog, job):
    """Two overlapping runs (cron, say) on one root: the second exits 1 before any work, naming the first."""
    import importlib

    root = str(tmp_path / "out")
    held = versions.acquire_lock(root, None, 3600, owner={"host": "nightly-7", "pid": 4242, "job": "jobs.encode"},
                                 path=versions.JOB_LOCK_PATH, what="job")
    module = importlib.import_module(f"jobs.{job}")
    with caplog.at_level(logging.ERROR, logger="jobs"):
        assert module.main(["--set", f"output.root={root}", "--set", "runtime.progress=false"]) == 1
    message = " ".join(r.getMessage() for r in caplog.records)
    assert f"the job lock '{root}/_lock.json' is held by host nightly-7 pid 4242" in message
    assert sorted(os.listdir(root)) == ["_lock.json"]  # nothing else was written
    assert storage.read_json(versions.lock_url(root, versions.JOB_LOCK_PATH))["token"] == held["token"]


def test_a_job_lock_left_by_a_killed_job_on_this_host_is_taken_over(tmp_path):
    root = str(tmp_path / "out")
    dead = {"host": socket.gethostname(), "pid": 2 ** 22 + 7, "started_at": iso(10), "token": "dead"}
    storage.write_json_atomic(versions.lock_url(root, versions.JOB_LOCK_PATH), dead)
    with versions.locked(root, None, 3600, path=versions.JOB_LOCK_PATH, what="job") as lock:
        assert storage.read_json(versions.lock_url(root, versions.JOB_LOCK_PATH))["token"] == lock["token"]
    assert not storage.exists(versions.lock_url(root, versions.JOB_LOCK_PATH))
