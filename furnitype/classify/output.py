"""Where ``classify`` and ``report --out`` write a folder: one writer at a time, built beside its place, swapped
in by renames, and the leftovers of a killed writer tidied by the next one.

- ``--out`` is resolved first: a symbolic link to a run names that run.
- ``.NAME.lock`` beside the folder is ``flock``-ed for the whole command, so a second writer of NAME fails at
  once. It records its holder's PID: the kernel releases the lock when the holder dies, so the next holder
  knows that the leftovers named with that PID are a dead process's: ``.NAME.tmp-PID`` (the folder being
  built) and ``.NAME.old-PID`` (the folder being replaced).
- The folder is built in ``.NAME.tmp-PID`` and its files are fsync'ed. A new folder is then renamed to NAME
  (never over an existing one); a replaced one is exchanged with NAME in one step where the system can
  (``renameat2(RENAME_EXCHANGE)``), else NAME is renamed aside to ``.NAME.old-PID`` and the new one renamed in.
  The old folder is removed last. So NAME always holds a whole folder, old or new, except between the two
  renames of the fallback, which the next command repairs by putting the old folder back.
- Only a folder of the same kind (``metrics.json`` ``kind``) is replaced, and only with ``overwrite``; a
  folder that is not empty and not such a folder is never touched, nor is anything inside a run.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from furnitype.classify.metadata import METRICS_FILE, REPORT_KIND, RUN_KIND
from furnitype.classify.runfiles import read_inside
from furnitype.errors import FurnitypeError, InputError, StoreError
from furnitype.features.locking import same_file
from furnitype.outputs import fsync_folder

#: How messages name the folders of each kind.
KIND_NAMES = {RUN_KIND: "run", REPORT_KIND: "report"}
#: Which command writes each kind.
KIND_WRITERS = {RUN_KIND: "classify", REPORT_KIND: "report"}

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


@dataclass(frozen=True)
class Building:
    """A folder being built: ``path`` (hidden, beside its place) becomes ``target`` when complete."""

    path: Path
    target: Path


@contextmanager
def building(out: str | os.PathLike, *, kind: str, overwrite: bool) -> Iterator[Building]:
    """Claim ``out`` for a folder of ``kind``, give the hidden folder to build it in, and swap it in at the end.

    Parameters
    ----------
    out : str or path-like
        Where the folder goes; a symbolic link is resolved first. Missing parent folders are created.
    kind : {RUN_KIND, REPORT_KIND}
        What is written (``metrics.json``'s ``kind``): only a folder of the same kind is replaced.
    overwrite : bool
        Replace a folder of the same kind at ``out``.

    Raises
    ------
    InputError
        ``out`` holds something that may not be replaced, or cannot be written (also when the disk fills up
        or the folder is read-only while building: every ``OSError`` inside the block becomes one line).
    StoreError
        Another process is writing ``out``.

    On any error (Ctrl-C included) the hidden folder is removed and ``out`` is as it was.
    """
    shown = str(out)
    try:
        target = Path(os.path.realpath(out))
        if target == target.parent:
            raise InputError(f"{shown} is the root folder; choose a folder for the {KIND_NAMES[kind]}.")
        _refuse_inside_a_run(target, shown)
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _cannot_write(shown, err) from err
    with _Lock(target, shown) as lock:
        tmp = _leftover(target, "tmp", os.getpid())
        try:
            lock.tidy()
            _check_target(target, shown, kind, overwrite)
            if os.path.lexists(tmp):
                raise InputError(f"{tmp} is in the way (not recorded as furnitype's leftover); remove it.")
        except OSError as err:
            raise _cannot_write(shown, err) from err
        try:
            lock.record()
            os.mkdir(tmp)
        except OSError as err:
            lock.tidy(os.getpid())
            raise _cannot_write(shown, err) from err
        try:
            yield Building(tmp, target)
            _fsync_tree(tmp)
            _swap_in(tmp, target, _check_target(target, shown, kind, overwrite))
        except OSError as err:
            lock.tidy(os.getpid())
            raise _cannot_write(shown, err) from err
        except BaseException:
            lock.tidy(os.getpid())
            raise
        lock.tidy(os.getpid())


def recover(path: str | os.PathLike) -> None:
    """Put back a folder that a killed writer had renamed aside, when nobody is writing it now."""
    target = Path(os.path.realpath(path))
    try:
        with _Lock(target, str(path), create=False) as lock:
            lock.tidy()
    except (FurnitypeError, OSError):
        pass  # somebody is writing it, or we may not: the folder is reported missing as it is


def folder_kind(path: Path) -> str | None:
    """The ``kind`` that ``metrics.json`` of a folder declares, or None when it is not a readable one."""
    try:
        kind = json.loads(read_inside(path, METRICS_FILE)).get("kind")
    except (ValueError, AttributeError, RecursionError, FurnitypeError, OSError):
        return None
    return kind if kind in KIND_NAMES else None


def _check_target(target: Path, shown: str, kind: str, overwrite: bool) -> str:
    """What is at ``target``: ``"nothing"``, an ``"empty"`` folder, or a folder to ``"replace"``; refuse the rest."""
    try:
        found = os.lstat(target)
    except FileNotFoundError:
        return "nothing"
    if not stat.S_ISDIR(found.st_mode):
        raise InputError(f"{shown} exists and is not a folder; choose another --out.")
    if not os.listdir(target):
        return "empty"
    existing = folder_kind(target)
    if existing is None:
        raise InputError(f"{shown} exists and is not a furnitype run; choose another --out.")
    if existing != kind:
        raise InputError(
            f"{shown} holds a {KIND_NAMES[existing]} (made by {KIND_WRITERS[existing]}), which "
            f"{KIND_WRITERS[kind]} does not replace; choose another --out."
        )
    if not overwrite:
        raise InputError(
            f"{shown} already holds a {KIND_NAMES[kind]}; use another --out, or --overwrite to replace it."
        )
    return "replace"


def _refuse_inside_a_run(target: Path, shown: str) -> None:
    for folder in target.parents:
        if folder_kind(folder) is not None:
            raise InputError(f"{shown} is inside {folder}, which furnitype made; choose a folder outside it.")


def _swap_in(tmp: Path, target: Path, found: str) -> None:
    if found == "empty":
        os.rename(tmp, target)  # replaces an empty folder in one step, fails if it is not empty any more
    elif found == "nothing":
        if not _renameat2(tmp, target, _RENAME_NOREPLACE):
            os.rename(tmp, target)  # no other furnitype can be here (the lock)
    elif not _renameat2(tmp, target, _RENAME_EXCHANGE):
        os.rename(target, _leftover(target, "old", os.getpid()))
        os.rename(tmp, target)
    fsync_folder(target.parent)


class _Lock:
    """``.NAME.lock`` beside a folder: ``flock``-ed by its writer, holding the writer's PID."""

    def __init__(self, target: Path, shown: str, *, create: bool = True):
        self.target = target
        self.shown = shown
        self.path = target.parent / f".{target.name}.lock"
        self.create = create
        self.fd: int | None = None

    def __enter__(self) -> _Lock:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_CREAT if self.create else 0)
        while self.fd is None:
            try:
                fd = os.open(self.path, flags, 0o644)
            except OSError as err:
                raise _cannot_write(self.shown, err) from err
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise StoreError(f"{self.path} is not furnitype's lock file; remove it.")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                os.close(fd)
                raise StoreError(f"another furnitype process is writing {self.shown}; wait for it to finish.") from err
            except OSError as err:  # a file system without locks
                os.close(fd)
                raise StoreError(f"cannot lock {self.path}: {err.strerror or err}") from err
            if same_file(fd, self.path):
                self.fd = fd
            else:
                os.close(fd)  # its last holder removed it after we opened it: lock the file that is there now
        return self

    def __exit__(self, *exc) -> None:
        """Remove the lock file when it records no leftovers (still holding the lock), then unlock."""
        try:
            if not self._recorded():
                os.unlink(self.path)
        except OSError:
            pass  # an empty lock file left behind is harmless: the next writer reuses it
        finally:
            os.close(self._held)

    def record(self) -> None:
        """Record this process as the writer, before it makes anything a killed writer would leave."""
        self._write([*self._recorded(), os.getpid()])

    def tidy(self, pid: int | None = None) -> None:
        """Repair and remove what the recorded writers (or this process, ``pid``) left, and forget them.

        The old folder goes back when the target is missing (a swap stopped between its two renames);
        anything else a writer left is removed. What cannot be removed now stays recorded for the next one.
        """
        recorded = self._recorded()
        remaining = [other for other in recorded if other != pid and pid is not None]
        for writer in [pid] if pid is not None else recorded:
            if not _tidy_leftovers(self.target, writer):
                remaining.append(writer)
        if remaining != recorded:
            try:
                self._write(remaining)
            except OSError:
                pass  # still recorded: the next writer tidies

    @property
    def _held(self) -> int:
        """The locked file's descriptor (only inside ``with``)."""
        if self.fd is None:
            raise RuntimeError(f"{self.path} is not locked by this process")
        return self.fd

    def _recorded(self) -> list[int]:
        text = os.pread(self._held, 4096, 0).decode("ascii", "replace")
        return [int(line) for line in text.split() if line.isdigit()]

    def _write(self, pids: list[int]) -> None:
        os.ftruncate(self._held, 0)
        os.pwrite(self._held, "".join(f"{pid}\n" for pid in pids).encode(), 0)
        os.fsync(self._held)


def _tidy_leftovers(target: Path, pid: int) -> bool:
    """Put back the old folder of ``pid`` if the target is missing, remove its leftovers; whether all went."""
    tmp, old = _leftover(target, "tmp", pid), _leftover(target, "old", pid)
    try:
        if not os.path.lexists(target) and _is_folder(old):
            os.rename(old, target)
            fsync_folder(target.parent)
    except OSError:
        return False
    for leftover in (tmp, old):
        if _is_folder(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    return not (_is_folder(tmp) or _is_folder(old))


def _leftover(target: Path, what: str, pid: int) -> Path:
    return target.parent / f".{target.name}.{what}-{pid}"


def _is_folder(path: Path) -> bool:
    """A real folder (not a symbolic link to one)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder of a folder this process wrote, deepest first."""
    for parent, _, files in os.walk(folder, topdown=False):
        for name in files:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_folder(parent)


def _renameat2(source: Path, destination: Path, flags: int) -> bool:
    """``renameat2(2)`` with ``flags``; False where the C library or the file system does not have them."""
    function = getattr(_libc(), "renameat2", None)
    if function is None:
        return False
    done = function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), flags)
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(destination))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _cannot_write(shown: str, err: OSError) -> InputError:
    return InputError(f"cannot write {shown}: {err.strerror or err}")


def refuse_one_of(target: str | os.PathLike, folders: Sequence[str | os.PathLike], shown: str) -> None:
    """Refuse an output folder that is one of the input folders (symbolic links resolved)."""
    real = os.path.realpath(target)
    if any(os.path.realpath(folder) == real for folder in folders):
        raise InputError(f"--out {shown} is one of the runs being reported; choose another folder.")
