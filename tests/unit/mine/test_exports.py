"""Per-part exports and report statistics: combined part by part, they equal what the whole table gives."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval_core.io import storage
from retrieval_core.mine import exports
from retrieval_core.mine import report as mine_report
from retrieval_core.mine.mining import PART_SCHEMA


def _part(rng, first: int, queries: int, negatives: int = 3, complete_every: int = 4) -> pa.Table:
    rows = []
    for q in range(first, first + queries):
        pos = [f"d{q}", f"d{q + 1000}"][: 1 + q % 2]
        neg = [f"d{q + 2000 + i}" for i in range(negatives - (q % complete_every == 0))]
        rows.append(
            {
                "query_id": f"q{q}",
                "query": f"query {q}",
                "positive_ids": pos,
                "positive_scores": rng.uniform(0.4, 0.9, len(pos)).astype(np.float32).tolist(),
                "negative_ids": neg,
                "negative_scores": rng.uniform(-0.1, 0.6, len(neg)).astype(np.float32).tolist(),
                "negative_ranks": sorted(rng.integers(1, 40, len(neg)).tolist()),
                "complete": len(neg) == negatives,
            }
        )
    return pa.Table.from_pylist(rows, schema=PART_SCHEMA)


@pytest.fixture
def parts():
    rng = np.random.default_rng(7)
    return [_part(rng, 0, 30), _part(rng, 30, 0), _part(rng, 30, 45)]


def _texts(table: pa.Table) -> dict:
    return {
        d: f"text of {d}" for c in ("positive_ids", "negative_ids") for ids in table.column(c).to_pylist() for d in ids
    }


def test_merged_statistics_equal_the_whole_table(parts):
    whole = pa.concat_tables(parts)
    merged = None
    for part in parts:
        merged = mine_report.merge_stats(merged, json.loads(json.dumps(mine_report.part_stats(part))))  # as recorded
    once = mine_report.part_stats(whole)
    for name in mine_report.SERIES:
        assert merged[name]["count"] == once[name]["count"] > 0
        assert merged[name]["bins"] == once[name]["bins"]
        assert merged[name]["min"] == once[name]["min"] and merged[name]["max"] == once[name]["max"]
        assert merged[name]["sum"] == pytest.approx(once[name]["sum"])
    report = mine_report.report(merged, {"queries": {}})
    negatives = np.concatenate([np.asarray(v, dtype=np.float64) for v in whole.column("negative_scores").to_pylist()])
    dist = report["negative_scores"]
    assert dist["count"] == len(negatives)
    assert dist["mean"] == pytest.approx(negatives.mean()) and dist["std"] == pytest.approx(negatives.std())
    for key, share in (("p25", 0.25), ("median", 0.5), ("p75", 0.75)):
        assert abs(dist[key] - np.quantile(negatives, share)) <= mine_report.SCORE_BIN
    assert sum(dist["histogram"]["counts"]) == len(negatives)
    assert len(dist["histogram"]["edges"]) == len(dist["histogram"]["counts"]) + 1
    ranks = np.concatenate([np.asarray(v) for v in whole.column("negative_ranks").to_pylist()])
    assert report["negative_ranks"]["median"] == np.quantile(ranks, 0.5, method="lower")
    assert mine_report.report_figure(report)[:4] == b"\x89PNG"


def _rescored(part: pa.Table, rng) -> pa.Table:
    """The part as a cross-encoder would leave it: its scores beside the bi-encoder's."""

    def ce(column):
        return [rng.uniform(0.0, 1.0, len(v)).astype(np.float32).tolist() for v in part.column(column).to_pylist()]

    return part.set_column(
        part.schema.get_field_index("positive_ce_scores"),
        "positive_ce_scores",
        pa.array(ce("positive_scores"), pa.list_(pa.float32())),
    ).set_column(
        part.schema.get_field_index("negative_ce_scores"),
        "negative_ce_scores",
        pa.array(ce("negative_scores"), pa.list_(pa.float32())),
    )


def test_merged_agreement_equals_the_whole_candidates_and_the_report_shows_both_models(parts):
    rng = np.random.default_rng(3)
    parts = [_rescored(p, rng) for p in parts]
    candidates = [(rng.uniform(-0.2, 0.8, n), rng.uniform(0.0, 1.0, n)) for n in (120, 0, 200)]
    merged = None
    for part, (bi, ce), shared in zip(parts, candidates, (40, 0, 51)):
        chosen = sum(len(v) for v in part.column("negative_ids").to_pylist())
        stats = mine_report.part_stats(part, mine_report.agreement_stats(bi, ce, chosen, shared))
        merged = mine_report.merge_stats(merged, json.loads(json.dumps(stats)))
    report = mine_report.report(merged, {"queries": {}})
    bi, ce = (np.concatenate([c[k] for c in candidates]) for k in (0, 1))
    agreement = report["agreement"]
    assert agreement["candidates"] == len(bi) == sum(map(sum, agreement["grid"]["counts"]))
    assert agreement["pearson"] == pytest.approx(np.corrcoef(bi, ce)[0, 1])
    negatives = sum(len(v) for p in parts for v in p.column("negative_ids").to_pylist())
    assert agreement["negatives_chosen"] == report["negative_ce_scores"]["count"] == negatives
    assert agreement["shared_with_bi_encoder"] == pytest.approx(91 / negatives)
    flat = np.concatenate([np.asarray(v) for p in parts for v in p.column("negative_ce_scores").to_pylist()])
    assert report["negative_ce_scores"]["mean"] == pytest.approx(flat.mean())
    assert len(agreement["grid"]["counts"]) == len(agreement["grid"]["bi_edges"]) - 1
    assert mine_report.report_figure(report)[:4] == b"\x89PNG"
    plain = mine_report.report(mine_report.part_stats(parts[0].drop_columns(["negative_ce_scores"])), {})
    assert "agreement" not in plain and "negative_ce_scores" not in plain  # no cross-encoder, no such sections


def test_the_exports_scores_are_the_cross_encoders_when_it_rescored(parts, tmp_path):
    rng = np.random.default_rng(5)
    part = _rescored(parts[0], rng)
    exports.write_part_exports(str(tmp_path), 0, part, _texts(part), ["triplet", "flag-jsonl"], 3, True)
    rows = part.to_pylist()
    triplets = pq.read_table(tmp_path / "part-00000.triplet.parquet").column("scores").to_pylist()
    assert triplets == [
        pytest.approx([p, n]) for r in rows for p in r["positive_ce_scores"] for n in r["negative_ce_scores"]
    ]
    flag = [json.loads(line) for line in (tmp_path / "part-00000.flag.jsonl").read_text().splitlines()]
    assert [f["neg_scores"] for f in flag] == [pytest.approx(r["negative_ce_scores"]) for r in rows]


def test_an_empty_report_has_zero_counts_and_a_figure():
    report = mine_report.report(None, {"queries": {}})
    assert all(report[name] == {"count": 0} for name in mine_report.SERIES)
    assert mine_report.report_figure(report)[:4] == b"\x89PNG"


@pytest.mark.parametrize("with_scores", [False, True])
def test_combined_part_exports_equal_the_exports_of_the_whole_table(parts, tmp_path, with_scores, monkeypatch):
    monkeypatch.setattr(exports, "NTUPLE_GROUP_ROWS", 4)  # several row groups a part
    formats = ["triplet", "n-tuple", "flag-jsonl"]
    for number, part in enumerate(parts):
        record = exports.write_part_exports(
            str(tmp_path / "_exports"), number, part, _texts(part), formats, 3, with_scores
        )
        assert exports.has_part_exports({"exports": record}, formats, with_scores)
        assert not exports.has_part_exports({"exports": record}, formats, not with_scores)
    written = exports.combine_exports(
        str(tmp_path / "exports"), str(tmp_path / "_exports"), [0, 1, 2], formats, 3, with_scores
    )
    whole = pa.concat_tables(parts)
    texts = _texts(whole)
    triplets = pq.read_table(tmp_path / "exports" / "triplet.parquet")
    assert triplets.to_pylist() == exports.triplet_table(whole, texts, with_scores).to_pylist()
    ntuples = pq.read_table(tmp_path / "exports" / "n-tuple.parquet")
    assert ntuples.to_pylist() == exports.ntuple_table(whole, texts, 3, with_scores).to_pylist()
    reader = pq.ParquetFile(tmp_path / "exports" / "n-tuple.parquet")
    groups = [reader.read_row_group(g).column("anchor").to_pylist() for g in range(reader.num_row_groups)]
    assert len(groups) > 10 and all(len(g) <= 4 + 1 for g in groups)  # closed at the first change of query
    assert sum(len(set(g)) for g in groups) == len(set(ntuples.column("anchor").to_pylist()))  # no query split
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
