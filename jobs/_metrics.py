"""What every job reports at its end: one JSON line (printed last, and written to ``<output.root>/_runs/<job>.json``)
and its metrics: in Prometheus' text format to ``runtime.metrics_file`` (node-exporter's textfile collector), and
through Ray's metrics (:mod:`jobs.ray.metrics`) while this process is connected to Ray.

A sample is ``(name, labels, value)``; its name must be in :data:`CATALOGUE`, its labels those of :func:`labels_of`
(``report`` adds ``job`` to every sample). ``samples_of`` reads the summary and samples out of what a stage's
``run`` returned. A metrics failure never fails the job: it is logged as a warning."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import tempfile
import time
from typing import Any, Callable

from jobs.ray import cluster
from jobs.ray import metrics as ray_metrics
from retrieval_core.config import Config
from retrieval_core.io import storage

log = logging.getLogger("jobs.metrics")

Sample = tuple[str, dict[str, str], float]  # (metric name, labels, value)

# name -> (kind, what it counts). Counters count this run's work (0 when a stage found its output complete);
# gauges say how things stand at the end of the run.
CATALOGUE: dict[str, tuple[str, str]] = {
    "retrieval_job_duration_seconds": ("gauge", "Seconds the job ran, from its config loaded to its end."),
    "retrieval_job_success": ("gauge", "1 when the job's last run succeeded, 0 when it failed."),
    "retrieval_job_last_run_timestamp_seconds": ("gauge", "Unix time at which the job's last run ended."),
    "retrieval_stage_duration_seconds": ("gauge", "Seconds a stage of the pipeline ran."),
    "retrieval_stage_reused": ("gauge", "1 when the stage found its output complete and did nothing, else 0."),
    "retrieval_rows_encoded": ("counter", "Corpus rows encoded into embeddings by this run."),
    "retrieval_embedding_rows": ("gauge", "Rows the embeddings hold."),
    "retrieval_rejected_rows": ("gauge", "Corpus rows not encoded, each listed with its reason under rejects/encode/."),
    "retrieval_shards_committed": ("counter", "Shards committed by this run (embedding shards; index shards added)."),
    "retrieval_api_requests": ("counter", "Requests sent to the embedding API by this run."),
    "retrieval_api_retries": ("counter", "Embedding API requests retried by this run."),
    "retrieval_api_tokens": ("counter", "Tokens the embedding API counted for this run."),
    "retrieval_vectors_indexed": ("counter", "Vectors added to the index by this run."),
    "retrieval_index_vectors": ("gauge", "Vectors the index holds."),
    "retrieval_index_recall_at_10": ("gauge", "Recall@10 of the index against exact search, measured at build."),
    "retrieval_eval_ndcg_at_10": ("gauge", "Mean nDCG@10 over the evaluation queries."),
    "retrieval_eval_recall_at_10": ("gauge", "Mean recall@10 over the evaluation queries."),
    "retrieval_eval_recall_at_100": ("gauge", "Mean recall@100 over the evaluation queries."),
    "retrieval_eval_mrr_at_10": ("gauge", "Mean MRR@10 over the evaluation queries."),
    "retrieval_eval_queries": ("gauge", "Queries evaluated (those with a relevant document)."),
    "retrieval_queries_mined": ("counter", "Queries written with hard negatives by this run."),
    "retrieval_queries_without_negatives": ("counter", "Queries this run found no negative for."),
    "retrieval_negatives_mined": (
        "counter",
        "(query, positive, negative) triples mined by this run: the rows of the triplet export.",
    ),
    "retrieval_tuples_mined": ("counter", "Training rows written by this run, per export format."),
    "retrieval_training_steps": ("counter", "Training steps taken by this run (a resumed training counts the rest)."),
    "retrieval_training_examples": ("gauge", "Training examples the model was trained on."),
    "retrieval_training_heldout_ndcg_at_10": ("gauge", "Held-out nDCG@10 of the trained model, at the last step."),
    "retrieval_training_loss": ("gauge", "Training loss at the last step."),
    "retrieval_queries_searched": ("counter", "Queries searched by this run."),
    "retrieval_refresh_documents": ("counter", "Documents the refresh compared, by status."),
    "retrieval_refresh_encoded_rows": ("counter", "Rows the refresh encoded (the added and changed documents)."),
    "retrieval_refresh_published": ("gauge", "1 when the refresh published a new version, else 0."),
    "retrieval_refresh_gate_passed": ("gauge", "1 when the refresh passed the gate, 0 when the gate held it back."),
    "retrieval_sink_lag_versions": ("gauge", "Versions a serving store is behind CURRENT."),
    "retrieval_sink_rows_applied": ("counter", "Rows a serving store was sent, by operation."),
    "retrieval_sink_failed": ("gauge", "1 when the serving store could not be brought to CURRENT, else 0."),
}

# the labels of a metric besides ``job`` (which every sample carries), where they are not just ``stage``
LABELS: dict[str, tuple[str, ...]] = {
    "retrieval_job_duration_seconds": (),
    "retrieval_job_success": (),
    "retrieval_job_last_run_timestamp_seconds": (),
    "retrieval_tuples_mined": ("format", "stage"),
    "retrieval_refresh_documents": ("status",),
    "retrieval_refresh_encoded_rows": (),
    "retrieval_refresh_published": (),
    "retrieval_refresh_gate_passed": ("gate",),
    "retrieval_sink_lag_versions": ("sink",),
    "retrieval_sink_rows_applied": ("op", "sink"),
    "retrieval_sink_failed": ("sink",),
}
RUNS_DIR = "_runs"


def report(
    cfg: Config,
    job: str,
    status: str,
    seconds: float,
    summary: dict,
    samples: list[Sample],
    *,
    in_root: bool = True,
) -> dict:
    """Report the end of ``job`` (``status``: ``ok`` or what went wrong, e.g. ``failed``): print the one-line JSON
    summary, write it to ``<output.root>/_runs/<job>.json`` (not with ``in_root=False``: a run that never held the
    root, refused by another job's lease, writes nothing there), write ``runtime.metrics_file`` (``{job}`` in it is
    replaced by the job's name) and record the samples on Ray when connected. ``samples`` plus the job's duration,
    success and end time, each labelled ``job``. Returns the summary line's fields. A sample whose name is not in
    :data:`CATALOGUE` or whose labels differ from :func:`labels_of` is refused (``ValueError``) before anything is
    written; any failure to write is a warning."""
    checked = [_checked(sample) for sample in samples]
    finished = time.time()
    line = run_line(cfg, job, status, seconds, finished, summary)
    text = json.dumps(line, default=str)
    print(text, flush=True)
    if in_root:
        _warn_on_error(
            f"write the run summary of {job} under {cfg.output.root}", lambda: _write_run_summary(cfg, job, text)
        )
    ended = _job_samples(status, seconds, finished)
    every = [(name, {**labels, "job": job}, value) for name, labels, value in [*ended, *checked]]
    if cfg.runtime.metrics_file:
        path = cfg.runtime.metrics_file.replace("{job}", job)
        _warn_on_error(f"write the metrics file {path}", lambda: write_metrics_file(path, every))
    _warn_on_error(
        "record the metrics on Ray", lambda: ray_metrics.record(every, CATALOGUE, _cluster_to_reconnect(cfg, status))
    )
    return line


def _cluster_to_reconnect(cfg: Config, status: str) -> str:
    """The cluster a job that ran on one records its metrics on once its session closed: a driver's address
    (``runtime.address`` or ``RAY_ADDRESS``), only after a success (a failed job's cluster may be unreachable, and a
    connection attempt would hold the report up), never ``local`` (a new cluster) nor a ``ray://`` client."""
    address = cluster.cluster_address(cfg.runtime)
    if status != "ok" or address in ("", "local") or address.startswith("ray://"):
        return ""
    return address


def run_line(cfg: Config, job: str, status: str, seconds: float, finished: float, summary: dict) -> dict:
    """The JSON summary's fields: job, status, seconds, finished (UTC, ISO 8601), output_root, then ``summary``'s
    (a key of its own that repeats one of these is left out)."""
    line = {
        "job": job,
        "status": status,
        "seconds": round(seconds, 3),
        "finished": datetime.datetime.fromtimestamp(finished, datetime.timezone.utc).isoformat(timespec="seconds"),
        "output_root": cfg.output.root,
    }
    return {**line, **{key: value for key, value in summary.items() if key not in line}}


def error_line(exc: BaseException) -> str:
    """The error's message on one line (its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _checked(sample: Sample) -> Sample:
    name, labels, value = sample
    if name not in CATALOGUE:
        raise ValueError(f"unknown metric {name!r}: not in jobs._metrics.CATALOGUE (docs/metrics.md lists them all)")
    expected = set(labels_of(name))
    if set(labels) - {"job"} != expected:
        raise ValueError(f"metric {name} takes the labels {sorted(expected)} (and job), got {sorted(labels)}")
    if CATALOGUE[name][0] == "counter" and not value >= 0:
        raise ValueError(f"counter {name} = {value}: a counter counts from 0 up")
    return name, {key: str(text) for key, text in labels.items()}, float(value)


def labels_of(name: str) -> tuple[str, ...]:
    """The labels of metric ``name`` besides ``job``: those of :data:`LABELS`, else ``stage``."""
    return LABELS.get(name, ("stage",))


def _job_samples(status: str, seconds: float, finished: float) -> list[Sample]:
    return [
        ("retrieval_job_duration_seconds", {}, round(seconds, 3)),
        ("retrieval_job_success", {}, 1.0 if status == "ok" else 0.0),
        ("retrieval_job_last_run_timestamp_seconds", {}, round(finished, 3)),
    ]


def _write_run_summary(cfg: Config, job: str, text: str) -> None:
    """``text`` to ``<output.root>/_runs/<job>.json``; not where output.root is a local directory that does not
    exist (a job that failed before writing anything leaves no root behind)."""
    local = storage.local_path(cfg.output.root, cfg.output.storage_options)
    if local is not None and not os.path.isdir(local):
        return
    url = storage.join(cfg.output.root, RUNS_DIR, f"{job}.json")
    storage.write_bytes_atomic(url, text.encode() + b"\n", cfg.output.storage_options)


def _warn_on_error(what: str, act: Callable[[], Any]) -> None:
    try:
        act()
    except Exception as exc:  # noqa: BLE001 - metrics never fail the job
        log.warning("could not %s: %s: %s", what, type(exc).__name__, exc)


# -------------------------------------------------------------------------------------------- Prometheus text format


def write_metrics_file(path: str, samples: list[Sample]) -> None:
    """Write ``samples`` to ``path`` whole or not at all: a temporary file in the same directory (hidden, ending
    in ``.tmp``, so that the textfile collector never reads it), readable by all, renamed into place."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(prometheus_text(samples))
        os.chmod(tmp, 0o644)  # the collector runs as another user
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def prometheus_text(samples: list[Sample]) -> str:
    """The samples in Prometheus' text exposition format (0.0.4): per metric ``# HELP`` and ``# TYPE`` lines, then
    its samples. A counter is exposed as ``<name>_total``. Samples of the same name and labels are merged (counters
    added, the last gauge kept)."""
    families: dict[str, dict[tuple, float]] = {}
    for name, labels, value in samples:
        series = families.setdefault(name, {})
        key = tuple(sorted(labels.items()))
        counter = CATALOGUE[name][0] == "counter"
        series[key] = series.get(key, 0.0) + float(value) if counter else float(value)
    lines = []
    for name in sorted(families):
        kind, help_text = CATALOGUE[name]
        exposed = f"{name}_total" if kind == "counter" else name
        lines += [f"# HELP {exposed} {_escape(help_text, quotes=False)}", f"# TYPE {exposed} {kind}"]
        lines += [f"{exposed}{_label_text(dict(key))} {_number(value)}" for key, value in families[name].items()]
    return "\n".join(lines) + "\n"


def _label_text(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in sorted(labels.items())) + "}"


def _escape(text: str, quotes: bool = True) -> str:
    """Backslash and newline escaped (and double quotes, in a label value), as the format wants."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quotes else text


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def catalogue_markdown() -> str:
    """The table of docs/metrics.md: every metric with its kind, labels and meaning."""
    rows = ["| Metric | Kind | Labels | Meaning |", "| --- | --- | --- | --- |"]
    for name, (kind, help_text) in CATALOGUE.items():
        labels = ", ".join(f"`{label}`" for label in ("job", *labels_of(name)))
        rows.append(f"| `{name}` | {kind} | {labels} | {help_text} |")
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------ what each stage's run returns


def samples_of(job: str, result: Any) -> tuple[dict, list[Sample]]:
    """(summary, samples) of what ``run`` of ``job`` (``jobs.encode``, ...) returned; ``({}, [])`` for a job or a
    result of another shape."""
    stage = job.rsplit(".", 1)[-1]
    reader = _pipeline if stage == "pipeline" else _STAGES.get(stage)
    if reader is None:
        return {}, []
    try:
        return reader(result, stage)
    except Exception as exc:  # noqa: BLE001 - a result of another shape only loses its metrics
        log.warning("no metrics from the result of %s: %s: %s", job, type(exc).__name__, exc)
        return {}, []


def _encode(r: dict, stage: str) -> tuple[dict, list[Sample]]:
    usage = r.get("api_usage") or {}
    keys = ("rows_in", "rows_encoded", "rows_rejected", "shards", "shards_run", "rows_encoded_now", "docs_per_s")
    summary = {**_picked(r, *keys, "reused", "output", "fingerprint"), **({"api_usage": usage} if usage else {})}
    samples = [
        ("retrieval_rows_encoded", r["rows_encoded_now"]),
        ("retrieval_shards_committed", r["shards_run"]),
        ("retrieval_embedding_rows", r["rows_encoded"]),
        ("retrieval_rejected_rows", r["rows_rejected"]),
        ("retrieval_stage_reused", int(bool(r["reused"]))),
    ]
    samples += [(f"retrieval_api_{key}", usage[key]) for key in ("requests", "retries", "tokens") if key in usage]
    return summary, _labelled(samples, stage)


def _index(r: dict, stage: str) -> tuple[dict, list[Sample]]:
    summary = _picked(r, "type", "metric", "ntotal", "shards", "recall_at_10", "search_parameters", "reused")
    built = not r["reused"]
    samples = [
        ("retrieval_vectors_indexed", r["ntotal"] if built else 0),
        ("retrieval_shards_committed", r["shards"] if built else 0),
        ("retrieval_index_vectors", r["ntotal"]),
        ("retrieval_stage_reused", int(not built)),
    ]
    if r["recall_at_10"] is not None:
        samples.append(("retrieval_index_recall_at_10", r["recall_at_10"]))
    return summary, _labelled(samples, stage)


EVAL_METRICS = {
    "ndcg@10": "ndcg_at_10",
    "recall@10": "recall_at_10",
    "recall@100": "recall_at_100",
    "mrr@10": "mrr_at_10",
}


def _evaluate(r: dict, stage: str) -> tuple[dict, list[Sample]]:
    figures = r["metrics"]
    summary = {"metrics": figures, **_picked(r, "index_type", "relevant_not_indexed", "reused")}
    samples = [(f"retrieval_eval_{name}", figures[key]) for key, name in EVAL_METRICS.items() if key in figures]
    samples += [("retrieval_eval_queries", figures["queries"]), ("retrieval_stage_reused", int(bool(r["reused"])))]
    return summary, _labelled(samples, stage)


def _mine(r: dict, stage: str) -> tuple[dict, list[Sample]]:
    exported = {fmt: export["rows"] for fmt, export in r["exports"].items()}
    keys = ("input_queries", "written", "complete", "incomplete", "without_negatives", "rejected_positives")
    summary = {**_picked(r, *keys, "reused"), "export_rows": exported}
    done = 0 if r["reused"] else 1
    samples: list[tuple[str, float]] = [
        ("retrieval_queries_mined", done * r["written"]),
        ("retrieval_queries_without_negatives", done * r["without_negatives"]),
        ("retrieval_stage_reused", 1 - done),
    ]
    if "triplet" in exported:
        samples.append(("retrieval_negatives_mined", done * exported["triplet"]))
    tuples = [
        ("retrieval_tuples_mined", {"stage": stage, "format": fmt}, float(done * rows))
        for fmt, rows in exported.items()
    ]
    return summary, _labelled(samples, stage) + tuples


def _train(r: dict, stage: str) -> tuple[dict, list[Sample]]:
    history = r["history"]
    evaluations = history["evaluations"]
    steps = 0 if r["reused"] else history["steps"] - history.get("resumed_from_step", 0)
    summary = {
        **_picked(r, "examples", "held_out_examples", "output", "reused"),
        "steps": history["steps"],
        "heldout_ndcg_at_10": [evaluations[0]["ndcg@10"], evaluations[-1]["ndcg@10"]],
    }
    samples = [
        ("retrieval_training_steps", steps),
        ("retrieval_training_examples", r["examples"]),
        ("retrieval_training_heldout_ndcg_at_10", evaluations[-1]["ndcg@10"]),
        ("retrieval_stage_reused", int(bool(r["reused"]))),
    ]
    if history.get("losses"):
        samples.append(("retrieval_training_loss", history["losses"][-1]))
    return summary, _labelled(samples, stage)


def _search(r: list, stage: str) -> tuple[dict, list[Sample]]:
    if not isinstance(r, list):
        raise TypeError("a search returns a list of hit lists")
    summary = {"queries": len(r), "hits": sum(len(hits) for hits in r)}
    return summary, _labelled([("retrieval_queries_searched", len(r))], stage)


_STAGES: dict[str, Callable[[Any, str], tuple[dict, list[Sample]]]] = {
    "encode": _encode,
    "index": _index,
    "evaluate": _evaluate,
    "mine": _mine,
    "train": _train,
    "search": _search,
}
# the pipeline's stages on the trained model, by the stage whose kind of result each returns
RERUN_OF = {"reencode": "encode", "reindex": "index", "reevaluate": "evaluate"}


def _pipeline(results: dict, stage: str) -> tuple[dict, list[Sample]]:
    """A pipeline's ``{stage: (result, seconds)}``: each stage's summary (with its seconds) and samples, labelled
    with the stage (``reencode``, say)."""
    stages, samples = {}, []
    for name, (result, seconds) in results.items():
        summary, found = _STAGES[RERUN_OF.get(name, name)](result, name)
        stages[name] = {**summary, "seconds": seconds}
        samples += [*found, ("retrieval_stage_duration_seconds", {"stage": name}, float(seconds))]
    return {"stages": stages}, samples


def _picked(result: dict, *keys: str) -> dict:
    return {key: result[key] for key in keys if key in result}


def _labelled(samples: list[tuple[str, float]], stage: str) -> list[Sample]:
    return [(name, {"stage": stage}, float(value)) for name, value in samples]


# ------------------------------------------------------------------------------------- refresh and sync

DOCUMENT_STATUSES = ("unchanged", "changed", "added", "deleted")


def refresh_samples(record: dict) -> tuple[dict, list]:
    """The run summary and metrics of a refresh (or rollback) record: the version, its counts and gates, and
    each sink's lag and rows."""
    counts = record.get("counts", {})
    summary = {key: record.get(key) for key in ("version", "previous", "published", "unchanged") if key in record}
    if counts:
        summary["counts"] = {
            k: counts[k] for k in ("unchanged", "changed", "added", "deleted", "encoded") if k in counts
        }
    samples: list[Sample] = [("retrieval_refresh_published", {}, 1.0 if record.get("published") else 0.0)]
    samples += [("retrieval_refresh_documents", {"status": k}, counts[k]) for k in DOCUMENT_STATUSES if k in counts]
    if "encoded_this_run" in counts:
        samples.append(("retrieval_refresh_encoded_rows", {}, counts["encoded_this_run"]))
    samples += [
        ("retrieval_refresh_gate_passed", {"gate": g["gate"]}, float(g["passed"])) for g in record.get("gates", [])
    ]
    sinks = record.get("sinks") or {}
    if sinks:
        summary["sinks"], more = sink_samples(sinks)
        samples += more
    return summary, samples


def sink_samples(result: dict) -> tuple[dict, list]:
    """(the run summary's ``sinks`` part, the metrics) of a sync: per sink what it holds, its lag in versions
    behind CURRENT, the rows it was sent, whether it failed."""
    summary, samples = {}, []
    for name, record in result["sinks"].items():
        last = record.get("last_sync", {}) if "error" not in record else {}
        lag = record.get("lag")
        summary[name] = {
            "holds": record.get("holds"),
            "lag": lag,
            **({"error": record["error"]} if "error" in record else {}),
        }
        samples.append(("retrieval_sink_failed", {"sink": name}, 1.0 if "error" in record else 0.0))
        if lag is not None:
            samples.append(("retrieval_sink_lag_versions", {"sink": name}, float(lag)))
        for op, key in (("upsert", "upserted"), ("delete", "deleted")):
            samples.append(("retrieval_sink_rows_applied", {"sink": name, "op": op}, last.get(key, 0)))
    return summary, samples
