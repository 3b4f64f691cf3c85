"""Leases on an output root: one holder, renewed in the background, taken over only once expired, by exactly one
contender, and fenced by the generation number."""

import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from retrieval_core.io import leases, storage, versions
from retrieval_core.io.folder import Folder
from retrieval_core.io.leases import LeaseLost, LockedError

MEMORY_ROOT = "memory://leases-test/out"


@pytest.fixture(params=["local", "memory"])
def lease_dir(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "out" / leases.REFRESH_LEASE)
        return
    storage.remove("memory://leases-test")
    yield storage.join(MEMORY_ROOT, leases.REFRESH_LEASE)
    storage.remove("memory://leases-test")


def write_generation(directory, generation, **fields):
    record = {
        "generation": generation,
        "host": "old-host",
        "pid": 4242,
        "token": "old",
        "expiry_s": 600,
        "renewed_at": leases.utc_now_iso(),
        "acquired_at": leases.utc_now_iso(),
        **fields,
    }
    storage.write_json_atomic(leases.generation_url(directory, generation), record)
    return record


def iso_ago(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds))


def test_a_second_contender_is_refused_naming_the_holder(lease_dir):
    lease = leases.acquire(lease_dir, expiry_s=600, renew_s=60, owner={"job": "jobs.refresh"})
    try:
        assert lease.generation == 1 and lease.record["job"] == "jobs.refresh"
        with pytest.raises(LockedError) as info:
            leases.acquire(lease_dir, expiry_s=600, renew_s=60)
        message = str(info.value)
        for part in (
            socket.gethostname(),
            f"pid {os.getpid()}",
            "jobs.refresh",
            "generation 1",
            "--wait",
            "publish.lease_expiry",
            lease.url,
        ):
            assert part in message
    finally:
        assert lease.release() is True
    again = leases.acquire(lease_dir, expiry_s=600, renew_s=60)
    assert again.generation == 2  # a released lease is taken at once, and generations only grow
    again.release()
    assert leases.generations(lease_dir) == [1, 2]


def test_an_expired_lease_is_taken_over_with_a_warning_and_old_generations_go(lease_dir, caplog):
    for g in (1, 2):
        write_generation(lease_dir, g, released=True)
    write_generation(lease_dir, 3, renewed_at=iso_ago(700))
    with caplog.at_level(logging.WARNING, logger="retrieval_core.io.leases"):
        lease = leases.acquire(lease_dir, expiry_s=600, renew_s=60)
    try:
        assert lease.generation == 4
        assert "taking over the expired refresh lease" in caplog.text and "old-host" in caplog.text
        assert leases.generations(lease_dir) == [3, 4]
    finally:
        lease.release()


def test_a_lease_renewed_within_its_expiry_is_not_taken(lease_dir):
    write_generation(lease_dir, 1, renewed_at=iso_ago(500), acquired_at=iso_ago(86400))  # old, but renewed
    with pytest.raises(LockedError, match="old-host"):
        leases.acquire(lease_dir, expiry_s=600, renew_s=60)


def test_a_lease_whose_process_is_gone_from_this_host_is_taken_over_at_once(lease_dir, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_generation(lease_dir, 1, host=socket.gethostname(), pid=int(dead.stdout))
    with caplog.at_level(logging.WARNING, logger="retrieval_core.io.leases"):
        lease = leases.acquire(lease_dir, expiry_s=600, renew_s=60)
    lease.release()
    assert "no longer runs on this host" in caplog.text


def test_an_unreadable_record_is_expired(lease_dir):
    storage.write_bytes_atomic(leases.generation_url(lease_dir, 1), b"{not json")
    lease = leases.acquire(lease_dir, expiry_s=600, renew_s=60)
    assert lease.generation == 2
    lease.release()


def test_renewal_keeps_the_lease_past_its_expiry(lease_dir):
    lease = leases.acquire(lease_dir, expiry_s=1.0, renew_s=0.2)
    try:
        time.sleep(1.6)
        with pytest.raises(LockedError):
            leases.acquire(lease_dir, expiry_s=1.0, renew_s=0.2)
        lease.check("a commit")  # still held
        assert leases.read_record(lease_dir, 1)["renewed_at"] >= lease.record["acquired_at"]
    finally:
        lease.release()


def test_a_holder_taken_over_is_fenced_and_names_the_new_holder(lease_dir):
    """A process paused past its expiry (here: its renewals stopped) is taken over; its next check fails."""
    first = leases.acquire(lease_dir, expiry_s=0.5, renew_s=0.2)
    first._stop.set()  # as if paused: no renewals
    time.sleep(0.8)
    second = leases.acquire(lease_dir, expiry_s=600, renew_s=60, owner={"job": "rollback"})
    try:
        first._renewed = time.monotonic()  # its own clock would not notice a SIGSTOP either
        first.lost = ""
        with pytest.raises(LeaseLost) as info:
            first.check("writing CURRENT")
        assert "generation 2" in str(info.value) and "rollback" in str(info.value)
        assert first.release() is False  # the new holder's lease is left alone
        second.check("still mine")
    finally:
        second.release()


def test_a_holder_that_cannot_renew_in_time_considers_its_lease_lost(lease_dir):
    lease = leases.acquire(lease_dir, expiry_s=0.3, renew_s=0.1)
    lease._stop.set()
    time.sleep(0.4)
    with pytest.raises(LeaseLost, match="could not renew it"):
        lease.ensure()
    lease.release()


def test_contenders_on_an_expired_local_lease_exactly_one_wins(tmp_path):
    directory = str(tmp_path / "out" / leases.REFRESH_LEASE)
    write_generation(directory, 1, renewed_at=iso_ago(3600))
    results, barrier = [], threading.Barrier(8)

    def contend():
        barrier.wait()
        try:
            results.append(leases.acquire(directory, expiry_s=600, renew_s=60))
        except LockedError:
            results.append(None)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r]
    assert len(results) == 8 and len(winners) == 1 and winners[0].generation == 2
    assert leases.newest(directory)[1]["token"] == winners[0].record["token"]
    winners[0].release()


def test_wait_queues_behind_the_holder(lease_dir, monkeypatch):
    monkeypatch.setattr(leases, "POLL_S", 0.05)
    holder = leases.acquire(lease_dir, expiry_s=600, renew_s=60)
    threading.Timer(0.4, holder.release).start()
    started = time.monotonic()
    waiter = leases.acquire(lease_dir, expiry_s=600, renew_s=60, wait=True)
    try:
        assert waiter.generation == 2 and time.monotonic() - started >= 0.3
        assert leases.read_record(lease_dir, 1)["released"] is True
    finally:
        waiter.release()


@pytest.mark.parametrize("job", ["encode", "index", "evaluate", "mine", "train", "pipeline"])
def test_a_second_job_writing_the_same_root_is_refused_naming_the_holder(tmp_path, caplog, job):
    """Two overlapping runs (cron, say) on one root: the second exits 1 before any work, naming the first."""
    import importlib

    root = str(tmp_path / "out")
    directory = versions.lease_dir(root, leases.JOB_LEASE)
    held = leases.acquire(
        directory, None, 600, 60, owner={"host": "nightly-7", "pid": 4242, "job": "jobs.encode"}, what="job"
    )
    try:
        module = importlib.import_module(f"jobs.{job}")
        with caplog.at_level(logging.ERROR, logger="jobs"):
            assert module.main(["--set", f"output.root={root}", "--set", "runtime.progress=false"]) == 1
        message = " ".join(r.getMessage() for r in caplog.records)
        assert f"the job lease '{held.url}' is held by host nightly-7 pid 4242 (jobs.encode)" in message
        assert sorted(os.listdir(root)) == ["_jobs"]  # nothing else was written
        assert leases.newest(directory)[1]["token"] == held.record["token"]
    finally:
        held.release()


def test_a_job_lease_left_by_a_killed_job_on_this_host_is_taken_over(tmp_path):
    root = str(tmp_path / "out")
    directory = versions.lease_dir(root, leases.JOB_LEASE)
    write_generation(directory, 1, host=socket.gethostname(), pid=2**22 + 7)
    with versions.leased(Folder(root, None), 600, 60, path=leases.JOB_LEASE, what="job") as lease:
        assert lease.generation == 2 and leases.newest(directory)[1]["token"] == lease.record["token"]
    assert leases.newest(directory)[1]["released"] is True


def test_a_holder_is_fenced_by_any_newer_generation_even_when_the_next_one_was_pruned(lease_dir):
    """A holder cut off while two others took and released the lease finds only g3 (g2 pruned): still lost, and
    its renewal does not bring it back."""
    lease = leases.acquire(lease_dir, expiry_s=600, renew_s=60)
    lease._stop.set()
    write_generation(lease_dir, 3, released=True)
    lease.renew()
    with pytest.raises(LeaseLost, match="generation 3"):
        lease.check("writing CURRENT")
    assert lease.release() is False


def test_a_holder_whose_record_is_gone_is_fenced(lease_dir):
    lease = leases.acquire(lease_dir, expiry_s=600, renew_s=60)
    storage.remove(lease.url)
    with pytest.raises(LeaseLost, match="its record is gone"):
        lease.check("a commit")
    lease._stop.set()
