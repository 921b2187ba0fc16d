"""The labels file: the ``path,label`` manifest that ``extract --manifest`` reads, added to one label at a time.

Every addition rewrites the file through a temporary file renamed over it (``replace_file``), under an ``flock``
on ``FILE.lock`` beside it: a reader (``extract --manifest``) sees the file before or after a label, a kill -9 or
a full disk leaves the previous file whole, and two writers at once keep both labels. A path is listed once: a
label for a path already listed with that label adds nothing, and with another label is refused (``read_manifest``
refuses a file that lists one path with two labels).

Test points (``furnitype.faults.pause_point``): ``labels-write`` (the file locked and read, the new file not yet
written) and ``labels-wait`` (another writer holds the lock).
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from furnitype.errors import FurnitypeError, InputError
from furnitype.extract.images import MAX_FILE_BYTES, ImageFile, bad_label, parse_manifest
from furnitype.faults import pause_point
from furnitype.features.locking import same_file
from furnitype.outputs import make_parents, replace_file, shown_name

HEADER = "path,label"
#: How long an addition waits for another writer of the file (a writer holds it for a few milliseconds).
WAIT_SECONDS = 60.0


def append_label(labels: str | os.PathLike, path: str, label: str) -> int:
    """Add the row ``path,label`` to the labels file ``labels`` (made, with its header, when missing).

    ``path`` is recorded absolute (relative to the working folder when it is not); spaces around ``label`` are
    dropped, as ``read_manifest`` drops them. Returns the number of labelled rows now in the file.

    Raises
    ------
    InputError
        ``label`` is empty or not one printable line; ``path`` cannot be written in a UTF-8 CSV so that it reads
        back the same; the path is listed with another label; the file is a symbolic link, not a regular file,
        or cannot be read as a manifest; the file cannot be written (the disk is full, ...).
    FurnitypeError
        Another writer has held the file for over ``WAIT_SECONDS``.
    """
    target = Path(os.path.abspath(labels))
    label = label.strip()
    if not label:
        raise InputError("a label must not be empty.")
    if bad_label(label):
        raise InputError(bad_label(label))
    photo = _recordable(path)
    if parse_manifest(_row_bytes(b"", photo, label), target) != [ImageFile(photo, label)]:
        raise InputError(f"cannot label {photo!r}: a labels file would not read its name back the same (blanks at its "
                         "ends are dropped); rename it.")
    make_parents(target)
    with _locked(target):
        data = _read(target)
        rows = parse_manifest(data, target) if data.strip() else []
        listed = {row.path: row.label for row in rows}
        if photo in listed:
            if listed[photo] != label:
                raise InputError(f"{shown_name(photo)} is already labelled {listed[photo]!r} in {target}; "
                                 "edit the file to change its label.")
            return _count(rows)
        new = data + _row_bytes(data, photo, label)
        added = rows + [ImageFile(photo, label)]
        if parse_manifest(new, target) != added:
            raise InputError(f"cannot add a label to {target}: its last line is cut off (a quote left open?); "
                             "fix the file.")
        pause_point("labels-write")
        replace_file(target, new)
    return _count(added)


def count_labels(labels: str | os.PathLike) -> int:
    """The number of labelled rows of the labels file (0 when it does not exist); ``InputError`` as
    ``append_label`` reads it."""
    return _count(_rows(labels))


def labelled_paths(labels: str | os.PathLike) -> set[str]:
    """The absolute paths the labels file labels (empty when it does not exist); ``InputError`` as
    ``append_label`` reads it."""
    return {row.path for row in _rows(labels) if row.label}


def _count(rows: list[ImageFile]) -> int:
    return sum(1 for row in rows if row.label)


def _rows(labels: str | os.PathLike) -> list[ImageFile]:
    target = Path(os.path.abspath(labels))
    data = _read(target)
    return parse_manifest(data, target) if data.strip() else []


def _recordable(path: str) -> str:
    """``path`` absolute, as the manifest will give it back; ``InputError`` when it cannot be."""
    photo = os.path.abspath(path)
    try:
        photo.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"cannot label {shown_name(photo)}: its name is not UTF-8 text, which a labels file "
                         "holds; rename it.") from err
    return photo


def _row_bytes(data: bytes, path: str, label: str) -> bytes:
    """The row (with the header when the file has nothing yet, after a line break when its last line lacks
    one), ending as the file's lines end."""
    newline = "\r\n" if b"\r\n" in data.split(b"\n", 1)[0] + b"\n" else "\n"
    out = io.StringIO()
    if not data.strip():
        out.write(HEADER + newline)
    elif not data.endswith((b"\n", b"\r")):
        out.write(newline)
    row = f"{path},{label}"
    # read_manifest splits lines as str.splitlines does (at U+2028 too): a row holding such a break is quoted
    if row.splitlines() == [row]:
        csv.writer(out, lineterminator=newline).writerow([path, label])
    else:
        csv.writer(out, lineterminator=newline, quoting=csv.QUOTE_ALL).writerow([path, label])
    return out.getvalue().encode("utf-8")


def _read(target: Path) -> bytes:
    """The bytes of the labels file (b"" when missing), never through a symbolic link, only a regular file."""
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise InputError(f"{target} is a symbolic link; give the labels file itself.") from err
        raise InputError(f"cannot read {target}: {err.strerror or err}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{target} is not a regular file, so not a labels file.")
        if st.st_size > MAX_FILE_BYTES:
            raise InputError(f"{target} is too large for a labels file ({st.st_size} bytes).")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as err:
        raise InputError(f"cannot read {target}: {err.strerror or err}") from err
    finally:
        os.close(fd)


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold the ``flock`` on ``FILE.lock`` beside ``target`` (waiting for another writer), then remove it."""
    lock = target.with_name(f"{target.name}.lock")
    deadline = time.monotonic() + WAIT_SECONDS
    waited = False
    while True:
        fd = _open_lock(lock, target)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        waited = True
                        pause_point("labels-wait")
                    if time.monotonic() > deadline:
                        raise FurnitypeError(f"another process has been writing {target} for over {WAIT_SECONDS:g} "
                                             "s; try again.") from None
                    time.sleep(0.005)
        except BaseException:
            os.close(fd)
            raise
        if same_file(fd, lock):
            break
        os.close(fd)  # the previous writer removed the lock file while we waited for it: lock the new one
    try:
        yield
    finally:
        try:
            if same_file(fd, lock):
                lock.unlink()  # still locked: a waiter sees its file gone and locks the next one
        except OSError:
            pass  # left behind, it is reused by the next writer
        finally:
            os.close(fd)


def _open_lock(lock: Path, target: Path) -> int:
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise InputError(f"{lock} is a symbolic link, not furnitype's lock file; remove it.") from err
        raise InputError(f"cannot write {target}: {err.strerror or err} (cannot create {lock}).") from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"{lock} is not a regular file, so not furnitype's lock file; remove it.")
    return fd
