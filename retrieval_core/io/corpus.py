"""Reading a corpus: file metadata for planning, one shard's rows for encoding, text assembly and rejects.

Formats: Parquet (blocks = row groups) and JSONL (blocks of ``JSONL_BLOCK_ROWS`` non-blank lines, with byte
offsets, found by one streaming pass over the file). Memory is bounded by one Parquet row group or one batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import fsspec.utils
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval_core.config import CorpusConfig
from retrieval_core.io import file_cache, storage
from retrieval_core.io.sharding import FileMeta, Piece, Shard, blocks_for_range

log = logging.getLogger(__name__)

JSONL_BLOCK_ROWS = 1000
SUFFIXES = {"parquet": (".parquet", ".parq", ".pq"), "jsonl": (".jsonl", ".json", ".ndjson", ".jsonl.gz")}
READ_BATCH_ROWS = 1024


class CorpusError(ValueError):
    """The corpus cannot be read as configured; the message names the file, column or value."""


@dataclass
class ShardRows:
    """One shard's accepted rows (texts assembled) and its rejects."""

    row_ids: list[int] = field(default_factory=list)
    doc_ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)


def corpus_format(url: str, configured: str) -> str:
    if configured:
        return configured
    name = url.lower()
    for fmt, suffixes in SUFFIXES.items():
        if name.endswith(suffixes):
            return fmt
    raise CorpusError(f"cannot infer the format of '{url}' from its extension; set corpus.format to parquet or jsonl")


def corpus_files(cfg: CorpusConfig) -> list[str]:
    suffixes = SUFFIXES[cfg.format] if cfg.format else tuple(s for group in SUFFIXES.values() for s in group)
    return storage.expand_paths(cfg.path, suffixes, cfg.storage_options)


def required_columns(cfg: CorpusConfig) -> list[str]:
    return [c for c in (cfg.id_column, cfg.text_column, cfg.title_column) if c]


def inspect_corpus(cfg: CorpusConfig) -> list[FileMeta]:
    """File metadata for planning, after checking that every file has the configured columns, and that Parquet
    files give them usable types: text and title strings, ids strings or integers, one id type in all files."""
    metas, id_types = [], {}
    for url, (meta, schema) in _inspect_files(corpus_files(cfg), cfg):
        columns = schema.names if isinstance(schema, pa.Schema) else schema
        missing = [c for c in required_columns(cfg) if c not in columns]
        if missing and meta.num_rows:
            raise CorpusError(
                f"'{url}' has no column {', '.join(map(repr, missing))}; columns present: {', '.join(columns)}"
            )
        if isinstance(schema, pa.Schema) and meta.num_rows:
            id_types[url] = _check_column_types(url, schema, cfg)
        metas.append(meta)
    kinds = {kind: url for url, kind in id_types.items()}
    if len(kinds) > 1:
        (kind_a, url_a), (kind_b, url_b) = sorted(kinds.items())
        raise CorpusError(
            f"the id column '{cfg.id_column}' holds {kind_a} values in '{url_a}' and {kind_b} values in "
            f"'{url_b}': write one type in every file (ids are compared as strings, so 1 and '1' would "
            f"be one id)"
        )
    return metas


def _inspect_files(urls: list[str], cfg: CorpusConfig) -> Iterator[tuple[str, tuple[FileMeta, pa.Schema | list[str]]]]:
    """Each file's metadata, in file order. Parquet footers are read ``storage.READ_THREADS`` (16) at a time: on
    object storage each is a round trip, and 10,000 of them one after another take minutes. JSONL files are scanned
    one after another: each scan reads the whole file (bandwidth, not round trips) in a Python loop over its lines,
    and every scan in flight would hold its own read-ahead buffer."""
    formats = [corpus_format(url, cfg.format) for url in urls]
    parquet = [url for url, fmt in zip(urls, formats) if fmt == "parquet"]
    footers = iter(storage.map_threads(lambda url: _inspect_parquet(url, cfg), parquet))
    for url, fmt in zip(urls, formats):
        yield url, (next(footers) if fmt == "parquet" else _inspect_jsonl(url, cfg))


def _check_column_types(url: str, schema: pa.Schema, cfg: CorpusConfig) -> str:
    """Refuses text or title columns that are not strings and id columns that are neither strings nor integers
    (their values would be encoded as their Python repr); returns the id column's kind."""
    for column in (cfg.text_column, cfg.title_column):
        if column and not (_is_string(schema.field(column).type) or pa.types.is_null(schema.field(column).type)):
            raise CorpusError(f"'{url}': column '{column}' is {schema.field(column).type}, not a string column")
    id_type = schema.field(cfg.id_column).type
    if _is_string(id_type):
        return "string"
    if pa.types.is_integer(id_type):
        return "integer"
    raise CorpusError(f"'{url}': the id column '{cfg.id_column}' is {id_type}; expected strings or integers")


def _is_string(arrow_type: pa.DataType) -> bool:
    return (
        pa.types.is_string(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(arrow_type))
    )


def _inspect_parquet(url: str, cfg: CorpusConfig) -> tuple[FileMeta, pa.Schema]:
    fs, path = storage.filesystem(url, cfg.storage_options)
    try:
        with fs.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
            schema = metadata.schema.to_arrow_schema()
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorpusError(f"'{url}' is not a readable Parquet file: {exc}") from None
    rows = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    return FileMeta(url, "parquet", rows), schema


@contextlib.contextmanager
def _readable(url: str):
    """Errors of reading a (possibly compressed) text file as one CorpusError naming it: gzip that is not gzip,
    compressed data cut short, a file that vanished."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as exc:
        raise CorpusError(f"'{url}' could not be read: {type(exc).__name__}: {exc}") from None


def _inspect_jsonl(url: str, cfg: CorpusConfig) -> tuple[FileMeta, list[str]]:
    fs, path = storage.filesystem(url, cfg.storage_options)
    block_rows, block_offsets, columns = [], [], None
    offset, rows_in_block = 0, 0
    with _readable(url), fs.open(path, "rb", compression="infer") as handle:
        for line in handle:
            if line.strip():
                if rows_in_block == 0:
                    block_offsets.append(offset)
                if columns is None:
                    columns = _first_record_keys(url, line)
                rows_in_block += 1
                if rows_in_block == JSONL_BLOCK_ROWS:
                    block_rows.append(rows_in_block)
                    rows_in_block = 0
            offset += len(line)
    if rows_in_block:
        block_rows.append(rows_in_block)
    return FileMeta(url, "jsonl", tuple(block_rows), tuple(block_offsets)), columns or []


def _first_record_keys(url: str, line: bytes) -> list[str]:
    try:
        record = json.loads(line)
    except UnicodeDecodeError as exc:
        raise CorpusError(f"'{url}': the first line is not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CorpusError(f"'{url}': the first line is not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise CorpusError(f"'{url}': the first line is not a JSON object")
    return list(record)


def iter_piece_batches(
    piece: Piece, columns: list[str], storage_options: dict, batch_rows: int = READ_BATCH_ROWS
) -> Iterator[tuple[int, dict]]:
    """Yield ``(first file row, {column: values})`` batches covering exactly the piece's rows."""
    reader = _iter_parquet if piece.file.format == "parquet" else _iter_jsonl
    position = None
    for first_row, batch in reader(piece, columns, storage_options, batch_rows):
        n = len(batch[columns[0]])
        lo, hi = max(first_row, piece.row_start), min(first_row + n, piece.row_stop)
        if lo < hi:
            yield lo, {c: values[lo - first_row : hi - first_row] for c, values in batch.items()}
        position = first_row + n
        if position >= piece.row_stop:
            return


def _iter_parquet(piece: Piece, columns: list[str], storage_options: dict, batch_rows: int):
    groups, first_row = blocks_for_range(piece.file.block_rows, piece.row_start, piece.row_stop)
    fs, path = storage.filesystem(piece.file.url, storage_options)
    try:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
                yield first_row, {c: batch.column(c).to_pylist() for c in columns}
                first_row += batch.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorpusError(f"'{piece.file.url}' could not be read as Parquet: {exc}") from None


def _iter_jsonl(piece: Piece, columns: list[str], storage_options: dict, batch_rows: int):
    blocks, first_row = blocks_for_range(piece.file.block_rows, piece.row_start, piece.row_stop)
    if not blocks:
        return
    with _readable(piece.file.url), _open_jsonl(piece.file.url, storage_options) as handle:
        handle.seek(piece.file.block_offsets[blocks[0]])
        batch: dict[str, list] = {c: [] for c in columns}
        row = first_row
        for line in handle:
            if not line.strip():
                continue
            for column, value in zip(columns, _jsonl_values(line, columns)):
                batch[column].append(value)
            if len(batch[columns[0]]) == batch_rows or row + 1 >= piece.row_stop:
                yield row + 1 - len(batch[columns[0]]), batch
                batch = {c: [] for c in columns}
            row += 1
            if row >= piece.row_stop:
                return
        if batch[columns[0]]:
            yield row - len(batch[columns[0]]), batch


def _open_jsonl(url: str, storage_options: dict):
    """A JSONL file open for reading at any byte offset of its text: itself, or when compressed (gzip ...), this
    node's decompressed copy of it (made once per node, see ``file_cache.decompressed_copy``): a compressed stream
    can only seek by decompressing from its start, which each piece of a large file would do again."""
    if fsspec.utils.infer_compression(url):
        return open(file_cache.decompressed_copy(url, storage_options), "rb")
    fs, path = storage.filesystem(url, storage_options)
    return fs.open(path, "rb")


def _jsonl_values(line: bytes, columns: list[str]) -> list:
    try:
        record = json.loads(line)
    except UnicodeDecodeError as exc:
        return [_BadLine(f"not UTF-8 text: {exc}")] * len(columns)
    except json.JSONDecodeError as exc:
        return [_BadLine(str(exc))] * len(columns)
    if not isinstance(record, dict):
        return [_BadLine("not a JSON object")] * len(columns)
    return [record.get(c) for c in columns]


class _BadLine:
    def __init__(self, reason: str):
        self.reason = reason


def assemble_text(title, text) -> str:
    """``title + " " + text`` as BEIR/MTEB do when a title is present, else the text."""
    return f"{title} {text}".strip() if title else text


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def texts_at(metas: list[FileMeta], cfg: CorpusConfig, positions: Iterable[int]) -> dict[int, str]:
    """Global row -> encoded text (title + " " + text) of the rows at ``positions``, reading only the blocks (Parquet
    row groups, JSONL blocks of lines) that hold them."""
    wanted = set(int(p) for p in positions if p >= 0)
    columns = required_columns(cfg)
    out: dict[int, str] = {}
    for file_start, piece in _blocks_holding(metas, wanted):
        for first, batch in iter_piece_batches(piece, columns, cfg.storage_options):
            titles = batch[cfg.title_column] if cfg.title_column else [None] * len(batch[cfg.text_column])
            for offset, (title, text) in enumerate(zip(titles, batch[cfg.text_column])):
                if file_start + first + offset in wanted:
                    out[file_start + first + offset] = assemble_text(title, text)
    return out


def _blocks_holding(metas: list[FileMeta], wanted: set[int]) -> Iterator[tuple[int, Piece]]:
    """(the file's first global row, a piece covering one block) for every block holding a wanted row."""
    import bisect

    rows_sorted = sorted(wanted)
    file_start = 0
    for meta in metas:
        block_start = file_start
        for rows in meta.block_rows:
            i = bisect.bisect_left(rows_sorted, block_start)
            if i < len(rows_sorted) and rows_sorted[i] < block_start + rows:
                yield file_start, Piece(meta, block_start - file_start, block_start - file_start + rows)
            block_start += rows
        file_start += meta.num_rows


def read_shard(shard: Shard, cfg: CorpusConfig) -> ShardRows:
    """The shard's rows: accepted texts with global row ids and doc ids, and every reject with its reason."""
    columns = required_columns(cfg)
    out = ShardRows()
    global_row = shard.row_start
    for piece in shard.pieces:
        for _, batch in iter_piece_batches(piece, columns, cfg.storage_options):
            titles = batch[cfg.title_column] if cfg.title_column else [None] * len(batch[cfg.id_column])
            for doc_id, title, text in zip(batch[cfg.id_column], titles, batch[cfg.text_column]):
                _accept_or_reject(out, global_row, piece.file.url, doc_id, title, text, cfg.max_text_chars)
                global_row += 1
    if global_row != shard.row_stop:
        raise CorpusError(
            f"{shard.name}: read {global_row - shard.row_start} rows, planned {shard.num_rows}; "
            "did a corpus file change since planning?"
        )
    return out


def _accept_or_reject(out: ShardRows, row_id: int, source: str, doc_id, title, text, max_chars: int) -> None:
    reason = _reject_reason(doc_id, title, text, max_chars)
    if reason:
        doc = str(doc_id) if isinstance(doc_id, (str, int)) and _encodable(str(doc_id)) else None
        out.rejects.append({"row_id": row_id, "doc_id": doc, "source": source, "reason": reason})
        return
    out.row_ids.append(row_id)
    out.doc_ids.append(str(doc_id))
    out.texts.append(assemble_text(title, text))


INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))  # zero-width characters strip() keeps


def _reject_reason(doc_id, title, text, max_chars: int) -> str | None:
    """Why a row cannot be encoded, or None. Values of the wrong type are refused rather than encoded as their
    Python repr; an integer id is taken as its decimal string."""
    if isinstance(doc_id, _BadLine):
        return f"invalid JSON line: {doc_id.reason}"
    if doc_id is None or str(doc_id) == "":
        return "null or empty id"
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        return f"id is a {type(doc_id).__name__}, not a string or integer"
    if text is None:
        return "null text"
    if not isinstance(text, str):
        return f"text is a {type(text).__name__}, not a string"
    if title is not None and not isinstance(title, str):
        return f"title is a {type(title).__name__}, not a string"
    if not _encodable(str(doc_id)) or not _encodable(text) or (title and not _encodable(title)):
        return "not valid Unicode (an unpaired surrogate escape)"
    if not text.translate(INVISIBLE).strip():
        return "empty text"
    if max_chars and len(text) > max_chars:
        return f"text of {len(text)} characters, over corpus.max_text_chars = {max_chars}"
    return None


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _valid_id(doc_id) -> bool:
    """An id a row can be accepted with (others are rejects, see :func:`_reject_reason`)."""
    return (
        isinstance(doc_id, (str, int))
        and not isinstance(doc_id, bool)
        and str(doc_id) != ""
        and _encodable(str(doc_id))
    )


def _id_hash(doc_id) -> int:
    return int.from_bytes(hashlib.blake2b(str(doc_id).encode("utf-8"), digest_size=8).digest(), "little")
