"""Fault injection for the tests, as SQLite's tests do it: a process stops itself at a named point.

``FURNITYPE_TEST_PAUSE_AT=POINT`` (or ``POINT:N``, the N-th time) makes ``pause_point(POINT)`` stop the process
with SIGSTOP, so that a test acts on a process held at a known moment (kills it, sends it Ctrl-C, runs a second
writer) instead of racing it; the test sees the stop with ``waitid`` and resumes it with SIGCONT. A signal sent
while it is stopped arrives when it resumes, as if at that point. Read once at import: unset, a point costs a
comparison. The points: ``cli-start`` (the command line, before it imports anything else) and ``store-commit``
(a transaction's pages are in the feature store, its undo file not removed yet).
"""

import os
import signal

_POINT, _, _nth = os.environ.get("FURNITYPE_TEST_PAUSE_AT", "").partition(":")
_NTH = int(_nth) if _nth.isdigit() else 1
_arrivals = 0


def pause_point(name: str) -> None:
    """Stop here (SIGSTOP) when ``FURNITYPE_TEST_PAUSE_AT`` names this point and this is its N-th arrival."""
    global _arrivals
    if name != _POINT:
        return
    _arrivals += 1
    if _arrivals == _NTH:
        os.kill(os.getpid(), signal.SIGSTOP)
