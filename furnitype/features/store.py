"""The HDF5 feature store: one row per image file, keyed by the sha256 of the file's bytes.

Layout (format 2), readable with plain h5py (see docs/formats.md)::

    /features   float32 or float16 (N, D), chunked by rows, gzip-compressed
    /sha256     fixed-length ASCII (N,), hex digest of the file's bytes
    /path       UTF-8 (N,), absolute path of the file when it was extracted
    /label      UTF-8 (N,), class name ("" when unlabelled)
    /live       uint8 (N,), 1 for the store's rows; 0 for removed rows, which wait for compaction
    /stat       int64 (N, 4), size, mtime_ns, inode, ctime_ns of the file when hashed (size -1: unknown)
    /folder     int32 (N,), index into /folders of the file's folder
    /folders    UTF-8 (F,), folders of the stored files
    /classes    UTF-8 (C,), the sorted distinct non-empty labels of live rows
    /skipped/   path, sha256, reason, label, live, stat, folder (S,): files that could not be used
    attributes  the settings that made the rows (backbone, weights, pooling, ...), provenance, counts

Rows are appended in place, in crash-safe transactions (``undo.py``), and removed by clearing ``live``;
``compact`` (or an extraction that leaves more than a quarter of the rows dead) writes the live rows into a new
file beside the store and renames it over. Readers hold a shared lock while they read, so they see only
committed rows. Format-1 files (the same datasets without live, stat, folder, folders; rows sorted by path) are
read as they are and upgraded on their first write.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from furnitype.errors import InputError, SettingsMismatchError, StoreError, first_line
from furnitype.features.locking import WriterLock, real_path, same_file, wait_for_lock
from furnitype.features.undo import (
    PagedFile,
    UndoDamaged,
    UndoLog,
    deferred_interrupts,
    fsync_folder,
    rollback,
    undo_path,
)
from furnitype.outputs import check_output, make_parents

__all__ = [
    "FeatureSet",
    "SettingsMismatchError",
    "StoreError",
    "check_settings",
    "compact",
    "load",
    "read_meta",
    "save",
    "summary",
]

FORMAT_VERSION = 2
#: Settings that decide a feature's value: rows made with different values are never mixed.
SETTING_KEYS = (
    "backbone",
    "weights",
    "pooling",
    "image_size",
    "interpolation",
    "precision",
    "decode",
    "store_dtype",
    "quantization",
)
#: Settings that only some files record (int8 stores: their quantized network); absent from ``settings`` else.
OPTIONAL_SETTING_KEYS = ("quantization",)
#: Attributes the store keeps for itself (counts), left out of ``meta``.
BOOKKEEPING = ("live_rows", "dead_rows", "live_skipped", "dead_skipped", "label_counts")
#: Version 1.10 of the HDF5 format: checksummed metadata, so damaged bytes are found, not misread.
LIBVER = ("v110", "v110")
STAT_UNKNOWN = (-1, 0, 0, 0)
_STR = h5py.string_dtype("utf-8")
_COLUMN_CHUNK = {"rows": 1024, "skipped": 256}
_FEATURE_CHUNK_BYTES = 256 << 10
_BLOCK_ROWS = 16384
#: Columns of both tables (``/`` for rows, ``/skipped`` for skips): dtype and the shape of one entry.
_COLUMNS = {
    "sha256": ("S64", ()),
    "path": (_STR, ()),
    "label": (_STR, ()),
    "live": ("u1", ()),
    "stat": ("i8", (4,)),
    "folder": ("i4", ()),
}
_SKIP_COLUMNS = {**_COLUMNS, "reason": (_STR, ())}
#: What h5py and numpy raise on a damaged file (HDF5's own errors arrive as OSError, KeyError or RuntimeError).
READ_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError, IndexError, UnicodeDecodeError, AttributeError)


@dataclass(frozen=True)
class FeatureSet:
    """The contents of a feature file, as arrays aligned by row.

    Attributes
    ----------
    features : ndarray of shape (n_rows, n_features), float32
    paths, labels, sha256 : ndarray of str, shape (n_rows,)
        Absolute file paths, class names ("" when unlabelled) and hex content digests.
    classes : list of str
        Sorted distinct non-empty labels.
    skipped : list of (path, reason)
        Files that could not be used, with the reason.
    meta : dict
        Settings (see ``SETTING_KEYS``) and provenance (versions, creation time, feature_dim).
    file : str
        The HDF5 file these rows were read from ("" when not from a file).
    """

    features: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    sha256: np.ndarray
    classes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    file: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def settings(self) -> dict:
        """The subset of ``meta`` that decides feature values."""
        return {key: self.meta.get(key) for key in SETTING_KEYS if key in self.meta or key not in OPTIONAL_SETTING_KEYS}


def load(path: str | os.PathLike) -> FeatureSet:
    """Read a feature file written by ``furnitype extract``.

    Parameters
    ----------
    path : str or path-like
        The HDF5 feature file.

    Returns
    -------
    FeatureSet
        The live rows, sorted by path; features as float32 whatever the stored dtype.
    """
    with open_store(path) as view:
        try:
            rows = view.live("rows")
            paths = view.column("rows", "path", rows)
            order = np.argsort(paths, kind="stable")
            position = np.empty_like(order)
            position[order] = np.arange(len(order))
            features = np.empty((len(rows), view.dim), np.float32)
            for start in range(0, len(rows), _BLOCK_ROWS):
                block = rows[start : start + _BLOCK_ROWS]
                features[position[start : start + len(block)]] = view.column("rows", "features", block)
            labels = view.column("rows", "label", rows)[order]
            sha256 = view.column("rows", "sha256", rows)[order].astype(str)
            skipped = _skipped(view)
        except READ_ERRORS as err:
            raise damaged(path, err) from None
        meta = view.meta
    paths = np.array(paths[order].tolist(), dtype=str)
    labels = np.array(labels.tolist(), dtype=str)
    classes = sorted({label for label in labels.tolist() if label})
    return FeatureSet(features, paths, labels, sha256, classes, skipped, meta, str(path))


def _skipped(view: StoreView) -> list[tuple[str, str]]:
    """The live skips as sorted ``(path, reason)`` pairs."""
    skips = view.live("skipped")
    paths = view.column("skipped", "path", skips).tolist()
    return sorted(zip(paths, view.column("skipped", "reason", skips).tolist(), strict=True))


def read_meta(path: str | os.PathLike) -> dict:
    """Read only the settings and provenance of a feature file (fast: no features are loaded).

    ``n_rows`` is the number of rows (live rows: removed rows waiting for compaction are not counted).
    """
    with open_store(path) as view:
        return view.meta


def summary(path: str | os.PathLike) -> dict:
    """Counts of a feature file without loading its features: rows, dead rows, classes, skipped files."""
    with open_store(path) as view:
        try:
            skipped = _skipped(view)
            classes = view.label_counts()
        except READ_ERRORS as err:
            raise damaged(path, err) from None
        return {
            "rows": view.meta["n_rows"],
            "dead_rows": view.dead_rows,
            "feature_dim": view.dim,
            "format": view.format,
            "bytes": os.path.getsize(view.file),
            "classes": dict(sorted(classes.items())),
            "meta": view.meta,
            "skipped": skipped,
        }


def save(
    path: str | os.PathLike,
    *,
    features: np.ndarray,
    paths: Sequence[str],
    labels: Sequence[str],
    sha256: Sequence[str],
    skipped: Sequence[tuple[str, str, str]] = (),
    meta: Mapping,
) -> None:
    """Write a complete feature file (beside it, then renamed over it), under the writer lock.

    ``skipped`` holds ``(path, sha256, reason)`` triples; ``meta["store_dtype"]`` (default float32) is the
    dtype of /features. Rows are written in the order given, in blocks (``features`` may be any array-like with
    ``shape`` and slicing, such as a memory map), as given (``extract`` itself never stores a row that is not
    finite: it records the file as skipped). What each file was when hashed is not known: the first ``extract``
    over these files hashes them once.
    """
    given = path
    features = features if hasattr(features, "shape") else np.asarray(features, dtype=np.float32)
    if len(features.shape) != 2:
        raise ValueError(f"features must be 2-D (rows, features). Received: shape={features.shape}")
    n_rows, dim = features.shape
    if not (len(paths) == len(labels) == len(sha256) == n_rows):
        raise ValueError("features, paths, labels and sha256 must have the same number of rows.")
    store_dtype = meta.get("store_dtype", "float32")
    real = writable(given)
    with WriterLock(real, given):
        recover(real, given)
        remove_leftovers(real)
        with new_file(real, given, rows_before=_rows_now(real)) as (h5, interrupts):
            layout = Layout(h5)
            layout.create(dim=dim, store_dtype=store_dtype, meta=meta)
            folders = Folders()
            for start in range(0, n_rows, _BLOCK_ROWS):
                if interrupts:
                    raise KeyboardInterrupt
                stop = min(start + _BLOCK_ROWS, n_rows)
                block = np.asarray(features[start:stop], dtype=np.float32)
                stored = block.astype(store_dtype)
                block_paths = [str(p) for p in paths[start:stop]]
                layout.append(
                    "rows",
                    features=stored,
                    sha256=np.array([str(s) for s in sha256[start:stop]], dtype="S64"),
                    path=block_paths,
                    label=[str(label) for label in labels[start:stop]],
                    live=np.ones(stop - start, np.uint8),
                    stat=np.tile(STAT_UNKNOWN, (stop - start, 1)),
                    folder=folders.ids(block_paths),
                )
            if skipped:
                skip_paths = [str(s[0]) for s in skipped]
                layout.append(
                    "skipped",
                    path=skip_paths,
                    sha256=np.array([s[1] for s in skipped], dtype="S64"),
                    reason=[str(s[2]) for s in skipped],
                    label=[""] * len(skipped),
                    live=np.ones(len(skipped), np.uint8),
                    stat=np.tile(STAT_UNKNOWN, (len(skipped), 1)),
                    folder=folders.ids(skip_paths),
                )
            layout.write_folders(folders.new())
            layout.set_counts(
                live_rows=n_rows, live_skipped=len(skipped), label_counts=Counter(str(x) for x in labels)
            )


@dataclass(frozen=True)
class CompactResult:
    """What ``compact`` did: rows kept, dead rows and skips dropped, file size before and after."""

    rows: int
    dropped: int
    bytes_before: int
    bytes_after: int


def compact(path: str | os.PathLike) -> CompactResult:
    """Rewrite a feature file with only its live rows (beside it, then renamed over it), under the writer lock.

    Also upgrades a format-1 file to format 2, and gives back the space that in-place appends leave unused.
    """
    real = writable(path)
    with WriterLock(real, path):
        recover(real, path)
        remove_leftovers(real)
        return compact_locked(real, path)


def compact_locked(real: Path, given: str | os.PathLike) -> CompactResult:
    """``compact`` for a caller that holds the writer lock."""
    before = os.path.getsize(real)
    with open_store(real, given=given, check_undo=False) as view:
        dropped = view.dead_rows + view.dead_skipped
        rows = view.meta["n_rows"]
    with new_file(real, given, rows_before=rows) as (h5, interrupts):
        with open_store(real, given=given, check_undo=False) as view:  # closed before the rename
            copy_live(view, Layout(h5), interrupts)
    return CompactResult(rows, dropped, before, os.path.getsize(real))


def check_settings(existing: Mapping, wanted: Mapping, file: str | os.PathLike) -> None:
    """Raise ``SettingsMismatchError`` naming every setting where ``existing`` differs from ``wanted``."""
    differing = [k for k in SETTING_KEYS if k in wanted and str(existing.get(k)) != str(wanted[k])]
    if differing:
        had = ", ".join(f"{k}={existing.get(k)}" for k in differing)
        asked = ", ".join(f"{k}={wanted[k]}" for k in differing)
        raise SettingsMismatchError(
            f"{file} was made with {had}, but this run asks for {asked}; "
            "use another --out, or --overwrite to replace it."
        )


class DamagedStoreError(StoreError):
    """A feature file (or its undo file) that is not what furnitype wrote: ``--overwrite`` rebuilds it."""


def damaged(path: str | os.PathLike, reason: BaseException | str) -> StoreError:
    """``X is damaged (reason); --overwrite rebuilds it``."""
    return DamagedStoreError(f"{path} is damaged ({first_line(reason)}); --overwrite rebuilds it.")


class StoreWriteError(InputError, StoreError):
    """A write to the store that failed (a full disk, an I/O error) and was rolled back: like every output that
    cannot be written, an ``InputError`` (exit 2); the store is intact."""


def write_failed(given: str | os.PathLike, err: OSError, rows: int, kept: str = "") -> StoreError:
    """One line for a write that failed and was rolled back (``kept``: what earlier commits of the run kept)."""
    what = "disk full while writing" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "cannot write"
    why = "" if err.errno in (errno.ENOSPC, errno.EDQUOT) else f" ({err.strerror or err})"
    return StoreWriteError(
        f"{what} {given}{why}: the last change was not written and the store is intact ({rows:,} rows); "
        f"{kept}free space or fix the cause and rerun."
    )


# -- reading ---------------------------------------------------------------------------------------------------


class StoreView:
    """An open feature file of either format, read column by column (``open_store`` makes one).

    Tables are ``"rows"`` and ``"skipped"``; a format-1 file reads as all rows live, what the files were when
    hashed unknown, and folders taken from the paths.
    """

    def __init__(self, h5: h5py.File, file: Path, given: str | os.PathLike):
        self.h5 = h5
        self.file = file
        self.given = given
        attrs = h5.attrs
        if "furnitype_format" not in attrs or "features" not in h5:
            raise DamagedStoreError(f"{given} is not a furnitype feature file (no furnitype_format attribute).")
        self.format = int(attrs["furnitype_format"])
        if self.format > FORMAT_VERSION:
            raise DamagedStoreError(f"{given} was written by a newer furnitype (format {self.format}).")
        self._derived: dict[str, np.ndarray] = {}
        self.n = {"rows": len(h5["path"]), "skipped": len(h5["skipped/path"])}
        self.dim = int(h5["features"].shape[1])
        if self.format == 1:
            self.dead_rows = self.dead_skipped = 0
        else:
            self.dead_rows = int(attrs["dead_rows"])
            self.dead_skipped = int(attrs["dead_skipped"])
        self._check()
        self.meta = {key: _plain(value) for key, value in attrs.items() if key not in BOOKKEEPING}
        self.meta["n_rows"] = self.n["rows"] - self.dead_rows

    def group(self, table: str) -> h5py.Group:
        return self.h5 if table == "rows" else self.h5["skipped"]

    def live(self, table: str) -> np.ndarray:
        """Indices of the live entries of ``table``."""
        if self.format == 1:
            return np.arange(self.n[table])
        return np.flatnonzero(self.group(table)["live"][...])

    def column(self, table: str, name: str, index: np.ndarray | None = None) -> np.ndarray:
        """A column (or the entries at sorted ``index``); strings as str, sha256 as bytes, features float32."""
        if self.format == 1 and (name in ("live", "stat", "folder") or (table == "skipped" and name == "label")):
            return _take(self._derive(table, name), index)
        dataset = self.group(table)[name]
        values = read_at(dataset, index)
        if name == "features":
            return values.astype(np.float32, copy=False)
        if name == "sha256":
            return values.astype("S64")  # format 1 kept skipped digests as UTF-8 strings
        if dataset.dtype.kind == "O":
            return np.array([v.decode("utf-8") for v in values.tolist()], dtype=object)
        return values

    def folders(self) -> list[str]:
        """The folder table (format 1: made from the paths)."""
        if self.format == 1:
            self._derive("rows", "folder")
            return list(self._derived["folders"])
        return [v.decode("utf-8") for v in self.h5["folders"][...].tolist()]

    def label_counts(self) -> Counter:
        """Live rows per label."""
        if self.format == 1:
            return Counter(self.column("rows", "label").tolist())
        return Counter(json.loads(self.h5.attrs["label_counts"]))

    def _derive(self, table: str, name: str) -> np.ndarray:
        key = f"{table}/{name}"
        if key not in self._derived:
            n = self.n[table]
            if name == "live":
                self._derived[key] = np.ones(n, np.uint8)
            elif name == "stat":
                self._derived[key] = np.tile(np.array(STAT_UNKNOWN, np.int64), (n, 1))
            elif name == "label":
                self._derived[key] = np.array([""] * n, dtype=object)
            else:
                folders = Folders()
                for other in ("rows", "skipped"):
                    self._derived[f"{other}/folder"] = folders.ids(self.column(other, "path").tolist())
                self._derived["folders"] = np.array(folders.new(), dtype=object)
        return self._derived[key]

    def _check(self) -> None:
        """The datasets a furnitype file has, with matching lengths; ``damaged`` otherwise."""
        columns = ("sha256", "path", "label") if self.format == 1 else tuple(_COLUMNS)
        skip_columns = ("path", "sha256", "reason") if self.format == 1 else tuple(_SKIP_COLUMNS)
        problem = None
        for table, names in (("rows", (*columns, "features")), ("skipped", skip_columns)):
            for name in names:
                dataset = self.group(table).get(name)
                if not isinstance(dataset, h5py.Dataset) or len(dataset) != self.n[table]:
                    problem = f"/{'' if table == 'rows' else 'skipped/'}{name} is missing or has the wrong length"
                elif name == "sha256" and table == "rows" and dataset.dtype != np.dtype("S64"):
                    problem = f"/{name} is not 64 hex digits"
        if self.format > 1 and not problem:
            if self.h5["stat"].shape[1:] != (4,) or self.h5["features"].dtype.kind != "f":
                problem = "a column has the wrong shape or type"
            elif not 0 <= self.dead_rows <= self.n["rows"] or not 0 <= self.dead_skipped <= self.n["skipped"]:
                problem = "its row counts do not add up"
        if problem:
            raise damaged(self.given, problem)


@contextlib.contextmanager
def open_store(
    path: str | os.PathLike, *, given: str | os.PathLike | None = None, check_undo: bool = True
) -> Iterator[StoreView]:
    """Open a feature file for reading under the shared store lock (see ``locking``).

    A transaction a writer left unfinished (it was killed) is rolled back first, when this process can take
    the writer lock; the file is read with HDF5's own driver (its fastest).
    """
    given = path if given is None else given
    real = real_path(path)
    deadline = time.monotonic() + 10.0
    while True:
        fd = _open_for_reading(real, given)
        open_fd: int | None = fd  # closed in the end unless closed before
        try:
            wait_for_lock(fd, exclusive=False, what=str(given))
            if not same_file(fd, real):
                continue  # replaced (compacted) while we waited: read the new file
            if check_undo and os.path.lexists(undo_path(real)):
                os.close(fd)
                open_fd = None
                _recover_for_reader(real, given, deadline)
                continue
            try:
                h5 = h5py.File(real, "r", locking=False)
            except READ_ERRORS as err:
                if "file signature not found" in str(err):
                    raise DamagedStoreError(
                        f"{given} is not a readable HDF5 feature file (file signature not found); "
                        "--overwrite replaces it."
                    ) from None
                raise damaged(given, err) from None
            try:
                try:
                    view = StoreView(h5, real, given)
                except READ_ERRORS as err:
                    raise damaged(given, err) from None
                yield view
            finally:
                h5.close()
            return
        finally:
            if open_fd is not None:
                os.close(open_fd)


def _open_for_reading(real: Path, given) -> int:
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(f"feature file not found: {given}") from None
    except OSError as err:
        raise InputError(f"cannot read {given}: {err.strerror or err}") from None
    if not _regular(fd):
        os.close(fd)
        raise DamagedStoreError(f"{given} is not a furnitype feature file (not a regular file).")
    return fd


def _recover_for_reader(real: Path, given, deadline: float) -> None:
    """Roll back a dead writer's transaction, or wait for the writer that holds the lock to do it."""
    try:
        lock = WriterLock(real, given).acquire()
    except InputError:
        raise _cannot_roll_back(real, given) from None
    except StoreError:
        if time.monotonic() > deadline:
            raise StoreError(f"{given} is being recovered by another furnitype process; try again.") from None
        time.sleep(0.05)
        return
    with lock:
        recover(real, given)


def _cannot_roll_back(real: Path, given) -> StoreError:
    return StoreError(
        f"{given} has an unfinished write ({undo_path(real).name}) that only a user who can write its folder "
        f"can roll back: run furnitype info {given} as that user."
    )


def recover(real: Path, given: str | os.PathLike, *, discard_damaged: bool = False) -> bool:
    """Roll back an unfinished transaction (caller holds the writer lock); True when the undo was unusable.

    A damaged undo file raises ``damaged`` unless ``discard_damaged`` (``--overwrite``: the store is rebuilt).
    """
    log = undo_path(real)
    if not os.path.lexists(log):
        return False
    try:
        fd = os.open(real, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None
    except OSError:
        raise _cannot_roll_back(real, given) from None
    try:
        if fd is not None:
            wait_for_lock(fd, exclusive=True, what=str(given))
        try:
            if fd is None:
                raise UndoDamaged("its store file is gone")
            rollback(real)
        except UndoDamaged as err:
            if not discard_damaged:
                raise damaged(given, f"{log.name} is {err}") from None
            try:
                log.rmdir() if log.is_dir() and not log.is_symlink() else log.unlink()
            except OSError:
                raise StoreError(f"{log} is not furnitype's undo file and cannot be removed; remove it.") from None
            return True
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise _cannot_roll_back(real, given) from None
            raise StoreError(
                f"cannot roll back the unfinished write to {given} ({err.strerror or err}); "
                "the next furnitype run on it tries again."
            ) from None
    finally:
        if fd is not None:
            os.close(fd)
    return False


def remove_leftovers(real: Path) -> None:
    """Remove what killed writers of this store left: ``.NAME.tmp-PID`` files and an old ``NAME.journal``.

    The caller holds the writer lock, so no live process is writing them; links are removed, not followed.
    """
    prefix = f".{real.name}.tmp-"
    with contextlib.suppress(OSError):
        for entry in os.scandir(real.parent):
            if entry.name.startswith(prefix) or entry.name == f"{real.name}.journal":
                if not entry.is_dir(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)


# -- writing ---------------------------------------------------------------------------------------------------


class WriteFailed(Exception):
    """A write that the disk refused (kept by ``PagedFile``); the file was rolled back or removed."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def new_file(real: Path, given, *, rows_before: int) -> Iterator[tuple[h5py.File, list]]:
    """Write a new file beside the store, then rename it over the store (caller holds the writer lock).

    Yields the open HDF5 file and the list of Ctrl-C presses so far (check it between blocks). A full disk or
    Ctrl-C removes the new file and leaves the store as it was.
    """
    tmp = real.with_name(f".{real.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise write_failed(given, err, rows_before) from None
    raw = PagedFile(fd, None)
    try:
        with deferred_interrupts() as interrupts:
            try:
                h5 = h5py.File(raw, "w", libver=LIBVER)
                try:
                    yield h5, interrupts
                finally:
                    h5.close()
                raw.commit()
                _replace(real, tmp, given)
            except BaseException:
                tmp.unlink(missing_ok=True)
                if raw.failed:
                    raise write_failed(given, raw.failed, rows_before) from None
                raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def transaction(real: Path, given) -> Iterator[h5py.File]:
    """Change the store in place, all or nothing (caller holds the writer lock; see ``undo.py``).

    Raises ``WriteFailed`` when the disk refused a write; the store is then as it was before.
    """
    fd = os.open(real, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        wait_for_lock(fd, exclusive=True, what=str(given))
        try:
            log = UndoLog.create(undo_path(real), os.fstat(fd).st_size)
        except OSError as err:
            raise WriteFailed(err) from None
        raw = PagedFile(fd, log)
        with deferred_interrupts():
            try:
                h5 = h5py.File(raw, "r+")
                try:
                    yield h5
                finally:
                    h5.close()
                raw.commit()
                log.remove()
            except BaseException:
                log.close()
                try:
                    rollback(real)
                except (OSError, UndoDamaged) as err:
                    raise StoreError(
                        f"a write to {given} failed and could not be rolled back yet ({first_line(err)}); "
                        "the next furnitype run on it finishes the rollback."
                    ) from None
                if raw.failed:
                    raise WriteFailed(raw.failed) from None
                raise
    finally:
        os.close(fd)


def _replace(real: Path, tmp: Path, given) -> None:
    """Rename ``tmp`` over ``real`` once no reader holds the old file; make it durable."""
    try:
        old = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        old = None
    try:
        if old is not None:
            wait_for_lock(old, exclusive=True, what=str(given))
        os.replace(tmp, real)
        fsync_folder(real)
    finally:
        if old is not None:
            os.close(old)


def writable(given: str | os.PathLike) -> Path:
    """The store's real path, after checking that it can be written (its missing folders are made, as every
    command makes an output's, ``furnitype.outputs``)."""
    check_output(given)
    real = real_path(given)
    if not real.parent.is_dir():
        make_parents(real)
    if real.exists() and not real.is_file():  # never replace a device or a FIFO, --overwrite or not
        raise InputError(f"cannot write {given}: it is not a regular file.")
    try:
        os.close(os.open(real, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC))
    except (PermissionError, IsADirectoryError):
        raise InputError(f"cannot write {given}: permission denied.") from None
    except OSError:
        pass  # not there yet, or not a regular file: said when it is read
    return real


class Folders:
    """The folder table: ``ids(paths)`` gives each path's folder index, adding folders not seen before."""

    def __init__(self, known: Sequence[str] = ()):
        self.names = list(known)
        self.index = {name: i for i, name in enumerate(self.names)}
        self._stored = len(self.names)

    def ids(self, paths: Sequence[str]) -> np.ndarray:
        return self.folder_ids([os.path.dirname(path) for path in paths])

    def folder_ids(self, folders: Sequence[str]) -> np.ndarray:
        out = np.empty(len(folders), np.int32)
        index, names = self.index, self.names
        for i, folder in enumerate(folders):
            found = index.get(folder)
            if found is None:
                found = index[folder] = len(names)
                names.append(folder)
            out[i] = found
        return out

    def new(self) -> list[str]:
        """Folders added since the table was read (to append to /folders); marks them stored."""
        added = self.names[self._stored :]
        self._stored = len(self.names)
        return added


class Layout:
    """Writes the datasets of format 2 into an open HDF5 file (a new file, or a transaction)."""

    def __init__(self, h5: h5py.File):
        self.h5 = h5

    def group(self, table: str) -> h5py.Group:
        return self.h5 if table == "rows" else self.h5["skipped"]

    def create(self, *, dim: int, store_dtype: str, meta: Mapping) -> None:
        """The empty datasets and the attributes (settings and provenance from ``meta``)."""
        h5 = self.h5
        self._create_features(dim, store_dtype)
        skipped = h5.create_group("skipped")
        for table, group, columns in (("rows", h5, _COLUMNS), ("skipped", skipped, _SKIP_COLUMNS)):
            for name, (dtype, shape) in columns.items():
                group.create_dataset(
                    name,
                    shape=(0, *shape),
                    maxshape=(None, *shape),
                    dtype=dtype,
                    chunks=(_COLUMN_CHUNK[table], *shape),
                    fletcher32=dtype is not _STR,
                )
        h5.create_dataset("folders", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(256,))
        h5.create_dataset("classes", data=[], dtype=_STR)
        for key, value in meta.items():
            if key not in BOOKKEEPING and key != "n_rows":
                h5.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        h5.attrs["store_dtype"] = store_dtype
        h5.attrs["furnitype_format"] = FORMAT_VERSION
        self.set_counts()

    def ensure_dim(self, dim: int) -> None:
        """Give /features its width when the first row comes (a store with no rows yet has width 0)."""
        features = self.h5["features"]
        if features.shape[1] != dim and features.shape[0] == 0:
            dtype = features.dtype
            del self.h5["features"]
            self._create_features(dim, dtype)
        elif features.shape[1] != dim:
            raise ValueError(f"rows of {dim} features do not fit a store of {features.shape[1]}.")

    def append(self, table: str, **columns) -> int:
        """Append entries to ``table`` (every column given); returns the index of the first one."""
        group = self.h5 if table == "rows" else self.h5["skipped"]
        start = len(group["path"])
        count = len(columns["path"])
        if not count:
            return start
        if table == "rows":
            self.ensure_dim(np.asarray(columns["features"]).shape[1])
        for name, values in columns.items():
            dataset = group[name]
            dataset.resize(start + count, axis=0)
            dataset[start:] = values
        return start

    def write_folders(self, names: Sequence[str]) -> None:
        if names:
            dataset = self.h5["folders"]
            start = len(dataset)
            dataset.resize(start + len(names), axis=0)
            dataset[start:] = list(names)

    def set_counts(
        self, *, live_rows=0, dead_rows=0, live_skipped=0, dead_skipped=0, label_counts: Mapping | None = None
    ) -> None:
        """The counts kept as attributes, and /classes (the non-empty labels with live rows)."""
        attrs = self.h5.attrs
        counts = {label: int(n) for label, n in sorted((label_counts or {}).items()) if n > 0}
        for key, value in (
            ("live_rows", live_rows),
            ("dead_rows", dead_rows),
            ("live_skipped", live_skipped),
            ("dead_skipped", dead_skipped),
        ):
            attrs[key] = int(value)
        attrs["label_counts"] = json.dumps(counts)
        classes = sorted(label for label in counts if label)
        if [c.decode() for c in self.h5["classes"][...].tolist()] != classes:
            del self.h5["classes"]
            self.h5.create_dataset("classes", data=classes, dtype=_STR)
        attrs["feature_dim"] = int(self.h5["features"].shape[1])

    def _create_features(self, dim: int, dtype) -> None:
        rows_per_chunk = int(np.clip(_FEATURE_CHUNK_BYTES // max(4 * dim, 1), 1, 64))
        self.h5.create_dataset(
            "features",
            shape=(0, dim),
            maxshape=(None, dim if dim else None),
            dtype=dtype,
            chunks=(rows_per_chunk, max(dim, 1)),
            compression="gzip",
            compression_opts=1,
            shuffle=True,
            fletcher32=True,
        )


def copy_live(view: StoreView, layout: Layout, interrupts: Sequence = ()) -> None:
    """Write the live rows and skips of ``view`` into a new file, in blocks (bounded memory)."""
    meta = {key: value for key, value in view.meta.items() if key != "n_rows"}
    layout.create(dim=view.dim, store_dtype=str(view.h5["features"].dtype), meta=meta)
    folders = Folders()
    old_folders = np.array(view.folders(), dtype=object)
    counts = {}
    labels: Counter = Counter()
    for table, columns in (("rows", (*_COLUMNS, "features")), ("skipped", _SKIP_COLUMNS)):
        live = view.live(table)
        counts[table] = len(live)
        for start in range(0, len(live), _BLOCK_ROWS):
            if interrupts:
                raise KeyboardInterrupt
            block = live[start : start + _BLOCK_ROWS]
            values = {name: view.column(table, name, block) for name in columns if name != "folder"}
            values["folder"] = folders.folder_ids(old_folders[view.column(table, "folder", block)].tolist())
            values["live"] = np.ones(len(block), np.uint8)
            if table == "rows":
                labels.update(values["label"].tolist())
                values["sha256"] = values["sha256"].astype("S64")
            layout.append(table, **{k: (v.tolist() if v.dtype == object else v) for k, v in values.items()})
    layout.write_folders(folders.new())
    layout.set_counts(live_rows=counts["rows"], live_skipped=counts["skipped"], label_counts=labels)


def read_at(dataset: h5py.Dataset, index: np.ndarray | None) -> np.ndarray:
    """``dataset[index]`` for sorted row indices, read as runs of consecutive rows (whole when dense)."""
    if index is None:
        return dataset[...]
    index = np.asarray(index, dtype=np.int64)
    if not len(index):
        return np.empty((0, *dataset.shape[1:]), dtype=dataset.dtype)
    first, last = int(index[0]), int(index[-1]) + 1
    if len(index) == last - first:
        return dataset[first:last]
    if len(index) * 4 >= last - first:  # dense enough: one read, then pick
        return dataset[first:last][index - first]
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(index)]])
    return np.concatenate([dataset[index[s] : index[e - 1] + 1] for s, e in zip(starts, ends, strict=True)])


def write_at(dataset: h5py.Dataset, index: np.ndarray, values) -> None:
    """``dataset[index] = values`` for sorted row indices, written as runs of consecutive rows."""
    index = np.asarray(index, dtype=np.int64)
    if not len(index):
        return
    values = np.asarray(values, dtype=dataset.dtype if dataset.dtype.kind != "O" else object)
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(index)]])
    for s, e in zip(starts, ends, strict=True):
        chunk = values[s:e]
        dataset[index[s] : index[e - 1] + 1] = chunk.tolist() if chunk.dtype == object else chunk


def _rows_now(real: Path) -> int:
    """Rows of the store being replaced (0 when there is none or it cannot be read), for messages."""
    try:
        with open_store(real, check_undo=False) as view:
            return view.meta["n_rows"]
    except (StoreError, InputError):
        return 0


def _take(values: np.ndarray, index: np.ndarray | None) -> np.ndarray:
    return values if index is None else values[np.asarray(index, dtype=np.int64)]


def _regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _plain(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value
