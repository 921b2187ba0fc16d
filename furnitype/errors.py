"""furnitype's own exceptions; the CLI turns each into a one-line message and an exit code.

The exit codes (documented in docs/cli.md): 0 success, 1 ``FurnitypeError`` (and its ``SettingsMismatchError``,
``StoreError``), 2 ``InputError`` and click's usage errors, 130 interrupted by Ctrl-C.
"""

import re


class FurnitypeError(Exception):
    """A problem the user can fix; the message is one line and says how."""

    exit_code = 1


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
