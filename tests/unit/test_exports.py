"""Per-part exports and report statistics: combined part by part, they equal what the whole table gives."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval_core import exports, storage
from retrieval_core.mining import PART_SCHEMA


def _part(rng, first: int, queries: int, negatives: int = 3, complete_every: int = 4) -> pa.Table:
    rows = []
    for q in range(first, first + queries):
        pos = [f"d{q}", f"d{q + 1000}"][: 1 + q % 2]
        neg = [f"d{q + 2000 + i}" for i in range(negatives - (q % complete_every == 0))]
        rows.append({"query_id": f"q{q}", "query": f"query {q}", "positive_ids": pos,
                     "positive_scores": rng.uniform(0.4, 0.9, len(pos)).astype(np.float32).tolist(),
                     "negative_ids": neg, "negative_scores": rng.uniform(-0.1, 0.6, len(neg)).astype(np.float32).tolist(),
                     "negative_ranks": sorted(rng.integers(1, 40, len(neg)).tolist()),
                     "complete": len(neg) == negatives})
    return pa.Table.from_pylist(rows, schema=PART_SCHEMA)


@pytest.fixture
def parts():
    rng = np.random.default_rng(7)
    return [_part(rng, 0, 30), _part(rng, 30, 0), _part(rng, 30, 45)]


def _texts(table: pa.Table) -> dict:
    return {d: f"text of {d}" for c in ("positive_ids", "negative_ids") for ids in table.column(c).to_pylist()
            for d in ids}


def test_merged_statistics_equal_the_whole_table(parts):
    whole = pa.concat_tables(parts)
    merged = None
    for part in parts:
        merged = exports.merge_stats(merged, json.loads(json.dumps(exports.part_stats(part))))  # as records hold it
    once = exports.part_stats(whole)
    for name in exports.SERIES:
        assert merged[name]["count"] == once[name]["count"] > 0
        assert merged[name]["bins"] == once[name]["bins"]
        assert merged[name]["min"] == once[name]["min"] and merged[name]["max"] == once[name]["max"]
        assert merged[name]["sum"] == pytest.approx(once[name]["sum"])
    report = exports.report(merged, {"queries": {}})
    negatives = np.concatenate([np.asarray(v, dtype=np.float64) for v in whole.column("negative_scores").to_pylist()])
    dist = report["negative_scores"]
    assert dist["count"] == len(negatives)
    assert dist["mean"] == pytest.approx(negatives.mean()) and dist["std"] == pytest.approx(negatives.std())
    for key, share in (("p25", 0.25), ("median", 0.5), ("p75", 0.75)):
        assert abs(dist[key] - np.quantile(negatives, share)) <= exports.SCORE_BIN
    assert sum(dist["histogram"]["counts"]) == len(negatives)
    assert len(dist["histogram"]["edges"]) == len(dist["histogram"]["counts"]) + 1
    ranks = np.concatenate([np.asarray(v) for v in whole.column("negative_ranks").to_pylist()])
    assert report["negative_ranks"]["median"] == np.quantile(ranks, 0.5, method="lower")
    assert exports.report_figure(report)[:4] == b"\x89PNG"


def test_an_empty_report_has_zero_counts_and_a_figure():
    report = exports.report(None, {"queries": {}})
    assert all(report[name] == {"count": 0} for name in exports.SERIES)
    assert exports.report_figure(report)[:4] == b"\x89PNG"


@pytest.mark.parametrize("with_scores", [False, True])
def test_combined_part_exports_equal_the_exports_of_the_whole_table(parts, tmp_path, with_scores):
    formats = ["triplet", "n-tuple", "flag-jsonl"]
    for number, part in enumerate(parts):
        record = exports.write_part_exports(str(tmp_path / "_exports"), number, part, _texts(part), formats, 3,
                                            with_scores)
        assert exports.has_part_exports({"exports": record}, formats, with_scores)
        assert not exports.has_part_exports({"exports": record}, formats, not with_scores)
    written = exports.combine_exports(str(tmp_path / "exports"), str(tmp_path / "_exports"), [0, 1, 2], formats, 3,
                                      with_scores)
    whole = pa.concat_tables(parts)
    texts = _texts(whole)
    triplets = pq.read_table(tmp_path / "exports" / "triplet.parquet")
    assert triplets.to_pylist() == exports.triplet_table(whole, texts, with_scores).to_pylist()
    ntuples = pq.read_table(tmp_path / "exports" / "n-tuple.parquet")
    assert ntuples.to_pylist() == exports.ntuple_table(whole, texts, 3, with_scores).to_pylist()
    assert (tmp_path / "exports" / "flag.jsonl").read_bytes() == exports.flag_lines(whole, texts, with_scores)
    assert written["triplet"]["rows"] == triplets.num_rows > 0
    assert written["flag-jsonl"]["rows"] == whole.num_rows


def test_an_atomic_stream_leaves_nothing_when_the_writer_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with storage.open_atomic(str(tmp_path / "out.bin")) as handle:
            handle.write(b"half")
            raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []
    with storage.open_atomic(str(tmp_path / "out.bin")) as handle:
        handle.write(b"whole")
    assert (tmp_path / "out.bin").read_bytes() == b"whole" and len(list(tmp_path.iterdir())) == 1
