"""The mining stage without Ray: parts, per-part selection and commit, exports, manifest (the input: ``mine_input``).

Layout under ``<root>/negatives/``::

    _plan.json            identity (index, mining settings, input files) and, once planned, the number of parts
    _input/               the input planned in hash buckets of queries (see ``mine_plan``): part inputs, rejects
    part-00000.parquet    query_id, query, positive_ids, positive_scores, negative_ids, negative_scores,
                          negative_ranks, complete, positive_ce_scores, negative_ce_scores (the cross-encoder's
                          scores when ``mine.cross_encoder`` rescored, else null)
    _parts/part-00000.json  the part's commit record (counts per filter, incomplete queries, the text groups it
                          asked, exports written, mergeable report statistics)
    _texts/               the text join (see ``mine_texts``): the parts' requests, the groups' texts and commit
                          records (removed once the manifest is written)
    _candidates/          the parts' search results (part-00000.npz: query vectors, scores, row ids; .json: the
                          text groups asked) and the join of their candidates' values (see ``mine_texts``), between
                          the search and the selection (removed once the manifest is written)
    _exports/part-00000.<export file>  the part's share of each export (removed once the manifest is written)
    rejects.parquet       positives whose doc id is not in the corpus (query_id, doc_id, reason)
    _manifest.json        written last: settings, counts, encoder fingerprint
    exports/              triplet.parquet, n-tuple.parquet, flag.jsonl (``mine.formats``)
    report.json, report.png
"""
from __future__ import annotations

import dataclasses
import io
import logging
import time
from typing import Callable

import numpy as np
import pyarrow as pa

from . import encoding, exports, lookup, mine_report, mine_texts, negatives, rescoring, storage
from .config import Config, MineConfig, redact_storage_options
from .manifest import claim_stage_dir, peak_memory_mb, read_manifest, stamp
from .mine_input import MiningQuery

log = logging.getLogger(__name__)

PART_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("query", pa.string()),
    ("positive_ids", pa.list_(pa.string())), ("positive_scores", pa.list_(pa.float32())),
    ("negative_ids", pa.list_(pa.string())), ("negative_scores", pa.list_(pa.float32())),
    ("negative_ranks", pa.list_(pa.int32())), ("complete", pa.bool_()),
    ("positive_ce_scores", pa.list_(pa.float32())), ("negative_ce_scores", pa.list_(pa.float32())),
])
PART_EXPORTS = "_exports"  # each part's share of the exports, until the combined exports are committed
TEXTS = "_texts"  # the text join's requests and texts (see mine_texts), until the combined exports are committed
CANDIDATES = "_candidates"  # the parts' search results and the join of their candidates, until the manifest


# ------------------------------------------------------------------------------------------------------ layout

@dataclasses.dataclass(frozen=True)
class MineLayout:
    root: str
    storage_options: dict = dataclasses.field(default_factory=dict)

    @property
    def dir(self) -> str:
        return storage.join(self.root, "negatives")

    def file(self, *parts: str) -> str:
        return storage.join(self.dir, *parts)

    def part_file(self, index: int) -> str:
        return self.file(f"part-{index:05d}.parquet")

    def record_file(self, index: int) -> str:
        return self.file("_parts", f"part-{index:05d}.json")


def layout_of(cfg: Config) -> MineLayout:
    return MineLayout(cfg.output.root, cfg.output.storage_options)


def rules_of(mi: MineConfig) -> negatives.Rules:
    return negatives.Rules(num_negatives=mi.num_negatives, range_min=mi.range_min, range_max=mi.range_max,
                           max_score=mi.max_score, min_score=mi.min_score, absolute_margin=mi.absolute_margin,
                           relative_margin=mi.relative_margin, sampling=mi.sampling, seed=mi.seed)


def mining_identity(cfg: Config, index_manifest: dict, input_plan: dict) -> dict:
    """What fixes the mined parts: the index, the query encoder, the rules, the mode, the part size, the input
    (its files' names, sizes and versions, and the number of buckets it is planned in) and the cross-encoder, when
    one rescores (absent otherwise, so identities without one stay what they were)."""
    mi = cfg.mine
    reading = {k: getattr(mi, k) for k in ("format", "query_column", "positive_column", "query_id_column")}
    identity = {"index": index_manifest["identity"], "fingerprint": index_manifest["fingerprint"],
                **encoding.query_side(cfg.model), "rules": dataclasses.asdict(rules_of(mi)), "mode": mi.mode,
                "queries_per_part": mi.queries_per_part, "input": {**input_plan, "reading": reading},
                "parts_by": "query id bucket, then first positive row"}
    cross_encoder = rescoring.cross_encoder_identity(mi, cfg.model)
    return {**identity, "cross_encoder": cross_encoder} if cross_encoder else identity


def prepare(cfg: Config, identity: dict) -> None:
    """Check (or, with ``output.overwrite``, clear) an earlier run, and write the plan. An earlier run with other
    settings that committed no part yet (it stopped while planning, on bad input say) is cleared: only its
    planning is lost."""
    layout = layout_of(cfg)
    plan_url = layout.file("_plan.json")
    if storage.exists(plan_url, layout.storage_options) and not storage.list_names(layout.file("_parts"),
                                                                                   layout.storage_options):
        if storage.read_json(plan_url, layout.storage_options).get("identity") != identity:
            log.info("'%s' holds the planning of a run with other settings and no mined part: planning again",
                     layout.dir)
            storage.remove(layout.dir, layout.storage_options)
    claim_stage_dir(layout.dir, identity, {"config": cfg.to_dict()}, cfg.output.overwrite, layout.storage_options)


def record_parts(cfg: Config, parts: int) -> None:
    """Add the number of parts to the plan once the buckets are planned (progress reports read it)."""
    layout = layout_of(cfg)
    url = layout.file("_plan.json")
    plan = storage.read_json(url, layout.storage_options)
    if plan.get("parts") != parts:
        storage.write_json_atomic(url, {**plan, "parts": parts}, layout.storage_options)


def text_starts(cfg: Config, choose: Callable[[], list[int]]) -> list[int]:
    """The text groups of the run (see :mod:`mine_texts`): those its plan records, else ``choose()``, recorded
    (every part of a run, whichever run mined it, asks by the same groups)."""
    layout = layout_of(cfg)
    url = layout.file("_plan.json")
    plan = storage.read_json(url, layout.storage_options)
    if "text_starts" not in plan:
        plan = {**plan, "text_starts": choose()}
        storage.write_json_atomic(url, plan, layout.storage_options)
    return plan["text_starts"]


def pending_parts(cfg: Config, parts: int) -> list[int]:
    layout = layout_of(cfg)
    return [i for i in range(parts) if not storage.exists(layout.record_file(i), layout.storage_options)]


# ------------------------------------------------------------------------------------------------------ one part

@dataclasses.dataclass
class Candidates:
    """A part's search results with the values the selection needs: (doc id, text hash) of each candidate row,
    the candidates' text hashes (n x depth, "" where none), and (vector, text hash) of each positive row."""
    values: dict[int, tuple[str, str]]
    hashes: np.ndarray
    positives: dict[int, tuple[np.ndarray, str]]

    @classmethod
    def joined(cls, joined: pa.Table, rows: lookup.RowLookup, queries: list[MiningQuery], ids: np.ndarray
               ) -> "Candidates":
        """From the rows the join found for the part (:func:`mine_texts.part_rows`); the positives' vectors from
        the embedding shards holding them (a part's positives lie in few shards)."""
        values = dict(zip(joined.column("row").to_pylist(),
                          zip(joined.column("doc_id").to_pylist(), joined.column("text_hash").to_pylist())))
        return cls(values, lookup.text_hashes(values, ids), positive_vectors(queries, rows))

    def positive_hashes(self) -> dict[int, str]:
        return {row: text_hash for row, (_, text_hash) in self.positives.items()}


def positive_vectors(queries: list[MiningQuery], rows: lookup.RowLookup) -> dict[int, tuple[np.ndarray, str]]:
    """Row id -> (vector, text hash) of every positive of ``queries``."""
    values = rows.vectors({r for q in queries for r in q.positive_rows})
    return {row: (np.asarray(vector, dtype=np.float32), text_hash) for row, (vector, text_hash) in values.items()}


def search_part(cfg: Config, number: int, queries: list[MiningQuery], encode: Callable, search: Callable,
                depth: int, text_starts: list[int]) -> dict:
    """The first half of part ``number``: encode its queries (``encode(texts)``), search (``search(vectors,
    depth)`` -> scores, row ids), write the results (``_candidates/part-NNNNN.npz``) and the requests of every
    candidate and positive row (text groups starting at rows ``text_starts``, see :mod:`mine_texts`), whose doc
    ids, text hashes and, for a cross-encoder, texts the join of the candidates finds; last, its record
    (``part-NNNNN.json``: the groups asked, seconds per step), which :func:`select_part` reads. Returns it."""
    so, clock = cfg.output.storage_options, _Clock()
    vectors = clock.step("encode", encode, [q.text for q in queries])
    scores, ids = clock.step("search", search, vectors, depth)
    wanted = np.concatenate([ids.ravel(), np.array([r for q in queries for r in q.positive_rows], dtype=np.int64)])
    groups = clock.step("text_requests", mine_texts.write_requests, candidates_dir(cfg), number, wanted,
                        text_starts, so)
    buffer = io.BytesIO()
    np.savez(buffer, vectors=vectors, scores=scores, ids=ids)
    storage.write_bytes_atomic(_candidates_file(cfg, number, "npz"), buffer.getvalue(), so)
    record = {"part": number, "text_groups": groups, "steps_s": clock.seconds}
    storage.write_json_atomic(_candidates_file(cfg, number, "json"), record, so)
    return record


def candidates_dir(cfg: Config) -> str:
    """Where the parts' search results and the join of their candidates are kept (see :mod:`mine_texts`)."""
    return layout_of(cfg).file(CANDIDATES)


def _candidates_file(cfg: Config, number: int, suffix: str) -> str:
    return storage.join(candidates_dir(cfg), f"part-{number:05d}.{suffix}")


def searched(cfg: Config, number: int) -> bool:
    """Whether :func:`search_part` finished part ``number``."""
    return storage.exists(_candidates_file(cfg, number, "json"), cfg.output.storage_options)


def search_record(cfg: Config, number: int) -> dict:
    """The record :func:`search_part` wrote for part ``number``."""
    return storage.read_json(_candidates_file(cfg, number, "json"), cfg.output.storage_options)


def select_part(cfg: Config, rows: lookup.RowLookup, number: int, queries: list[MiningQuery], range_max: int,
                text_starts: list[int], rescore: Callable | None = None) -> dict:
    """The second half of part ``number`` (searched by :func:`search_part`, its candidates joined): with a
    cross-encoder, rescore the candidates (``rescore(pairs)`` -> scores) with the joined texts; select the
    negatives; write the part's statistics and either its exports (with a cross-encoder: the texts are at hand) or
    its text requests (the join after the selection finds them, see :func:`export_part`); commit it. ``rows`` gives
    the positives' vectors only. Memory: the values (and texts) of the part's candidates. Returns its commit
    record."""
    so = cfg.output.storage_options
    record = search_record(cfg, number)
    clock = _Clock(record["steps_s"])
    with np.load(io.BytesIO(storage.read_bytes(_candidates_file(cfg, number, "npz"), so))) as arrays:
        vectors, scores, ids = arrays["vectors"], arrays["scores"], arrays["ids"]
    joined = clock.step("select", mine_texts.part_rows, candidates_dir(cfg), number, record["text_groups"], so)
    found = clock.step("select", Candidates.joined, joined, rows, queries, ids)
    rescored = None
    if rescore:
        by_row = dict(zip(joined.column("row").to_pylist(), joined.column("text").to_pylist()))
        rescored = clock.step("rescore", rescoring.rescore_part, lambda wanted: {r: by_row[r] for r in wanted},
                              queries, ids, found.hashes, found.positive_hashes(), rescore)
    table, counts, named, agreement = clock.step("select", mine_part, cfg, found, queries, vectors, scores, ids,
                                                 range_max, rescored)
    if rescore:
        texts = dict(zip(joined.column("doc_id").to_pylist(), joined.column("text").to_pylist()))
        counts["exports"] = clock.step("exports", _part_exports, cfg, number, table, texts)
    else:
        counts["text_groups"] = clock.step("text_requests", mine_texts.write_requests, texts_dir(cfg), number,
                                           named.values(), text_starts, so)
    return commit_part(cfg, number, table, {**counts, "stats": mine_report.part_stats(table, agreement),
                                            "peak_memory_mb": peak_memory_mb(), "steps_s": clock.seconds,
                                            "seconds": round(sum(clock.seconds.values()), 3)})


class _Clock:
    """Seconds spent in each named step (added to ``seconds``, when given)."""

    def __init__(self, seconds: dict[str, float] | None = None):
        self.seconds: dict[str, float] = dict(seconds or {})

    def step(self, name: str, function: Callable, *args):
        started = time.perf_counter()
        result = function(*args)
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 4)
        return result


def _part_exports(cfg: Config, number: int, table: pa.Table, texts: dict[str, str]) -> dict:
    mi = cfg.mine
    return exports.write_part_exports(layout_of(cfg).file(PART_EXPORTS), number, table, texts, list(mi.formats),
                                      mi.num_negatives, mi.output_scores, cfg.output.storage_options)


def mine_part(cfg: Config, found: Candidates, queries: list[MiningQuery], query_vectors: np.ndarray,
              scores: np.ndarray, ids: np.ndarray, range_max: int, rescored: rescoring.Rescored | None = None
              ) -> tuple[pa.Table, dict, dict[str, int], dict | None]:
    """Select the negatives of one part from its search results (scores / ids: n x depth, best first), by the
    cross-encoder's scores when ``rescored``. Returns the part's table (kept queries), its counts, the row id of
    every document the table names, and the agreement statistics of the two models (None without rescoring)."""
    rules = rules_of(cfg.mine)
    positives, candidates = found.positives, found.values
    rows, named, counts = [], {}, {"queries": len(queries), "complete": 0, "incomplete": 0, "without_negatives": 0,
                                   "written": 0, "filtered": dict.fromkeys(negatives.FILTERS, 0)}
    together = {"chosen": 0, "shared": 0}
    for i, (query, vector) in enumerate(zip(queries, query_vectors)):
        pos_scores = [float(vector @ positives[r][0]) for r in query.positive_rows]
        ce_row, ce_positive = (rescored.candidates[i], rescored.positives[i]) if rescored else (None, None)
        chosen, shared = _choose(rules, range_max, query, (scores[i], ids[i], found.hashes[i]), pos_scores,
                                 {positives[r][1] for r in query.positive_rows}, ce_row, ce_positive)
        for rule, n in chosen.filtered.items():
            counts["filtered"][rule] += n
        complete = len(chosen.ids) == rules.num_negatives
        counts["complete" if complete else ("incomplete" if chosen.ids else "without_negatives")] += 1
        if complete or (cfg.mine.keep_incomplete and chosen.ids):
            together["chosen"] += len(chosen.ids)
            together["shared"] += shared or 0
            named.update(zip(query.positive_doc_ids, query.positive_rows))
            named.update((candidates[r][0], r) for r in chosen.ids)
            rows.append({"query_id": query.query_id, "query": query.text, "positive_ids": query.positive_doc_ids,
                         "positive_scores": pos_scores, "negative_ids": [candidates[r][0] for r in chosen.ids],
                         "negative_scores": [float(scores[i][rank - 1]) for rank in chosen.ranks],
                         "negative_ranks": chosen.ranks, "complete": complete, "positive_ce_scores": ce_positive,
                         "negative_ce_scores": chosen.scores if rescored else None})
    counts["written"] = len(rows)
    agreement = mine_report.agreement_stats(scores[rescored.scored], rescored.candidates[rescored.scored],
                                            **together) if rescored else None
    return pa.Table.from_pylist(rows, schema=PART_SCHEMA), counts, named, agreement


def _choose(rules: negatives.Rules, range_max: int, query: MiningQuery, results: tuple, positive_scores: list,
            positive_hashes: set, ce_row: np.ndarray | None, ce_positive: list | None):
    """(the query's negatives, by the cross-encoder's scores when given, else the bi-encoder's; how many of them
    the bi-encoder's scores alone would have chosen, None without a cross-encoder). ``results``: the bi-encoder's
    scores, the row ids and text hashes of the candidates."""
    bi_row, id_row, hashes = results

    def by(scores, positive):
        return negatives.select(scores, id_row, hashes, set(query.positive_rows), positive, positive_hashes, rules,
                                range_max, query.query_id)

    if ce_row is None:
        return by(bi_row, positive_scores), None
    chosen = by(ce_row, ce_positive)
    return chosen, len(set(chosen.ids) & set(by(bi_row, positive_scores).ids))


def commit_part(cfg: Config, index: int, table: pa.Table, counts: dict) -> dict:
    layout = layout_of(cfg)
    storage.write_parquet_atomic(layout.part_file(index), table, layout.storage_options)
    record = {"part": index, "path": f"part-{index:05d}.parquet", **counts}
    storage.write_json_atomic(layout.record_file(index), record, layout.storage_options)
    return record


def part_records(cfg: Config, parts: int) -> tuple[list[dict], dict | None]:
    """(the parts' commit records without their statistics, the statistics merged), reading one record at a time.
    A part committed without this run's exports (other ``mine.formats`` or ``mine.output_scores``) or without
    statistics (an older run) gets them here, from its table."""
    layout = layout_of(cfg)
    records, stats = [], None
    for i in range(parts):
        record = storage.read_json(layout.record_file(i), layout.storage_options)
        if "stats" not in record or not exports.has_part_exports(record, list(cfg.mine.formats),
                                                                 cfg.mine.output_scores):
            record = _complete_record(cfg, record)
        stats = mine_report.merge_stats(stats, record.pop("stats"))
        records.append(record)
    return records, stats


def _complete_record(cfg: Config, record: dict) -> dict:
    def looked_up(table: pa.Table) -> dict[str, str]:
        doc_ids = {d for column in ("positive_ids", "negative_ids") for ids in table.column(column).to_pylist()
                   for d in ids}
        return lookup.texts_for_doc_ids(cfg.output.root, doc_ids, cfg.output.storage_options,
                                        corpus_storage_options=cfg.corpus.storage_options)

    return _with_exports(cfg, record, looked_up)


def _with_exports(cfg: Config, record: dict, texts_of) -> dict:
    """Write the exports of the part of commit record ``record`` with the texts ``texts_of(its table)`` gives, and
    add them (and its statistics, when it has none) to its commit record; returns the new record."""
    layout = layout_of(cfg)
    table = conform(storage.read_parquet(layout.part_file(record["part"]), layout.storage_options))
    record = {**record, "exports": _part_exports(cfg, record["part"], table, texts_of(table)),
              "stats": record.get("stats") or mine_report.part_stats(table)}
    storage.write_json_atomic(layout.record_file(record["part"]), record, layout.storage_options)
    return record


def texts_dir(cfg: Config) -> str:
    """Where the text join of the exports keeps its files (see :mod:`mine_texts`)."""
    return layout_of(cfg).file(TEXTS)


def parts_to_export(cfg: Config, parts: int) -> list[tuple[int, int, list[int]]]:
    """(part, queries, text groups) of each part whose exports the text join is to write: those committed with
    text requests (still there) and without this run's exports (reading one commit record at a time)."""
    layout, mi = layout_of(cfg), cfg.mine
    out = []
    for i in range(parts):
        record = storage.read_json(layout.record_file(i), layout.storage_options)
        if "text_groups" in record and not exports.has_part_exports(record, list(mi.formats), mi.output_scores) \
                and _requests_kept(cfg, i, record["text_groups"]):
            out.append((i, record["queries"], record["text_groups"]))
    return out


def _requests_kept(cfg: Config, number: int, groups: list[int]) -> bool:
    """Whether part ``number``'s text requests are still there (a finished run removed them: its parts then get
    other exports by :func:`part_records`)."""
    return not groups or storage.exists(mine_texts.request_file(texts_dir(cfg), number), cfg.output.storage_options)


def export_part(cfg: Config, number: int) -> dict:
    """Write part ``number``'s exports from the texts the join found for it, and add them to its commit record;
    returns the record."""
    layout = layout_of(cfg)
    record = storage.read_json(layout.record_file(number), layout.storage_options)
    return _with_exports(cfg, record, lambda table: mine_texts.part_texts(
        texts_dir(cfg), number, record["text_groups"], layout.storage_options))


def combine_exports(cfg: Config, records: list[dict]) -> dict[str, dict]:
    """The exports of ``mine.formats``: the parts' shares concatenated in part order (see :mod:`exports`)."""
    mi, layout = cfg.mine, layout_of(cfg)
    return exports.combine_exports(layout.file("exports"), layout.file(PART_EXPORTS), [r["part"] for r in records],
                                   list(mi.formats), mi.num_negatives, mi.output_scores, layout.storage_options)


def remove_part_exports(cfg: Config) -> None:
    """Drop the parts' shares of the exports and the text join's files once the combined exports are committed
    (by the manifest)."""
    layout = layout_of(cfg)
    storage.remove(layout.file(PART_EXPORTS), layout.storage_options)
    storage.remove(layout.file(TEXTS), layout.storage_options)
    storage.remove(layout.file(CANDIDATES), layout.storage_options)


def concat_parts(root: str, parts: list[dict], storage_options: dict | None = None) -> pa.Table:
    """The part files named by ``parts`` (commit records or manifest entries, each with a ``path``), in order."""
    tables = [conform(storage.read_parquet(storage.join(root, "negatives", p["path"]), storage_options))
              for p in parts]
    return pa.concat_tables(tables) if tables else PART_SCHEMA.empty_table()


def conform(part: pa.Table) -> pa.Table:
    """A part table with every column of :data:`PART_SCHEMA`: a part written before the cross-encoder columns
    existed gets them as nulls."""
    for column in PART_SCHEMA:
        if column.name not in part.column_names:
            part = part.append_column(column, pa.nulls(part.num_rows, column.type))
    return part.select(PART_SCHEMA.names)


def read_parts(root: str, storage_options: dict | None = None) -> pa.Table:
    """Every committed part of a completed mining run, in query order."""
    return concat_parts(root, read_mine_manifest(root, storage_options)["parts"], storage_options)


def count_totals(records: list[dict]) -> tuple[dict, dict]:
    """(query counts, candidates removed per filter) summed over the parts' commit records."""
    totals = {key: sum(r[key] for r in records)
              for key in ("queries", "complete", "incomplete", "without_negatives", "written")}
    return totals, {rule: sum(r["filtered"][rule] for r in records) for rule in negatives.FILTERS}


def write_manifest(cfg: Config, identity: dict, records: list[dict], input_queries: int, rejected: int,
                   extra: dict) -> dict:
    totals, filtered = count_totals(records)
    manifest = {**stamp(), "stage": "negatives", "fingerprint": identity["fingerprint"], "identity": identity,
                "input_queries": input_queries, "rejected_positives": rejected,
                "queries_without_positives": input_queries - totals["queries"], "totals": totals,
                "filtered": filtered, "parts": [{"part": r["part"], "path": r["path"], "written": r["written"]}
                                                for r in records],
                "settings": redact_storage_options(dataclasses.asdict(cfg.mine)), **extra,
                "part_steps_s": {step: round(sum(r.get("steps_s", {}).get(step, 0.0) for r in records), 3)
                                 for step in ("encode", "search", "rescore", "select", "text_requests", "exports")},
                "peak_memory_mb": {"driver": peak_memory_mb(),
                                   "workers_max": max((r.get("peak_memory_mb", 0.0) for r in records), default=0.0)},
                "config": cfg.to_dict()}
    storage.write_json_atomic(layout_of(cfg).file("_manifest.json"), manifest, cfg.output.storage_options)
    return manifest


def read_mine_manifest(root: str, storage_options: dict | None = None) -> dict:
    return read_manifest(storage.join(root, "negatives", "_manifest.json"), storage_options, "mine")
