"""IVF shard indexes as inverted lists only, and their merge by ranges of lists into one memory-mappable file.

A shard of an IVF index is stored as its lists, without the trained index (which ``trained.faiss`` holds once):

    magic      8 bytes  ``RRIVFL01``
    nlist      int64    lists of the trained index
    code_size  int64    bytes per code
    count      int64    non-empty lists in this shard
    lists      int64[count]  their numbers, increasing
    sizes      int64[count]  entries in each
    payload    for each listed list: its codes (size * code_size bytes), then its ids (size * 8 bytes)

so a file is its codes and ids plus 16 bytes per non-empty list, and the lists ``[lo, hi)`` of a shard are one
contiguous byte range (one ranged read on object storage).

The merged index is FAISS's own file format, written as a stream: the trained index serialized with its
``ntotal`` set and its (empty) inverted lists cut off, then the ``ilar`` lists section (every list's size, then
each list's codes and ids, shard after shard in shard order). That is byte for byte what ``faiss.write_index``
writes for the index filled in one process, and ``faiss.read_index(path, IO_FLAG_MMAP_IFC)`` maps its lists in
place, so a searcher holds the quantizer and the pages of the lists it probes. The merge is cut into ranges of
lists of at most half of ``index.merge_memory`` bytes of codes and ids: one task per range reads every shard's
bytes for its lists and writes a range file; a last step writes the header and copies the range files after it in
order. Every process holds one range at most (and one shard's share of it while it is read), never the index.
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
from typing import Any, Callable, Iterable

import faiss
import numpy as np

from retrieval_core.io import storage

MAGIC = b"RRIVFL01"
HEAD = struct.Struct("<8sqqq")
ID_BYTES = 8
COPY_CHUNK = 64 << 20  # bytes copied at a time when the range files are put together


@dataclasses.dataclass(frozen=True)
class ListsHeader:
    """What a shard lists file holds: which lists, how many entries each, and where its payload starts."""

    nlist: int
    code_size: int
    lists: np.ndarray
    sizes: np.ndarray
    data_start: int

    @property
    def entry_bytes(self) -> int:
        return self.code_size + ID_BYTES

    def span(self, lo: int, hi: int) -> tuple[int, int, slice]:
        """(start, stop) bytes of the payload of lists ``[lo, hi)``, and which of the header's entries they are."""
        first, last = np.searchsorted(self.lists, [lo, hi])
        ends = np.cumsum(self.sizes) * self.entry_bytes
        start = int(ends[first - 1]) if first else 0
        stop = int(ends[last - 1]) if last else 0
        return self.data_start + start, self.data_start + stop, slice(int(first), int(last))


def streamable(trained: faiss.Index) -> bool:
    """True when the merged index of this trained index can be written as a stream: an IVF index (possibly behind
    a transform) whose serialization ends with its empty array lists (every type ``index.type`` builds except
    fast-scan codes, whose lists are stored in blocks)."""
    ivf = _ivf(trained)
    if (
        ivf is None
        or ivf.ntotal
        or not isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists)
    ):
        return False
    return faiss.serialize_index(trained).tobytes().endswith(_empty_lists(ivf))


def _ivf(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _empty_lists(ivf) -> bytes:
    return b"ilar" + struct.pack("<qq", ivf.nlist, ivf.code_size) + b"sprs" + struct.pack("<q", 0)


def write_shard(index: faiss.Index, url: str, storage_options: dict | None = None) -> int:
    """Write the inverted lists of a filled IVF ``index`` (codes and ids, no trained state) to ``url``; returns the
    bytes written. Memory: the codes and ids are copied once, list by list, into the file."""
    ivf = faiss.extract_index_ivf(index)
    lists: Any = ivf.invlists
    sizes = np.array([lists.list_size(number) for number in range(ivf.nlist)], dtype=np.int64)
    present = np.flatnonzero(sizes).astype(np.int64)
    written = 0
    with storage.open_atomic(url, storage_options) as out:
        written += out.write(HEAD.pack(MAGIC, ivf.nlist, ivf.code_size, len(present)))
        written += out.write(present.tobytes()) + out.write(sizes[present].tobytes())
        for number in present.tolist():
            size = int(sizes[number])
            written += out.write(faiss.rev_swig_ptr(lists.get_codes(number), size * ivf.code_size).tobytes())
            written += out.write(faiss.rev_swig_ptr(lists.get_ids(number), size).tobytes())
    return written


def read_header(url: str, storage_options: dict | None = None) -> ListsHeader:
    """The header of a shard lists file (two small reads; the payload is not read)."""
    fs, path = storage.filesystem(url, storage_options)
    with storage.naming(url, "read"):
        magic, nlist, code_size, count = HEAD.unpack(fs.cat_file(path, 0, HEAD.size))
        if magic != MAGIC:
            raise ValueError(f"'{url}' is not a shard lists file (it starts with {magic!r})")
        table = np.frombuffer(fs.cat_file(path, HEAD.size, HEAD.size + 16 * count), dtype=np.int64)
    return ListsHeader(nlist, code_size, table[:count], table[count:], HEAD.size + 16 * count)


def read_lists(url: str, header: ListsHeader, lo: int, hi: int, storage_options: dict | None = None):
    """(lists, their sizes, codes (n x code_size uint8), ids (n int64)) of the lists ``[lo, hi)`` present in a shard
    file, entries in list order, read in one ranged read."""
    start, stop, which = header.span(lo, hi)
    sizes, numbers = header.sizes[which], header.lists[which]
    if stop == start:
        return numbers, sizes, np.zeros((0, header.code_size), np.uint8), np.zeros(0, np.int64)
    fs, path = storage.filesystem(url, storage_options)
    with storage.naming(url, "read"):
        data = np.frombuffer(fs.cat_file(path, start, stop), dtype=np.uint8)
    return (numbers, sizes, *_entries(data, sizes, header.code_size))


def _entries(data: np.ndarray, sizes: np.ndarray, code_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, ids) of the payload bytes of consecutive lists of ``sizes`` entries (each list's codes, then ids)."""
    total = int(sizes.sum())
    codes, ids = np.empty((total, code_size), np.uint8), np.empty(total, np.int64)
    position, row = 0, 0
    for size in sizes.tolist():
        codes[row : row + size] = data[position : position + size * code_size].reshape(size, -1)
        position += size * code_size
        ids[row : row + size] = data[position : position + size * ID_BYTES].view(np.int64)
        position += size * ID_BYTES
        row += size
    return codes, ids


SPAN_FIELDS = 4  # a shard's part of a range of lists: first and end entry of its header, its count, payload start


def spans(header: ListsHeader, bounds: np.ndarray) -> np.ndarray:
    """Where the ranges of lists cut at ``bounds`` (each range's first list, then ``nlist``) lie in this shard's
    file: one row per range of (first header entry, end header entry, the header's entry count, payload start), so
    that a range's task reads its slice of the header and its payload, not the whole header."""
    cut = np.searchsorted(header.lists, bounds)
    ends = np.concatenate([[0], np.cumsum(header.sizes)]) * header.entry_bytes
    first, last = cut[:-1], cut[1:]
    count = np.full(len(first), len(header.lists))
    return np.stack([first, last, count, header.data_start + ends[first]], axis=1).astype(np.int64)


def read_span(url: str, span: np.ndarray, code_size: int, storage_options: dict | None = None):
    """(lists, sizes, codes, ids) of one shard's part of a range (a row of :func:`spans`): three ranged reads
    (its header entries' lists and sizes, then its payload), none when the shard holds none of the range."""
    first, last, count, start = (int(v) for v in span)
    if last == first:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, code_size), np.uint8), np.zeros(0, np.int64)
    fs, path = storage.filesystem(url, storage_options)
    with storage.naming(url, "read"):
        numbers = np.frombuffer(fs.cat_file(path, HEAD.size + 8 * first, HEAD.size + 8 * last), np.int64)
        at = HEAD.size + 8 * count
        sizes = np.frombuffer(fs.cat_file(path, at + 8 * first, at + 8 * last), np.int64)
        stop = start + int(sizes.sum()) * (code_size + ID_BYTES)
        data = np.frombuffer(fs.cat_file(path, start, stop), dtype=np.uint8)
    return (numbers, sizes, *_entries(data, sizes, code_size))


def range_spans(
    urls: list[str], ranges: list[tuple[int, int]], nlist: int, storage_options: dict | None = None
) -> np.ndarray:
    """Every shard's :func:`spans` for ``ranges``, as an array (range, shard, field): what the plan gives each range
    task (its row), so that no range task reads the whole headers. Memory: 32 bytes per range and shard, and a batch
    of headers."""
    bounds = np.array([lo for lo, _ in ranges] + [nlist], dtype=np.int64)
    out = np.zeros((len(ranges), len(urls), SPAN_FIELDS), np.int64)
    for number, (_, header) in enumerate(headers(urls, storage_options)):
        out[:, number, :] = spans(header, bounds)
    return out


HEADERS_AT_ONCE = 256  # shard headers read (in parallel) and held at a time


def headers(urls: list[str], storage_options: dict | None = None) -> Iterable[tuple[str, ListsHeader]]:
    """The shard files' headers in order, read in parallel ``HEADERS_AT_ONCE`` at a time (held no longer)."""
    for start in range(0, len(urls), HEADERS_AT_ONCE):
        batch = urls[start : start + HEADERS_AT_ONCE]
        yield from zip(batch, storage.map_threads(lambda url: read_header(url, storage_options), batch))


def list_totals(urls: list[str], storage_options: dict | None = None) -> tuple[np.ndarray, int]:
    """(entries of each list over all the shard files, bytes per entry), from their headers alone, read in
    parallel a batch at a time; the files must agree on the number of lists. Memory: one count per list and a
    batch of headers."""
    totals, entry_bytes = None, 1
    for url, header in headers(urls, storage_options):
        if totals is None:
            totals, entry_bytes = np.zeros(header.nlist, dtype=np.int64), header.entry_bytes
        if header.nlist != len(totals):
            raise ValueError(f"'{url}' holds {header.nlist} lists, the other shard files {len(totals)}")
        np.add.at(totals, header.lists, header.sizes)
    return (np.zeros(0, np.int64) if totals is None else totals), entry_bytes


def plan_ranges(totals: np.ndarray, entry_bytes: int, budget: int) -> list[tuple[int, int]]:
    """Consecutive ranges of lists covering ``[0, nlist)``, each holding at most ``budget`` bytes of codes and ids
    (a single list larger than that is a range of its own)."""
    ranges, lo, held = [], 0, 0
    for number, size in enumerate(totals.tolist()):
        cost = size * entry_bytes
        if number > lo and held + cost > budget:
            ranges.append((lo, number))
            lo, held = number, 0
        held += cost
    ranges.append((lo, len(totals)))
    return ranges


def merge_range(
    urls: list[str],
    shard_spans: np.ndarray,
    lo: int,
    counts: np.ndarray,
    code_size: int,
    out_url: str,
    so=None,
    dead: Callable[[int], np.ndarray | None] | None = None,
) -> np.ndarray:
    """Write the lists ``[lo, lo + len(counts))`` of all shard files, in shard order within each list, as the merged
    file's payload for them (each list's codes, then its ids), leaving out the ids ``dead(shard)`` names (a
    refresh's dead rows of a shared shard index; sorted, or None); returns each list's entries written.
    ``shard_spans``: each shard's row of :func:`spans` for this range; ``counts``: each list's entries over all
    shards, dead ones included. Memory: the range's codes and ids once (each shard's part is copied to its place as
    it is read), one shard's part and its dead ids."""
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    all_codes = np.empty((int(starts[-1]), code_size), np.uint8)
    all_ids = np.empty(int(starts[-1]), np.int64)
    cursor = starts[:-1].copy()  # where each list's next entries go: shard after shard
    for shard, (url, span) in enumerate(zip(urls, shard_spans)):
        numbers, sizes, codes, ids = read_span(url, span, code_size, so)
        if not len(ids):
            continue  # the shard holds none of the range: its dead ids are not read
        numbers, sizes, codes, ids = without_dead(numbers, sizes, codes, ids, dead(shard) if dead else None)
        if not len(ids):
            continue
        first_of_list = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        destination = np.repeat(cursor[numbers - lo] - first_of_list, sizes) + np.arange(len(ids))
        all_codes[destination] = codes
        all_ids[destination] = ids
        cursor[numbers - lo] += sizes
    with storage.open_atomic(out_url, so) as out:
        for a, b in zip(starts[:-1].tolist(), cursor.tolist()):
            if b > a:
                out.write(all_codes[a:b].tobytes())
                out.write(all_ids[a:b].tobytes())
    return cursor - starts[:-1]


def without_dead(numbers: np.ndarray, sizes: np.ndarray, codes: np.ndarray, ids: np.ndarray, dead):
    """(lists, sizes, codes, ids) of consecutive lists' entries less those whose id is in ``dead`` (sorted ids, or
    None: all kept)."""
    if dead is None or not len(dead) or not len(ids):
        return numbers, sizes, codes, ids
    keep = ~np.isin(ids, dead, assume_unique=False)
    owner = np.repeat(np.arange(len(numbers)), sizes)
    return numbers, np.bincount(owner[keep], minlength=len(numbers)).astype(np.int64), codes[keep], ids[keep]


def merged_prefix(trained: faiss.Index, totals: np.ndarray) -> bytes:
    """The merged file up to its first list: the trained index with ``ntotal`` set, and the lists' sizes."""
    copy = faiss.clone_index(trained)
    _set_ntotal(copy, int(totals.sum()))
    ivf = faiss.extract_index_ivf(copy)
    head = faiss.serialize_index(copy).tobytes()[: -len(_empty_lists(ivf))]
    # FAISS writes the sizes of every list ("full") when more than half are non-empty, else (list, size) pairs
    if np.count_nonzero(totals) > ivf.nlist // 2:
        sizes = b"full" + struct.pack("<q", ivf.nlist) + totals.astype(np.int64).tobytes()
    else:
        present = np.flatnonzero(totals)
        pairs = np.column_stack([present, totals[present]]).astype(np.int64).ravel()
        sizes = b"sprs" + struct.pack("<q", len(pairs)) + pairs.tobytes()
    return head + b"ilar" + struct.pack("<qq", ivf.nlist, ivf.code_size) + sizes


def _set_ntotal(index: faiss.Index, ntotal: int) -> None:
    index = faiss.downcast_index(index)
    index.ntotal = ntotal
    inner = getattr(index, "index", None)  # a transform or an id map around the IVF index
    if inner is not None and not isinstance(index, faiss.IndexIVF):
        _set_ntotal(inner, ntotal)


def assemble(prefix: bytes, range_urls: list[str], out_url: str, storage_options: dict | None = None) -> int:
    """Write the merged file: ``prefix``, then the range files in order, copied ``COPY_CHUNK`` bytes at a time;
    returns its size. Memory: one chunk."""
    size = 0
    with storage.open_atomic(out_url, storage_options) as out:
        size += out.write(prefix)
        for url in range_urls:
            fs, path = storage.filesystem(url, storage_options)
            with storage.naming(url, "read"), fs.open(path, "rb") as part:
                while chunk := part.read(COPY_CHUNK):
                    size += out.write(chunk)
    return size


def fill(
    trained: faiss.Index, urls: Iterable[str], storage_options: dict | None = None, dead: Iterable | None = None
) -> faiss.Index:
    """A copy of ``trained`` holding the lists of the given shard files, in memory (a group of shards searched
    together by one mining worker), less each shard's ``dead`` ids (sorted arrays or None, one per file). Memory:
    those shards' codes and ids, plus the trained index once."""
    index = faiss.clone_index(trained)
    ivf = faiss.extract_index_ivf(index)
    invlists: Any = ivf.invlists
    added = 0
    for url, gone in zip(urls, dead if dead is not None else itertools.repeat(None)):
        header = read_header(url, storage_options)
        numbers, sizes, codes, ids = read_lists(url, header, 0, header.nlist, storage_options)
        numbers, sizes, codes, ids = without_dead(numbers, sizes, codes, ids, gone)
        row = 0
        for number, size in zip(numbers.tolist(), sizes.tolist()):
            # the arrays are held here while FAISS copies from them
            list_ids, list_codes = ids[row : row + size], np.ascontiguousarray(codes[row : row + size])
            if size:
                invlists.add_entries(number, size, faiss.swig_ptr(list_ids), faiss.swig_ptr(list_codes))
            row += size
        added += len(ids)
    _set_ntotal(index, added)
    return index
