"""Reading the feature store: ``open_store`` under the shared lock, columns of either format, recovery."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from furnitype.errors import InputError, StoreError, first_line
from furnitype.features import undo
from furnitype.features.layout import (
    BLOCK_ROWS,
    BOOKKEEPING,
    COLUMNS,
    CRC_ATTR,
    CRC_BLOCK,
    FORMAT_VERSION,
    SETTING_KEYS,
    SKIP_COLUMNS,
    STAT_UNKNOWN,
    STRING_COLUMNS,
    Folders,
    StringsDamaged,
    read_at,
    read_strings,
)
from furnitype.features.locking import WriterLock, real_path, same_file, wait_for_lock

#: What h5py raises when the file's bytes are not what furnitype wrote (HDF5's own errors arrive as OSError,
#: KeyError, ValueError or RuntimeError); stored bytes that do not decode raise UnicodeDecodeError, a ValueError.
#: Only those raised by h5py or by decoding count (``from_file``): furnitype's own bugs are not damage.
READ_ERRORS = (OSError, KeyError, ValueError, RuntimeError)
_H5PY_FRAME = re.compile(r"(^|[/\\])h5py[/\\]")


class DamagedStoreError(StoreError):
    """A feature file (or its undo file) that is not what furnitype wrote. The message names no option: only
    ``extract`` can rebuild it, and adds ``--overwrite rebuilds it`` itself."""


def damaged(path: str | os.PathLike, reason: BaseException | str) -> StoreError:
    """``X is damaged (reason).``"""
    return DamagedStoreError(f"{path} is damaged ({first_line(reason)}).")


def from_file(err: BaseException) -> bool:
    """Whether ``err`` (one of ``READ_ERRORS``) says the file is damaged: raised inside h5py while it read or
    changed the file, a stored string that is not UTF-8, or strings whose checksum is wrong."""
    if isinstance(err, (UnicodeDecodeError, StringsDamaged)):
        return True
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and bool(_H5PY_FRAME.search(tb.tb_frame.f_code.co_filename))


class StoreView:
    """An open feature file of either format, read column by column (``open_store`` makes one).

    Tables are ``"rows"`` and ``"skipped"``; a format-1 file reads as all rows live, what the files were when
    hashed unknown, and folders taken from the paths. The layout is checked when the file is opened, and what
    is read when it is read (checksums, UTF-8, folder indices, finite features): anything that is not what
    furnitype writes raises ``damaged``.
    """

    def __init__(self, h5: h5py.File, file: Path, given: str | os.PathLike):
        self.h5 = h5
        self.file = file
        self.given = given
        with self.reading():
            attrs = h5.attrs
            if "furnitype_format" not in attrs or not isinstance(h5.get("features"), h5py.Dataset):
                raise DamagedStoreError(f"{given} is not a furnitype feature file (no furnitype_format attribute).")
            self.format = _integer(attrs["furnitype_format"])
            if self.format is None or self.format < 1:
                raise damaged(given, "its furnitype_format attribute is not a format number")
            if self.format > FORMAT_VERSION:
                raise DamagedStoreError(f"{given} was written by a newer furnitype (format {self.format}).")
            self._derived: dict[str, np.ndarray] = {}
            self._check()
            self._live = {table: self._read_live(table) for table in ("rows", "skipped")}
            self.dead_rows = self.n["rows"] - len(self._live["rows"])
            self.dead_skipped = self.n["skipped"] - len(self._live["skipped"])
            self.meta = {key: _plain(value) for key, value in attrs.items() if key not in BOOKKEEPING}
            self._check_settings()
        self.meta["n_rows"] = len(self._live["rows"])

    def _check_settings(self) -> None:
        """Settings of the types furnitype writes (text; the image size a whole number) and a ``feature_dim``
        equal to the number of feature columns; ``damaged`` otherwise."""
        for key in SETTING_KEYS:
            value, number = self.meta.get(key), key == "image_size"
            if value is not None and (type(value) is not int if number else not isinstance(value, str)):
                raise damaged(self.given, f"its {key} attribute is not {'a whole number' if number else 'text'}")
        dim = self.meta.get("feature_dim")
        if dim is not None and (type(dim) is not int or (self.n["rows"] and dim != self.dim)):
            raise damaged(self.given, f"its feature_dim attribute ({dim!r}) is not its {self.dim} feature columns")

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Errors that the file's bytes cause in the block become ``damaged``; others (bugs) pass through."""
        try:
            yield
        except READ_ERRORS as err:
            if not from_file(err):
                raise
            raise damaged(self.given, err) from err

    def group(self, table: str) -> h5py.Group:
        return self.h5 if table == "rows" else self.h5["skipped"]

    def live(self, table: str) -> np.ndarray:
        """Indices of the live entries of ``table``."""
        return self._live[table]

    def column(self, table: str, name: str, index: np.ndarray | None = None) -> np.ndarray:
        """A column (or the entries at sorted ``index``); strings as str, sha256 as bytes, features float32."""
        if self.format == 1 and (name in ("live", "stat", "folder") or (table == "skipped" and name == "label")):
            return _take(self._derive(table, name), index)
        with self.reading():
            group = self.group(table)
            if group[name].dtype.kind == "O" and name != "sha256":
                return np.array([v.decode("utf-8") for v in read_strings(group, name, index)], dtype=object)
            values = read_at(group[name], index)
        if name == "features":
            self._check_finite(values.astype(np.float32, copy=False), index)
            return values.astype(np.float32, copy=False)
        if name == "sha256":
            return values.astype("S64")  # format 1 kept skipped digests as UTF-8 strings
        return values

    def folders(self) -> list[str]:
        """The folder table (format 1: made from the paths)."""
        if self.format == 1:
            self._derive("rows", "folder")
            return list(self._derived["folders"])
        with self.reading():
            return [v.decode("utf-8") for v in read_strings(self.h5, "folders")]

    def label_counts(self) -> Counter:
        """Live rows per label, counted from the rows (in blocks: bounded memory)."""
        counts: Counter = Counter()
        live = self.live("rows")
        for start in range(0, len(live), BLOCK_ROWS):
            counts.update(self.column("rows", "label", live[start : start + BLOCK_ROWS]).tolist())
        return counts

    def verify(self) -> None:
        """Read every live entry (features, strings, digests) and the folders: ``damaged`` at the first that is
        not what furnitype wrote (a damaged chunk of /features is found only by reading it)."""
        for table, names in (("rows", (*COLUMNS, "features")), ("skipped", SKIP_COLUMNS)):
            live = self.live(table)
            for start in range(0, len(live), BLOCK_ROWS):
                for name in names:
                    self.column(table, name, live[start : start + BLOCK_ROWS])
        self.folders()

    def _read_live(self, table: str) -> np.ndarray:
        if self.format == 1:
            return np.arange(self.n[table])
        live = self.group(table)["live"][...]
        if len(live) and live.max() > 1:
            raise damaged(self.given, f"/{'' if table == 'rows' else 'skipped/'}live holds values other than 0 and 1")
        return np.flatnonzero(live)

    def _check_finite(self, values: np.ndarray, index: np.ndarray | None) -> None:
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        if len(bad):
            row = int(bad[0] if index is None else np.asarray(index)[bad[0]])
            raise damaged(self.given, f"/features row {row} holds numbers that are not finite (NaN or infinity)")

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
        """The datasets a furnitype file has, of the right kinds and shapes, with matching lengths, every chunk
        written (a size declared without the data is not read); ``damaged`` otherwise."""
        h5 = self.h5
        skipped = h5.get("skipped")
        if not isinstance(skipped, h5py.Group) or not isinstance(h5.get("path"), h5py.Dataset):
            raise damaged(self.given, "/path or /skipped is missing")
        self.n = {"rows": len(h5["path"]), "skipped": len(skipped["path"]) if "path" in skipped else 0}
        if self.format == 1:
            columns = {"sha256": "S", "path": "T", "label": "T", "features": "f"}
            skip_columns = {"path": "T", "sha256": "ST", "reason": "T"}
        else:
            columns = {**{name: _KINDS[name] for name in COLUMNS}, "features": "f"}
            skip_columns = {name: _KINDS[name] for name in SKIP_COLUMNS}
        for table, kinds in (("rows", columns), ("skipped", skip_columns)):
            where = "/" if table == "rows" else "/skipped/"
            for name, kind in kinds.items():
                problem = _column_problem(self.group(table).get(name), self.n[table], kind)
                if problem:
                    raise damaged(self.given, f"{where}{name} {problem}")
        features = h5["features"]
        self.dim = int(features.shape[1])
        if self.dim < 1 and self.n["rows"]:
            raise damaged(self.given, "/features has no columns")
        if self.format == 1:
            return
        problem = _column_problem(h5.get("folders"), None, "T")
        if problem:
            raise damaged(self.given, f"/folders {problem}")
        for table in ("rows", "skipped"):  # 4 bytes a row: cheap enough to check at every open
            folder = self.group(table)["folder"][...]
            if len(folder) and (folder.min() < 0 or folder.max() >= len(h5["folders"])):
                where = "/" if table == "rows" else "/skipped/"
                raise damaged(self.given, f"a {where}folder index is outside /folders ({len(h5['folders'])} folders)")
        if CRC_ATTR in h5.attrs:
            if _integer(h5.attrs[CRC_ATTR]) != CRC_BLOCK:
                raise damaged(self.given, f"its {CRC_ATTR} attribute is not {CRC_BLOCK}")
            strings = [("/", name, self.n["rows"]) for name in STRING_COLUMNS["rows"]]
            strings += [("/skipped/", name, self.n["skipped"]) for name in STRING_COLUMNS["skipped"]]
            strings.append(("/", "folders", len(h5["folders"])))
            for where, name, n in strings:
                crcs = h5.get(f"{where}{name}_crc")
                problem = _column_problem(crcs, -(-n // CRC_BLOCK), "u")
                if problem:
                    raise damaged(self.given, f"{where}{name}_crc {problem}")


#: The kind of each column: "T" a string, "S" 64 bytes, "ST" either, "u"/"i" integers ("i4": four a row, as
#: /stat), "f" floats (two dimensions).
_KINDS = {"sha256": "S", "path": "T", "label": "T", "reason": "T", "live": "u", "stat": "i4", "folder": "i"}


def _column_problem(dataset, n: int | None, kind: str) -> str:
    """What is wrong with a column that should hold ``n`` entries of ``kind`` ("" if nothing)."""
    if not isinstance(dataset, h5py.Dataset):
        return "is missing"
    if dataset.ndim not in (1, 2) or (n is not None and len(dataset) != n):
        return "is missing or has the wrong length"
    dtype = dataset.dtype
    strings = h5py.check_string_dtype(dtype) is not None and dtype.kind == "O"
    fits = {
        "T": strings,
        "S": dtype == np.dtype("S64"),
        "ST": strings or dtype == np.dtype("S64"),
        "u": dtype.kind == "u",
        "i": dtype.kind in "iu",
        "i4": dtype.kind in "iu" and dataset.shape[1:] == (4,),
        "f": dtype.kind == "f",
    }[kind]
    if not fits or dataset.ndim != (2 if kind in ("f", "i4") else 1):
        return "has the wrong type or shape"
    if not _all_written(dataset):
        return "declares more entries than the file holds"
    return ""


def _all_written(dataset: h5py.Dataset) -> bool:
    """Whether every chunk of ``dataset`` is in the file (furnitype writes them all): a size declared without the
    data would read as fill values, or as more memory than there is."""
    if not dataset.size:
        return True
    if dataset.chunks is None:
        return dataset.id.get_storage_size() > 0
    expected = 1
    for size, chunk in zip(dataset.shape, dataset.chunks, strict=True):
        expected *= -(-size // chunk)
    return dataset.id.get_num_chunks() == expected


def _integer(value) -> int | None:
    """An integer attribute's value (None when it is not one)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return None


@contextlib.contextmanager
def open_store(
    path: str | os.PathLike, *, given: str | os.PathLike | None = None, check_undo: bool = True
) -> Iterator[StoreView]:
    """Open a feature file for reading under the shared store lock (see ``locking``).

    A transaction a writer left unfinished (it was killed; the file carries its mark, whatever its name) is rolled
    back first, when this process can take the writer lock; the file is read with HDF5's own driver (its fastest).
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
            if check_undo and (os.path.lexists(undo.undo_path(real)) or undo.marked(fd)):
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
                    ) from err
                raise damaged(given, err) from err
            try:
                yield StoreView(h5, real, given)
            finally:
                h5.close()
            return
        finally:
            if open_fd is not None:
                os.close(open_fd)


def _open_for_reading(real: Path, given) -> int:
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise InputError(f"feature file not found: {given}") from err
    except OSError as err:
        raise InputError(f"cannot read {given}: {err.strerror or err}") from err
    if not _regular(fd):
        os.close(fd)
        raise DamagedStoreError(f"{given} is not a furnitype feature file (not a regular file).")
    return fd


def _recover_for_reader(real: Path, given, deadline: float) -> None:
    """Roll back a dead writer's transaction, or wait for the writer that holds the lock to do it."""
    try:
        lock = WriterLock(real, given).acquire()
    except InputError as err:
        raise _cannot_roll_back(real, given) from err
    except StoreError as err:
        if time.monotonic() > deadline:
            raise StoreError(f"{given} is being recovered by another furnitype process; try again.") from err
        time.sleep(0.05)
        return
    with lock:
        recover(real, given)


def _cannot_roll_back(real: Path, given) -> StoreError:
    return StoreError(
        f"{given} has an unfinished write ({undo.undo_path(real).name}) that only a user who can write its folder "
        f"can roll back: run furnitype info {given} as that user."
    )


def recover(real: Path, given: str | os.PathLike, *, discard_damaged: bool = False) -> bool:
    """Roll back an unfinished transaction (caller holds the writer lock); True when the undo was unusable.

    Its undo file is ``NAME.undo`` beside ``real``, or, when the file carries the mark of another one, the undo file
    of another name of the file in its folder (a hard link); one elsewhere is a one-line error. A damaged undo file,
    or one elsewhere, raises unless ``discard_damaged`` (``--overwrite``: the store is rebuilt as a new file renamed
    in, so the other names keep the old file and its undo file).
    """
    log = undo.undo_path(real)
    try:
        fd = os.open(real, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None
    except OSError as err:
        if not os.path.lexists(log):
            return False  # said when it is read or written
        raise _cannot_roll_back(real, given) from err
    try:
        if not os.path.lexists(log) and not (fd is not None and _regular(fd) and undo.marked(fd)):
            return False
        if fd is not None:
            wait_for_lock(fd, exclusive=True, what=str(given))
        try:
            if fd is None:
                raise undo.UndoDamaged("its store file is gone")
            if not undo.rollback(log, fd) and undo.marked(fd):
                found = undo.find(fd, real.parent)
                if found is None:
                    if discard_damaged:
                        return True
                    raise StoreError(
                        f"{given} has an unfinished write whose undo file is beside another name of this file, in "
                        f"another folder (a hard link; find -samefile {given} lists its names): run furnitype info "
                        "on that name to roll it back."
                    )
                log = found
                undo.rollback(log, fd)
        except undo.UndoDamaged as err:
            if not discard_damaged:
                raise damaged(given, f"{log.name} is {err}") from err
            try:
                log.rmdir() if log.is_dir() and not log.is_symlink() else log.unlink()
            except OSError as gone:
                raise StoreError(f"{log} is not furnitype's undo file and cannot be removed; remove it.") from gone
            return True
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise _cannot_roll_back(real, given) from err
            raise StoreError(
                f"cannot roll back the unfinished write to {given} ({err.strerror or err}); "
                "the next furnitype run on it tries again."
            ) from err
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
