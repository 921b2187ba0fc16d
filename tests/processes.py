"""Acting on a real process at a known moment, never racing it: the process is stopped (SIGSTOP) first.

Either it stops itself at a named point of the code (``pause_env``, see ``furnitype.faults``) and the test waits
for the stop (``wait_stopped``), or the test stops it when it sees an event and checks the event again while the
process cannot move (``stop_when``). Then the test looks, and sends its signal (``signal_stopped``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable


def pause_env(point: str, nth: int = 1) -> dict[str, str]:
    """The environment that makes a furnitype process stop itself at ``point`` the ``nth`` time it gets there."""
    return {**os.environ, "FURNITYPE_TEST_PAUSE_AT": f"{point}:{nth}"}


def wait_stopped(proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Wait until ``proc`` is stopped (True) or has ended (False); ``timeout`` is only a guard."""
    deadline = time.monotonic() + timeout
    while proc.returncode is None:
        # WNOWAIT: only look; the exit status stays for Popen.wait, and a stop is no longer reported once resumed.
        seen = os.waitid(os.P_PID, proc.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT | os.WNOHANG)
        if seen is not None:
            return seen.si_code == os.CLD_STOPPED
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"process {proc.pid} neither stopped nor ended in {timeout:.0f} s")
        time.sleep(0.01)
    return False


def stop_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120) -> bool:
    """Stop ``proc`` at a moment when ``ready()`` holds, checked again once it is stopped; False when the process
    ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            os.kill(proc.pid, signal.SIGSTOP)
            if not wait_stopped(proc):
                return False
            if ready():
                return True
            os.kill(proc.pid, signal.SIGCONT)  # it moved on between the look and the stop: look again
        time.sleep(0.001)
    return False


def signal_stopped(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the stopped ``proc`` and let it go on: it acts on ``sig`` where it stopped."""
    os.kill(proc.pid, sig)
    if sig != signal.SIGKILL:
        os.kill(proc.pid, signal.SIGCONT)


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], *, sig=signal.SIGKILL, timeout: float = 120) -> bool:
    """Send ``sig`` to ``proc`` at a moment when ``ready()`` holds, and wait for it to end; False when the process
    ended before ``ready()`` was seen."""
    if not stop_when(proc, ready, timeout):
        proc.kill()
        proc.wait()
        return False
    signal_stopped(proc, sig)
    proc.wait()
    return True
