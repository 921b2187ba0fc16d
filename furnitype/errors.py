"""furnitype's own exceptions; the CLI turns each into a one-line message and an exit code."""


class FurnitypeError(Exception):
    """A problem the user can fix; the message is one line and says how."""

    exit_code = 1


class InputError(FurnitypeError):
    """Missing or empty input, or an output that cannot be written (exit 2, like a usage error)."""

    exit_code = 2


class SettingsMismatchError(FurnitypeError):
    """A feature file (or run) was made with other settings than the ones asked for."""


class StoreError(FurnitypeError):
    """A feature file that cannot be read: not furnitype's, damaged, or locked by another writer."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a command after some of its work was kept; the message says what (exit 130)."""

    exit_code = 130
