"""Progress for people and for logs: a bar on a terminal, one line per step elsewhere (cron, a scheduler's log).

``runtime.progress``: ``auto`` (the default) shows tqdm bars when stderr is a terminal and otherwise logs one line
per step when it ends (``refresh: encode: 606 doc in 12.3 s (49.3 doc/s)``); ``true`` always bars; ``false`` never
bars, lines only. A step that ends by an error or a stop logs nothing: the job's own one-line message says it.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

from retrieval_core.config import RuntimeConfig

log = logging.getLogger("jobs.progress")


def bars_on(rt: RuntimeConfig) -> bool:
    if rt.progress == "auto":
        return sys.stderr.isatty()
    return rt.progress is True


class StepLine:
    """A bar's stand-in when bars are off: counts quietly, then logs one line with count, time and rate."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.initial = initial, initial
        self.postfix: dict = {}
        self.started = time.perf_counter()

    def __enter__(self) -> "StepLine":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = values

    def close(self) -> None:
        if sys.exc_info()[0] is not None or not self.total:  # unwinding an error or a stop, or nothing to do
            return
        seconds = time.perf_counter() - self.started
        done = self.n - self.initial
        rate = f", {done / seconds:,.1f} {self.unit}/s" if seconds > 0 and done else ""
        earlier = f" ({self.initial:,} committed earlier)" if self.initial else ""
        extra = "".join(f", {key} {value}" for key, value in self.postfix.items())
        log.info(
            "%s: %s of %s %s in %.1f s%s%s%s",
            self.desc,
            f"{done:,}",
            f"{self.total - self.initial:,}",
            self.unit,
            seconds,
            rate,
            earlier,
            extra,
        )


def bar(rt: RuntimeConfig, total: int, desc: str, unit: str = "it", initial: int = 0):
    """A tqdm bar (bars on), else a :class:`StepLine`; both take ``update``, ``set_postfix`` and ``close``."""
    if bars_on(rt):
        return tqdm(total=total, initial=initial, unit=unit, desc=desc, disable=not total, dynamic_ncols=True)
    return StepLine(total, desc, unit, initial)
