"""Fault injection for the tests, as SQLite's tests do it: a process stops itself at a named point.

``FURNITYPE_TEST_PAUSE_AT=POINT`` (or ``POINT:N``, the N-th time) makes ``pause_point(POINT)`` stop the process
with SIGSTOP, so that a test acts on a process held at a known moment (kills it, sends it Ctrl-C, runs a second
writer) instead of racing it; the test sees the stop with ``waitid`` and resumes it with SIGCONT. A signal sent
while it is stopped arrives when it resumes, as if at that point. Read once at import: unset, a point costs a
comparison. The points: ``cli-start`` (the command line, before it imports anything else), ``store-commit``
(a transaction's pages are in the feature store, which still carries its mark: not committed) and
``store-committed`` (the mark is off: committed, its undo file not removed yet).

``FURNITYPE_TEST_HOLD_AT=POINT[,POINT...]:FOLDER`` makes ``hold_point(POINT)`` hold only the thread that gets
there, while the rest of the process goes on (a server keeps answering while a batch is held): on arrival it
creates ``FOLDER/POINT.held``, and it goes on once the test creates ``FOLDER/POINT.go``. Points: ``serve-warm``
(the server's model and stores loaded, the network not yet built) and ``serve-batch`` (a batch of photos taken
by the server's network thread, before the network runs).
"""

import os
import signal
import time
from pathlib import Path

_POINT, _, _nth = os.environ.get("FURNITYPE_TEST_PAUSE_AT", "").partition(":")
_NTH = int(_nth) if _nth.isdigit() else 1
_arrivals = 0
_held, _, _hold_folder = os.environ.get("FURNITYPE_TEST_HOLD_AT", "").partition(":")
_HOLD = set(_held.split(","))


def pause_point(name: str) -> None:
    """Stop here (SIGSTOP) when ``FURNITYPE_TEST_PAUSE_AT`` names this point and this is its N-th arrival."""
    global _arrivals
    if name != _POINT:
        return
    _arrivals += 1
    if _arrivals == _NTH:
        os.kill(os.getpid(), signal.SIGSTOP)


def hold_point(name: str) -> None:
    """Hold this thread here when ``FURNITYPE_TEST_HOLD_AT`` names this point, until the test lets it go."""
    if name not in _HOLD or not _hold_folder:
        return
    folder = Path(_hold_folder)
    (folder / f"{name}.held").touch()
    while not (folder / f"{name}.go").exists():
        time.sleep(0.01)
