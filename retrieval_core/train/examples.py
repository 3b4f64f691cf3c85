"""The training examples, streamed from the mine's n-tuple export; nothing holds the whole training set.

The export (``negatives/exports/n-tuple.parquet``: ``anchor, positive, negative_1 .. negative_n``, one row per
(query, positive), written in row groups that never split a query) already carries the texts, joined once by the
mine. Training reads it row group by row group:

- **Held out** is decided per query, by a hash of (``train.seed``, query text) against ``train.eval_fraction``:
  every reader decides alike, without a list of the queries.
- **An epoch** reads the row groups in an order drawn from (seed, epoch) through a shuffle buffer of
  ``train.shuffle_buffer`` examples, and cuts batches in which no query appears twice.
- **Every worker reads the same stream** and keeps its share (every ``world``-th example) of each global batch. So
  the batches do not depend on the number of workers, every worker stops at the same step, and a resumed training
  skips to its batch by reading the epoch again. The price is that each worker decodes the whole table once an
  epoch; docs/stages/train.md puts it in figures beside the training's own work.
- **The survey**, made once before training (:func:`survey`): the count of training examples (the query column
  only), then the held-out examples that are scored (at most ``train.eval_queries`` queries) and the documents they
  are ranked against (``train.eval_corpus_size``), from the first row groups of a seeded order.

Memory: a reader holds one row group and the shuffle buffer; the survey holds what it returns, bounded by the
settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random
from typing import Iterable, Iterator

import pyarrow.parquet as pq

from retrieval_core.config import ConfigError
from retrieval_core.io import storage

NTUPLE_EXPORT = "n-tuple"


@dataclasses.dataclass(frozen=True)
class Example:
    query_id: str
    query: str
    positive: str
    negatives: tuple


@dataclasses.dataclass(frozen=True)
class TrainingTable:
    """The n-tuple export at ``url`` as training reads it: ``num_negatives`` negatives a row, held-out queries
    drawn with ``seed`` and ``eval_fraction``, epochs shuffled through ``shuffle_buffer`` examples."""

    url: str
    num_negatives: int
    seed: int
    eval_fraction: float
    shuffle_buffer: int
    storage_options: dict | None = None

    def columns(self) -> list[str]:
        return ["anchor", "positive", *(f"negative_{i}" for i in range(1, self.num_negatives + 1))]

    def held_out(self, query: str) -> bool:
        return held_out(query, self.seed, self.eval_fraction)


@dataclasses.dataclass(frozen=True)
class Survey:
    """What training needs to know before its first step, bounded by the settings: the number of training and
    held-out examples, and the held-out examples scored with the documents they are ranked against."""

    train_examples: int
    held_out_examples: int
    evaluation: list
    eval_corpus: dict


def check_mined_for_training(formats: list) -> None:
    """Refuse, before any stage runs, a pipeline that trains on a mine that will not write the n-tuple export."""
    if NTUPLE_EXPORT not in formats:
        raise ConfigError(
            f"train reads the mine's n-tuple export, and mine.formats = {list(formats)} leaves it out: add "
            f"'n-tuple' to mine.formats"
        )


def table_of(mine_manifest: dict, negatives_dir: str, tr, storage_options: dict | None = None) -> TrainingTable:
    """The mine's n-tuple export (``negatives_dir``/exports/n-tuple.parquet) as ``tr`` reads it; refused, naming
    the setting, when the mine did not write it or wrote fewer than ``train.num_negatives`` negatives a row."""
    written = (mine_manifest.get("exports") or {}).get(NTUPLE_EXPORT)
    if not written:
        raise ConfigError(
            "train reads the mine's n-tuple export, and the mine did not write it: keep 'n-tuple' in mine.formats "
            "and run mine again"
        )
    table = TrainingTable(
        storage.join(negatives_dir, written["path"]),
        tr.num_negatives,
        tr.seed,
        tr.eval_fraction,
        tr.shuffle_buffer,
        storage_options,
    )
    names = set(_schema(table).names)
    missing = [c for c in table.columns() if c not in names]
    if missing:
        mined = sum(1 for n in names if n.startswith("negative_"))
        raise ConfigError(
            f"train.num_negatives = {tr.num_negatives} and the mine wrote {mined} negatives a query "
            f"(mine.num_negatives): lower train.num_negatives or mine more"
        )
    return table


def held_out(query: str, seed: int, fraction: float) -> bool:
    """Whether ``query`` is held out: a hash of (seed, query) read as a number in [0, 1), below ``fraction``."""
    value = int.from_bytes(hashlib.blake2b(f"{seed}\0{query}".encode(), digest_size=8).digest(), "big")
    return value / 2**64 < fraction


def query_key(query: str) -> str:
    """A query's id in training: a hash of its text (two queries with one text are one query)."""
    return hashlib.blake2b(query.encode(), digest_size=8).hexdigest()


def group_order(table: TrainingTable, epoch: int) -> list[int]:
    """The row groups in the order epoch ``epoch`` reads them (one int a row group)."""
    order = list(range(_row_groups(table)))
    random.Random(f"{table.seed}:{epoch}:row groups").shuffle(order)
    return order


def epoch_examples(table: TrainingTable, epoch: int) -> Iterator[Example]:
    """The training (not held-out) examples of epoch ``epoch``, in its order: row groups in :func:`group_order`,
    through a shuffle buffer of ``table.shuffle_buffer`` examples drawn with (seed, epoch)."""
    draw = random.Random(f"{table.seed}:{epoch}:buffer")  # a draw of its own, not another epoch's order
    buffer: list[Example] = []
    for example in _examples(table, group_order(table, epoch)):
        if len(buffer) < max(1, table.shuffle_buffer):
            buffer.append(example)
            continue
        at = draw.randrange(len(buffer))
        yield buffer[at]
        buffer[at] = example
    draw.shuffle(buffer)
    yield from buffer


def epoch_batches(examples: Iterable[Example], batch_size: int) -> Iterator[list[Example]]:
    """Batches of ``batch_size`` examples in which no query appears twice (its other positives would otherwise be
    in-batch false negatives): an example whose query is in the batch waits for the next one. The last
    incomplete batch is dropped."""
    current: list[Example] = []
    seen: set[str] = set()
    deferred: list[Example] = []
    for example in examples:
        if example.query_id in seen:
            deferred.append(example)
            continue
        current.append(example)
        seen.add(example.query_id)
        if len(current) == batch_size:
            yield current
            current, seen = [], set()
            waiting, deferred = deferred, []
            for again in waiting:
                (deferred if again.query_id in seen else current).append(again)
                seen.add(again.query_id)


def survey(table: TrainingTable, eval_queries: int, eval_corpus_size: int) -> Survey:
    """Count the training and held-out examples (the query column only), then take the held-out examples scored
    (the first ``eval_queries`` held-out queries of the row groups in a seeded order) and the documents they are
    ranked against: their positives, then others of those row groups (positives and negatives, drawn with the
    seed) up to ``eval_corpus_size``."""
    train, held, held_queries = _count(table)
    evaluation, pool = _first_groups(table, min(eval_queries, held_queries), eval_corpus_size)
    must = sorted({e.positive for e in evaluation})
    others = sorted(pool - set(must))
    random.Random(table.seed).shuffle(others)
    texts = must + others[: max(0, eval_corpus_size - len(must))]
    return Survey(train, held, evaluation, {f"e{i}": t for i, t in enumerate(texts)})


def _count(table: TrainingTable) -> tuple[int, int, int]:
    """(training examples, held-out examples, held-out queries): a query's rows are consecutive."""
    train = held = held_queries = 0
    with _opened(table) as reader:
        for group in range(reader.metadata.num_row_groups):
            previous = None
            for query in reader.read_row_group(group, columns=["anchor"]).column("anchor").to_pylist():
                out = table.held_out(query)
                held, train = held + out, train + (not out)
                held_queries += out and query != previous
                previous = query
    return train, held, held_queries


def _first_groups(table: TrainingTable, eval_queries: int, eval_corpus_size: int) -> tuple[list[Example], set]:
    """(held-out examples of the first ``eval_queries`` held-out queries (at most as many as there are), the first
    2 x ``eval_corpus_size`` texts of the row groups read) over the row groups in the seeded order, read until both
    are full: what it holds is bounded by the two settings."""
    evaluation: list[Example] = []
    chosen: set[str] = set()
    pool: set[str] = set()
    order = list(range(_row_groups(table)))
    random.Random(f"{table.seed}:survey").shuffle(order)
    room = 2 * eval_corpus_size  # twice: the scored positives among them leave enough others
    with _opened(table) as reader:
        for group in order:
            if len(chosen) >= eval_queries and len(pool) >= room:
                break
            for example in _rows(table, reader, group):
                for text in (example.positive, *example.negatives):
                    if len(pool) < room:
                        pool.add(text)
                if table.held_out(example.query) and (example.query_id in chosen or len(chosen) < eval_queries):
                    chosen.add(example.query_id)
                    evaluation.append(example)
    return evaluation, pool


def _examples(table: TrainingTable, order: list[int]) -> Iterator[Example]:
    with _opened(table) as reader:
        for group in order:
            yield from (e for e in _rows(table, reader, group) if not table.held_out(e.query))


def _rows(table: TrainingTable, reader: pq.ParquetFile, group: int) -> list[Example]:
    data = reader.read_row_group(group, columns=table.columns()).to_pydict()
    negatives = list(zip(*(data[f"negative_{i}"] for i in range(1, table.num_negatives + 1))))
    return [
        Example(query_key(query), query, positive, negatives[i] if negatives else ())
        for i, (query, positive) in enumerate(zip(data["anchor"], data["positive"]))
    ]


def _row_groups(table: TrainingTable) -> int:
    with _opened(table) as reader:
        return reader.metadata.num_row_groups


def _schema(table: TrainingTable):
    with _opened(table) as reader:
        return reader.schema_arrow


@contextlib.contextmanager
def _opened(table: TrainingTable) -> Iterator[pq.ParquetFile]:
    """The table's Parquet reader, its file closed at the end of the block (errors name the table)."""
    fs, path = storage.filesystem(table.url, table.storage_options)
    with storage.naming(table.url, "read"), fs.open(path, "rb") as handle:
        yield pq.ParquetFile(handle)
