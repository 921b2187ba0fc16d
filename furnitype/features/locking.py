"""Who may touch a feature store when: one writer per store, readers never see a transaction half done.

Two locks, both ``flock`` on the store's real path (symbolic links resolved, so two names of one file share them):

- the **writer lock**, on ``FILE.lock`` beside the store, held by a writer for its whole run (``extract``,
  ``compact``, ``save``): a second writer fails at once;
- the **store lock**, on the store file itself: exclusive while a writer changes the file (a transaction, a
  rename over it), shared while a reader reads it. HDF5's own file locking takes the same ``flock``, so a plain
  h5py reader waits for a transaction too.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path

from furnitype.errors import InputError, StoreError

#: How long a reader waits for a transaction, and a writer for the readers, before giving up.
WAIT_SECONDS = 60.0


def real_path(path: str | os.PathLike) -> Path:
    """The store's path with symbolic links resolved (the file that is read, written and locked)."""
    return Path(os.path.realpath(os.path.abspath(path)))


class WriterLock:
    """The writer lock of the store at ``path`` (``FILE.lock``, never opened through a symbolic link).

    ``given`` is how messages name the store (the path the user gave).
    """

    def __init__(self, path: Path, given: str | os.PathLike | None = None):
        self.path = Path(f"{path}.lock")
        self.given = str(given or path)
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        """Take the lock now, or raise ``StoreError`` naming the store another process is writing."""
        while True:
            fd = _open_lock_file(self.path, self.given)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreError(f"another furnitype process is writing {self.given}; wait for it to finish.") from None
            except OSError as err:
                os.close(fd)
                raise StoreError(f"cannot lock {self.path}: {err.strerror or err}") from None
            if same_file(fd, self.path):
                self._fd = fd
                return self
            os.close(fd)  # the previous writer removed the file while we waited for it: lock the new one

    def release(self) -> None:
        """Remove the lock file (still holding the lock, so no one locks a removed file), then unlock."""
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

    def __enter__(self) -> WriterLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


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
        except BlockingIOError:
            if time.monotonic() > deadline:
                holder = "a reader has" if exclusive else "a writer has"
                raise StoreError(f"{what} is busy: {holder} held it for over {WAIT_SECONDS:g} s; try again.") from None
            time.sleep(delay)
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS) and not exclusive:
                return
            raise StoreError(f"cannot lock {what}: {err.strerror or err}") from None


def _open_lock_file(path: Path, given: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise StoreError(f"{path} is a symbolic link, not furnitype's lock file; remove it.") from None
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise InputError(f"cannot write {given}: permission denied (cannot create {path}).") from None
        raise StoreError(f"cannot create {path}: {err.strerror or err}") from None
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
