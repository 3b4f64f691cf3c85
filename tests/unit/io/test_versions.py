"""Versions of an output root: names, CURRENT, rollback, resolve_root, the lock, retention, leases, paths."""

import json
import os
import socket
import threading
from datetime import datetime, timedelta, timezone

import pytest

from retrieval_core.io import storage, versions
from retrieval_core.io.folder import Folder
from retrieval_core.io.versions import VersionError

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
        name = versions.new_version_name(Folder(root), now=start + timedelta(hours=i))
        make_version(root, name, complete=i % 3 != 0)  # incomplete ones still take their number
        made.append(name)
    assert made[0] == "v000001-20240131T235959Z"
    assert made[1] == "v000002-20240201T005959Z"
    assert [versions.parse_version_seq(n) for n in made] == list(range(1, 13))
    assert len(set(made)) == 12 and made == sorted(made)
    assert versions.list_versions(Folder(root)) == made


def test_name_with_the_same_second_is_still_unique(root):
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
    first = versions.new_version_name(Folder(root), now=now)
    make_version(root, first)
    second = versions.new_version_name(Folder(root), now=now)
    assert first != second and versions.list_versions(Folder(root + "/")) == [first] and second > first


def test_naive_and_other_zone_times_are_utc(root):
    assert versions.new_version_name(Folder(root), now=datetime(2024, 1, 1, 10, 0, 0)) == "v000001-20240101T100000Z"
    plus2 = timezone(timedelta(hours=2))
    assert versions.new_version_name(Folder(root), now=datetime(2024, 1, 1, 10, 0, 0, tzinfo=plus2)).endswith(
        "T080000Z"
    )


def test_listing_ignores_other_entries_and_orders_past_999999(root):
    make_version(root, "v000002-20240101T000000Z")
    make_version(root, "v1000000-20240102T000000Z")
    make_version(root, "v000010-20240103T000000Z")
    storage.write_bytes_atomic(storage.join(root, "versions", "notes.txt"), b"x")
    assert versions.list_versions(Folder(root)) == [
        "v000002-20240101T000000Z",
        "v000010-20240103T000000Z",
        "v1000000-20240102T000000Z",
    ]
    assert versions.new_version_name(Folder(root)).startswith("v1000001-")
    assert versions.list_versions(Folder(storage.join(root, "nothing-here"))) == []


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
            versions.publish(Folder(root), name)
    assert versions.read_current(Folder(root)) is None


def test_publish_writes_current_and_tracks_previous(root):
    a, b = "v000001-20240101T000000Z", "v000002-20240102T000000Z"
    make_version(root, a)
    make_version(root, b)
    first = versions.publish(Folder(root), a, expected=None, by={"action": "refresh"})
    assert first["version"] == a and first["previous"] is None and first["published_at"].endswith("Z")
    second = versions.publish(Folder(root), b, expected=a, by={"action": "refresh"})
    assert versions.read_current(Folder(root)) == second
    assert second["version"] == b and second["previous"] == a
    assert [m["version"] for m in second["history"]] == [a, b]
    assert second["by"]["action"] == "refresh" and second["by"]["pid"] == os.getpid()
    assert versions.read_refresh_record(Folder(root), b)["published"] is True  # CURRENT named it: the record says so


def test_publish_is_a_compare_and_set_naming_who_moved_current(root):
    """A refresh that started from a and finds CURRENT moved (by a rollback) publishes nothing and says who."""
    a, b, c = "v000001-20240101T000000Z", "v000002-20240102T000000Z", "v000003-20240103T000000Z"
    for n in (a, b, c):
        make_version(root, n)
    versions.publish(Folder(root), b, expected=None, by={"action": "refresh"})
    versions.publish(Folder(root), a, expected=b, by={"action": "rollback"})
    with pytest.raises(versions.CurrentMovedError) as info:
        versions.publish(Folder(root), c, expected=b, by={"action": "refresh"})
    message = str(info.value)
    assert f"expected to name {b}" in message and f"names {a}" in message and "by rollback" in message
    assert socket.gethostname() in message
    assert versions.read_current(Folder(root))["version"] == a


def test_history_is_bounded(root):
    a, b = "v000001-20240101T000000Z", "v000002-20240102T000000Z"
    make_version(root, a)
    make_version(root, b)
    for i in range(versions.HISTORY_KEEP + 5):
        versions.publish(Folder(root), (a, b)[i % 2])
    history = versions.read_current(Folder(root))["history"]
    assert len(history) == versions.HISTORY_KEEP and history[-1]["version"] == (a, b)[(versions.HISTORY_KEEP + 4) % 2]


def test_current_is_replaced_atomically_on_disk(tmp_path):
    root = str(tmp_path / "out")
    names = ["v000001-20240101T000000Z", "v000002-20240102T000000Z"]
    for n in names:
        make_version(root, n)
    versions.publish(Folder(root), names[0])
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
            versions.publish(Folder(root), names[(i + 1) % 2])
    finally:
        stop.set()
        thread.join()
    assert errors == [] and seen and set(seen) <= set(names)
    assert sorted(os.listdir(root)) == ["CURRENT", "versions"]  # no temporary left
    assert versions.read_current(Folder(root))["version"] == names[0]  # 200 flips end on names[0]


def test_publish_on_memory_leaves_only_the_new_current():
    storage.remove("memory://versions-test")
    try:
        a, b = "v000001-20240101T000000Z", "v000002-20240102T000000Z"
        make_version(MEMORY_ROOT, a)
        make_version(MEMORY_ROOT, b)
        versions.publish(Folder(MEMORY_ROOT), a)
        versions.publish(Folder(MEMORY_ROOT), b)
        assert storage.list_names(MEMORY_ROOT) == ["CURRENT", "versions"]
        assert storage.read_json(storage.join(MEMORY_ROOT, "CURRENT"))["version"] == b
    finally:
        storage.remove("memory://versions-test")


FAILED_GATE = {
    "gate": "publish.max_deleted_fraction",
    "threshold": 0.1,
    "value": 0.6,
    "passed": False,
    "message": "deleted 3,112 of 5,183 documents (60.0%) > 10%",
}


def make_failed(root, name):
    base = make_version(root, name)
    storage.write_json_atomic(
        storage.join(base, "refresh.json"),
        {"complete": True, "gates_passed": False, "published": False, "gates": [FAILED_GATE]},
    )


def test_states_name_current_published_failed_incomplete_and_abandoned(root):
    names = [f"v{i:06d}-2024010{i}T000000Z" for i in range(1, 7)]
    make_version(root, names[0])
    make_version(root, names[1])
    make_failed(root, names[2])
    make_version(root, names[3], complete=None)  # unfinished, no build names it
    make_version(root, names[4], complete=None)  # the pending build
    storage.write_json_atomic(storage.join(root, versions.BUILD_RECORD), {"version": names[4], "identity": {}})
    make_version(root, names[5])  # finished, passed, never published and not pending
    versions.publish(Folder(root), names[0])
    versions.publish(Folder(root), names[1])
    found = {s["version"]: s for s in versions.states(Folder(root))}
    assert [found[n]["state"] for n in names] == [
        "published",
        "current",
        "failed",
        "abandoned",
        "incomplete",
        "abandoned",
    ]
    assert found[names[2]]["detail"] == "deleted 3,112 of 5,183 documents (60.0%) > 10%"
    line = versions.state_line(found[names[2]])
    assert line.startswith(f"{names[2]}  failed: deleted 3,112 of 5,183")


def test_rollback_target_refuses_failed_without_force_and_unfinished_always(root):
    good, failed, bad = "v000001-20240101T000000Z", "v000002-20240102T000000Z", "v000003-20240103T000000Z"
    make_version(root, good)
    make_failed(root, failed)
    make_version(root, bad, complete=False)
    versions.publish(Folder(root), good)
    with pytest.raises(VersionError, match="failed: deleted 3,112 of 5,183 documents.*--force"):
        versions.rollback_target(Folder(root), failed)
    assert versions.rollback_target(Folder(root), failed, force=True)["state"] == "failed"
    for force in (False, True):
        with pytest.raises(VersionError, match="never finished") as info:
            versions.rollback_target(Folder(root), bad, force=force)
        assert good in str(info.value)
    with pytest.raises(VersionError, match="does not exist"):
        versions.rollback_target(Folder(root), "v000009-20240109T000000Z")
    assert versions.read_current(Folder(root))["version"] == good


# ---------------------------------------------------------------------------------------------------- resolve_root


def test_resolve_plain_root_without_versions(root):
    storage.write_json_atomic(storage.join(root, "embeddings", "_manifest.json"), {"n": 1})
    assert versions.resolve_root(Folder(root)) == (root, None)


def test_resolve_follows_current_and_explicit_versions(root):
    a, b = "v000001-20240101T000000Z", "v000002-20240102T000000Z"
    make_version(root, a)
    make_version(root, b)
    versions.publish(Folder(root), a)
    assert versions.resolve_root(Folder(root)) == (versions.version_root(root, a), a)
    assert versions.resolve_root(Folder(root), version=b) == (versions.version_root(root, b), b)


def test_resolve_missing_versions_are_errors(root):
    a = "v000001-20240101T000000Z"
    make_version(root, a)
    with pytest.raises(VersionError, match="v000005-20240105T000000Z") as info:
        versions.resolve_root(Folder(root), version="v000005-20240105T000000Z")
    assert a in str(info.value)
    versions.publish(Folder(root), a)
    storage.remove(versions.version_root(root, a))
    with pytest.raises(VersionError) as info:
        versions.resolve_root(Folder(root))
    assert a in str(info.value) and "CURRENT" in str(info.value) and versions.version_root(root, a) in str(info.value)


# ---------------------------------------------------------------------------------------------------- retention

NAMES = [f"v{i:06d}-202401{i:02d}T000000Z" for i in range(1, 8)]


def states_of(published=(), failed=(), other=()):
    found = [{"version": n, "state": "published"} for n in published]
    found += [{"version": n, "state": "failed"} for n in failed]
    return found + [{"version": n, "state": state} for n, state in other]


def test_retention_counts_published_versions_only():
    found = states_of(published=NAMES[:4], failed=NAMES[4:])
    assert versions.versions_to_delete(found, 1, 3, set()) == NAMES[:3]
    assert versions.versions_to_delete(found, 1, 1, set()) == NAMES[:3] + NAMES[4:6]
    assert versions.versions_to_delete(found, 10, 0, {NAMES[5]}) == [NAMES[4], NAMES[6]]
    incomplete = states_of(published=NAMES[:2], other=[(NAMES[2], "incomplete"), (NAMES[3], "abandoned")])
    assert versions.versions_to_delete(incomplete, 1, 0, set()) == [NAMES[0], NAMES[3]]
    assert versions.versions_to_delete([], 1, 0, set()) == []
    with pytest.raises(ValueError, match="-1"):
        versions.versions_to_delete(found, 1, -1, set())


def test_three_failed_nights_never_push_out_the_last_published_version():
    """keep_versions 1: failed nights after the last good one delete failed ones only, past keep_failed."""
    for failed_nights in range(1, 6):
        found = states_of(published=NAMES[:1], failed=NAMES[1 : 1 + failed_nights])
        for keep_failed in range(0, 4):
            doomed = versions.versions_to_delete(found, 1, keep_failed, set())
            assert NAMES[0] not in doomed
            assert len(doomed) == max(0, failed_nights - keep_failed)


def test_retention_never_deletes_protected_versions_whatever_keep():
    found = states_of(published=NAMES[:4], failed=NAMES[4:])
    for keep in range(1, 9):
        for keep_failed in range(0, 4):
            for protected in ({NAMES[0]}, {NAMES[3], NAMES[4]}):
                doomed = versions.versions_to_delete(found, keep, keep_failed, protected)
                assert not set(doomed) & protected
                assert not set(doomed) & set(NAMES[:4][-keep:])


def test_delete_version_files_keeps_referenced_files(root):
    old = "v000001-20240101T000000Z"
    base = make_version(
        root,
        old,
        files=(
            "embeddings/shard-00000.parquet",
            "embeddings/shard-00001.parquet",
            "index/index.faiss",
            "eval/metrics.json",
        ),
    )
    shared = storage.join(base, "embeddings", "shard-00001.parquet")
    deleted = versions.delete_version_files(Folder(root, None), old, referenced={shared})
    assert deleted == 4  # three files and refresh.json
    assert storage.exists(shared)
    assert storage.read_bytes(shared) == b"data"
    assert storage.list_names(base) == ["embeddings"]
    assert storage.list_names(storage.join(base, "embeddings")) == ["shard-00001.parquet"]
    assert versions.delete_version_files(Folder(root, None), old, referenced=set()) == 1
    assert not storage.exists(base)
    assert versions.list_versions(Folder(root)) == []
    assert versions.delete_version_files(Folder(root, None), old, referenced=set()) == 0


def test_delete_version_files_matches_referenced_urls_by_location(tmp_path):
    root = str(tmp_path / "out")
    name = "v000001-20240101T000000Z"
    base = make_version(root, name, files=("embeddings/a.parquet", "embeddings/b.parquet"))
    as_file_url = "file://" + storage.join(base, "embeddings", "a.parquet")
    assert versions.delete_version_files(Folder(root, None), name, {as_file_url}) == 2
    assert os.listdir(os.path.join(base, "embeddings")) == ["a.parquet"]


# ---------------------------------------------------------------------------------------------------- readers


def test_reader_leases_fresh_and_stale(root):
    a, b, c = "v000001-20240101T000000Z", "v000002-20240102T000000Z", "v000003-20240103T000000Z"
    for n in (a, b, c):
        make_version(root, n)
    lease_a = versions.register_reader(Folder(root), a)
    lease_b = versions.register_reader(Folder(root), b)
    assert lease_a.startswith(storage.join(versions.version_root(root, a), "_readers") + "/")
    assert storage.read_json(lease_a)["pid"] == os.getpid()
    assert versions.readers_in_use(Folder(root), max_age_s=3600) == {a, b}
    record = storage.read_json(lease_b)
    storage.write_json_atomic(lease_b, {**record, "heartbeat_at": iso(7200)})  # b's reader went quiet
    storage.write_bytes_atomic(storage.join(versions.version_root(root, c), "_readers", "x.json"), b"garbage")
    assert versions.readers_in_use(Folder(root), max_age_s=3600) == {a}
    versions.renew_reader(lease_b)
    assert versions.readers_in_use(Folder(root), max_age_s=3600) == {a, b}
    versions.release_reader(lease_a)
    versions.release_reader(lease_a)  # twice is harmless
    assert versions.readers_in_use(Folder(root), max_age_s=3600) == {b}


def test_register_reader_of_a_missing_version_names_it(root):
    with pytest.raises(VersionError, match="v000004-20240104T000000Z"):
        versions.register_reader(Folder(root), "v000004-20240104T000000Z")


# ---------------------------------------------------------------------------------------------------- relative paths


def test_resolve_relative_on_s3_keeps_the_protocol():
    got = storage.resolve_relative("s3://b/r/versions/v2/embeddings", "../../v1/embeddings/shard-00001.parquet")
    assert got == "s3://b/r/versions/v1/embeddings/shard-00001.parquet"
    assert storage.resolve_relative("s3://b/r/", "./x/../y") == "s3://b/r/y"
    assert storage.resolve_relative("s3://b", "k") == "s3://b/k"
    assert storage.resolve_relative("gs://b/r", "s3://other/x") == "s3://other/x"  # absolute: as it is
    with pytest.raises(ValueError, match="climbs"):
        storage.resolve_relative("s3://b/r", "../../other-bucket/x")


@pytest.mark.parametrize(
    "from_dir,target",
    [
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
    ],
)
def test_relative_to_and_resolve_relative_round_trip(from_dir, target):
    relative = storage.relative_to(from_dir, target)
    assert "://" not in relative and not relative.startswith("/")
    assert storage.resolve_relative(from_dir, relative) == target


def test_relative_to_refuses_other_protocols_and_buckets():
    for a, b in (
        ("s3://b/r", "s3://c/r"),
        ("s3://b/r", "gs://b/r"),
        ("/data/r", "s3://b/r"),
        ("/data/r", "relative/r"),
    ):
        with pytest.raises(ValueError, match="same protocol"):
            storage.relative_to(a, b)


def test_relative_paths_resolve_to_real_files(root):
    shard = storage.join(versions.version_root(root, "v000001-20240101T000000Z"), "embeddings", "s.parquet")
    storage.write_bytes_atomic(shard, b"shared")
    here = storage.join(versions.version_root(root, "v000002-20240102T000000Z"), "embeddings")
    relative = storage.relative_to(here, shard)
    assert relative == "../../v000001-20240101T000000Z/embeddings/s.parquet"
    assert storage.read_bytes(storage.resolve_relative(here, relative)) == b"shared"
