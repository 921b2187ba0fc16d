"""What every command's outputs share: checked before any work, written by rename, numbers rounded alike.

The rules (docs/cli.md, "Conventions"):

- An output is checked before anything is computed (``check_output``): a file output must not be a folder, a
  folder output must not be a file, and the nearest existing folder above it must be writable.
- Missing parent folders of an output are created when it is written, by every command.
- A file is written beside its final place and renamed over it (``write_file``), so a failed or interrupted
  write leaves the previous file as it was.
- Probabilities, distances and seconds in JSON and CSV output carry 6 significant digits (``significant``);
  a missing value is ``null`` in JSON and an empty cell in CSV, never ``""`` in JSON.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from furnitype.errors import InputError

#: Significant digits of the floats furnitype writes as JSON or CSV.
DIGITS = 6


def check_output(path: str | os.PathLike, *, kind: Literal["file", "folder"] = "file") -> Path:
    """Refuse an output that cannot be written, before any work; return it as a ``Path``.

    Parameters
    ----------
    path : str or path-like
    kind : {"file", "folder"}, default="file"

    Raises
    ------
    InputError
        ``path`` is a folder where a file is wanted (or the other way round), something above it is not a
        folder, or the nearest existing folder above it is not writable.
    """
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise InputError(f"cannot write {path}: it is a folder.")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise InputError(f"cannot write {path}: it is a file, not a folder.")
    above = path.absolute().parent
    while not above.exists() and not above.is_symlink():
        above = above.parent
    if not above.is_dir():
        raise InputError(f"cannot write {path}: {above} is not a folder.")
    if not os.access(above, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: permission denied in {above}.")
    return path


def make_parents(path: str | os.PathLike) -> Path:
    """Create the missing folders above ``path``; ``InputError`` when that fails."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}") from None
    return path


@contextlib.contextmanager
def write_file(path: str | os.PathLike, mode: Literal["w", "wb"] = "w", **open_args: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it is synced and renamed over ``path``.

    Missing parent folders are created. On any error (a full disk, Ctrl-C) the temporary file is removed, the
    previous ``path`` is left as it was, and an ``OSError`` becomes a one-line ``InputError``.
    """
    path = make_parents(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; the output gets the usual permissions
        with open(fd, mode, **open_args) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(name, path)
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def significant(value: float | None, digits: int = DIGITS) -> float | None:
    """``value`` rounded to ``digits`` significant digits (None stays None)."""
    return None if value is None else float(f"{value:.{digits}g}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
