"""Crash-safe writes to an HDF5 file in place: a rollback journal, as SQLite keeps one.

h5py's ``fileobj`` driver hands every read and write of the HDF5 library to a Python file object; ``PagedFile`` is
that object. Writes to the file as it was when the transaction began are held in memory, page by page; before
they reach the file, the old bytes of those pages are appended to ``FILE.undo`` (each with its CRC) and fsynced.
Bytes past the old end of the file go straight to the file: a rollback cuts them off. Commit = close HDF5, write
the held pages, fsync the file, take the mark off (below), remove the undo file. A process killed in between
leaves the undo file "hot"; ``rollback`` (run by the next opener that can take the writer lock) writes the saved
pages back and truncates the file to its old size, so the file is exactly what the last commit left.

The undo file is found by the store's name, but a store may have other names (hard links), so the store itself
says that a transaction is open: while one is, the file's first 8 bytes (HDF5's signature) are the transaction's
mark, ``\x89FTX`` and 4 random bytes, also written in its undo file's header; HDF5 is shown the real bytes. The
mark is written and fsynced before any other byte of the file changes, and taken off (the signature written back
and fsynced) after every page of the commit is durable: that is the commit point. So every name sees an
unfinished transaction, and an undo file is replayed only over the file its mark is on: one beside a file
without its mark is stale (the transaction committed, or the file moved on) and is removed unused. An undo file
of furnitype before the mark (``FTUNDO2``) is replayed as it was.

A failed write (a full disk) never reaches HDF5 as an error, which HDF5 does not survive well: from then on the
file object keeps everything in memory, HDF5 closes normally, and the caller rolls the file back.

Undo file layout: ``MAGIC | old size (u64) | inode (u64) | mark (8 bytes) | crc32 (u32)``, two slots ``sequence
(u64) | records (u64) | crc32 (u32)``, then records ``page number (u64) | length (u32) | crc32 of number and bytes
(u32) | the page's old bytes``; the first record, page 0, is written with the header. Each append of records is
fsynced, then the count of records saved so far goes to the slot of the next sequence number and is fsynced;
only then may those pages change. So the records the newest valid slot counts must all be whole and valid
(otherwise the undo file is damaged: never a partial rollback), while records past that count were being
appended when the process died or the power went: the rollback stops at the first that is not whole and valid.
Putting back a page that was never changed writes the bytes it has, so every valid record is used. Two slots, so
that a slot torn while being written leaves the other.
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

from furnitype.faults import pause_point
from furnitype.outputs import fsync_folder

PAGE = 4096
_MAGIC = b"FTUNDO3\n"
_HEADER = struct.Struct("<8sQQ8sI")
#: The undo file of furnitype before the mark: ``MAGIC | old size | crc32``; still rolled back.
_MAGIC_2 = b"FTUNDO2\n"
_HEADER_2 = struct.Struct("<8sQI")
_SLOT = struct.Struct("<QQI")
_RECORD = struct.Struct("<QII")
#: How the mark of an open transaction begins (HDF5's signature is ``\x89HDF\r\n\x1a\n``).
_MARK = b"\x89FTX"
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


def marked(fd: int) -> bool:
    """Whether the file open as ``fd`` carries the mark of a transaction (one that is open, or a dead one's)."""
    return os.pread(fd, len(_MARK), 0) == _MARK


class UndoLog:
    """The old bytes of every page a transaction overwrites, durable before the page is."""

    def __init__(self, path: Path, fd: int, size: int, mark: bytes, head: bytes):
        self.path = path
        self.size = size
        self.mark = mark
        self.head = head
        self.saved = {0}
        self._fd = fd
        self._offset = os.fstat(fd).st_size
        self._records = 1
        self._sequence = 1

    @classmethod
    def create(cls, path: Path, store: int) -> UndoLog:
        """Create ``path`` (never through a symbolic link, never over a file) for the file open as ``store``, and
        mark that file (module docstring).

        Its header, with the file's first page, is written and fsynced under the name of the writer's temporary
        file (``.FILE.tmp-PID``, free during a transaction; removed by the next writer if this one dies) and the
        file appears at ``path`` whole: an undo file cut short is damage.
        """
        found = os.fstat(store)
        mark = _MARK + os.urandom(4)
        first = os.pread(store, min(PAGE, found.st_size), 0)
        head = struct.pack("<8sQQ8s", _MAGIC, found.st_size, found.st_ino, mark)
        blob = head + struct.pack("<I", zlib.crc32(head)) + bytes(_SLOT.size) + _slot(1, 1) + _record(0, first)
        tmp = path.with_name(f".{path.name[: -len('.undo')]}.tmp-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            write_all(fd, blob, 0)
            os.fsync(fd)
            _link(tmp, path)
            tmp.unlink(missing_ok=True)
            fsync_folder(path.parent)
            write_all(store, mark, 0)  # the pages it counts are saved: the file may change now, first its head
            os.fsync(store)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return cls(path, fd, found.st_size, mark, first[: len(mark)])

    def save(self, fd: int, pages: list[int]) -> None:
        """Append the current bytes of ``pages`` (those not saved yet, inside the old size), durably counted."""
        records = []
        for page in pages:
            if page in self.saved or page * PAGE >= self.size:
                continue
            records.append(_record(page, os.pread(fd, min(PAGE, self.size - page * PAGE), page * PAGE)))
            self.saved.add(page)
        if records:
            blob = b"".join(records)
            write_all(self._fd, blob, self._offset)
            os.fsync(self._fd)
            self._offset += len(blob)
            self._records += len(records)
            self._sequence += 1
            write_all(self._fd, _slot(self._sequence, self._records), _HEADER.size + (self._sequence % 2) * _SLOT.size)
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


def rollback(log: Path, fd: int, *, ours: bool = False) -> bool:
    """Put back the pages saved in the undo file ``log`` into the file open as ``fd`` and cut it to its old size;
    False when there is no undo file, or when it is stale (the file does not carry its mark), which is removed.

    ``ours``: the caller's own transaction, rolled back whether or not the mark was written yet. The caller holds
    the writer lock and an exclusive lock on the file. Running it again after it was interrupted is harmless: the
    mark, which says the rollback is not finished, is the last thing it takes off.

    Raises
    ------
    UndoDamaged
        The undo file is a link, not a regular file, not furnitype's, or not for this file; the file is left as it is.
    """
    try:
        undo = os.open(log, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as err:
        if os.path.islink(log):
            raise UndoDamaged("a symbolic link, not furnitype's") from err
        raise UndoDamaged(err.strerror or str(err)) from err
    try:
        if not stat.S_ISREG(os.fstat(undo).st_mode):
            raise UndoDamaged("not a regular file")
        data = _read_all(undo)
    finally:
        os.close(undo)
    size, mark, pages = _parse(data)
    head = os.pread(fd, len(mark), 0)
    if mark and head != mark and not ours:
        if not head.startswith(_MARK) and head != dict(pages).get(0, b"")[: len(mark)]:
            raise UndoDamaged("not for this file (its first bytes are neither the mark nor what they were)")
        _unlink(log)  # its transaction committed, or never changed the file: nothing of it may be put back
        return False
    for page, old in pages:
        if page:
            write_all(fd, old, page * PAGE)
    os.ftruncate(fd, size)
    os.fsync(fd)
    for page, old in pages:
        if not page:
            write_all(fd, old, 0)
    os.fsync(fd)
    _unlink(log)
    return True


def find(fd: int, folder: Path) -> Path | None:
    """The undo file in ``folder`` of the transaction whose mark the file open as ``fd`` carries (the undo file of
    another name of it, a hard link); None when there is none."""
    mark, inode = os.pread(fd, len(_MARK) + 4, 0), os.fstat(fd).st_ino
    if not mark.startswith(_MARK):
        return None
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name.endswith(".undo") and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError, UndoDamaged):
                    undo = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                    try:
                        header = os.pread(undo, _HEADER.size + 2 * _SLOT.size, 0)
                    finally:
                        os.close(undo)
                    if _header(header)[1:] == (inode, mark):
                        return Path(entry.path)
    return None


def _slot(sequence: int, records: int) -> bytes:
    counted = struct.pack("<QQ", sequence, records)
    return counted + struct.pack("<I", zlib.crc32(counted))


def _record(page: int, old: bytes) -> bytes:
    return _RECORD.pack(page, len(old), zlib.crc32(old, zlib.crc32(struct.pack("<Q", page)))) + old


def _unlink(log: Path) -> None:
    log.unlink()
    fsync_folder(log.parent)


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


def _header(data: bytes) -> tuple[int, int, bytes]:
    """The old size, the inode and the mark (0 and b"" for ``FTUNDO2``, which has neither) of an undo file.

    The undo file appears with its header whole (``UndoLog.create``), so one cut short of it is damage: the
    pages it would have saved may have changed.
    """
    header = _HEADER_2 if data[:8] == _MAGIC_2 else _HEADER
    if len(data) < header.size + 2 * _SLOT.size:
        if not (_MAGIC.startswith(data[:8]) or _MAGIC_2.startswith(data[:8])):
            raise UndoDamaged("not a furnitype undo file")
        raise UndoDamaged(f"cut short ({len(data)} bytes, less than its {header.size + 2 * _SLOT.size}-byte header)")
    fields = header.unpack_from(data)
    if fields[0] not in (_MAGIC, _MAGIC_2):
        raise UndoDamaged("not a furnitype undo file")
    if zlib.crc32(data[: header.size - 4]) != fields[-1]:
        raise UndoDamaged("its header checksum is wrong")
    return (fields[1], 0, b"") if header is _HEADER_2 else fields[1:4]


def _parse(data: bytes) -> tuple[int, bytes, list[tuple[int, bytes]]]:
    """The old size, the mark and the saved pages."""
    size, _, mark = _header(data)
    slots = (_HEADER if mark else _HEADER_2).size
    counted, newest = 0, -1
    for slot in (slots, slots + _SLOT.size):
        sequence, records, slot_crc = _SLOT.unpack_from(data, slot)
        if zlib.crc32(data[slot : slot + 16]) == slot_crc and sequence > newest:
            newest, counted = sequence, records
    pages: list[tuple[int, bytes]] = []
    offset = slots + 2 * _SLOT.size
    while True:
        problem = _record_problem(data, offset, size)
        if problem:
            if len(pages) < counted:
                raise UndoDamaged(f"its record {len(pages) + 1} {problem}")
            return size, mark, pages  # the append the process died in: its pages were not changed yet
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
        self._head = undo.head if undo else b""  # the file's first bytes under the mark, as HDF5 must see them

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
        if offset < len(self._head):
            view[: len(self._head) - offset] = self._head[offset : offset + len(view)]

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
        """Write the held pages (their old bytes saved first) and fsync the file, then take the mark off and fsync
        again (the commit point); raise the first failure."""
        self._write_held()
        self._sync()
        if self.undo and not self.failed:
            pause_point("store-commit")
            try:
                write_all(self.fd, self._head, 0)
            except OSError as err:
                self._fail(err)
            self._sync()
        if self.failed:
            raise self.failed

    def _sync(self) -> None:
        if not self.failed:
            try:
                os.fsync(self.fd)
            except OSError as err:
                self._fail(err)

    def _hold(self, start: int, view: memoryview) -> None:
        position, end = start, start + len(view)
        while position < end:
            page = position // PAGE
            held = self._held.get(page)
            if held is None:
                held = bytearray(PAGE)
                self._read_disk(memoryview(held), page * PAGE)
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
                data = memoryview(self._held[page])[:length]
                if page == 0 and self.undo:  # the mark stays on until the commit point
                    data = memoryview(self.undo.mark + bytes(data[len(self.undo.mark) :]))
                try:
                    write_all(self.fd, data, page * PAGE)
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
