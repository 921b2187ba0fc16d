"""The files of a run folder as received data: read only from inside the folder, and only regular files.

A run folder may come from someone else (``predict RUN`` on another machine). Every path it names is
relative and resolves inside it: no absolute paths, no ``..``, no symbolic links on the way (each folder is
opened with ``O_NOFOLLOW`` relative to the one before), and only regular files are opened, so a FIFO or a
device cannot make a reader hang. What is wrong with a run is a ``Damage``: where (a file, and a field of it),
and what.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from furnitype.errors import StoreError

#: The largest metadata file read (bytes): a run's JSON files are kilobytes to a few megabytes.
MAX_METADATA_BYTES = 256 << 20

#: What a name or a line of text shown to the user must not hold.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Damage(ValueError):
    """A part of a run that is not what furnitype writes.

    Parameters
    ----------
    where : str
        The file, relative to the run folder, and the field (``metrics.json rows[0].accuracy``).
    problem : str
        What is wrong with it, in a few words.
    """

    def __init__(self, where: str, problem: str):
        where, problem = printable(where.rstrip()), printable(problem)
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem

    def inside(self, folder: str) -> Damage:
        """The same damage, named from a parent folder (``models/feats/logreg/`` + ``model.json ...``)."""
        return Damage(f"{folder.rstrip('/')}/{self.where}", self.problem)


def csv_rows(data: bytes, name: str, *headers: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of the run's CSV file ``name``; its header must be one of ``headers`` (the first is
    today's, named when it is none of them).

    Raises
    ------
    Damage
        Not UTF-8 text, not CSV, or another header.
    """
    try:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
        columns = list(reader.fieldnames or ())
        if columns not in [list(header) for header in headers]:
            raise Damage(name, f"its columns are not {', '.join(headers[0])}")
        return columns, list(reader)
    except UnicodeDecodeError as cause:
        raise Damage(name, "not UTF-8 text") from cause
    except csv.Error as err:
        raise Damage(name, f"not CSV: {err}") from err


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``): a received name cannot break a message's
    line or send escape sequences to a terminal."""
    return CONTROL_CHARACTERS.sub(lambda found: repr(found.group())[1:-1], text)


def relative_parts(relative: str, where: str) -> tuple[str, ...]:
    """The components of a path recorded in a run, which must stay inside the run folder.

    Raises
    ------
    Damage
        An absolute path, an empty one, ``.`` or ``..`` components, a backslash or a NUL character.
    """
    if not isinstance(relative, str) or not relative:
        raise Damage(where, "not a relative path inside the run")
    parts = PurePosixPath(relative).parts
    if relative.startswith("/") or "\\" in relative or "\0" in relative:
        raise Damage(where, f"{relative!r} is not a relative path inside the run")
    if any(part in (".", "..") for part in relative.split("/")) or "" in relative.split("/"):
        raise Damage(where, f"{relative!r} leaves the run folder or is not a plain path")
    return parts


def read_inside(root: str | os.PathLike, relative: str, *, limit: int | None = MAX_METADATA_BYTES) -> bytes:
    """The bytes of the regular file ``relative`` inside the folder ``root``.

    Raises
    ------
    Damage
        The path leaves the folder, goes through a symbolic link, is missing, is not a regular file, or is
        larger than ``limit`` bytes.
    StoreError
        The file cannot be read (permissions, I/O error).
    """
    fd = _open_inside(Path(root), relative)
    try:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise Damage(relative, f"{size:,} bytes, more than a run's file can be ({limit:,})")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as err:
        raise StoreError(f"cannot read {Path(root) / relative}: {err.strerror or err}") from err
    finally:
        os.close(fd)


def file_inside(root: str | os.PathLike, relative: str) -> Path:
    """The path of the regular file ``relative`` inside ``root``, checked as ``read_inside`` checks it.

    For readers that take a path (Keras); the file is checked, not held open.
    """
    os.close(_open_inside(Path(root), relative))
    return Path(root, relative)


def folder_inside(root: str | os.PathLike, relative: str) -> Path:
    """The path of the folder ``relative`` inside ``root``, with no symbolic link on the way."""
    os.close(_open_folders(Path(root), relative_parts(relative, relative), relative, last_is_folder=True))
    return Path(root, relative)


def _open_inside(root: Path, relative: str) -> int:
    parts = relative_parts(relative, relative)
    parent = _open_folders(root, parts, relative, last_is_folder=False)
    try:
        try:
            found = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError as cause:
            raise Damage(relative, "missing") from cause
        _check_kind(found.st_mode, relative, want_folder=False)
        try:
            fd = os.open(parts[-1], _FILE, dir_fd=parent)
        except OSError as err:
            raise _open_error(err, root, relative, want_folder=False) from err
        _check_kind(os.fstat(fd).st_mode, relative, want_folder=False, fd=fd)
        return fd
    finally:
        os.close(parent)


def _open_folders(root: Path, parts: tuple[str, ...], relative: str, *, last_is_folder: bool) -> int:
    """An open descriptor of the folder holding the last part (or of the last part itself)."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise StoreError(f"cannot read {root}: {err.strerror or err}") from err
    walk = parts if last_is_folder else parts[:-1]
    for i, part in enumerate(walk):
        name = "/".join(parts[: i + 1])
        try:
            _check_kind(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode, name, want_folder=True)
            inner = os.open(part, _DIRECTORY, dir_fd=fd)
        except OSError as err:
            raise _open_error(err, root, name, want_folder=True) from err
        finally:
            os.close(fd)
        fd = inner
    return fd


def _check_kind(mode: int, where: str, *, want_folder: bool, fd: int | None = None) -> None:
    problem = None
    if stat.S_ISLNK(mode):
        problem = "is a symbolic link (a run's files must be inside it)"
    elif want_folder and not stat.S_ISDIR(mode):
        problem = "is not a folder"
    elif not want_folder and not stat.S_ISREG(mode):
        problem = "is not a regular file"
    if problem:
        if fd is not None:
            os.close(fd)
        raise Damage(where, problem)


def _open_error(err: OSError, root: Path, where: str, *, want_folder: bool) -> Exception:
    if err.errno == errno.ENOENT:
        return Damage(where, "missing")
    if err.errno == errno.ELOOP:
        return Damage(where, "is a symbolic link (a run's files must be inside it)")
    if err.errno == errno.ENOTDIR:
        return Damage(where, "is not a folder" if want_folder else "is not a regular file")
    return StoreError(f"cannot read {root / where}: {err.strerror or err}")
