"""Fault points: the places where the fault-injection tests make a process die or an operation fail.

Inert unless the environment variable ``RETRIEVAL_TEST_FAULTS`` names a plan file that exists (only tests set it,
before any worker starts, so workers see it too). The plan is a JSON list of faults::

    [{"point": "write", "match": "embeddings/_shards/shard-00001.json", "action": "kill", "skip": 0, "times": 1}]

A fault fires at the calls of ``point`` whose ``detail`` ends with ``match``, after letting ``skip`` of them pass,
``times`` times in all processes together (hits are claimed with exclusive-create marker files next to the plan).
Actions: ``kill`` (SIGKILL of the calling process: a crash, nothing runs after it), ``crash`` (raise
:class:`InjectedCrash`, a BaseException that no ``except Exception`` handles: a driver's crash, simulated in the
test's own process), ``oserror`` (raise ``OSError(ENOSPC)``: a full disk, or a store refusing writes) and
``stall`` (sleep ``seconds``: slow work, so that a test can strike while it runs).

Points: ``write`` (every atomic write of ``storage``, after the data is staged and before it is committed;
``detail`` = the URL), ``search`` (a searcher actor's batch; ``detail`` = "search"), ``encode`` (an embedding
shard about to be read and encoded; ``detail`` = its name), ``train`` (a training step done; ``detail`` =
"step-N").
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time

ENV = "RETRIEVAL_TEST_FAULTS"


class InjectedCrash(BaseException):
    """A simulated crash of the calling process."""


def point(name: str, detail: str) -> None:
    """Fire the fault the test plan holds for this call, if any."""
    plan_path = os.environ.get(ENV)
    if not plan_path or not os.path.exists(plan_path):
        return
    with open(plan_path) as handle:
        plan = json.load(handle)
    for number, fault in enumerate(plan):
        if fault["point"] == name and detail.endswith(fault.get("match", "")) and _claim(plan_path, number, fault):
            _fire(fault["action"], f"{name} {detail}", fault.get("seconds", 1.0))


def _claim(plan_path: str, number: int, fault: dict) -> bool:
    """This call's hit of the fault: the first free marker number; True when the hit is one that fires."""
    skip, times = fault.get("skip", 0), fault.get("times", 1)
    for hit in range(skip + times):
        try:
            os.close(os.open(f"{plan_path}.{number}.{hit}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        return hit >= skip
    return False


def _fire(action: str, where: str, seconds: float = 1.0) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "crash":
        raise InjectedCrash(f"injected crash at {where}")
    if action == "oserror":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {where})")
    if action == "stall":
        time.sleep(seconds)
        return
    raise ValueError(f"unknown fault action {action!r}")
