"""Who may touch a feature store when: one writer per store, readers never see a transaction half done.

Two locks:

- the **writer lock**, held by a writer for its whole run (``extract``, ``compact``, ``save``): a second writer
  fails at once. It is an ``flock`` on ``FILE.lock`` beside the store's real path (symbolic links resolved, so
  two names of one file share it; it exists before the store does), and, while the store exists, a lock on the
  store file itself, so that a hard link (another name, another ``FILE.lock``) is the same store too: an
  open-file-description lock (``F_OFD_SETLK``) on one byte far past the file's data, apart from the ``flock``s
  below. A new file renamed over the store is locked before it is renamed.
- the **store lock**, an ``flock`` on the store file: exclusive while a writer changes the file (a transaction,
  a rename over it), shared while a reader reads it. HDF5's own file locking takes the same ``flock``, so a
  plain h5py reader waits for a transaction too.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
from pathlib import Path

from furnitype.errors import InputError, StoreError

#: How long a reader waits for a transaction, and a writer for the readers, before giving up.
WAIT_SECONDS = 60.0
#: The byte of the store file that its writer locks (far past any data; HDF5 and readers use ``flock``).
_INODE_BYTE = 1 << 62
#: Writer locks this process holds, by the store's real path (a file renamed over the store is handed to it).
_held: dict[Path, WriterLock] = {}


def real_path(path: str | os.PathLike) -> Path:
    """The store's path with symbolic links resolved (the file that is read, written and locked)."""
    return Path(os.path.realpath(os.path.abspath(path)))


class WriterLock:
    """The writer lock of the store at ``path`` (``FILE.lock``, never opened through a symbolic link).

    ``given`` is how messages name the store (the path the user gave).
    """

    def __init__(self, path: Path, given: str | os.PathLike | None = None):
        self.store = Path(path)
        self.path = Path(f"{path}.lock")
        self.given = str(given or path)
        self._fd: int | None = None
        self._store_fd: int | None = None

    def acquire(self) -> WriterLock:
        """Take the lock now, or raise ``StoreError`` naming the store another process is writing."""
        while True:
            fd = _open_lock_file(self.path, self.given)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                os.close(fd)
                raise self._busy() from err
            except OSError as err:
                os.close(fd)
                raise StoreError(f"cannot lock {self.path}: {err.strerror or err}") from err
            if same_file(fd, self.path):
                self._fd = fd
                break
            os.close(fd)  # the previous writer removed the file while we waited for it: lock the new one
        try:
            self._lock_store_file()
        except BaseException:
            self.release()
            raise
        _held[self.store] = self
        return self

    def hold(self, fd: int) -> None:
        """The store is now the file open as ``fd`` (renamed over it, already ``lock_file``d): keep that one
        locked, and let the old file go (a hard link may still name it: it is another store now)."""
        old, self._store_fd = self._store_fd, os.dup(fd)
        if old is not None:
            os.close(old)

    def release(self) -> None:
        """Remove the lock file (still holding the lock, so no one locks a removed file), then unlock."""
        if _held.get(self.store) is self:
            del _held[self.store]
        if self._store_fd is not None:
            os.close(self._store_fd)
            self._store_fd = None
        if self._fd is None:
            return
        try:
            if same_file(self._fd, self.path):
                self.path.unlink()
        except OSError:
            pass  # a lock file left behind is harmless: the next writer locks and reuses it
        finally:
            os.close(self._fd)
            self._fd = None

    def _lock_store_file(self) -> None:
        try:
            fd = os.open(self.store, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # no store yet: the new file is locked before it is renamed in (``hold``)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise InputError(f"cannot write {self.given}: permission denied.") from err
            return  # not a file that can be written (a folder, ...): said when it is read
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return
        if not lock_file(fd):
            os.close(fd)
            raise self._busy()
        self._store_fd = fd

    def _busy(self) -> StoreError:
        return StoreError(f"another furnitype process is writing {self.given}; wait for it to finish.")

    def __enter__(self) -> WriterLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_file(fd: int) -> bool:
    """Lock the file open as ``fd`` for its writer (see the module docstring); False when another writer holds it.

    Systems without open-file-description locks, or file systems that refuse them, keep only ``FILE.lock``.
    """
    if not hasattr(fcntl, "F_OFD_SETLK"):
        return True
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _byte_lock(fcntl.F_WRLCK))
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if err.errno not in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        return True
    if not _flock_is_apart(fd):  # NFS makes an flock a lock of the whole file: the writer would lock itself out
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _byte_lock(fcntl.F_UNLCK))
    return True


def _byte_lock(kind: int) -> bytes:
    """A ``struct flock`` for the byte ``_INODE_BYTE``."""
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, _INODE_BYTE, 1, 0)


def _flock_is_apart(fd: int) -> bool:
    """Whether an ``flock`` of the file open as ``fd`` ignores the byte lock just taken on it (it does, but file
    systems that emulate ``flock`` with byte-range locks, as NFS does, make them conflict)."""
    try:
        probe = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        os.close(probe)
    return True


def hold_new_store(real: Path, fd: int) -> None:
    """Tell this process's writer lock of ``real`` that the file open as ``fd`` was renamed over it."""
    lock = _held.get(real)
    if lock is not None:
        lock.hold(fd)


def wait_for_lock(fd: int, *, exclusive: bool, what: str, timeout: float | None = None) -> None:
    """``flock`` ``fd`` shared or exclusive, waiting up to ``timeout`` seconds (default ``WAIT_SECONDS``).

    Filesystems without ``flock`` (some network mounts) are read without it.
    """
    deadline = time.monotonic() + (WAIT_SECONDS if timeout is None else timeout)
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    # Polled often: a writer's transactions are short and a reader must get in between them.
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, mode)
            return
        except BlockingIOError as err:
            if time.monotonic() > deadline:
                holder = "a reader has" if exclusive else "a writer has"
                raise StoreError(f"{what} is busy: {holder} held it for over {WAIT_SECONDS:g} s; try again.") from err
            time.sleep(delay)
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS) and not exclusive:
                return
            raise StoreError(f"cannot lock {what}: {err.strerror or err}") from err


def _open_lock_file(path: Path, given: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise StoreError(f"{path} is a symbolic link, not furnitype's lock file; remove it.") from err
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise InputError(f"cannot write {given}: permission denied (cannot create {path}).") from err
        raise StoreError(f"cannot create {path}: {err.strerror or err}") from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StoreError(f"{path} is not a regular file, so not furnitype's lock file; remove it.")
    return fd


def same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
