"""The Starlette application of ``furnitype serve``: routes that parse a request and call ``Service``.

The model, the network and the stores are loaded in the background when the application starts (its lifespan),
and the network is run once; until then ``/v1/health`` answers 503 ``{"status": "starting"}`` and the other
endpoints 503. Every error is ``{"error": "one line"}`` with a 4xx or 503 status.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from furnitype.errors import FurnitypeError, InputError, first_line
from furnitype.extract.keras_backend import check_device
from furnitype.faults import hold_point
from furnitype.labels import count_labels
from furnitype.serve.openapi import openapi
from furnitype.serve.service import RETRY_AFTER_S, HTTPError, Service, Upload

log = logging.getLogger("furnitype")
T = TypeVar("T")

PAGE = Path(__file__).parent / "page"
SHA256 = re.compile(r"[0-9a-f]{64}")
#: The largest JSON body a request may send (a sha256 and a label, or a k).
MAX_JSON_BYTES = 64 << 10
#: Photos one request may upload.
MAX_PHOTOS = 64
MAX_K = 1000
#: Seconds a JSON body (a few hundred bytes) may take to arrive.
JSON_TIMEOUT_S = 10


class _State:
    """What the routes reach: the loaded service (None until warm), or why it could not start."""

    def __init__(self) -> None:
        self.service: Service | None = None
        self.failure: BaseException | None = None


def create_app(
    run: str | os.PathLike,
    catalogue: str | os.PathLike,
    *,
    queue: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    token: str | None = None,
    model: str | None = None,
    weights: str | None = None,
    top_k: int = 3,
    max_batch: int = 32,
    max_wait_ms: float = 5,
    max_queue: int = 256,
    max_upload_mb: float = 20,
    max_pixels: int = 40_000_000,
    decode_workers: int | None = None,
    device: str = "auto",
    body_timeout_s: float = 60.0,
    refresh_s: float = 1.0,
    hosts: Collection[str] | None = None,
    on_ready: Callable[[], None] | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
) -> Starlette:
    """The ASGI application serving a run's model over a catalogue of feature rows.

    Parameters
    ----------
    run : path
        A run folder written by ``furnitype classify``.
    catalogue : path
        A feature file made with the settings of one of the run's feature sets: ``/v1/similar`` searches it,
        following the file (rows an ``extract`` commits appear within ``refresh_s`` seconds).
    queue : path, default=None
        A feature file of new photos to label (``/v1/suggest``).
    labels : path, default=None
        The ``path,label`` CSV the labels of ``/v1/labels`` are appended to (``extract --manifest`` reads it).
    token : str, default=None
        Every ``/v1`` endpoint and ``/openapi.json`` then require ``Authorization: Bearer TOKEN``.
    model, weights :
        As for ``furnitype predict`` (None: the best row's model, the recorded weights).
    top_k : int, default=3
        Classes per prediction unless a request asks for another number.
    max_batch, max_wait_ms, max_queue, decode_workers :
        The micro-batcher's (``furnitype.serve.batcher.Batcher``).
    device : str, default="auto"
        Where the network runs: ``auto`` (the first GPU the Keras backend sees, else the CPU), ``cpu``, ``gpu`` or
        ``gpu:N``.
    max_upload_mb : float, default=20
        The largest request body (413 above).
    max_pixels : int, default=40_000_000
        The largest photo, in pixels (422 above; checked from its header before decoding).
    body_timeout_s : float, default=60.0
        How long a request's body may take to arrive (408 after): a slow client holds a place in the queue.
    refresh_s : float, default=1.0
        How often the catalogue's and the queue's files are checked for new rows.
    hosts : collection of str, default=None
        The names the ``Host`` header may give (400 for others); None: any. ``serve`` gives the loopback names
        when it listens on a loopback address, so that a site whose name is made to point at 127.0.0.1 (DNS
        rebinding) cannot use the server through a browser.
    on_ready, on_failure : callable, default=None
        Called once the model is loaded and warm, or with the error that stopped it loading.

    Raises
    ------
    InputError
        An option out of its range.
    """
    for name, value, least in (("top_k", top_k, 1), ("max_batch", max_batch, 1), ("max_wait_ms", max_wait_ms, 0),
                               ("max_queue", max_queue, 1), ("max_upload_mb", max_upload_mb, 0.001),
                               ("max_pixels", max_pixels, 1), ("body_timeout_s", body_timeout_s, 0.01),
                               ("refresh_s", refresh_s, 0.01)):
        if value < least:
            raise InputError(f"{name.replace('_', '-')} must be at least {least}. Received: {value}")
    check_device(device)
    if labels is not None and queue is None:
        raise InputError("--labels needs --queue: the photos to label are the queue's.")
    if labels is not None:  # a labels file that cannot be read is refused at the start, not at the first label
        count_labels(labels)
    state = _State()
    max_body = int(max_upload_mb * (1 << 20))

    def load() -> Service:
        service = Service(run, catalogue, queue=queue, labels=labels, model=model, weights=weights, top_k=top_k,
                          max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, max_pixels=max_pixels,
                          decode_workers=decode_workers, device=device)
        try:
            hold_point("serve-warm")
            service.warm()
        except BaseException:
            service.close()
            raise
        return service

    async def follow(service: Service) -> None:
        while True:
            await asyncio.sleep(refresh_s)
            try:
                await asyncio.to_thread(service.refresh)
            except Exception as err:  # noqa: BLE001 - the server goes on with the rows it has, and tries again
                log.warning("warning: could not read the catalogue again: %s", first_line(err))

    async def start() -> None:
        try:
            service = await asyncio.to_thread(load)
        except Exception as err:  # noqa: BLE001 - reported by on_failure (the CLI: one line and its exit code)
            state.failure = err
            if on_failure is None:
                log.error("furnitype serve could not start: %s", first_line(err))
            else:
                on_failure(err)
            return
        state.service = service
        if on_ready is not None:
            on_ready()
        await follow(service)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(start())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if state.service is not None:
                await asyncio.to_thread(state.service.close)

    def ready() -> Service:
        if state.service is None:
            if state.failure is not None:
                raise HTTPError(503, f"the server could not start: {first_line(state.failure)}")
            raise HTTPError(503, "starting: the model is loading; try again", retry_after=RETRY_AFTER_S)
        return state.service

    async def health(request: Request) -> Response:
        if state.service is None:
            status = "failed" if state.failure is not None else "starting"
            return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "ok"})

    async def info(request: Request) -> Response:
        service = ready()
        return JSONResponse(await asyncio.to_thread(service.info))

    async def predict(request: Request) -> Response:
        started = time.perf_counter()
        service = ready()
        top_k = _integer(request, "top_k", 1, MAX_K)
        with service.admitted(1):  # before reading the body: memory stays bounded
            uploads = await _uploads(request, max_body, body_timeout_s)
            with service.admitted(len(uploads) - 1):
                return JSONResponse(await service.predict(uploads, top_k, started))

    async def similar(request: Request) -> Response:
        started = time.perf_counter()
        service = ready()
        k = _integer(request, "k", 1, MAX_K)
        max_distance = _number(request.query_params.get("max_distance"), "max_distance")
        if _content_type(request) == "application/json":
            body = await _json(request)
            sha256 = body.get("sha256")
            if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
                raise HTTPError(400, "give the sha256 of a photo of the catalogue: 64 lowercase hex digits")
            if "k" in body:
                k = _integer_value(body["k"], "k", 1, MAX_K)
            if "max_distance" in body:
                max_distance = _number(body["max_distance"], "max_distance")
            return JSONResponse(service.similar_sha256(sha256, k or 10, max_distance, started))
        with service.admitted(1):
            uploads = await _uploads(request, max_body, body_timeout_s, json_too=True)
            if len(uploads) != 1:
                raise HTTPError(400, f"give one photo (a file field named photo); received {len(uploads)}")
            return JSONResponse(await service.similar_upload(uploads[0], k or 10, max_distance, started))

    async def photo(request: Request) -> Response:
        service = ready()
        sha256 = request.path_params["sha256"]
        size = _integer(request, "size", 16, 1024) or 256
        if not SHA256.fullmatch(sha256):
            raise HTTPError(404, "no photo has this sha256 (64 lowercase hex digits)")
        picture = await asyncio.to_thread(service.thumbnail, sha256, size)
        return Response(picture, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})

    async def suggest(request: Request) -> Response:
        service = ready()
        n = _integer(request, "n", 1, MAX_K) or 10
        return JSONResponse(await asyncio.to_thread(service.suggest, n))

    async def label(request: Request) -> Response:
        service = ready()
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
            raise HTTPError(403, f"labels are taken only from the server's own page, not from {origin}")
        if _content_type(request) != "application/json":
            raise HTTPError(415, "send the label as JSON: {\"sha256\": \"...\", \"label\": \"...\"}")
        body = await _json(request)
        sha256, name = body.get("sha256"), body.get("label")
        if not isinstance(sha256, str) or not SHA256.fullmatch(sha256) or not isinstance(name, str):
            raise HTTPError(400, "give {\"sha256\": 64 lowercase hex digits, \"label\": one of the classes}")
        return JSONResponse(await asyncio.to_thread(service.label, sha256, name), status_code=201)

    async def schema(request: Request) -> Response:
        return JSONResponse(openapi())

    async def index(request: Request) -> Response:
        return FileResponse(PAGE / "index.html")

    routes = [
        Route("/v1/health", _answer(health)),
        Route("/v1/info", _answer(info)),
        Route("/v1/predict", _answer(predict), methods=["POST"]),
        Route("/v1/similar", _answer(similar), methods=["POST"]),
        Route("/v1/photos/{sha256}", _answer(photo)),
        Route("/v1/suggest", _answer(suggest)),
        Route("/v1/labels", _answer(label), methods=["POST"]),
        Route("/openapi.json", schema),
        Route("/", index),
        Mount("/static", StaticFiles(directory=PAGE, check_dir=False)),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_exception})
    if token is not None:
        app.add_middleware(BearerToken, token=token)
    if hosts is not None:
        app.add_middleware(KnownHosts, hosts=hosts)
    return app


class KnownHosts:
    """ASGI middleware: 400 for a request whose ``Host`` header names another host than ``hosts``."""

    def __init__(self, app: ASGIApp, hosts: Collection[str]):
        self.app = app
        self.hosts = {host.lower() for host in hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"host", b"").decode("latin-1").strip().lower()
            name = given[1:].partition("]")[0] if given.startswith("[") else given.partition(":")[0]
            if name not in self.hosts:
                response = _error(400, f"this server answers to {', '.join(sorted(self.hosts))}, not {given!r}")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BearerToken:
    """ASGI middleware: the API (``/v1``, ``/openapi.json``) answers 401 without ``Authorization: Bearer TOKEN``.

    The page's static files hold no data and are served without it (a browser cannot send the header when it
    opens a page).
    """

    def __init__(self, app: ASGIApp, token: str):
        if not token:
            raise InputError("--token must not be empty.")
        self.app = app
        self.expected = hashlib.sha256(token.encode()).digest()

    def _allows(self, authorization: bytes) -> bool:
        """Whether the header gives the token; in constant time, its length too (digests of equal length are
        compared); the scheme in any case (RFC 9110)."""
        scheme, _, given = authorization.partition(b" ")
        return hmac.compare_digest(hashlib.sha256(given).digest(), self.expected) and scheme.lower() == b"bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"].startswith("/v1/") or scope["path"] == "/openapi.json"):
            if not self._allows(dict(scope["headers"]).get(b"authorization", b"")):
                response = JSONResponse({"error": "give the server's token: Authorization: Bearer TOKEN"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _answer(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint with its errors as ``{"error": "one line"}``: ``HTTPError`` with its status, a furnitype
    error 400 (bad input) or 500, a client gone mid-upload 400 (nobody reads it)."""

    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except HTTPError as err:
            headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
            return _error(err.status, str(err), headers)
        except InputError as err:
            return _error(400, str(err))
        except FurnitypeError as err:
            return _error(500, str(err))
        except ClientDisconnect:
            return _error(400, "the client disconnected before the request was whole")

    return answer


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": first_line(message)}, status_code=status, headers=headers)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such route, method not allowed) as ``{"error"}``."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _error(404, f"no such endpoint: {request.method} {request.url.path}")
    return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _chunks(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The request's body, chunk by chunk; 413 when it is longer than ``limit`` bytes (before reading it, when
    its Content-Length says so)."""
    too_large = HTTPError(413, f"the request is larger than the limit of {limit / (1 << 20):g} MB")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large

    async def chunks() -> AsyncGenerator[bytes, None]:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise too_large
            yield chunk

    return chunks()


async def _in_time(reading: Awaitable[T], timeout: float) -> T:
    """What ``reading`` returns; 408 when the body takes longer than ``timeout`` seconds to arrive (a slow
    client would hold its place in the queue)."""
    try:
        return await asyncio.wait_for(reading, timeout)
    except asyncio.TimeoutError as err:
        raise HTTPError(408, f"the request's body took longer than {timeout:g} s to arrive") from err


async def _body(request: Request, limit: int, timeout: float) -> bytes:
    async def read() -> bytes:
        return b"".join([chunk async for chunk in _chunks(request, limit)])

    return await _in_time(read(), timeout)


async def _json(request: Request) -> dict[str, Any]:
    body = await _body(request, MAX_JSON_BYTES, JSON_TIMEOUT_S)
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as err:  # RecursionError: arrays nested thousands deep
        raise HTTPError(400, f"the body is not JSON: {first_line(err)}") from err
    if not isinstance(value, dict):
        raise HTTPError(400, "the body must be a JSON object")
    return value


async def _uploads(request: Request, limit: int, timeout: float, *, json_too: bool = False) -> list[Upload]:
    """The files of the multipart form's ``photo`` fields."""
    if _content_type(request) != "multipart/form-data":
        expected = "multipart/form-data (or application/json with a sha256)" if json_too else "multipart/form-data"
        raise HTTPError(415, f"send the photo as {expected}; received {_content_type(request) or 'no content type'}")
    # parsed as it arrives: a file part goes to a temporary file past 1 MB, not to a copy of the whole body
    parser = MultiPartParser(request.headers, _chunks(request, limit), max_files=MAX_PHOTOS,
                             max_fields=MAX_PHOTOS, max_part_size=MAX_JSON_BYTES)
    try:
        form = await _in_time(parser.parse(), timeout)
    except MultiPartException as err:
        raise HTTPError(400, f"the multipart body cannot be read: {err.message}") from err
    try:
        files = [item for item in form.getlist("photo") if isinstance(item, UploadFile)]
        if not files:
            raise HTTPError(400, "give a photo: a file field named photo")
        return [Upload(item.filename or "", await item.read()) for item in files]
    finally:
        await form.close()


def _integer(request: Request, name: str, least: int, most: int) -> int | None:
    value = request.query_params.get(name)
    return None if value is None else _integer_value(value, name, least, most)


def _integer_value(value: object, name: str, least: int, most: int) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not re.fullmatch(r"[0-9]{1,9}", text) or not least <= int(text) <= most:
        raise HTTPError(400, f"{name} must be a whole number from {least} to {most}. Received: {name}={value!r}")
    return int(text)


def _number(value: object, name: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(str(value))
    except ValueError:
        number = float("nan")
    if isinstance(value, bool) or not 0.0 <= number <= 2.0:
        raise HTTPError(400, f"{name} must be a number from 0 to 2. Received: {name}={value!r}")
    return number
