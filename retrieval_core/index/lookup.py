"""From global row ids back to documents: doc ids from the embedding shards, texts from the corpus itself."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq

from retrieval_core.config import CorpusConfig
from retrieval_core.encode.embeddings import read_embeddings_manifest, read_shard_table
from retrieval_core.io import file_cache, shard_list, storage
from retrieval_core.io.corpus import inspect_corpus, read_shard, texts_at
from retrieval_core.io.folder import Folder
from retrieval_core.io.sharding import FileMeta, plan_shards


def _shards_holding(shards: Sequence[dict], row_ids: Iterable[int]) -> dict[int, list[int]]:
    """Manifest shard index -> the wanted row ids inside its [row_start, row_stop) range (the shards' bounds are
    read once per shard list and kept: 16 bytes a shard)."""
    starts, stops = shard_list.row_bounds(shards)
    wanted: dict[int, list[int]] = {}
    for row_id in sorted(set(int(r) for r in row_ids if r >= 0)):
        i = int(np.searchsorted(starts, row_id, side="right")) - 1
        if i >= 0 and row_id < stops[i]:
            wanted.setdefault(i, []).append(row_id)
    return wanted


def row_values(
    folder: Folder,
    row_ids: Iterable[int],
    columns: list[str],
    manifest: dict | None = None,
) -> dict[int, tuple]:
    """Row id -> values of ``columns`` of the embedding shards (``doc_id``, ``text_hash``, ``embedding`` ...),
    reading only those columns of only the shards that hold the rows. Missing rows (rejects, -1) are absent."""
    manifest = manifest or read_embeddings_manifest(folder)
    out: dict[int, tuple] = {}
    for i, rows in _shards_holding(manifest["shards"], row_ids).items():
        table = read_shard_table(folder, manifest["shards"][i], columns)
        where = {r: n for n, r in enumerate(table.column("row_id").to_pylist())}
        picked = [where[r] for r in rows if r in where]
        taken = table.take(picked)
        values = [taken.column(c).to_pylist() for c in columns]
        out.update(zip(taken.column("row_id").to_pylist(), zip(*values)))
    return out


def doc_ids_for_rows(folder: Folder, row_ids: Iterable[int], manifest: dict | None = None) -> dict[int, str]:
    """Row id -> doc id, reading only the doc_id column of the shards that hold the rows."""
    return {row: values[0] for row, values in row_values(folder, row_ids, ["doc_id"], manifest).items()}


def text_hashes(values: dict[int, tuple[str, str]], ids: np.ndarray) -> np.ndarray:
    """The text hash of each row id of ``ids`` (any shape; object array) from ``values`` (row id -> (doc id, text
    hash)); "" for a row without one (-1, rejects)."""
    flat = [values.get(row, (None, ""))[1] for row in ids.ravel().tolist()]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(ids.shape)


class RowLookup:
    """Row ids -> doc ids, text hashes, vectors and texts, for a process that looks up many text groups (a mine
    worker): the corpus is planned once, and texts are read from the blocks (Parquet row groups, JSONL blocks of
    lines) that hold the rows only. Doc ids and text hashes are read from the shards holding the rows, each shard's
    columns once per call; vectors likewise. Nothing per row is kept between calls: a run joins each text group
    once."""

    def __init__(
        self,
        folder: Folder,
        corpus_storage_options: dict | None = None,
        manifest: dict | None = None,
    ):
        self.folder = folder
        self.corpus_storage_options = corpus_storage_options
        self.manifest = manifest or read_embeddings_manifest(folder)
        self._metas: list[FileMeta] | None = None

    def values(self, row_ids: Iterable[int]) -> dict[int, tuple[str, str]]:
        """Row id -> (doc id, text hash); missing rows (rejects, -1) are absent."""
        out: dict[int, tuple[str, str]] = {}
        for i, rows in _shards_holding(self.manifest["shards"], row_ids).items():
            table = read_shard_table(self.folder, self.manifest["shards"][i], ["doc_id", "text_hash"]).sort_by("row_id")
            ids = table.column("row_id").to_numpy()
            wanted = np.asarray(rows, dtype=np.int64)
            at = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
            found = ids[at] == wanted if len(ids) else np.zeros(len(wanted), dtype=bool)
            at = at[found]
            out.update(
                zip(
                    wanted[found].tolist(),
                    zip(table.column("doc_id").take(at).to_pylist(), table.column("text_hash").take(at).to_pylist()),
                )
            )
        return out

    def vectors(self, row_ids: Iterable[int]) -> dict[int, tuple]:
        """Row id -> (embedding, text hash)."""
        return row_values(self.folder, row_ids, ["embedding", "text_hash"], self.manifest)

    def texts(self, row_ids: Iterable[int]) -> dict[int, str]:
        """Row id -> the text that was encoded; rows without one (rejects, -1) are absent."""
        return self.texts_of(self.values(row_ids))

    def texts_of(self, values: dict[int, tuple[str, str]]) -> dict[int, str]:
        """Row id -> the text that was encoded, for rows whose (doc id, text hash) :meth:`values` found: no shard
        of the embeddings is read again."""
        if self.manifest.get("docmap"):  # a refresh version: rows are not corpus positions
            return _version_texts(
                self.folder,
                self.manifest,
                {row: doc for row, (doc, _) in values.items()},
                self.corpus_storage_options,
            )
        if self._metas is None:
            self._corpus = encoded_corpus(self.manifest, self.corpus_storage_options)
            self._metas = inspect_corpus(self._corpus)
        return texts_at(self._metas, self._corpus, list(values))


def rows_for_doc_ids(folder: Folder, doc_ids: Iterable[str], manifest: dict | None = None) -> dict[str, int]:
    """Doc id -> row id for those of ``doc_ids`` that the embeddings hold, reading the doc_id and row_id columns of
    one shard at a time (memory: ``doc_ids`` and one shard's columns, whatever the corpus size)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    manifest = manifest or read_embeddings_manifest(folder)
    wanted = pa.array(sorted(set(doc_ids)), pa.string())
    found: dict[str, int] = {}
    if not len(wanted):
        return found
    for shard in manifest["shards"]:
        table = read_shard_table(folder, shard, ["doc_id"])
        hits = table.filter(pc.is_in(table.column("doc_id"), value_set=wanted))
        found.update(zip(hits.column("doc_id").to_pylist(), hits.column("row_id").to_pylist()))
    return found


def doc_ids_present(folder: Folder, doc_ids: Iterable[str]) -> set[str]:
    """Those of ``doc_ids`` that the embeddings hold (encoded, not rejected), reading the doc_id column of one shard
    at a time (memory: ``doc_ids`` and one shard's column, whatever the corpus size)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array(sorted(set(doc_ids)), pa.string())
    found: set[str] = set()
    for shard in read_embeddings_manifest(folder)["shards"]:
        column = read_shard_table(folder, shard, ["doc_id"]).column("doc_id")
        found.update(pc.filter(column, pc.is_in(column, value_set=wanted)).to_pylist())
    return found


def texts_for_rows(
    folder: Folder, row_ids: Iterable[int], corpus_storage_options: dict | None = None
) -> dict[int, str]:
    """Row id -> the text that was encoded (title + " " + text), read back from the corpus (only the corpus shards
    holding the rows are read). The corpus settings come from the embeddings manifest, its storage options from the
    running job (``corpus_storage_options``): manifests hold none. In a refresh version, where row ids are not
    corpus positions, the version's doc map gives each document's position in its snapshot."""
    manifest = read_embeddings_manifest(folder)
    if not manifest.get("docmap"):
        return _texts_at_positions(folder, manifest, row_ids, corpus_storage_options)
    doc_of = {row: values[0] for row, values in row_values(folder, row_ids, ["doc_id"], manifest).items()}
    return _version_texts(folder, manifest, doc_of, corpus_storage_options)


def _version_texts(
    folder: Folder, manifest: dict, doc_of: dict[int, str], corpus_storage_options: dict | None
) -> dict[int, str]:
    """Row id -> encoded text in a refresh version, for the rows of ``doc_of`` (row id -> doc id): through each
    document's position in the version's snapshot."""
    position = snapshot_rows(folder, manifest, set(doc_of.values()))
    texts = _texts_at_positions(folder, manifest, position.values(), corpus_storage_options)
    return {row: texts[position[doc]] for row, doc in doc_of.items()}


def snapshot_rows(folder: Folder, manifest: dict, doc_ids: set[str]) -> dict[str, int]:
    """Doc id -> its row in the version's snapshot, from the doc map (partitioned by a hash of the doc id, so only
    the buckets holding ``doc_ids`` are read). On object storage a bucket is read from this node's copy of it
    (``file_cache.local_copy``), fetched once and shared by the node's processes: the mining workers of a node ask
    for the same buckets again and again."""
    from retrieval_core.io.sharding import buckets_of

    docmap = manifest["docmap"]
    directory = Folder(storage.resolve_relative(folder.join("embeddings"), docmap["dir"]), folder.storage_options)
    wanted = sorted(doc_ids)
    out: dict[str, int] = {}
    for bucket in sorted(set(buckets_of(wanted, docmap["buckets"]).tolist())):
        local = file_cache.local_copy(directory.join(f"b{bucket:05d}.parquet"), folder.storage_options)
        table = pq.read_table(local, columns=["doc_id", "corpus_row"])
        out.update(
            (d, r)
            for d, r in zip(table.column("doc_id").to_pylist(), table.column("corpus_row").to_pylist())
            if d in doc_ids
        )
    return out


def _texts_at_positions(
    folder: Folder,
    manifest: dict,
    positions: Iterable[int],
    corpus_storage_options: dict | None,
) -> dict[int, str]:
    """Corpus position -> encoded text, through the encode plan's shards of the manifest's corpus."""
    plan = folder.read_json("embeddings", "_plan.json")
    corpus_cfg = encoded_corpus(manifest, corpus_storage_options)
    shards = plan_shards(inspect_corpus(corpus_cfg), plan["identity"]["rows_per_shard"])
    wanted = _shards_holding([{"row_start": s.row_start, "row_stop": s.row_stop} for s in shards], positions)
    out = {}
    for i, rows in wanted.items():
        read = read_shard(shards[i], corpus_cfg)
        where = dict(zip(read.row_ids, read.texts))
        out.update({r: where[r] for r in rows if r in where})
    return out


def encoded_corpus(manifest: dict, corpus_storage_options: dict | None = None) -> CorpusConfig:
    """The corpus settings an embeddings manifest was made with, with the running job's storage options (the
    manifest's are redacted)."""
    return CorpusConfig(**{**manifest["config"]["corpus"], "storage_options": dict(corpus_storage_options or {})})


def texts_for_doc_ids(
    folder: Folder,
    doc_ids: Iterable[str],
    doc_rows: dict[str, int] | None = None,
    corpus_storage_options: dict | None = None,
) -> dict[str, str]:
    """Doc id -> encoded text, through the doc id -> row id map (``doc_rows``; when not given, found for these ids
    alone by :func:`rows_for_doc_ids`) and :func:`texts_for_rows` (``corpus_storage_options``: the running job's
    ``corpus.storage_options``)."""
    wanted = set(doc_ids)
    doc_rows = doc_rows if doc_rows is not None else rows_for_doc_ids(folder, wanted)
    by_row = texts_for_rows(folder, [doc_rows[d] for d in wanted], corpus_storage_options)
    return {d: by_row[doc_rows[d]] for d in wanted}


def as_doc_ids(ids: np.ndarray, mapping: dict[int, str]) -> list[list[str]]:
    """Rows of global row ids (-1 = no result) -> rows of doc ids, dropping missing results."""
    return [[mapping[int(r)] for r in row if r >= 0 and int(r) in mapping] for row in ids]
