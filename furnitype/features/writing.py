"""Writing the feature store: a new file renamed over it, or a transaction in place (``undo.py``)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from furnitype.errors import InputError, StoreError, deferred_interrupts, first_line
from furnitype.faults import pause_point
from furnitype.features.layout import BLOCK_ROWS, COLUMNS, LIBVER, SKIP_COLUMNS, Folders, Layout
from furnitype.features.locking import hold_new_store, lock_file, real_path, wait_for_lock
from furnitype.features.undo import (
    PagedFile,
    UndoDamaged,
    UndoLog,
    rollback,
    undo_path,
)
from furnitype.features.view import StoreView
from furnitype.outputs import check_output, fsync_folder, make_parents


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
        raise write_failed(given, err, rows_before) from err
    lock_file(fd)  # a file no one else has opened yet: locked before it becomes the store
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
                hold_new_store(real, fd)
            except BaseException:
                tmp.unlink(missing_ok=True)
                if raw.failed:
                    raise write_failed(given, raw.failed, rows_before) from raw.failed
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
            log = UndoLog.create(undo_path(real), fd)
        except OSError as err:
            raise WriteFailed(err) from err
        raw = PagedFile(fd, log)
        with deferred_interrupts():
            try:
                h5 = h5py.File(raw, "r+")
                try:
                    yield h5
                finally:
                    h5.close()
                raw.commit()
                pause_point("store-committed")
                log.remove()
            except BaseException:
                log.close()
                try:
                    rollback(log.path, fd, ours=True)
                except (OSError, UndoDamaged) as err:
                    raise StoreError(
                        f"a write to {given} failed and could not be rolled back yet ({first_line(err)}); "
                        "the next furnitype run on it finishes the rollback."
                    ) from err
                if raw.failed:
                    raise WriteFailed(raw.failed) from raw.failed
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
        fsync_folder(real.parent)
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
    except (PermissionError, IsADirectoryError) as err:
        raise InputError(f"cannot write {given}: permission denied.") from err
    except OSError:
        pass  # not there yet, or not a regular file: said when it is read
    return real



def copy_live(view: StoreView, layout: Layout, interrupts: Sequence = ()) -> None:
    """Write the live rows and skips of ``view`` into a new file, in blocks (bounded memory)."""
    meta = {key: value for key, value in view.meta.items() if key != "n_rows"}
    layout.create(dim=view.dim, store_dtype=str(view.h5["features"].dtype), meta=meta)
    folders = Folders()
    old_folders = np.array(view.folders(), dtype=object)
    counts = {}
    labels: Counter = Counter()
    for table, columns in (("rows", (*COLUMNS, "features")), ("skipped", SKIP_COLUMNS)):
        live = view.live(table)
        counts[table] = len(live)
        for start in range(0, len(live), BLOCK_ROWS):
            if interrupts:
                raise KeyboardInterrupt
            block = live[start : start + BLOCK_ROWS]
            values = {name: view.column(table, name, block) for name in columns if name != "folder"}
            values["folder"] = folders.folder_ids(old_folders[view.column(table, "folder", block)].tolist())
            values["live"] = np.ones(len(block), np.uint8)
            if table == "rows":
                labels.update(values["label"].tolist())
                values["sha256"] = values["sha256"].astype("S64")
            layout.append(table, **{k: (v.tolist() if v.dtype == object else v) for k, v in values.items()})
    layout.write_folders(folders.new())
    layout.set_counts(live_rows=counts["rows"], live_skipped=counts["skipped"], label_counts=labels)

