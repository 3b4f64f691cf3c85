"""The mining stage without Ray: layout, plan, commit records, exports, manifest (a part's two halves:
``mine.parts``; the input: ``mine.inputs``).

Layout under ``<root>/negatives/``::

    _plan.json            identity (index, mining settings, input files) and, once planned, the number of parts
    _input/               the input planned in hash buckets of queries (see ``mine.plan``): part inputs, rejects
    part-00000.parquet    query_id, query, positive_ids, positive_scores, negative_ids, negative_scores,
                          negative_ranks, complete, positive_ce_scores, negative_ce_scores (the cross-encoder's
                          scores when ``mine.cross_encoder`` rescored, else null)
    _parts/part-00000.json  the part's commit record (counts per filter, incomplete queries, the text groups it
                          asked, exports written, mergeable report statistics)
    _texts/               the text join (see ``mine.texts``): the parts' requests, the groups' texts and commit
                          records (removed once the manifest is written)
    _candidates/          the parts' search results (part-00000.npz: query vectors, scores, row ids; .json: the
                          text groups asked) and the join of their candidates' values (see ``mine.texts``), between
                          the search and the selection (removed once the manifest is written)
    _exports/part-00000.<export file>  the part's share of each export (removed once the manifest is written)
    rejects.parquet       positives whose doc id is not in the corpus (query_id, doc_id, reason)
    _manifest.json        written last: settings, counts, encoder fingerprint
    exports/              triplet.parquet, n-tuple.parquet, flag.jsonl (``mine.formats``)
    report.json, report.png
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import pyarrow as pa

from retrieval_core.config import Config, MineConfig, redact_storage_options
from retrieval_core.encode import encoding
from retrieval_core.index import lookup
from retrieval_core.io import storage
from retrieval_core.io.folder import Folder, StageLayout
from retrieval_core.io.manifest import claim_stage_dir, peak_memory_mb, read_manifest, stamp
from retrieval_core.mine import exports, negatives, rescoring
from retrieval_core.mine import report as mine_report
from retrieval_core.mine import texts as mine_texts

log = logging.getLogger(__name__)

PART_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("query", pa.string()),
        ("positive_ids", pa.list_(pa.string())),
        ("positive_scores", pa.list_(pa.float32())),
        ("negative_ids", pa.list_(pa.string())),
        ("negative_scores", pa.list_(pa.float32())),
        ("negative_ranks", pa.list_(pa.int32())),
        ("complete", pa.bool_()),
        ("positive_ce_scores", pa.list_(pa.float32())),
        ("negative_ce_scores", pa.list_(pa.float32())),
    ]
)
PART_EXPORTS = "_exports"  # each part's share of the exports, until the combined exports are committed
TEXTS = "_texts"  # the text join's requests and texts (see mine.texts), until the combined exports are committed
CANDIDATES = "_candidates"  # the parts' search results and the join of their candidates, until the manifest


# ------------------------------------------------------------------------------------------------------ layout


def layout_at(root: str, storage_options: dict | None = None) -> StageLayout:
    """The mine stage's files under ``root`` (see the module's docstring)."""
    return StageLayout(root, "negatives", storage_options or {}, records="_parts", unit="part-")


def layout_of(cfg: Config) -> StageLayout:
    return layout_at(cfg.output.root, cfg.output.storage_options)


@dataclasses.dataclass(frozen=True)
class MineWork:
    """What the mine stage's steps read and where they write, so that no step (and no task) takes the whole config:
    the mine section, the stage's layout, the output root (the index and embeddings it reads), the corpus's storage
    options (its texts), whether an earlier run may be replaced, and the config as the plan records it."""

    mine: MineConfig
    out: StageLayout
    root: Folder
    corpus_storage_options: dict = dataclasses.field(repr=False)  # credentials: never in a repr
    overwrite: bool = False
    config: dict = dataclasses.field(default_factory=dict, repr=False)


def work_of(cfg: Config) -> MineWork:
    return MineWork(
        cfg.mine,
        layout_of(cfg),
        Folder.output(cfg.output),
        cfg.corpus.storage_options,
        cfg.output.overwrite,
        cfg.to_dict(),
    )


def rules_of(mi: MineConfig) -> negatives.Rules:
    return negatives.Rules(
        num_negatives=mi.num_negatives,
        range_min=mi.range_min,
        range_max=mi.range_max,
        max_score=mi.max_score,
        min_score=mi.min_score,
        absolute_margin=mi.absolute_margin,
        relative_margin=mi.relative_margin,
        sampling=mi.sampling,
        seed=mi.seed,
    )


def mining_identity(cfg: Config, index_manifest: dict, input_plan: dict) -> dict:
    """What fixes the mined parts: the index, the query encoder, the rules, the mode, the part size, the input
    (its files' names, sizes and versions, and the number of buckets it is planned in) and the cross-encoder, when
    one rescores (absent otherwise, so identities without one stay what they were)."""
    mi = cfg.mine
    reading = {k: getattr(mi, k) for k in ("format", "query_column", "positive_column", "query_id_column")}
    identity = {
        "index": index_manifest["identity"],
        "fingerprint": index_manifest["fingerprint"],
        **encoding.query_side(cfg.model),
        "rules": dataclasses.asdict(rules_of(mi)),
        "mode": mi.mode,
        "queries_per_part": mi.queries_per_part,
        "input": {**input_plan, "reading": reading},
        "parts_by": "query id bucket, then first positive row",
    }
    cross_encoder = rescoring.cross_encoder_identity(mi, cfg.model)
    return {**identity, "cross_encoder": cross_encoder} if cross_encoder else identity


def prepare(work: MineWork, identity: dict) -> None:
    """Check (or, with ``output.overwrite``, clear) an earlier run, and write the plan. An earlier run with other
    settings that committed no part yet (it stopped while planning, on bad input say) is cleared: only its
    planning is lost."""
    layout = work.out
    plan_url = layout.file("_plan.json")
    if storage.exists(plan_url, layout.storage_options) and not storage.list_names(
        layout.file("_parts"), layout.storage_options
    ):
        if storage.read_json(plan_url, layout.storage_options).get("identity") != identity:
            log.info(
                "'%s' holds the planning of a run with other settings and no mined part: planning again", layout.dir
            )
            storage.remove(layout.dir, layout.storage_options)
    claim_stage_dir(layout.dir, identity, {"config": work.config}, work.overwrite, layout.storage_options)


def record_parts(work: MineWork, parts: int) -> None:
    """Add the number of parts to the plan once the buckets are planned (progress reports read it)."""
    layout = work.out
    url = layout.file("_plan.json")
    plan = storage.read_json(url, layout.storage_options)
    if plan.get("parts") != parts:
        storage.write_json_atomic(url, {**plan, "parts": parts}, layout.storage_options)


def text_starts(work: MineWork, choose: Callable[[], list[int]]) -> list[int]:
    """The text groups of the run (see :mod:`mine.texts`): those its plan records, else ``choose()``, recorded
    (every part of a run, whichever run mined it, asks by the same groups)."""
    layout = work.out
    url = layout.file("_plan.json")
    plan = storage.read_json(url, layout.storage_options)
    if "text_starts" not in plan:
        plan = {**plan, "text_starts": choose()}
        storage.write_json_atomic(url, plan, layout.storage_options)
    return plan["text_starts"]


def pending_parts(work: MineWork, parts: int) -> list[int]:
    layout = work.out
    return [i for i in range(parts) if not storage.exists(layout.record_file(i), layout.storage_options)]


# ------------------------------------------------------------------------------------------------------ one part


def part_exports(work: MineWork, number: int, table: pa.Table, texts: dict[str, str]) -> dict:
    mi = work.mine
    return exports.write_part_exports(
        work.out.file(PART_EXPORTS),
        number,
        table,
        texts,
        list(mi.formats),
        mi.num_negatives,
        mi.output_scores,
        work.root.storage_options,
    )


def commit_part(work: MineWork, index: int, table: pa.Table, counts: dict) -> dict:
    layout = work.out
    storage.write_parquet_atomic(layout.data_file(index), table, layout.storage_options)
    record = {"part": index, "path": f"part-{index:05d}.parquet", **counts}
    storage.write_json_atomic(layout.record_file(index), record, layout.storage_options)
    return record


def part_records(work: MineWork, parts: int) -> tuple[list[dict], dict | None]:
    """(the parts' commit records without their statistics, the statistics merged), reading one record at a time.
    A part committed without this run's exports (other ``mine.formats`` or ``mine.output_scores``) or without
    statistics (an older run) gets them here, from its table."""
    layout = work.out
    records, stats = [], None
    for i in range(parts):
        record = storage.read_json(layout.record_file(i), layout.storage_options)
        if "stats" not in record or not exports.has_part_exports(
            record, list(work.mine.formats), work.mine.output_scores
        ):
            record = _complete_record(work, record)
        stats = mine_report.merge_stats(stats, record.pop("stats"))
        records.append(record)
    return records, stats


def _complete_record(work: MineWork, record: dict) -> dict:
    def looked_up(table: pa.Table) -> dict[str, str]:
        doc_ids = {
            d for column in ("positive_ids", "negative_ids") for ids in table.column(column).to_pylist() for d in ids
        }
        return lookup.texts_for_doc_ids(
            work.root,
            doc_ids,
            corpus_storage_options=work.corpus_storage_options,
        )

    return _with_exports(work, record, looked_up)


def _with_exports(work: MineWork, record: dict, texts_of) -> dict:
    """Write the exports of the part of commit record ``record`` with the texts ``texts_of(its table)`` gives, and
    add them (and its statistics, when it has none) to its commit record; returns the new record."""
    layout = work.out
    table = conform(storage.read_parquet(layout.data_file(record["part"]), layout.storage_options))
    record = {
        **record,
        "exports": part_exports(work, record["part"], table, texts_of(table)),
        "stats": record.get("stats") or mine_report.part_stats(table),
    }
    storage.write_json_atomic(layout.record_file(record["part"]), record, layout.storage_options)
    return record


def texts_dir(work: MineWork) -> str:
    """Where the text join of the exports keeps its files (see :mod:`mine.texts`)."""
    return work.out.file(TEXTS)


def join_export_texts(work: MineWork, group: int, parts: list[int], rows: lookup.RowLookup) -> dict:
    """The text join of the exports for text group ``group``: the rows its requesting ``parts`` asked for, looked
    up with ``rows`` (see :func:`mine.texts.resolve_group`); returns the group's commit record."""
    return mine_texts.resolve_group(texts_dir(work), group, parts, rows, work.root.storage_options)


def parts_to_export(work: MineWork, parts: int) -> list[tuple[int, int, list[int]]]:
    """(part, queries, text groups) of each part whose exports the text join is to write: those committed with
    text requests (still there) and without this run's exports (reading one commit record at a time)."""
    layout, mi = work.out, work.mine
    out = []
    for i in range(parts):
        record = storage.read_json(layout.record_file(i), layout.storage_options)
        if (
            "text_groups" in record
            and not exports.has_part_exports(record, list(mi.formats), mi.output_scores)
            and _requests_kept(work, i, record["text_groups"])
        ):
            out.append((i, record["queries"], record["text_groups"]))
    return out


def _requests_kept(work: MineWork, number: int, groups: list[int]) -> bool:
    """Whether part ``number``'s text requests are still there (a finished run removed them: its parts then get
    other exports by :func:`part_records`)."""
    return not groups or storage.exists(mine_texts.request_file(texts_dir(work), number), work.root.storage_options)


def export_part(work: MineWork, number: int) -> dict:
    """Write part ``number``'s exports from the texts the join found for it, and add them to its commit record;
    returns the record."""
    layout = work.out
    record = storage.read_json(layout.record_file(number), layout.storage_options)
    return _with_exports(
        work,
        record,
        lambda table: mine_texts.part_texts(texts_dir(work), number, record["text_groups"], layout.storage_options),
    )


def combine_exports(work: MineWork, records: list[dict]) -> dict[str, dict]:
    """The exports of ``mine.formats``: the parts' shares concatenated in part order (see :mod:`exports`)."""
    mi, layout = work.mine, work.out
    return exports.combine_exports(
        layout.file("exports"),
        layout.file(PART_EXPORTS),
        [r["part"] for r in records],
        list(mi.formats),
        mi.num_negatives,
        mi.output_scores,
        layout.storage_options,
    )


def combine_export(fmt: str, work: MineWork, numbers: list[int]) -> dict:
    """One export format of :func:`combine_exports` (a Ray task's work): ``{"path", "rows"}``."""
    mi, layout = work.mine, work.out
    return exports.combine_export(
        layout.file("exports"),
        layout.file(PART_EXPORTS),
        numbers,
        fmt,
        mi.num_negatives,
        mi.output_scores,
        layout.storage_options,
    )


def remove_part_exports(work: MineWork) -> None:
    """Drop the parts' shares of the exports and the text join's files once the combined exports are committed
    (by the manifest)."""
    layout = work.out
    storage.remove(layout.file(PART_EXPORTS), layout.storage_options)
    storage.remove(layout.file(TEXTS), layout.storage_options)
    storage.remove(layout.file(CANDIDATES), layout.storage_options)


def concat_parts(folder: Folder, parts: list[dict]) -> pa.Table:
    """The part files named by ``parts`` (commit records or manifest entries, each with a ``path``), in order."""
    tables = [conform(folder.read_parquet("negatives", p["path"])) for p in parts]
    return pa.concat_tables(tables) if tables else PART_SCHEMA.empty_table()


def conform(part: pa.Table) -> pa.Table:
    """A part table with every column of :data:`PART_SCHEMA`: a part written before the cross-encoder columns
    existed gets them as nulls."""
    for column in PART_SCHEMA:
        if column.name not in part.column_names:
            part = part.append_column(column, pa.nulls(part.num_rows, column.type))
    return part.select(PART_SCHEMA.names)


def read_parts(folder: Folder) -> pa.Table:
    """Every committed part of a completed mining run, in query order."""
    return concat_parts(folder, read_mine_manifest(folder)["parts"])


def count_totals(records: list[dict]) -> tuple[dict, dict]:
    """(query counts, candidates removed per filter) summed over the parts' commit records."""
    totals = {
        key: sum(r[key] for r in records)
        for key in ("queries", "complete", "incomplete", "without_negatives", "written")
    }
    return totals, {rule: sum(r["filtered"][rule] for r in records) for rule in negatives.FILTERS}


def write_manifest(
    work: MineWork, identity: dict, records: list[dict], input_queries: int, rejected: int, extra: dict
) -> dict:
    totals, filtered = count_totals(records)
    manifest = {
        **stamp(),
        "stage": "negatives",
        "fingerprint": identity["fingerprint"],
        "identity": identity,
        "input_queries": input_queries,
        "rejected_positives": rejected,
        "queries_without_positives": input_queries - totals["queries"],
        "totals": totals,
        "filtered": filtered,
        "parts": [{"part": r["part"], "path": r["path"], "written": r["written"]} for r in records],
        "settings": redact_storage_options(dataclasses.asdict(work.mine)),
        **extra,
        "part_steps_s": {
            step: round(sum(r.get("steps_s", {}).get(step, 0.0) for r in records), 3)
            for step in ("encode", "search", "rescore", "select", "text_requests", "exports")
        },
        "peak_memory_mb": {
            "driver": peak_memory_mb(),
            "workers_max": max((r.get("peak_memory_mb", 0.0) for r in records), default=0.0),
        },
        "config": work.config,
    }
    storage.write_json_atomic(work.out.file("_manifest.json"), manifest, work.root.storage_options)
    return manifest


def read_mine_manifest(folder: Folder) -> dict:
    return read_manifest(folder.join("negatives", "_manifest.json"), folder.storage_options, "mine")
