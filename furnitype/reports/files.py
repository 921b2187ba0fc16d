"""Writing a report file so that a failure never leaves half of it: write beside, fsync, rename over."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from furnitype.errors import InputError


def replace_file(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it, renamed into place once on disk.

    A full disk, a missing folder or Ctrl-C leaves the previous file at ``path`` whole (or no file); the
    temporary file is never written through a symlink (``O_NOFOLLOW``) and is removed on failure.

    Raises
    ------
    InputError
        The file cannot be written (one line: the path and why).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    created = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        created = True
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        created = False
    except OSError as err:
        why = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise InputError(f"cannot write {path}: {why}") from None
    finally:
        if created:
            tmp.unlink(missing_ok=True)
    return path
