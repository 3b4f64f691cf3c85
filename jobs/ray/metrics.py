"""The jobs' samples recorded through Ray's application metrics (``ray.util.metrics``), which Ray's metrics agent on
each node exposes to Prometheus (as ``ray_<name>``; a counter as ``ray_<name>_total``). The only module that imports
``ray.util.metrics``."""

from __future__ import annotations

import logging
from typing import Union

import ray
from ray.util import metrics as ray_metrics

RayMetric = Union[ray_metrics.Counter, ray_metrics.Gauge]
_made: dict[str, RayMetric] = {}  # by name: Ray wants one object per metric in a process


def record(
    samples: list[tuple[str, dict[str, str], float]], catalogue: dict[str, tuple[str, str]], address: str = ""
) -> bool:
    """Record ``samples`` (name, labels, value): a counter is increased by the value (a value of 0 only makes the
    counter), a gauge set to it; ``catalogue`` gives each name's kind and description. A job reports after its Ray
    session has closed: with ``address`` (the cluster the job ran on) this process connects again for the recording
    (the node's metrics agent keeps what a driver recorded after it disconnects); without one (a local cluster, gone
    with the job) it does nothing and returns False."""
    if ray.is_initialized():
        _record(samples, catalogue)
        return True
    if not address:
        return False
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        _record(samples, catalogue)
    finally:
        ray.shutdown()
        _made.clear()  # metric objects belong to the connection that made them
    return True


def _record(samples: list[tuple[str, dict[str, str], float]], catalogue: dict[str, tuple[str, str]]) -> None:
    for name, labels, value in samples:
        kind, description = catalogue[name]
        metric = _metric(name, kind, description, tuple(sorted(labels)))
        if isinstance(metric, ray_metrics.Gauge):
            metric.set(value, tags=labels)
        elif value > 0:  # Ray refuses to add 0
            metric.inc(value, tags=labels)


def _metric(name: str, kind: str, description: str, tag_keys: tuple[str, ...]) -> RayMetric:
    """The Counter or Gauge of ``name``, made on first use with these tag keys."""
    if name not in _made:
        made = ray_metrics.Counter if kind == "counter" else ray_metrics.Gauge
        _made[name] = made(name, description=description, tag_keys=tag_keys)
    metric = _made[name]
    if metric.info["tag_keys"] != tag_keys:
        raise ValueError(f"metric {name} has the labels {metric.info['tag_keys']}, not {tag_keys}")
    return metric
