"""Reading the feature store: ``open_store`` under the shared lock, columns of either format, recovery."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from furnitype.errors import InputError, StoreError, first_line
from furnitype.features.layout import (
    BOOKKEEPING,
    COLUMNS,
    FORMAT_VERSION,
    SKIP_COLUMNS,
    STAT_UNKNOWN,
    Folders,
    read_at,
)
from furnitype.features.locking import WriterLock, real_path, same_file, wait_for_lock
from furnitype.features.undo import UndoDamaged, rollback, undo_path

#: What h5py and numpy raise on a damaged file (HDF5's own errors arrive as OSError, KeyError or RuntimeError).
READ_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError, IndexError, UnicodeDecodeError, AttributeError)


class DamagedStoreError(StoreError):
    """A feature file (or its undo file) that is not what furnitype wrote. The message names no option: only
    ``extract`` can rebuild it, and adds ``--overwrite rebuilds it`` itself."""


def damaged(path: str | os.PathLike, reason: BaseException | str) -> StoreError:
    """``X is damaged (reason).``"""
    return DamagedStoreError(f"{path} is damaged ({first_line(reason)}).")



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
        columns = ("sha256", "path", "label") if self.format == 1 else tuple(COLUMNS)
        skip_columns = ("path", "sha256", "reason") if self.format == 1 else tuple(SKIP_COLUMNS)
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
                        f"{given} is not a readable HDF5 feature file (file signature not found)."
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
