"""What every command's outputs share: checked before any work, written by rename, numbers rounded alike.

The rules (docs/cli.md, "Conventions"):

- An output is checked before anything is computed (``check_output``): a file output must not be a folder nor
  a device, FIFO or socket, a folder output must not be a file, and the nearest existing folder above it must
  be writable.
- An output never replaces what the command reads, nor another output of the same command
  (``refuse_inputs``): a feature file, a file of a run, a photo it lists, reads or draws (``refuse_photos``,
  compared by the file, links followed), even with ``--overwrite``.
- An existing file is replaced only with ``--overwrite`` (``refuse_existing``); a feature store without it is
  added to, not replaced.
- Missing parent folders of an output are created when it is written, by every command.
- A file is written beside its final place and renamed over it (``replace_file``), so a failed or
  interrupted write leaves the previous file as it was.
- A file name whose bytes are not UTF-8 is written to JSON with those bytes as ``\\xNN`` escapes
  (``shown_name``: ``caf\\xe9.jpg``), never as lone surrogates (``\\udce9``) that strict JSON parsers reject.
- Probabilities, distances and seconds in JSON and CSV output carry 6 significant digits (``significant``);
  a missing value is ``null`` in JSON and an empty cell in CSV, never ``""`` in JSON.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, overload

from tqdm import tqdm

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
        ``path`` is a folder where a file is wanted (or the other way round), a device, FIFO or socket,
        something above it is not a folder, or the nearest existing folder above it is not writable.
    """
    path = Path(path)
    _check_name_lengths(path)
    if kind == "file" and path.is_dir():
        raise InputError(f"cannot write {path}: it is a folder.")
    if kind == "file" and _special(path):  # renamed over, /dev/null would become a file
        raise InputError(f"cannot write {path}: it is a device, FIFO or socket, not a file.")
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


def _special(path: Path) -> bool:
    """``path`` itself (not what a link leads to) is there and is neither a file, a folder nor a link."""
    try:
        mode = os.lstat(path).st_mode
    except (OSError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode))


#: Bytes the longest file furnitype keeps beside an output adds to its name: ``.NAME.tmp-PID`` (a PID has at
#: most 7 digits on Linux); ``NAME.lock``, ``NAME.undo``, ``.NAME.lock`` are shorter.
SIDE_NAME_BYTES = len("..tmp-") + 7


def _check_name_lengths(path: Path) -> None:
    """Refuse a name the file system cannot hold, or whose temporary and lock files beside it it cannot
    (``.NAME.tmp-PID``): at once, not after the work when the output is written."""
    above = path.absolute().parent
    missing = [path.name]
    while not os.path.lexists(above) and above != above.parent:
        missing.append(above.name)
        above = above.parent
    try:
        name_max = os.pathconf(above, "PC_NAME_MAX") if os.path.isdir(above) else 255
    except OSError:
        name_max = 255
    for i, name in enumerate(missing):
        limit = name_max - SIDE_NAME_BYTES if i == 0 else name_max
        if len(os.fsencode(name)) > limit:
            raise InputError(
                f"cannot write {path}: the name {name[:20]}… is {len(os.fsencode(name))} bytes long; the file "
                f"system allows {limit} here{' (furnitype adds .NAME.tmp-PID beside it)' if i == 0 else ''}."
            )


def refuse_inputs(
    outputs: Mapping[str, str | os.PathLike | None],
    inputs: Iterable[str | os.PathLike],
    *,
    kept: Iterable[str | os.PathLike] = (),
) -> None:
    """Refuse outputs that would replace what the command reads, or each other, before any work.

    Parameters
    ----------
    outputs : mapping of option name to path or None
        The command's outputs by the option that names them (``{"--out": ..., "--sheet": ...}``); None: not
        written.
    inputs : iterable of path
        The files and folders the command reads: no output may be one of them (also through a link), nor a
        folder that holds one.
    kept : iterable of path
        Folders whose files no output may replace (a run: its ``metrics.json``, its models); a new file
        inside one is fine. Symbolic links are resolved throughout.

    Raises
    ------
    InputError
        An output is an input, replaces a file inside a ``kept`` folder, or is also another output.
    """
    given = {option: (path, os.path.realpath(path)) for option, path in outputs.items() if path is not None}
    seen: dict[str, str] = {}
    for option, (path, real) in given.items():
        if real in seen:
            raise InputError(f"{option} {path} is also {seen[real]}; give each output its own path.")
        seen[real] = option
    if not given:
        return
    for source in inputs:
        real_source = os.path.realpath(source)
        for option, (path, real) in given.items():
            if real == real_source or _same_file(real, real_source):  # a hard link is the same file
                raise InputError(f"{option} {path} is one of the inputs; choose another path.")
            if os.path.isdir(real) and Path(real_source).is_relative_to(real):  # replacing it would delete it
                raise InputError(f"{option} {path} holds {source}, which this command reads; choose another path.")
    for folder in kept:
        real_folder = Path(os.path.realpath(folder))
        for option, (path, real) in given.items():
            if Path(real).is_relative_to(real_folder) and os.path.lexists(real):
                raise InputError(f"{option} {path} would replace a file of {folder}; choose another path.")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def refuse_photos(outputs: Mapping[str, str | os.PathLike | None], photos: Iterable[str | os.PathLike]) -> None:
    """Refuse outputs that are one of ``photos``, the files the command lists, reads or draws.

    Outputs are compared with the photos as files (device and inode, symbolic links followed), so a link to a
    photo and a photo listed through a link are caught. ``photos`` is only iterated when an output exists (an
    output that does not exist replaces nothing), so it may be a generator that lists folders.

    Raises
    ------
    InputError
        An output is one of the photos.
    """
    existing = {}
    for option, path in outputs.items():
        if path is not None:
            with contextlib.suppress(OSError, ValueError):
                found = os.stat(path)
                existing[(found.st_dev, found.st_ino)] = (option, path)
    if not existing:
        return
    for photo in photos:
        try:
            found = os.stat(photo)
        except (OSError, ValueError):
            continue
        if (found.st_dev, found.st_ino) in existing:
            option, path = existing[(found.st_dev, found.st_ino)]
            raise InputError(f"{option} {path} is one of the photos this command reads ({photo}); choose another "
                             "path.")


def refuse_existing(outputs: Mapping[str, str | os.PathLike | None], *, overwrite: bool) -> None:
    """Refuse to replace an existing file (or link) at an output unless ``overwrite``; check inputs first
    (``refuse_inputs``, ``refuse_photos``), which ``overwrite`` never replaces.

    Raises
    ------
    InputError
        An output exists and ``overwrite`` is not set.
    """
    for option, path in outputs.items():
        if path is not None and not overwrite and os.path.lexists(path):
            raise InputError(f"{path} already exists; choose another {option}, or --overwrite to replace it.")


def make_parents(path: str | os.PathLike) -> Path:
    """Create the missing folders above ``path``; ``InputError`` when that fails."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}") from err
    return path


def replace_file(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it, synced and renamed into place.

    Missing parent folders are created. A full disk, an error or Ctrl-C leaves the previous file at ``path``
    whole (or no file); the temporary file is never written through a symlink (``O_NOFOLLOW``) and is removed
    on failure.

    Raises
    ------
    InputError
        The file cannot be written (one line: the path and why).
    """
    path = make_parents(path)
    try:
        write_replacing(path, data)
    except OSError as err:
        why = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise InputError(f"cannot write {path}: {why}") from err
    return path


def write_replacing(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``.NAME.tmp-PID`` beside ``path`` (never through a link), fsync it, rename it over
    ``path`` and fsync the folder: a reader sees the old file or the new one. On an ``OSError`` the temporary
    file is removed and the error raised.

    A ``.NAME.tmp-PID`` already there is a killed writer's that had this process's id (a restarted container
    gives its processes the same ids): it is removed (a link as a link) and the file created anew.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    created = False
    try:
        try:
            fd = _create(tmp)
        except FileExistsError:
            tmp.unlink()
            fd = _create(tmp)
        created = True
        try:
            view = memoryview(data)
            while view:  # os.write, not a file object: a test injects a full disk at this boundary
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        created = False
        fsync_folder(path.parent)
    finally:
        if created:
            tmp.unlink(missing_ok=True)


def _create(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the names created, renamed or removed in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shown_name(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes that are not UTF-8 (``os.fsdecode`` keeps them as lone surrogates)
    become ``\\xNN`` escapes; any other name is returned as it is."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that no file name decodes to
            return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return name


def progress_bar(*, enabled: bool, **options: Any) -> tqdm:
    """A tqdm bar on stderr, drawn only when ``enabled`` and stderr is a terminal: a log gets no bars."""
    return tqdm(disable=None if enabled else True, file=sys.stderr, **options)


def data_frame(columns: Mapping[str, Any] | Iterable[Mapping[str, Any]], *, order: Iterable[str] = (),
               attrs: Mapping[str, Any] | None = None) -> Any:
    """A pandas DataFrame of ``columns`` (a mapping of column to values, or records) in ``order``, with
    ``attrs``; pandas is an optional dependency: without it, an ``ImportError`` that says how to install it."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("to_frame() needs pandas: pip install 'furnitype[pandas]' (or pip install pandas)") from None
    frame = pd.DataFrame(columns if isinstance(columns, Mapping) else list(columns), columns=list(order) or None)
    frame.attrs.update(attrs or {})
    return frame


def json_ready(value: Any) -> Any:
    """``value`` with every string and path (keys included) made valid UTF-8 by ``shown_name``, for ``json.dumps``."""
    if isinstance(value, (str, os.PathLike)):
        return shown_name(os.fspath(value))
    if isinstance(value, Mapping):
        return {json_ready(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


@overload
def significant(value: float, digits: int = DIGITS) -> float: ...
@overload
def significant(value: None, digits: int = DIGITS) -> None: ...


def significant(value: float | None, digits: int = DIGITS) -> float | None:
    """``value`` rounded to ``digits`` significant digits (None stays None)."""
    return None if value is None else float(f"{value:.{digits}g}")


def is_utf8(name: str) -> bool:
    """False for a name with bytes that are not UTF-8 (``os.fsdecode`` keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
