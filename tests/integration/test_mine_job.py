"""The mining job on the session's local Ray cluster, against sentence-transformers' mine_hard_negatives."""

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import DEMO_CORPUS, REPO, build_tiny_cross_encoder, config, write_jsonl

from jobs import encode, index, mine
from jobs.ray.dispatch import StageFailed
from retrieval_core.index import lookup
from retrieval_core.io.folder import Folder
from retrieval_core.mine import inputs as mine_input
from retrieval_core.mine import mining
from retrieval_core.mine import shuffle as mine_shuffle

pytestmark = pytest.mark.usefixtures("ray_cluster")
PAIRS = REPO / "examples" / "demo" / "pairs.jsonl"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """The demo corpus encoded (title + text) and indexed exactly (Flat), shared by the mining runs."""
    root = tmp_path_factory.mktemp("mine") / "base"
    cfg = config(DEMO_CORPUS, root, corpus__title_column="title", runtime__rows_per_shard=32, index__type="Flat")
    encode.run(cfg)
    index.run(cfg)
    return root


def mine_config(root, tmp_path, name, **settings):
    """A config whose output.root is a copy of the indexed demo root (mining writes under it)."""
    import shutil

    target = tmp_path / name
    shutil.copytree(root, target)
    overrides = {
        "corpus__title_column": "title",
        "runtime__rows_per_shard": 32,
        "index__type": "Flat",
        "mine__pairs_path": str(PAIRS),
        "mine__query_id_column": "query_id",
        **{f"mine__{k}": v for k, v in settings.items()},
    }
    return config(DEMO_CORPUS, target, **overrides)


def demo_texts():
    return {r["id"]: f"{r['title']} {r['text']}" for r in pq.read_table(DEMO_CORPUS).to_pylist()}


@pytest.fixture(scope="module")
def st_cache(tmp_path_factory) -> str:
    """mine_hard_negatives' own embedding cache, shared by the reference runs: the corpus is encoded once."""
    return str(tmp_path_factory.mktemp("st-cache"))


def reference_negatives(cache: str, cross_encoder: str | None = None, **settings) -> dict[str, list[str]]:
    """sentence-transformers' mine_hard_negatives on the same pairs and corpus: query -> negative texts."""
    from datasets import Dataset
    from sentence_transformers import CrossEncoder, SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from retrieval_core.encode.model_files import resolve_model_path

    texts = demo_texts()
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    rows = [{"query": p["query"], "positive": texts[d]} for p in pairs for d in p["positive"]]
    model = SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu")
    if "range_max" in settings and _st_reserves_a_query_slot():
        settings["range_max"] -= 1  # the same candidates as the job: range_max + max_positives of them
    if cross_encoder:
        settings["cross_encoder"] = CrossEncoder(cross_encoder, device="cpu")
    result = mine_hard_negatives(
        Dataset.from_list(rows),
        model,
        corpus=list(texts.values()),
        output_format="triplet",
        verbose=False,
        cache_folder=cache,
        **settings,
    )
    out: dict[str, list[str]] = {}
    for row in result:
        negatives = out.setdefault(row["query"], [])
        if row["negative"] not in negatives:
            negatives.append(row["negative"])
    return out


def _st_reserves_a_query_slot() -> bool:
    """sentence-transformers 6.3 retrieves one candidate more than 6.2 (range_max + max_positives + 1: a slot for
    the query's own text, should the corpus hold it, which it then excludes). The demo corpus holds no query text,
    so with range_max one lower it ranks exactly the candidates the job ranks (range_max + max_positives); the
    cross-encoder tests, which rescore the whole window, see the difference."""
    import sentence_transformers

    major, minor = (int(part) for part in sentence_transformers.__version__.split(".")[:2])
    return (major, minor) >= (6, 3)


def job_negatives(cfg) -> dict[str, list[str]]:
    texts = demo_texts()
    table = mining.read_parts(Folder(str(cfg.output.root)))
    return {r["query"]: [texts[d] for d in r["negative_ids"]] for r in table.to_pylist()}


def max_positives() -> int:
    pairs = (json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip())
    return max(len(p["positive"]) for p in pairs)


# sentence-transformers' defaults: no margin, and a window of 10 * num_negatives (+ positives) with one; the job's
# default margin is 0.05 with a wider window, so both are set explicitly on the job's side.
@pytest.mark.parametrize("settings", [{}, {"relative_margin": 0.05}, {"range_min": 2, "num_negatives": 4}])
def test_negatives_equal_sentence_transformers(demo_root, tmp_path, st_cache, settings):
    job_settings = {"relative_margin": "null", **settings}
    if "relative_margin" in settings:
        job_settings["range_max"] = (
            settings.get("range_min", 0) + 10 * settings.get("num_negatives", 3) + max_positives()
        )
    cfg = mine_config(demo_root, tmp_path, "job", **job_settings)
    summary = mine.run(cfg)
    ours = job_negatives(cfg)
    reference = reference_negatives(st_cache, sampling_strategy="top", **settings)
    assert summary["written"] == len(ours) > 0
    assert ours == reference


def test_exports_report_rejects_and_rerun(demo_root, tmp_path):
    from datasets import load_dataset

    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    pairs[0]["positive"] = pairs[0]["positive"] + ["no-such-doc"]
    pairs.append({"query_id": "qx", "query": "a query whose positive is missing", "positive": "missing-doc"})
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = mine_config(
        demo_root,
        tmp_path,
        "exports",
        pairs_path=str(path),
        output_scores="true",
        formats="[triplet, n-tuple, flag-jsonl]",
        max_score=0.3,
    )
    summary = mine.run(cfg)
    out = Path(cfg.output.root) / "negatives"
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert sorted(r["doc_id"] for r in rejects) == ["missing-doc", "no-such-doc"]
    assert summary["rejected_positives"] == 2 and summary["input_queries"] == len(pairs)
    parts = mining.read_parts(Folder(str(cfg.output.root))).to_pylist()
    triplets = load_dataset("parquet", data_files=str(out / "exports" / "triplet.parquet"), split="train")
    assert triplets.column_names == ["anchor", "positive", "negative", "scores"]
    assert len(triplets) == sum(len(r["positive_ids"]) * len(r["negative_ids"]) for r in parts)
    assert all(s[1] <= 0.3 for s in triplets["scores"])
    tuples = load_dataset("parquet", data_files=str(out / "exports" / "n-tuple.parquet"), split="train")
    assert tuples.column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3", "scores"]
    assert len(tuples) == sum(len(r["positive_ids"]) for r in parts if r["complete"])
    flag = [json.loads(line) for line in (out / "exports" / "flag.jsonl").read_text().splitlines()]
    assert len(flag) == len(parts) and all(set(f) == {"query", "pos", "neg", "pos_scores", "neg_scores"} for f in flag)
    report = json.loads((out / "report.json").read_text())
    assert report["negative_scores"]["count"] == sum(len(r["negative_ids"]) for r in parts)
    assert report["filtered"]["max_score"] > 0 and (out / "report.png").stat().st_size > 1000
    again = mine.run(cfg)
    assert again["reused"] is True and again["written"] == summary["written"]


def test_parts_mined_with_other_formats_get_this_runs_exports(demo_root, tmp_path, monkeypatch):
    """Parts committed by a run with other export settings (killed before its manifest) are not mined again; their
    exports are made from the part files, and every export equals a clean run's, texts included. The clean run
    joins its texts in 4 groups of 64 rows (mine_texts); the resumed one looks them up part by part."""
    from retrieval_core.mine import texts as mine_texts

    both = "[triplet, flag-jsonl]"
    clean = mine_config(demo_root, tmp_path, "clean", formats=both, queries_per_part=40, output_scores="true")
    monkeypatch.setattr(mine_texts, "TEXT_GROUP_ROWS", 64)
    mine.run(clean)
    monkeypatch.undo()
    assert mining.read_mine_manifest(Folder(str(clean.output.root)))["text_join"]["groups"] == 4
    cfg = mine_config(demo_root, tmp_path, "resumed", formats="[triplet]", queries_per_part=40)
    mine.run(cfg)
    out = Path(cfg.output.root) / "negatives"
    (out / "_manifest.json").unlink()
    parts_before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    mine.run(
        dataclasses.replace(cfg, mine=dataclasses.replace(cfg.mine, formats=clean.mine.formats, output_scores=True))
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == parts_before  # not mined again
    assert not (out / "_exports").exists()
    clean_out = Path(clean.output.root) / "negatives"
    for name in ("triplet.parquet", "flag.jsonl"):
        assert (out / "exports" / name).read_bytes() == (clean_out / "exports" / name).read_bytes()
    corpus = set(demo_texts().values())
    flag = [json.loads(line) for line in (out / "exports" / "flag.jsonl").read_text().splitlines()]
    assert flag and all(set(f["pos"]) | set(f["neg"]) <= corpus for f in flag)
    assert json.loads((out / "report.json").read_text()) == json.loads((clean_out / "report.json").read_text())


def _by_query(cfg) -> dict:
    return {r["query_id"]: r for r in mining.read_parts(Folder(str(cfg.output.root))).to_pylist()}


def assert_same_negatives(a: dict, b: dict) -> None:
    """Per query: the same ids, ranks and completeness; scores up to float noise (queries encoded in other
    batches)."""
    assert a.keys() == b.keys()
    exact = ("query", "positive_ids", "negative_ids", "negative_ranks", "complete")
    for query_id, row in a.items():
        assert [row[c] for c in exact] == [b[query_id][c] for c in exact]
        for column in ("positive_scores", "negative_scores"):
            assert row[column] == pytest.approx(b[query_id][column], abs=1e-5)


def test_input_planned_in_hash_buckets_by_workers_gives_the_same_negatives(demo_root, tmp_path, monkeypatch):
    """The input split into about 10 buckets (planned by Ray tasks: the input read once and shuffled to its
    buckets, the positives joined with the corpus by doc bucket) mines the same negatives per query, the same
    rejects and counts, as one bucket planned in the driver."""
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    pairs[0]["positive"] = pairs[0]["positive"] + ["no-such-doc"]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    one = mine_config(demo_root, tmp_path, "one", pairs_path=str(path), queries_per_part=7)
    many = mine_config(
        demo_root,
        tmp_path,
        "many",
        pairs_path=str(path),
        queries_per_part=7,
        input_mb_per_bucket=path.stat().st_size / 10 / 2**20,
    )
    monkeypatch.setattr(mine_shuffle, "DOC_ROWS_PER_TASK", 70)  # in the driver's plan: 4 doc buckets, 4 shard groups
    a, b = mine.run(one), mine.run(many)
    manifest = mining.read_mine_manifest(Folder(str(many.output.root)))
    assert (
        manifest["input_buckets"] == 10
        and mining.read_mine_manifest(Folder(str(one.output.root)))["input_buckets"] == 1
    )
    assert manifest["input_shuffle"]["doc_buckets"] > 1 and manifest["input_shuffle"]["shard_groups"] > 1
    assert_same_negatives(_by_query(one), _by_query(many))
    assert len(_by_query(one)) == len(pairs)
    assert {k: a[k] for k in ("input_queries", "written", "rejected_positives")} == {
        k: b[k] for k in ("input_queries", "written", "rejected_positives")
    }
    rejects = [pq.read_table(Path(c.output.root) / "negatives" / "rejects.parquet").to_pylist() for c in (one, many)]
    assert (
        rejects[0]
        == rejects[1]
        == [{"query_id": pairs[0]["query_id"], "doc_id": "no-such-doc", "reason": "positive not in corpus"}]
    )


def test_bad_input_found_while_planning_in_workers_names_the_line_and_a_fixed_input_needs_no_overwrite(
    demo_root, tmp_path
):
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    broken = [*pairs[:5], {"query_id": "bad", "query": "", "positive": "d001"}, *pairs[5:]]
    path = write_jsonl(tmp_path / "pairs.jsonl", broken)
    cfg = mine_config(
        demo_root, tmp_path, "bad", pairs_path=str(path), input_mb_per_bucket=path.stat().st_size / 3 / 2**20
    )
    with pytest.raises(mine_input.PairsError, match=r"pairs\.jsonl' line 6: 'query' must be a non-empty string"):
        mine.run(cfg)
    write_jsonl(path, pairs)  # fixed: another input, and no part was mined from the broken one
    assert mine.run(cfg)["written"] == len(pairs)


def test_beir_input_in_buckets_gives_the_same_negatives(demo_root, tmp_path):
    beir = {
        "pairs_path": "",
        "queries_path": str(REPO / "examples" / "demo" / "queries.jsonl"),
        "qrels_path": str(REPO / "examples" / "demo" / "qrels.tsv"),
    }
    size = sum(Path(beir[k]).stat().st_size for k in ("queries_path", "qrels_path"))
    one = mine_config(demo_root, tmp_path, "one", **beir)
    many = mine_config(demo_root, tmp_path, "many", **beir, input_mb_per_bucket=size / 4 / 2**20)
    a, b = mine.run(one), mine.run(many)
    assert mining.read_mine_manifest(Folder(str(many.output.root)))["input_buckets"] == 4
    assert a["input_queries"] == b["input_queries"] > 0 and a["written"] == b["written"]
    assert_same_negatives(_by_query(one), _by_query(many))


# ------------------------------------------------------------------------------------------- cross-encoder


@pytest.fixture(scope="module")
def tiny_ce(tmp_path_factory) -> str:
    return str(build_tiny_cross_encoder(tmp_path_factory.mktemp("ce")))


# sentence-transformers rescores only when a margin, max_score or min_score is set: without a margin it is made to
# rescore by a min_score below every sigmoid score, which removes nothing (the job rescores whenever it is given a
# cross-encoder). Both take the same window.
def test_rescored_negatives_with_a_margin_in_sharded_mode_equal_sentence_transformers_with_the_cross_encoder(
    demo_root, tmp_path, tiny_ce, st_cache
):
    window = 10 * 3 + max_positives()
    cfg = mine_config(
        demo_root, tmp_path, "ce", cross_encoder=tiny_ce, range_max=window, relative_margin=0.05, mode="sharded"
    )
    summary = mine.run(cfg)
    ours = job_negatives(cfg)
    assert summary["written"] == len(ours) > 0 and summary["filtered"]["relative_margin"] > 0
    reference = reference_negatives(st_cache, tiny_ce, sampling_strategy="top", range_max=window, relative_margin=0.05)
    assert ours == reference


def test_rescoring_without_a_margin_equals_sentence_transformers_and_a_rerun_rescores_only_the_rest(
    demo_root, tmp_path, tiny_ce, st_cache, faults, monkeypatch
):
    """Parts of 10 queries: a failure at the fifth part, then a rerun that leaves the committed parts as they are;
    the result equals sentence-transformers' (the sharded mode is checked against it with a margin, above). The
    rerun asks for one more export format: the committed parts get it through the text join (no part looks its
    texts up across the corpus)."""
    from sentence_transformers import CrossEncoder

    window = 10 * 3 + max_positives()
    settings = dict(
        cross_encoder=tiny_ce,
        range_max=window,
        relative_margin="null",
        queries_per_part=10,
        output_scores="true",
        formats="[flag-jsonl]",
    )
    replicated = mine_config(demo_root, tmp_path, "replicated", mode="replicated", **settings)
    replicated = dataclasses.replace(replicated, runtime=dataclasses.replace(replicated.runtime, cpus_per_worker=2))
    faults([{"point": "write", "match": "negatives/part-00004.parquet", "action": "oserror"}])
    with pytest.raises(StageFailed, match="part-00004.parquet"):
        mine.run(replicated)  # one worker: parts 0 to 3 are committed
    out = Path(replicated.output.root) / "negatives"
    committed = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert sorted(committed) == [f"part-{i:05d}.parquet" for i in range(4)]
    monkeypatch.setattr(lookup, "texts_for_doc_ids", lambda *a, **k: pytest.fail("texts looked up for a part"))
    replicated = dataclasses.replace(
        replicated, mine=dataclasses.replace(replicated.mine, formats=["flag-jsonl", "triplet"])
    )
    mine.run(replicated)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in committed} == committed
    assert job_negatives(replicated) == reference_negatives(
        st_cache, tiny_ce, sampling_strategy="top", range_max=window, min_score=-1.0
    )
    a = _by_query(replicated)
    for row in a.values():
        assert row["negative_ce_scores"] == sorted(row["negative_ce_scores"], reverse=True)
    # the cross-encoder's scores are its own, and the exports' scores are they
    texts = demo_texts()
    row = a[sorted(a)[0]]
    direct = CrossEncoder(tiny_ce, device="cpu").predict([(row["query"], texts[d]) for d in row["negative_ids"]])
    assert row["negative_ce_scores"] == pytest.approx(direct.tolist(), abs=1e-5)
    flag = {f["query"]: f for f in map(json.loads, (out / "exports" / "flag.jsonl").read_text().splitlines())}
    assert flag[row["query"]]["neg_scores"] == pytest.approx(row["negative_ce_scores"], abs=1e-6)
    triplets = pq.read_table(out / "exports" / "triplet.parquet").to_pylist()
    assert [(t["anchor"], t["positive"], t["negative"]) for t in triplets] == [
        (r["query"], texts[p], texts[n])
        for r in mining.read_parts(Folder(str(replicated.output.root))).to_pylist()
        for p in r["positive_ids"]
        for n in r["negative_ids"]
    ]
    assert flag[row["query"]]["pos_scores"] == pytest.approx(row["positive_ce_scores"], abs=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["negative_ce_scores"]["count"] == sum(len(r["negative_ids"]) for r in a.values())
    agreement = report["agreement"]
    assert agreement["candidates"] > agreement["negatives_chosen"] == report["negative_ce_scores"]["count"]
    assert -1.0 <= agreement["pearson"] <= 1.0
    assert agreement["shared_with_bi_encoder"] < 0.9  # the cross-encoder's choice, not the bi-encoder's
    identity = mining.read_mine_manifest(Folder(str(replicated.output.root)))["identity"]
    assert identity["cross_encoder"]["model"] == tiny_ce and identity["cross_encoder"]["weights_sha256"]


class NoPartLookups(lookup.RowLookup):
    """A row lookup that refuses what a part must no longer do: look its candidates up (doc ids, text hashes,
    texts) across the corpus."""

    def values(self, row_ids):
        raise AssertionError(f"{len(list(row_ids))} rows looked up in the embedding shards")

    def texts(self, row_ids):
        raise AssertionError(f"the corpus was read for {len(list(row_ids))} texts")

    def texts_of(self, values):
        raise AssertionError(f"the corpus was read for {len(values)} texts")


def test_a_part_selects_from_the_values_the_join_found_not_from_lookups(demo_root, tmp_path, tiny_ce):
    """A part is mined in two halves around the join of its candidates: searched (its candidate and positive rows
    requested by text group), then rescored and selected from the joined doc ids, hashes and texts. The second half
    looks nothing up across the corpus, each group reads each of its texts once, and the scores are the
    cross-encoder's on the corpus texts."""
    from sentence_transformers import CrossEncoder

    from retrieval_core.encode import encoding
    from retrieval_core.encode.embeddings import read_embeddings_manifest
    from retrieval_core.index import faiss_index, indexing
    from retrieval_core.mine import parts as mine_parts
    from retrieval_core.mine import plan as mine_plan
    from retrieval_core.mine import rescoring
    from retrieval_core.mine import texts as mine_texts

    cfg = mine_config(
        demo_root,
        tmp_path,
        "halves",
        cross_encoder=tiny_ce,
        range_max=12,
        relative_margin="null",
        num_negatives=2,
        queries_per_part=15,
    )
    root, emb = str(cfg.output.root), read_embeddings_manifest(Folder(str(cfg.output.root)))
    parts = mine_plan.part_inputs([mine_plan.plan_bucket(mining.work_of(cfg), 0, emb=emb)], cfg.mine.queries_per_part)
    queries = {p.number: mine_plan.read_part_input(mining.work_of(cfg), p) for p in parts}
    merged, encoder = indexing.load_index(Folder(root))[0], encoding.load_encoder(cfg.model, 0, threads=1)
    starts, directory = mine_texts.group_starts(emb, rows_per_group=64), mine_parts.candidates_dir(mining.work_of(cfg))
    assert len(parts) > 1 and len(starts) > 1
    for p in parts:
        mine_parts.search_part(
            mining.work_of(cfg),
            p.number,
            queries[p.number],
            encoder.encode_queries,
            lambda vectors, k: faiss_index.search(merged, vectors, k),
            16,
            starts,
        )
    asked = [(p.number, mine_parts.search_record(mining.work_of(cfg), p.number)["text_groups"]) for p in parts]
    records = [
        mine_texts.resolve_group(directory, g, numbers, lookup.RowLookup(Folder(root)))
        for g, numbers in mine_texts.groups_to_join(directory, asked).items()
    ]
    corpus_rows = sum(s["row_stop"] - s["row_start"] for s in emb["shards"])
    read = sum(r["read"] for r in records)
    assert 0 < read <= corpus_rows < sum(r["texts"] for r in records)  # each text read once, whatever the parts
    scorer = rescoring.CrossEncoderScorer(cfg.mine, cfg.model)
    committed = [
        mine_parts.select_part(
            mining.work_of(cfg), NoPartLookups(Folder(root)), p.number, queries[p.number], 12, starts, scorer.score
        )
        for p in parts
    ]
    assert all(r["exports"]["formats"] == list(cfg.mine.formats) for r in committed)  # no second join
    texts, direct = demo_texts(), CrossEncoder(tiny_ce, device="cpu")
    rows = mining.concat_parts(Folder(root), committed).to_pylist()
    assert rows and sum(len(r["negative_ids"]) for r in rows) > len(rows)
    for row in rows:
        for ids, scores in (
            (row["negative_ids"], row["negative_ce_scores"]),
            (row["positive_ids"], row["positive_ce_scores"]),
        ):
            want = direct.predict([(row["query"], texts[d]) for d in ids]).tolist()
            assert scores == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_negatives_over_binary_codes_rescored_equal_sentence_transformers(demo_root, tmp_path, st_cache, mode):
    """index.vectors: binary (RaBitQ) with rescoring: mining reads the index as it reads any other. Its candidates
    (10 x the window) cover the 247 demo documents, and rescoring gives their exact scores, so the negatives are the
    reference's, as over the exact index."""
    import shutil

    cfg = mine_config(demo_root, tmp_path, "binary", relative_margin="null", mode=mode)
    shutil.rmtree(Path(cfg.output.root) / "index")
    cfg = dataclasses.replace(
        cfg, index=dataclasses.replace(cfg.index, type="auto", vectors="binary", rescore_factor=10)
    )
    built = index.run(cfg)
    assert built["type"] == "RaBitQ"
    mine.run(cfg)
    assert job_negatives(cfg) == reference_negatives(st_cache, sampling_strategy="top")
