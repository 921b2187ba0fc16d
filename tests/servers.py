"""A real ``furnitype serve`` process on an ephemeral loopback port, for the server and browser tests.

The server prints ``ready on http://HOST:PORT`` on stderr once its model is loaded and warm; a test waits for that
line (an event, with a generous timeout only as a guard), never for a duration.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field

READY = re.compile(r"ready on (http://\S+)")
STARTING = re.compile(r"starting on (http://[^\s:]+:\d+)")


@dataclass
class Server:
    """A started server: its address, its process and every line it printed on stderr so far."""

    url: str
    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 120) -> int:
        """Send ``sig`` and wait for the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def start_server(*args, env: dict | None = None, timeout: float = 300, until: re.Pattern = READY) -> Server:
    """``furnitype serve ARGS... --port 0`` in a new process; returns once it is ready (raises if it ends first).

    ``until``: the line to wait for instead, its group 1 the server's address (``STARTING``: it listens, its
    model is still loading).
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "furnitype", "serve", *map(str, args), "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env or os.environ.copy(),
    )
    lines: list[str] = []
    found = threading.Event()
    address: list[str] = []

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line.rstrip("\n"))
            match = until.search(line)
            if match and not address:
                address.append(match.group(1))
                found.set()
        found.set()  # the process ended (or closed stderr) without becoming ready

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout) or not address:
        process.kill()
        process.wait()
        raise AssertionError("furnitype serve did not become ready:\n" + "\n".join(lines))
    return Server(address[0], process, lines)
