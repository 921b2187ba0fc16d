"""furnitype's own exceptions; the CLI turns each into a one-line message and an exit code.

The exit codes (documented in docs/cli.md): 0 success, 1 ``FurnitypeError`` (and its ``SettingsMismatchError``,
``StoreError``), 2 ``InputError`` and click's usage errors, 130 interrupted by Ctrl-C.
"""

import contextlib
import re
import signal
import threading
from collections.abc import Iterator

#: A sha256 in hex that is not part of a file name: messages show its first 12 digits.
_FULL_SHA256 = re.compile(r"(?<![\w/.-])([0-9a-f]{12})[0-9a-f]{52}(?![\w/.-])")


def short_hashes(text: str) -> str:
    """``text`` with each 64-digit sha256 shortened to its first 12 hex digits and ``…`` (file names kept)."""
    return _FULL_SHA256.sub(r"\1…", text)


class FurnitypeError(Exception):
    """A problem the user can fix; the message is one line and says how. A sha256 in it is shown short."""

    exit_code = 1

    def __init__(self, message: object = "", *args: object):
        super().__init__(short_hashes(str(message)), *args)


class InputError(FurnitypeError):
    """Bad input: a missing or empty input, an option value out of its range or choices, or an output that cannot
    be written (exit 2, like a usage error)."""

    exit_code = 2


class SettingsMismatchError(FurnitypeError):
    """A feature file (or run) was made with other settings than the ones asked for."""


class StoreError(FurnitypeError):
    """A feature file that cannot be read: not furnitype's, damaged, or locked by another writer."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a command after some of its work was kept; the message says what (exit 130)."""

    exit_code = 130


def first_line(err: BaseException | str, limit: int = 400) -> str:
    """An error's message as one line for our own messages: its first line (and the next one when the first
    ends with a colon, as the detail then follows; the reason alone when h5py wraps it as ``Unable to ...
    (reason)``), at most ``limit`` characters; its type's name when empty."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__ if isinstance(err, BaseException) else ""
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    wrapped = re.fullmatch(r"Unable to (?:synchronously )?[^(]*\((.*)\)", text)
    text = wrapped.group(1) if wrapped else text
    return text if len(text) <= limit else text[: limit - 1] + "…"


#: The signals an outer ``deferred_interrupts`` block has received (None outside any).
_held_back: list | None = None


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[list]:
    """Hold Ctrl-C (SIGINT) back while the block runs, then raise ``KeyboardInterrupt`` if one came.

    Yields the list of signals received so far: a long block checks it between steps to stop early. Outside the
    main thread (where signal handlers cannot be set) the block runs as it is.
    """
    global _held_back
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    if _held_back is not None:  # inside an outer block: that one raises when it ends
        yield _held_back
        return
    received: list = []
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    _held_back = received
    try:
        yield received
    finally:
        _held_back = None
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
    if received:
        raise KeyboardInterrupt
