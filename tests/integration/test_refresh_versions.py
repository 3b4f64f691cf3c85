"""Versions a user can trust unattended: the refresh lease against rollbacks and paused holders, failed nights
that never push out a published version, stop messages that count the version being built, no silent adoption."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import faults_fired
from helpers import REPO
from test_refresh import SETTINGS, by_doc, day1, day2, refresh_config, search_all, snapshot

from jobs import encode, index, refresh
from retrieval_core.encode import embeddings
from retrieval_core.io import leases, versions
from retrieval_core.io.folder import Folder
from retrieval_core.refresh import publishing

pytestmark = pytest.mark.usefixtures("ray_cluster")


def day3() -> list[dict]:
    """Day 2 with three more texts revised."""
    docs = [dict(d) for d in day2()]
    for d in docs[7:10]:
        d["text"] = d["text"] + " again"
    return docs


def refresh_command(corpus, root, model, *extra: str) -> list[str]:
    sets = [
        f"corpus.path={corpus}",
        f"output.root={root}",
        f"model.name={model}",
        *[f"{k.replace('__', '.')}={v}" for k, v in SETTINGS.items()],
    ]
    return [sys.executable, "-m", "jobs.refresh", *[a for s in sets for a in ("--set", s)], *extra]


def wait_for(condition, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()[1].decode()[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_rollback_while_a_refresh_runs_is_refused_and_with_wait_applied_after_it(tmp_path, tiny_model, faults):
    """Defect 1: a rollback made because last night's version is bad is never undone by the refresh that was
    running: refused while it holds the lease, and with --wait applied once it has published."""
    root = tmp_path / "nightly"
    v1 = refresh.run(refresh_config(snapshot(tmp_path, "day1", day1()), root, tiny_model))["version"]
    v2 = refresh.run(refresh_config(snapshot(tmp_path, "day2", day2()), root, tiny_model))["version"]
    faults([{"point": "write", "match": "embeddings/_manifest.json", "action": "stall", "seconds": 6}])
    running = subprocess.Popen(
        refresh_command(snapshot(tmp_path, "day3", day3()), root, tiny_model),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: faults_fired() == 1, running)  # the refresh holds the lease, building day 3
    rollback = [sys.executable, "-m", "jobs.refresh", "--set", f"output.root={root}", "--rollback", v1]
    refused = subprocess.run(rollback, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "the refresh lease" in refused.stderr and "is held by" in refused.stderr
    assert "(jobs.refresh)" in refused.stderr and f"pid {running.pid}" in refused.stderr
    assert versions.read_current(Folder(str(root)))["version"] == v2
    waiting = subprocess.Popen([*rollback, "--wait"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = running.communicate(timeout=300)
    assert running.returncode == 0, err.decode()[-3000:]
    v3 = out.decode().split("published ")[1].split()[0]
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err.decode()[-3000:]
    assert f"CURRENT now names {v1} (was {v3})" in out.decode()
    current = versions.read_current(Folder(str(root)))
    assert current["version"] == v1  # the rollback stands: the refresh published before it, never after
    assert [(m["version"], m["action"]) for m in current["history"]][-2:] == [(v3, "refresh"), (v1, "rollback")]
    assert current["history"][-1]["generation"] > current["history"][-2]["generation"]


def test_a_refresh_paused_past_its_lease_expiry_publishes_nothing_once_taken_over(tmp_path, tiny_model, faults):
    """Defect 6: a refresh stopped (SIGSTOP) longer than publish.lease_expiry loses its lease to the next one,
    which publishes; resumed (SIGCONT), the first stops at its next fence check, exits 1 naming the lost lease,
    and publishes nothing."""
    root, fast = tmp_path / "nightly", dict(publish__lease_expiry=3, publish__lease_renew=1)
    refresh.run(refresh_config(snapshot(tmp_path, "day1", day1()), root, tiny_model, **fast))
    s2 = snapshot(tmp_path, "day2", day2())
    faults([{"point": "write", "match": "embeddings/_manifest.json", "action": "stall", "seconds": 2}])
    first = subprocess.Popen(
        refresh_command(s2, root, tiny_model, "--set", "publish.lease_expiry=3", "--set", "publish.lease_renew=1"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: faults_fired() == 1, first)
    first.send_signal(signal.SIGSTOP)
    try:
        time.sleep(4.5)  # past the expiry, with no renewal
        faults([])
        second = refresh.run(refresh_config(s2, root, tiny_model, **fast))
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 1, err.decode()[-3000:]
    assert "lost the refresh lease" in err.decode() and "published" not in out.decode()
    current = versions.read_current(Folder(str(root)))
    assert current["version"] == second["version"] and current["by"]["action"] == "refresh"
    holders = {m["pid"] for m in current["history"]}
    assert first.pid not in holders  # only this process (day 1, day 2) ever moved CURRENT
    assert by_doc(versions.version_root(str(root), second["version"]))  # the published version reads whole


def test_failed_nights_never_push_out_the_last_published_version(tmp_path, tiny_model, capsys):
    """Defects 2 and 3: three failed nights with keep_versions 1 keep the last good version; failed ones are kept up
    to keep_failed, listed with the gate that failed them, and published by a rollback only with --force."""
    root = tmp_path / "nightly"
    keep = dict(publish__keep_versions=1, publish__keep_failed=2)
    good = refresh.run(refresh_config(snapshot(tmp_path, "day1", day1()), root, tiny_model, **keep))["version"]
    failed = []
    for rows in (120, 110, 100):
        cfg = refresh_config(snapshot(tmp_path, f"cut{rows}", day1()[:rows]), root, tiny_model, **keep)
        with pytest.raises(publishing.GateError, match=f"deleted {200 - rows} of 200 documents"):
            refresh.run(cfg)
        failed.append(versions.list_versions(Folder(str(root)))[-1])
    found = {s["version"]: s for s in versions.states(Folder(str(root)))}
    assert found[good]["state"] == "current" and failed[0] not in found  # the oldest failed one went, not `good`
    assert [found[v]["state"] for v in failed[1:]] == ["failed", "failed"]
    assert found[failed[2]]["detail"] == "deleted 100 of 200 documents (50.0%) > 10%"

    args = ["--set", f"output.root={root}", "--set", "publish.keep_versions=1", "--set", "publish.keep_failed=2"]
    assert refresh.main([*args, "--list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith(f"{good}  current  documents 200") and listing[-1].startswith(
        f"{failed[2]}  failed: deleted 100 of 200 documents (50.0%) > 10%"
    )
    assert refresh.main([*args, "--list", "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["state"]) for v in as_json["versions"]] == [
        (good, "current"),
        (failed[1], "failed"),
        (failed[2], "failed"),
    ]

    assert refresh.main([*args, "--rollback", failed[2]]) == 1  # refused: it failed a gate
    assert versions.read_current(Folder(str(root)))["version"] == good
    assert refresh.main([*args, "--rollback", failed[2], "--force"]) == 0
    assert "forced past: deleted 100 of 200 documents" in capsys.readouterr().out
    assert refresh.main([*args, "--rollback", good]) == 0
    night5 = refresh.run(refresh_config(snapshot(tmp_path, "day2", day2()), root, tiny_model, **keep))
    states = {s["version"]: s["state"] for s in versions.states(Folder(str(root)))}
    assert states[night5["version"]] == "current" and states[good] == "published"  # CURRENT's previous stays


def test_a_stopped_refresh_counts_what_its_version_has_committed(tmp_path, tiny_model):
    """Defect 4: SIGTERM during the encode of a version: one line that counts the version being built."""
    root = tmp_path / "nightly"
    refresh.run(refresh_config(snapshot(tmp_path, "day1", day1()), root, tiny_model))
    command = refresh_command(snapshot(tmp_path, "day2", day2()), root, tiny_model, "--set", "runtime.rows_per_shard=2")
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: list(root.glob("versions/v000002-*/embeddings/_shards/*.json")), driver)
    driver.send_signal(signal.SIGTERM)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 143, err.decode()[-3000:]
    lines = [line for line in err.decode().splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and "Traceback" not in err.decode()
    version = next(root.glob("versions/v000002-*")).name
    assert f"committed under {root}: version {version} (diff 3 buckets joined, " in lines[0]
    encoded = int(lines[0].split(" buckets joined, ")[1].split()[0])
    assert encoded >= 1 and "nothing yet" not in lines[0]


def test_a_root_of_plain_job_output_is_refused_unless_adopted(tmp_path, tiny_model):
    """No silent adoption: versions published beside the plain jobs' output would replace it for every reader.
    With --adopt, that output becomes the first version (its vectors shared, nothing encoded)."""
    root, s1 = tmp_path / "plain", snapshot(tmp_path, "day1", day1())
    cfg = refresh_config(s1, root, tiny_model)
    encode.run(cfg)
    index.run(cfg)
    with pytest.raises(versions.VersionError, match="--adopt") as info:
        refresh.run(cfg)
    assert "output.root" in str(info.value) and "embeddings/_manifest.json" in str(info.value)
    assert versions.read_current(Folder(str(root))) is None and not (root / "versions").exists()
    adopted = refresh.run(cfg, adopt=True)
    assert adopted["adopted"] and adopted["counts"]["encoded"] == 0 and adopted["counts"]["reused"] == 200
    version_root = versions.version_root(str(root), adopted["version"])
    manifest = embeddings.read_embeddings_manifest(Folder(version_root))
    assert all(s["path"].startswith("../../../embeddings/") for s in manifest["shards"])
    queries = np.stack(list(by_doc(str(root)).values())[::20])
    assert search_all(version_root, queries)[1] == search_all(str(root), queries)[1]
    day2_record = refresh.run(refresh_config(snapshot(tmp_path, "day2", day2()), root, tiny_model))
    assert day2_record["previous"] == adopted["version"] and day2_record["counts"]["encoded"] == 16
    with pytest.raises(versions.VersionError, match="holds no plain job output"):
        refresh.run(refresh_config(s1, tmp_path / "empty", tiny_model), adopt=True)
    assert leases.newest(versions.lease_dir(str(root)))[1]["released"] is True
