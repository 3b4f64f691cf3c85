"""The refresh's and the sync's run summaries and metrics: every sample is one the catalogue accepts (a wrong name or
label would be refused at the end of a night), with the record's numbers."""

from jobs import _metrics


def checked(samples):
    return {(name, tuple(sorted(labels.items()))): value for name, labels, value in map(_metrics._checked, samples)}


SINKS = {
    "version": "v000002-20261204T000000Z",
    "sinks": {
        "lance-docs": {"holds": "v000002-20261204T000000Z", "lag": 0, "last_sync": {"upserted": 16, "deleted": 4}},
        "qdrant-docs": {"holds": "v000001-20261203T000000Z", "lag": 1, "error": "ConnectionError: gone"},
    },
}


def test_a_published_night_reports_its_counts_gates_and_sinks():
    record = {
        "version": "v000002-20261204T000000Z",
        "previous": "v000001-20261203T000000Z",
        "published": True,
        "counts": {"unchanged": 186, "changed": 10, "added": 6, "deleted": 4, "encoded": 16, "encoded_this_run": 16},
        "gates": [
            {"gate": "publish.min_recall", "passed": True},
            {"gate": "publish.max_deleted_fraction", "passed": True},
        ],
        "sinks": SINKS,
    }
    summary, samples = _metrics.refresh_samples(record)
    found = checked(samples)
    assert found[("retrieval_refresh_published", ())] == 1.0
    assert found[("retrieval_refresh_documents", (("status", "changed"),))] == 10
    assert found[("retrieval_refresh_encoded_rows", ())] == 16
    assert found[("retrieval_refresh_gate_passed", (("gate", "publish.min_recall"),))] == 1.0
    assert found[("retrieval_sink_lag_versions", (("sink", "qdrant-docs"),))] == 1.0
    assert found[("retrieval_sink_failed", (("sink", "qdrant-docs"),))] == 1.0
    assert found[("retrieval_sink_failed", (("sink", "lance-docs"),))] == 0.0
    assert found[("retrieval_sink_rows_applied", (("op", "upsert"), ("sink", "lance-docs")))] == 16
    assert summary["counts"]["added"] == 6 and summary["sinks"]["qdrant-docs"]["error"] == "ConnectionError: gone"


def test_a_rollback_reports_no_counts_and_a_sync_reports_its_sinks():
    summary, samples = _metrics.refresh_samples({"version": "v1", "previous": "v2"})
    assert "counts" not in summary and checked(samples) == {("retrieval_refresh_published", ()): 0.0}
    summary, samples = _metrics.sink_samples(SINKS)
    assert summary["lance-docs"] == {"holds": "v000002-20261204T000000Z", "lag": 0}
    found = checked(samples)  # per sink: failed, lag, rows upserted and deleted (0 for the failed one)
    assert len(found) == 8 and found[("retrieval_sink_rows_applied", (("op", "delete"), ("sink", "qdrant-docs")))] == 0


def test_ray_metrics_are_recorded_again_only_on_a_drivers_cluster_after_a_success(monkeypatch):
    from retrieval_core.config import load_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def address(value: str, status: str = "ok") -> str:
        return _metrics._cluster_to_reconnect(load_config(None, [f"runtime.address={value}"]), status)

    assert address("10.0.0.1:6379") == "10.0.0.1:6379"
    assert address("10.0.0.1:6379", "failed") == ""  # a failed job's cluster may be gone: no connection attempt
    assert address("") == "" and address("local") == ""  # a local cluster ended with the job: no new one started
    assert address("ray://head:10001") == ""  # a client connection: not a driver on the cluster
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")  # ray job submit
    assert address("") == "10.0.0.2:6379"
