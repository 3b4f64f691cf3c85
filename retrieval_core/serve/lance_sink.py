"""A LanceDB table kept in step with the published versions (embedded: a local path or an object store URL).

Rows are ``doc_id`` (string) and ``vector`` (fixed-size float32 list). Upserts are ``merge_insert`` on ``doc_id``,
deletes a ``doc_id IN (...)`` filter, a whole load one overwrite (a new table version: readers see the old rows
until it commits). Every table version that holds one of our versions carries a tag of that version's name, so a
rollback (or a roll forward to a version applied before) checks the tagged table version out as a new one instead
of replaying changes, and the tag pointing at the table's latest version says which version the table holds.
With ``index_growth`` > 0, an IVF-PQ index is built once the table holds ``index_min_rows`` rows and rebuilt when
the rows it does not cover (added since its build; LanceDB searches them exactly) pass that fraction of the rows it
covers. A B-tree index on ``doc_id`` serves the merge inserts and deletes.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from retrieval_core.serve.sinks import Sink, log

VECTOR = "vector"
# up to this many rows a merge insert joins on a scan of doc_id, above it through the B-tree index: on 100k rows
# the scan took 0.045 s and the index 0.11 s for 6,000 upserts (bench/sink_vs_reload.py); a scan grows with the table
SCAN_ROWS = 1_000_000
DELETE_ROWS = 50_000  # ids a delete commits at once


class LanceSink(Sink):
    def __init__(self, spec: dict, dim: int, normalized: bool, max_retries: int = 6):
        super().__init__(spec, dim, normalized, max_retries)
        import lancedb

        options = {k: str(v) for k, v in spec.get("storage_options", {}).items()}
        self.db = lancedb.connect(spec["uri"], storage_options=options or None)
        self.table_name = spec["table"]
        self.schema = pa.schema([("doc_id", pa.string()), (VECTOR, pa.list_(pa.float32(), dim))])
        self._table_handle: Any = None

    def _table(self, checked: bool = True):
        """The table (None while it does not exist); ``checked``: refused unless it has our columns and dimension
        (a whole load replaces any schema)."""
        if self._table_handle is None and self.exists():
            self._table_handle = self.db.open_table(self.table_name)
        if checked and self._table_handle is not None and self._table_handle.schema != self.schema:
            raise ValueError(
                f"sink {self.name}: table {self.table_name!r} at {self.spec['uri']} has schema "
                f"{self._table_handle.schema}, expected doc_id and {VECTOR} of {self.dim} float32 (a version "
                f"encoded with another model is loaded whole, replacing it; any other table: give the sink another)"
            )
        return self._table_handle

    def exists(self) -> bool:
        return self.table_name in self.db.list_tables().tables

    def holds(self) -> str | None:
        table = self._table(checked=False)
        if table is None:
            return None
        latest = table.version
        return next((name for name, info in table.tags.list().items() if info["version"] == latest), None)

    def upsert(self, doc_ids: list[str], vectors: np.ndarray) -> None:
        data = self._arrow(doc_ids, vectors)
        table = self._table()
        if table is None:
            self._table_handle = self.db.create_table(self.table_name, data=data, schema=self.schema)
            return
        table.merge_insert("doc_id").when_matched_update_all().when_not_matched_insert_all().execute(data)

    def upsert_all(self, batches: Iterable[tuple[list[str], np.ndarray]]) -> None:
        """One merge insert for the whole stream (one table version a step, not one a batch), read batch by batch."""
        table = self._table()
        if table is None:
            self.replace_rows(batches)
            return
        reader = self._reader(batches)
        merge = table.merge_insert("doc_id").when_matched_update_all().when_not_matched_insert_all()
        merge.use_index(table.count_rows() > SCAN_ROWS).execute(reader)

    def delete_all(self, batches: Iterable[list[str]]) -> None:
        """Deletes gathered into commits of at least ``DELETE_ROWS`` ids (one table version each, not one a batch)."""
        gathered: list[str] = []
        for doc_ids in batches:
            gathered += doc_ids
            if len(gathered) >= max(DELETE_ROWS, self.spec["batch_size"]):
                self.delete(gathered)
                gathered = []
        self.delete(gathered)

    def delete(self, doc_ids: list[str]) -> None:
        table = self._table()
        if table is None or not doc_ids:
            return
        quoted = ", ".join("'" + d.replace("'", "''") + "'" for d in doc_ids)
        table.delete(f"doc_id IN ({quoted})")

    def replace(self, version: str, batches: Iterable[tuple[list[str], np.ndarray]]) -> None:
        self.replace_rows(batches)
        self.mark(version)

    def _reader(self, batches: Iterable[tuple[list[str], np.ndarray]]) -> pa.RecordBatchReader:
        rows = (self._arrow(ids, vectors).to_batches()[0] for ids, vectors in batches if ids)
        return pa.RecordBatchReader.from_batches(self.schema, rows)

    def replace_rows(self, batches: Iterable[tuple[list[str], np.ndarray]]) -> None:
        """The table's rows replaced by the stream, in one new table version."""
        reader = self._reader(batches)
        table = self._table(checked=False)
        if table is None or table.schema != self.schema:  # none yet, or another encoder's: a table version anew
            mode = "create" if table is None else "overwrite"
            self._table_handle = self.db.create_table(self.table_name, data=reader, schema=self.schema, mode=mode)
        else:
            table.add(reader, mode="overwrite")

    def mark(self, version: str) -> None:
        """Tag the data just committed with ``version`` at once (a kill while the indexes build then still finds the
        table holding it), build what indexes are due, and move the tag to the table version they made."""
        table = self._table()
        if table is None:  # nothing was ever written: an empty version
            self._table_handle = table = self.db.create_table(self.table_name, schema=self.schema)
        self._tag(table, version)
        self._key_index(table)
        self._maybe_index(table)
        self._tag(table, version)

    def _tag(self, table, version: str) -> None:
        if version in table.tags.list():
            table.tags.update(version, table.version)
        else:
            table.tags.create(version, table.version)

    def can_restore(self, version: str) -> bool:
        table = self._table(checked=False)
        return table is not None and version in table.tags.list()

    def restore(self, version: str) -> bool:
        table = self._table(checked=False)
        if table is None or version not in table.tags.list():
            return False
        table.restore(version)
        self._tag(table, version)
        log.info("sink %s: table %s checked out at the table version tagged %s", self.name, self.table_name, version)
        return True

    def forget(self, kept: set[str]) -> None:
        """Remove the tags of versions no longer kept under the output root (their table versions may then be
        cleaned up by the table's own ``cleanup_old_versions``)."""
        table = self._table(checked=False)
        for name in set(table.tags.list()) - kept if table is not None else ():
            table.tags.delete(name)

    def stats(self) -> dict:
        table = self._table(checked=False)
        return {"rows": table.count_rows(), "table_version": table.version} if table is not None else {"rows": 0}

    def _arrow(self, doc_ids: list[str], vectors: np.ndarray) -> pa.Table:
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
        return pa.table(
            {"doc_id": pa.array(doc_ids, pa.string()), VECTOR: pa.FixedSizeListArray.from_arrays(flat, self.dim)},
            schema=self.schema,
        )

    def _key_index(self, table) -> None:
        """A B-tree index on ``doc_id`` (merge inserts and deletes find their rows through it instead of scanning
        the table), rebuilt once a tenth of the rows are past it."""
        from lancedb.index import BTree

        stats = next((table.index_stats(i.name) for i in table.list_indices() if i.columns == ["doc_id"]), None)
        if stats is None or stats.num_unindexed_rows > 0.1 * max(stats.num_indexed_rows, 1):
            table.create_index("doc_id", config=BTree(), replace=True, name="doc_id_idx")

    def _maybe_index(self, table) -> None:
        growth = self.spec.get("index_growth", 0)
        if not growth:
            return
        rows = table.count_rows()
        indexed = _indexed_rows(table)
        if indexed is None and rows < self.spec["index_min_rows"]:
            return
        if indexed is None or rows - indexed > growth * indexed:
            log.info("sink %s: building the IVF-PQ index of %s (%d rows)", self.name, self.table_name, rows)
            from lancedb.index import IvfPq

            table.create_index(VECTOR, config=IvfPq(distance_type="dot"), replace=True, name=f"{VECTOR}_idx")


def _indexed_rows(table) -> int | None:
    """Rows the vector index covers, or None without one."""
    for index in table.list_indices():
        if VECTOR in index.columns:
            return table.index_stats(index.name).num_indexed_rows
    return None
