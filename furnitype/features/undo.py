"""Crash-safe writes to an HDF5 file in place: a rollback journal, as SQLite keeps one.

h5py's ``fileobj`` driver hands every read and write of the HDF5 library to a Python file object; ``PagedFile`` is
that object. Writes to the file as it was when the transaction began are held in memory, page by page; before
they reach the file, the old bytes of those pages are appended to ``FILE.undo`` (each with its CRC) and fsynced.
Bytes past the old end of the file go straight to the file: a rollback cuts them off. Commit = close HDF5, write
the held pages, fsync the file, remove the undo file. A process killed in between leaves the undo file "hot";
``rollback`` (run by the next opener that can take the writer lock) writes the saved pages back and truncates the
file to its old size, so the file is exactly what the last commit left.

A failed write (a full disk) never reaches HDF5 as an error, which HDF5 does not survive well: from then on the
file object keeps everything in memory, HDF5 closes normally, and the caller rolls the file back.

Undo file layout: ``MAGIC | old size (u64) | crc32 (u32)``, two slots ``sequence (u64) | records (u64) | crc32
(u32)``, then records ``page number (u64) | length (u32) | crc32 of number and bytes (u32) | the page's old bytes``.
Each append of records is fsynced, then the count of records saved so far goes to the slot of the next sequence
number and is fsynced; only then may those pages change. So the records the newest valid slot counts must all be
whole and valid (otherwise the undo file is damaged: never a partial rollback), while records past that count
were being appended when the process died or the power went: the rollback stops at the first that is not whole
and valid. Putting back a page that was never changed writes the bytes it has, so every valid record is used.
Two slots, so that a slot torn while being written leaves the other.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import struct
import zlib
from pathlib import Path

from furnitype.outputs import fsync_folder

PAGE = 4096
_MAGIC = b"FTUNDO2\n"
_HEADER = struct.Struct("<8sQI")
_SLOT = struct.Struct("<QQI")
_RECORDS_START = _HEADER.size + 2 * _SLOT.size
_RECORD = struct.Struct("<QII")
#: Pages held in memory before they are written out (undo first) in the middle of a transaction.
_HELD_PAGES_LIMIT = (32 << 20) // PAGE


class UndoDamaged(Exception):
    """An undo file that cannot be trusted (not furnitype's, or damaged); the message says why."""


def undo_path(path: str | os.PathLike) -> Path:
    """``FILE.undo`` beside ``path``."""
    return Path(f"{path}.undo")


def write_all(fd: int, data, offset: int) -> None:
    """``os.pwrite`` until every byte is written (the single place where store bytes reach the disk)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class UndoLog:
    """The old bytes of every page a transaction overwrites, durable before the page is."""

    def __init__(self, path: Path, fd: int, size: int):
        self.path = path
        self.size = size
        self.saved: set[int] = set()
        self._fd = fd
        self._offset = _RECORDS_START
        self._records = 0
        self._sequence = 0

    @classmethod
    def create(cls, path: Path, size: int) -> UndoLog:
        """Create ``path`` (never through a symbolic link, never over a file) for a file of ``size`` bytes.

        Its header is written and fsynced under the name of the writer's temporary file (``.FILE.tmp-PID``, free
        during a transaction; removed by the next writer if this one dies) and the file appears at ``path``
        whole: an undo file cut short is damage.
        """
        tmp = path.with_name(f".{path.name[: -len('.undo')]}.tmp-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            head = _MAGIC + struct.pack("<Q", size)
            write_all(fd, head + struct.pack("<I", zlib.crc32(head)) + bytes(2 * _SLOT.size), 0)
            os.fsync(fd)
            _link(tmp, path)
            tmp.unlink(missing_ok=True)
            fsync_folder(path.parent)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return cls(path, fd, size)

    def save(self, fd: int, pages: list[int]) -> None:
        """Append the current bytes of ``pages`` (those not saved yet, inside the old size), durably counted."""
        records = []
        for page in pages:
            if page in self.saved or page * PAGE >= self.size:
                continue
            old = os.pread(fd, min(PAGE, self.size - page * PAGE), page * PAGE)
            records.append(_RECORD.pack(page, len(old), zlib.crc32(old, zlib.crc32(struct.pack("<Q", page)))) + old)
            self.saved.add(page)
        if records:
            blob = b"".join(records)
            write_all(self._fd, blob, self._offset)
            os.fsync(self._fd)
            self._offset += len(blob)
            self._records += len(records)
            self._sequence += 1
            counted = struct.pack("<QQ", self._sequence, self._records)
            slot = _HEADER.size + (self._sequence % 2) * _SLOT.size
            write_all(self._fd, counted + struct.pack("<I", zlib.crc32(counted)), slot)
            os.fsync(self._fd)

    def close(self) -> None:
        """Close the log, leaving it for ``rollback``."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """Close and delete the log: the transaction is committed."""
        self.close()
        self.path.unlink()
        fsync_folder(self.path.parent)


def rollback(path: Path) -> bool:
    """Put back the pages saved in ``path``'s undo file and cut the file to its old size; False when none.

    The caller holds the writer lock and an exclusive lock on the file. Running it again after it was
    interrupted is harmless.

    Raises
    ------
    UndoDamaged
        The undo file is a link, not a regular file, or not furnitype's; the file is left as it is.
    """
    log = undo_path(path)
    try:
        fd = os.open(log, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as err:
        if os.path.islink(log):
            raise UndoDamaged("a symbolic link, not furnitype's") from err
        raise UndoDamaged(err.strerror or str(err)) from err
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UndoDamaged("not a regular file")
        data = _read_all(fd)
    finally:
        os.close(fd)
    size, pages = _parse(data)
    target = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for page, old in pages:
            write_all(target, old, page * PAGE)
        os.ftruncate(target, size)
        os.fsync(target)
    finally:
        os.close(target)
    log.unlink()
    fsync_folder(log.parent)
    return True


def _link(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the name ``path``, never over a file (``FileExistsError``): a hard link, or on file systems
    without them a rename (the caller holds the writer lock, so no other furnitype makes ``path`` meanwhile)."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from err
        os.rename(tmp, path)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(data: bytes) -> tuple[int, list[tuple[int, bytes]]]:
    """The old size and the saved pages.

    The undo file appears with its header whole (``UndoLog.create``), so one cut short of it is damage: the
    pages it would have saved may have changed.
    """
    if len(data) < _RECORDS_START:
        if not _MAGIC.startswith(data[: len(_MAGIC)]):
            raise UndoDamaged("not a furnitype undo file")
        raise UndoDamaged(f"cut short ({len(data)} bytes, less than its {_RECORDS_START}-byte header)")
    magic, size, crc = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise UndoDamaged("not a furnitype undo file")
    if zlib.crc32(data[: _HEADER.size - 4]) != crc:
        raise UndoDamaged("its header checksum is wrong")
    counted, newest = 0, -1
    for slot in (_HEADER.size, _HEADER.size + _SLOT.size):
        sequence, records, slot_crc = _SLOT.unpack_from(data, slot)
        if zlib.crc32(data[slot : slot + 16]) == slot_crc and sequence > newest:
            newest, counted = sequence, records
    pages: list[tuple[int, bytes]] = []
    offset = _RECORDS_START
    while True:
        problem = _record_problem(data, offset, size)
        if problem:
            if len(pages) < counted:
                raise UndoDamaged(f"its record {len(pages) + 1} {problem}")
            return size, pages  # the append the process died in: its pages were not changed yet
        page, length, _ = _RECORD.unpack_from(data, offset)
        pages.append((page, data[offset + _RECORD.size : offset + _RECORD.size + length]))
        offset += _RECORD.size + length


def _record_problem(data: bytes, offset: int, size: int) -> str:
    """What is wrong with the record at ``offset`` of an undo file for a file of ``size`` bytes ("" if nothing)."""
    if offset + _RECORD.size > len(data):
        return "is missing" if offset >= len(data) else "is cut short"
    page, length, crc = _RECORD.unpack_from(data, offset)
    old = data[offset + _RECORD.size : offset + _RECORD.size + length]
    if page * PAGE >= size or length != min(PAGE, size - page * PAGE):
        return f"saves {length} bytes of page {page}, outside the file's old {size} bytes"
    if len(old) != length:
        return "is cut short"
    if zlib.crc32(old, zlib.crc32(struct.pack("<Q", page))) != crc:
        return f"(page {page}) has a wrong checksum"
    return ""


class PagedFile(io.RawIOBase):
    """The file object h5py's ``fileobj`` driver reads and writes (see the module docstring).

    Parameters
    ----------
    fd : int
        The file, open for reading and writing; it stays open after ``close``.
    undo : UndoLog or None
        The undo log of this transaction; None for a new file written beside the store (nothing to undo).
    """

    def __init__(self, fd: int, undo: UndoLog | None):
        super().__init__()
        self.fd = fd
        self.undo = undo
        self.size = os.fstat(fd).st_size
        self.failed: OSError | None = None
        self._pos = 0
        self._old_pages = -(-undo.size // PAGE) if undo else 0
        self._held: dict[int, bytearray] = {}

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        start, end = self._pos, self._pos + len(view)
        if not self._held:
            self._read_disk(view, start)
            self._pos = end
            return len(view)
        position = start
        while position < end:
            page = position // PAGE
            stop = min(end, (page + 1) * PAGE)
            held = self._held.get(page)
            if held is not None:
                view[position - start : stop - start] = held[position - page * PAGE : stop - page * PAGE]
            else:
                self._read_disk(view[position - start : stop - start], position)
            position = stop
        self._pos = end
        return len(view)

    def _read_disk(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` from the file at ``offset``; zeros past its end (as HDF5's own drivers give)."""
        done = 0
        while done < len(view) and offset + done < self.size:
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if not got:
                break
            done += got
        view[done:] = bytes(len(view) - done)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        start, end = self._pos, self._pos + len(view)
        held_end = min(end, self._old_pages * PAGE) if not self.failed else end
        if start < held_end:
            self._hold(start, view[: held_end - start])
        if end > held_end:
            direct_start = max(start, held_end)
            try:
                write_all(self.fd, view[direct_start - start :], direct_start)
            except OSError as err:
                self._fail(err)
                self._hold(direct_start, view[direct_start - start :])
        self._pos = end
        self.size = max(self.size, end)
        if len(self._held) > _HELD_PAGES_LIMIT and not self.failed:
            self._write_held()
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if size < self.size and not self.failed:
            self._write_held()
            if self.undo and not self.failed:
                self._save(range(size // PAGE, self._old_pages))
        if not self.failed:
            try:
                os.ftruncate(self.fd, size)
            except OSError as err:
                self._fail(err)
        for page in [p for p in self._held if p * PAGE >= size]:
            del self._held[page]
        self.size = size
        return size

    def flush(self) -> None:
        """Nothing: pages are written at ``commit`` (HDF5 flushes its own caches before closing)."""

    def commit(self) -> None:
        """Write the held pages (their old bytes saved first) and fsync the file; raise the first failure."""
        self._write_held()
        if not self.failed:
            try:
                os.fsync(self.fd)
            except OSError as err:
                self._fail(err)
        if self.failed:
            raise self.failed

    def _hold(self, start: int, view: memoryview) -> None:
        position, end = start, start + len(view)
        while position < end:
            page = position // PAGE
            held = self._held.get(page)
            if held is None:
                held = bytearray(PAGE)
                old = os.pread(self.fd, PAGE, page * PAGE) if page * PAGE < self.size else b""
                held[: len(old)] = old
                self._held[page] = held
            stop = min(end, (page + 1) * PAGE)
            held[position - page * PAGE : stop - page * PAGE] = view[position - start : stop - start]
            position = stop

    def _write_held(self) -> None:
        if self.failed or not self._held:
            return
        pages = sorted(self._held)
        if self.undo:
            self._save(pages)
        for page in pages:
            if self.failed:
                return
            length = min(PAGE, self.size - page * PAGE)
            if length > 0:
                try:
                    write_all(self.fd, memoryview(self._held[page])[:length], page * PAGE)
                except OSError as err:
                    self._fail(err)
                    return
            del self._held[page]

    def _save(self, pages) -> None:
        if self.undo is None:  # a file opened without an undo log keeps nothing to roll back
            return
        try:
            self.undo.save(self.fd, list(pages))
        except OSError as err:
            self._fail(err)

    def _fail(self, err: OSError) -> None:
        """From now on keep every write in memory: HDF5 goes on to a normal close, the caller rolls back."""
        if self.failed is None:
            self.failed = err
            self._old_pages = 0
