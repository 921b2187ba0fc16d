"""An approximate nearest-neighbour index of a feature store's live rows, kept beside it (``NAME.h5.usearch``).

The index is usearch's HNSW graph over the rows' directions (cosine metric, float16 vectors), keyed by row number
in the store, followed by a trailer that says what it covers: the store's identity (its ``file_id``, a new one
for every file written whole: a new store, ``--overwrite``, ``compact``, ``save``), how many rows (the first
``rows`` of the file, dead ones left out) and how many of those were dead. Rows are never changed in place,
only appended or killed, so an index of the same file is brought up to date by adding the rows past ``rows``
and removing the rows killed since (``update``); another file, a damaged or unreadable index, is rebuilt.

It is written beside the store (``.NAME.h5.usearch.tmp-PID``), fsync'ed and renamed over the old one by the
holder of the store's writer lock, so a reader sees the old index or the new one, never a part of one. A
reader maps it (``Index.restore(view=True)``): only the pages a search touches are read.

The index only proposes candidates: callers re-rank them by exact cosine from the stored rows and drop rows
that are no longer live, so a stale index costs recall, never a wrong distance or a removed photo.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from furnitype.errors import InputError, StoreError
from furnitype.faults import pause_point
from furnitype.features.layout import BLOCK_ROWS
from furnitype.features.locking import WriterLock, real_path
from furnitype.features.undo import write_all
from furnitype.features.view import StoreView, open_store
from furnitype.outputs import fsync_folder

#: Live rows from which ``similar`` searches through the index by default (below, exact search is as fast:
#: loading 50,000 rows of 512 floats and one matrix product take about half a second; see docs/benchmarks.md).
THRESHOLD = 50_000
#: Rows an index may lack (appended, or killed, since it was written) before it is rewritten: a search reads
#: the appended ones and compares them exactly (about 35 ms of CPU for 2,000 rows of 512, 160 ms for 10,000)
#: and drops killed candidates; an extraction that changes more rewrites the index (seconds at 10^6 rows).
TAIL_ROWS = 2_000
#: Candidates the index proposes per neighbour asked (at least ``MIN_CANDIDATES``), re-ranked exactly.
CANDIDATES_PER_NEIGHBOUR = 4
MIN_CANDIDATES = 40
#: Width of the graph search (usearch's default is 64): 128 lifts recall@10 on 10^5 rows of 2,048 from 0.957 to
#: 0.972 for 0.3 ms more per query (docs/benchmarks.md).
EXPANSION_SEARCH = 128
SUFFIX = ".usearch"
FORMAT = 1
_MAGIC = b"FTANNv1\n"
_TAIL = struct.Struct("<QI8s")  # trailer length, crc32 of the trailer, magic
_HEAD_BYTES = 1 << 16  # the part of the usearch file whose crc32 a reader checks (its header and first levels)

log = logging.getLogger("furnitype")


class IndexDamaged(Exception):
    """An index file that is not a whole index written by furnitype (the message says why)."""


@dataclass(frozen=True)
class Covered:
    """What an index covers: the store's identity, its first ``rows`` rows, ``dead`` of them left out."""

    store: str
    rows: int
    dead: int
    dim: int


def index_path(store: str | os.PathLike) -> Path:
    """``NAME.h5.usearch`` beside the store's real path."""
    real = real_path(store)
    return real.with_name(real.name + SUFFIX)


def store_identity(view: StoreView) -> str:
    """The store file's ``file_id`` (a new one for every file written whole); a store written before furnitype
    recorded one gets a digest of its sha256 column (its next write records a ``file_id``)."""
    file_id = view.h5.attrs.get("file_id")
    if isinstance(file_id, (str, bytes)) and file_id:
        return file_id.decode() if isinstance(file_id, bytes) else file_id
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for start in range(0, view.n["rows"], 1 << 16):
        digest.update(view.column("rows", "sha256", np.arange(start, min(start + (1 << 16), view.n["rows"]))).tobytes())
    return f"sha256-column:{digest.hexdigest()}"


def dead_among(view: StoreView, rows: int) -> int:
    """Dead rows among the store's first ``rows``."""
    live = view.live("rows")
    return rows - int(np.searchsorted(live, rows))


class AnnIndex:
    """An index file mapped for searching (``open_index``), with what it covers."""

    def __init__(self, index, covered: Covered, path: Path):
        index.expansion_search = EXPANSION_SEARCH
        self._index = index
        self.covered = covered
        self.path = path

    def __len__(self) -> int:
        return len(self._index)

    def rows(self) -> np.ndarray:
        """The row numbers the index holds, ascending."""
        return np.sort(np.asarray(self._index.keys, np.int64))

    def candidates(self, X: np.ndarray, count: int, *, threads: int = 1) -> list[np.ndarray]:
        """The row numbers of (up to) ``count`` approximate nearest rows of each row of ``X``."""
        count = max(1, min(count, len(self._index)))
        X = np.asarray(X, np.float32)
        found = self._index.search(X, count, threads=threads)
        if X.ndim == 2 and len(X) > 1:  # BatchMatches: keys past each query's count are not matches
            return [found.keys[i, : found.counts[i]].astype(np.int64) for i in range(len(X))]
        return [np.asarray(found.keys, np.int64).ravel()]


def read_covered(path: Path) -> tuple[Covered, int]:
    """The trailer of an index file and the length of its usearch part; ``IndexDamaged`` when not whole."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise IndexDamaged(f"cannot be read: {err.strerror or err}") from err
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise IndexDamaged("not a regular file")
        size = found.st_size
        if size < _TAIL.size:
            raise IndexDamaged("cut short")
        length, crc, magic = _TAIL.unpack(os.pread(fd, _TAIL.size, size - _TAIL.size))
        if magic != _MAGIC:
            raise IndexDamaged("not a furnitype index, or cut short")
        if length > size - _TAIL.size:
            raise IndexDamaged("its trailer is damaged")
        raw = os.pread(fd, length, size - _TAIL.size - length)
        if zlib.crc32(raw) != crc:
            raise IndexDamaged("its trailer is damaged")
        info = json.loads(raw)
        body = size - _TAIL.size - length
        if info.get("format") != FORMAT or info.get("bytes") != body:
            raise IndexDamaged("cut short, or of another format")
        if zlib.crc32(os.pread(fd, min(_HEAD_BYTES, body), 0)) != info.get("head_crc"):
            raise IndexDamaged("its header is damaged")
        covered = Covered(str(info["store"]), int(info["rows"]), int(info["dead"]), int(info["dim"]))
        return covered, body
    except (ValueError, KeyError, TypeError) as err:
        raise IndexDamaged("its trailer is damaged") from err
    except OSError as err:
        raise IndexDamaged(f"cannot be read: {err.strerror or err}") from err
    finally:
        os.close(fd)


def covered_crc(path: Path) -> int:
    """The crc32 of the whole usearch part that the trailer records (checked by writers, who read it all)."""
    with open(path, "rb") as f:
        f.seek(-_TAIL.size, os.SEEK_END)
        length, _, _ = _TAIL.unpack(f.read(_TAIL.size))
        f.seek(-_TAIL.size - length, os.SEEK_END)
        return int(json.loads(f.read(length))["crc"])


def keep_up(real: Path, given: str | os.PathLike) -> None:
    """For a writer that holds the store's lock, at the end of its run: rewrite the index when it lags more than
    ``TAIL_ROWS`` rows, is damaged or of another file, or is missing while the store has ``THRESHOLD`` live rows."""
    path = index_path(real)
    remove_leftovers(path)
    with open_store(real, given=given, check_undo=False) as view:
        if not os.path.lexists(path) and len(view.live("rows")) < THRESHOLD:
            return
        with contextlib.suppress(IndexDamaged):
            covered, _ = read_covered(path)
            if not problem(covered, view, store_identity(view)) and lag(covered, view) <= TAIL_ROWS:
                return
        update(view, given, path=path)


def open_index(path: Path) -> AnnIndex:
    """Map an index file for searching (``IndexDamaged`` when it is not whole)."""
    from usearch.index import Index

    covered, _ = read_covered(path)
    try:
        index = Index.restore(str(path), view=True)
    except (RuntimeError, ValueError) as err:
        raise IndexDamaged(f"usearch cannot map it: {err}") from err
    if index is None or index.ndim != covered.dim or len(index) > covered.rows - covered.dead:
        raise IndexDamaged("its graph does not match its trailer")
    return AnnIndex(index, covered, path)


def problem(covered: Covered, view: StoreView, identity: str) -> str:
    """Why an index that covers ``covered`` cannot be brought up to date for ``view`` ("" when it can)."""
    if covered.store != identity:
        return "it indexes another file (the store was compacted or rewritten since)"
    if covered.dim != view.dim:
        return f"its rows have {covered.dim} features, the store's {view.dim}"
    if covered.rows > view.n["rows"] or dead_among(view, covered.rows) < covered.dead:
        return "it indexes rows the store does not have"
    return ""


def lag(covered: Covered, view: StoreView) -> int:
    """Rows of the store an index of it lacks: appended since it was written, or killed since (not removed)."""
    return view.n["rows"] - covered.rows + dead_among(view, covered.rows) - covered.dead


def kneighbors(view: StoreView, index: AnnIndex | None, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine distances and row numbers (in the store) of the ``k`` nearest live rows of each row of ``X``,
    nearest first (equal distances in row order): among the index's candidates and the rows it lacks, or, with
    no index, among all live rows read block by block. Only the rows compared are read."""
    from furnitype.features.index import CosineIndex

    live = view.live("rows")
    k = min(k, len(live))
    X = np.asarray(X, np.float32)
    if index is None:
        return _exact_blocks(view, live, X, k)
    covered = index.covered
    tail = live[np.searchsorted(live, covered.rows) :]
    base = max(MIN_CANDIDATES, CANDIDATES_PER_NEIGHBOUR * k)
    count = base + min(dead_among(view, covered.rows) - covered.dead, base)  # killed since: not answers
    found = index.candidates(X, count)
    rows = np.union1d(np.concatenate([tail, *found]), np.zeros(0, np.int64))
    rows = rows[np.isin(rows, live, assume_unique=True)]
    features = view.column("rows", "features", rows) if len(rows) else np.zeros((0, view.dim), np.float32)
    distances, nearest = np.zeros((len(X), k), np.float32), np.zeros((len(X), k), np.int64)
    for i, cand in enumerate(found):
        mine = np.union1d(cand, tail)
        at = np.searchsorted(rows, mine)
        at = at[(at < len(rows)) & (rows[np.minimum(at, len(rows) - 1)] == mine)]
        if len(at) < k:  # the graph offered too few live rows (unlikely): compare with every live row
            d, r = _exact_blocks(view, live, X[i : i + 1], k)
            distances[i], nearest[i] = d[0], r[0]
            continue
        d, r = CosineIndex(features[at]).kneighbors(X[i : i + 1], k)
        distances[i], nearest[i] = d[0], rows[at][r[0]]
    return distances, nearest


def _exact_blocks(view: StoreView, live: np.ndarray, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact search over all live rows, read ``BLOCK_ROWS`` at a time (bounded memory)."""
    from furnitype.features.index import CosineIndex

    best_d = np.full((len(X), 0), np.inf, np.float32)
    best_r = np.zeros((len(X), 0), np.int64)
    for start in range(0, len(live), BLOCK_ROWS):
        rows = live[start : start + BLOCK_ROWS]
        d, r = CosineIndex(view.column("rows", "features", rows)).kneighbors(X, k)
        best_d, best_r = np.concatenate([best_d, d], axis=1), np.concatenate([best_r, rows[r]], axis=1)
        order = np.lexsort((best_r, best_d), axis=1)[:, :k]
        best_d, best_r = np.take_along_axis(best_d, order, 1), np.take_along_axis(best_r, order, 1)
    return best_d, best_r


def update(view: StoreView, given: str | os.PathLike, *, path: Path | None = None) -> AnnIndex:
    """Bring the index of the store open as ``view`` up to date (the caller holds the store's writer lock):
    add the rows appended since, remove those killed since; rebuild it when it is missing, damaged or of another
    file (one warning line for a damaged one). Written beside, renamed over."""
    from usearch.index import Index

    path = path or index_path(view.file)
    identity = store_identity(view)
    index, covered, why = None, None, ""
    if os.path.lexists(path):
        try:
            covered, body = read_covered(path)
            why = problem(covered, view, identity)
            if not why:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    if _crcs(fd, body)[1] != covered_crc(path):
                        raise IndexDamaged("its checksum is wrong")
                finally:
                    os.close(fd)
                index = Index.restore(str(path))
                if index is None or index.ndim != view.dim:
                    raise IndexDamaged("usearch cannot read it")
        except IndexDamaged as err:
            why = f"is damaged ({err})"
        except (OSError, RuntimeError, ValueError) as err:
            why = f"is damaged ({err})"
        else:
            why = f"is stale: {why}" if why else ""
        if why:
            log.warning(f"warning: {path.name} {why}; rebuilding it.")
            index, covered = None, None
    live = view.live("rows")
    if index is None or covered is None:
        index = Index(ndim=view.dim, metric="cos", dtype="f16")
        start = 0
    else:
        start = covered.rows
        killed = np.setdiff1d(np.arange(covered.rows), live[: np.searchsorted(live, covered.rows)])
        present = killed[index.contains(killed.astype(np.uint64))] if len(killed) else killed
        if len(present):
            index.remove(present.astype(np.uint64))
    added = live[np.searchsorted(live, start) :]
    for first in range(0, len(added), BLOCK_ROWS):
        rows = added[first : first + BLOCK_ROWS]
        # One thread: usearch then builds the same graph from the same rows (a rebuild answers as the index it
        # replaces); the build is CPU-bound either way (about 4 minutes of CPU for 10^6 rows of 512).
        index.add(rows.astype(np.uint64), view.column("rows", "features", rows), threads=1)
    total = view.n["rows"]
    covered = Covered(identity, total, dead_among(view, total), view.dim)
    write_index(path, index, covered, given)
    return AnnIndex(index, covered, path)


def write_index(path: Path, index, covered: Covered, given: str | os.PathLike) -> None:
    """The index and its trailer into ``.NAME.usearch.tmp-PID``, fsync'ed, renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
    except OSError as err:
        raise StoreError(f"cannot write the index of {given} ({err.strerror or err}).") from err
    try:
        index.save(str(tmp))  # into the file made above (usearch writes it in place, no copy in memory)
        pause_point("index-write")
        fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            body = os.fstat(fd).st_size
            head_crc, crc = _crcs(fd, body)
            info = {"format": FORMAT, "store": covered.store, "rows": covered.rows, "dead": covered.dead,
                    "dim": covered.dim, "bytes": body, "head_crc": head_crc, "crc": crc}
            trailer = json.dumps(info).encode()
            write_all(fd, trailer + _TAIL.pack(len(trailer), zlib.crc32(trailer), _MAGIC), body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except (OSError, RuntimeError) as err:  # usearch says a failed write with a RuntimeError
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write the index of {given} ({getattr(err, 'strerror', None) or err}).") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _crcs(fd: int, length: int) -> tuple[int, int]:
    """The crc32 of the first ``_HEAD_BYTES`` of the file open as ``fd`` and of its first ``length`` bytes."""
    head = crc = 0
    for start in range(0, length, _HEAD_BYTES):
        chunk = os.pread(fd, min(_HEAD_BYTES, length - start), start)
        if start == 0:
            head = zlib.crc32(chunk)
        crc = zlib.crc32(chunk, crc)
    return head, crc


def remove_leftovers(path: Path) -> None:
    """Remove ``.NAME.usearch.tmp-PID`` files that killed writers left (the caller holds the writer lock)."""
    prefix = f".{path.name}.tmp-"
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if entry.name.startswith(prefix) and not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def usable_index(view: StoreView, given: str | os.PathLike) -> AnnIndex | None:
    """The index of the store open as ``view``, for a reader: up to date (updated now under the writer lock when
    it is stale, missing or damaged and this process can take that lock and write beside the store), or stale
    but of this file (another process is writing: the caller also searches the rows it lacks), else None (the
    caller searches exactly)."""
    path = index_path(view.file)
    identity = store_identity(view)
    found: AnnIndex | None = None
    with contextlib.suppress(IndexDamaged):
        found = open_index(path)
        if problem(found.covered, view, identity):
            found = None
        elif lag(found.covered, view) <= TAIL_ROWS:
            return found
    try:
        with WriterLock(view.file, given):
            remove_leftovers(path)
            update(view, given, path=path)
    except (StoreError, InputError) as err:
        if found is None:
            why = str(err).rstrip(".")
            log.warning(f"warning: the index of {given} cannot be made now ({why}); searching every row.")
        return found
    return open_index(path)


@dataclass(frozen=True)
class Neighbourhoods:
    """The ``k`` nearest other live rows of every live row of a store (``all_neighbours``).

    Attributes
    ----------
    paths, labels, sha256 : ndarray of str, shape (n,)
        The live rows, in the store's row order.
    neighbours : ndarray of int, shape (n, k)
        Positions (into ``paths``) of each row's nearest other rows, nearest first; equal distances in row order.
    distances : ndarray of float32, shape (n, k)
        Their exact cosine distances (0 = same direction, up to 2).
    """

    paths: np.ndarray
    labels: np.ndarray
    sha256: np.ndarray
    neighbours: np.ndarray
    distances: np.ndarray


def all_neighbours(store: str | os.PathLike, k: int, *, exact: bool | None = None) -> Neighbourhoods:
    """The ``k`` nearest other live rows of every live row of ``store`` (batch k-NN, for near-duplicates).

    ``exact`` as in ``furnitype.similar.similar``: None compares with every row below ``THRESHOLD`` live rows and
    goes through the store's index above it (made or brought up to date first when possible); the distances
    are exact either way. Memory: the paths, labels and digests of all rows, and one block of features at a time.
    """
    if k < 1:
        raise InputError(f"k must be at least 1. Received: k={k}")
    with open_store(store) as view:
        live = view.live("rows")
        k = min(k, max(len(live) - 1, 0))
        index = None if exact or (exact is None and len(live) < THRESHOLD) else usable_index(view, store)
        neighbours = np.zeros((len(live), k), np.int64)
        distances = np.zeros((len(live), k), np.float32)
        block = BLOCK_ROWS if index is None else 1024  # with the index: the block's candidates are read
        for start in range(0, len(live) if k else 0, block):
            rows = live[start : start + block]
            d, r = kneighbors(view, index, view.column("rows", "features", rows), k + 1)
            for i, own in enumerate(rows):
                keep = np.flatnonzero(r[i] != own)[:k]
                neighbours[start + i], distances[start + i] = np.searchsorted(live, r[i][keep]), d[i][keep]
        return Neighbourhoods(
            np.array(view.column("rows", "path", live).tolist(), dtype=str),
            np.array(view.column("rows", "label", live).tolist(), dtype=str),
            view.column("rows", "sha256", live).astype(str),
            neighbours,
            distances,
        )
