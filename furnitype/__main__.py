"""The ``furnitype`` command (also ``python -m furnitype``).

It starts here, not in ``furnitype.cli``, so that Ctrl-C while the command line's modules are still being
imported exits 130 with one line, as it does later, instead of a traceback.
"""

import sys

from furnitype.errors import Interrupted
from furnitype.faults import pause_point


def main() -> None:
    """Import and run the command line; Ctrl-C before click has taken over exits 130."""
    try:
        pause_point("cli-start")
        from furnitype.cli import main as command_line

        command_line()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(Interrupted.exit_code)


if __name__ == "__main__":
    main()
