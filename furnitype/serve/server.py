"""Running the application with uvicorn on a socket bound here (so ``port=0`` gives a real, known port).

Ctrl-C or SIGTERM stops taking connections and lets the requests in flight finish (at most ``drain_s``
seconds), then ``serve`` returns (SIGTERM) or raises ``KeyboardInterrupt`` (Ctrl-C: the CLI exits 130). A second
Ctrl-C ends the process at once, with exit status 130.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from furnitype.errors import InputError, Interrupted
from furnitype.serve.app import create_app


def serve(
    run: str,
    catalogue: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    drain_s: int = 30,
    echo: Callable[[str], None] = print,
    **options: Any,
) -> None:
    """Serve ``create_app(run, catalogue, **options)`` on ``host:port`` until Ctrl-C or SIGTERM.

    ``echo`` gets the lines for the user: a warning when ``host`` is not a loopback address, ``starting on
    http://HOST:PORT`` once it listens (``/v1/health`` answers 503 until the model is warm), ``ready on
    http://HOST:PORT`` once the model is warm, and what happens on a stop. On a loopback address, requests
    must name a loopback host (``create_app``'s ``hosts``).

    Raises
    ------
    InputError
        The address cannot be bound (in use, not this machine's), or an option is out of its range.
    FurnitypeError
        The run, the catalogue or the network could not be loaded.
    KeyboardInterrupt
        Stopped by Ctrl-C (after the requests in flight finished).
    """
    sock = _bind(host, port)
    try:
        url = _url(host, sock.getsockname()[1])
        hosts = None
        if _loopback(sock):
            hosts = {"127.0.0.1", "localhost", "::1", host}
        else:
            echo(f"warning: serving on {host}, reachable from other machines"
                 f"{'' if options.get('token') else '; give --token to require a token'}")
        failures: list[BaseException] = []
        server: _Server | None = None

        def failed(err: BaseException) -> None:
            failures.append(err)
            if server is not None:
                server.should_exit = True

        app = create_app(run, catalogue, hosts=hosts, on_ready=lambda: echo(f"ready on {url}"), on_failure=failed,
                         **options)
        echo(f"starting on {url}: loading the model")
        config = uvicorn.Config(app, http=_Protocol, log_config=None, access_log=False, lifespan="on",
                                server_header=False, timeout_graceful_shutdown=drain_s)
        server = _Server(config, echo)
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failures:
        raise failures[0]
    if signal.SIGINT in server.signals:
        raise KeyboardInterrupt("interrupted: stopped taking requests; those in flight were answered")


class _Server(uvicorn.Server):
    """uvicorn's server, telling the user when it stops, and leaving what the signal means to ``serve``
    (uvicorn would raise it again once stopped: SIGTERM would then kill the process instead of exiting 0)."""

    def __init__(self, config: uvicorn.Config, echo: Callable[[str], None]):
        super().__init__(config)
        self.echo = echo
        self.signals: list[int] = []

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT and signal.SIGINT in self.signals:
            # uvicorn would still wait for the model to load or a network pass to end; the server writes nothing
            # a kill could leave half-written (a label is written whole by a rename)
            self.echo("Ctrl-C again: stopped at once; the requests in flight were not answered")
            os._exit(Interrupted.exit_code)
        if not self.should_exit:
            name = "Ctrl-C" if sig == signal.SIGINT else signal.Signals(sig).name
            self.echo(f"{name}: stopping; finishing the requests in flight (Ctrl-C again stops at once)")
        self.signals.append(sig)
        super().handle_exit(sig, frame)


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection, closed when a request's head (its line and headers) has not arrived whole
    ``timeout_keep_alive`` seconds after the connection opened or its previous response was sent. uvicorn waits
    for a head forever, so silent connections, or a client sending a header a byte at a time, would each hold a
    socket for good, until the server has none left."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        # unlike uvicorn's, bytes do not stop the timer: a whole request head does (handle_events)
        self.conn.receive_data(data)
        self.handle_events()


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0: one the system picks)."""
    if not 0 <= port <= 65535:
        raise InputError(f"port must be from 0 to 65535. Received: port={port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise InputError(f"cannot serve on {host}: {err.strerror or err}") from err
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise InputError(f"cannot serve on {host}:{port}: {err.strerror or err}") from err
    return sock


def _loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
