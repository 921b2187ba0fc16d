"""furnitype's own exceptions; the CLI turns each into a one-line message and an exit code.

The exit codes (documented in docs/cli.md): 0 success, 1 ``FurnitypeError`` (and its ``SettingsMismatchError``,
``StoreError``), 2 ``InputError`` and click's usage errors, 130 interrupted by Ctrl-C.
"""


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


def first_line(err: BaseException | str) -> str:
    """The first line of an error's message (its type's name when it has none), for one-line messages."""
    text = str(err)
    return (text.splitlines() or [type(err).__name__ if isinstance(err, BaseException) else ""])[0]
