"""The micro-batcher: the photos of concurrent requests go through the network as one batch.

Requests decode their photos in a thread pool, in parallel, then hand the decoded images to one network thread.
It takes up to ``max_batch`` images, waiting at most ``max_wait_ms`` after the first one for others to arrive
(as Triton's dynamic batcher and Ray Serve's ``@serve.batch`` do), runs the network once and hands each request
its rows. At most ``max_queue`` photos are admitted at a time, from upload to result: past that, ``QueueFull``
(the server answers 503 with Retry-After), so memory stays bounded however many clients come.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from furnitype.errors import InputError
from furnitype.faults import hold_point

T = TypeVar("T")


class QueueFull(Exception):
    """More photos are waiting than the batcher admits (``max_queue``)."""


@dataclass(frozen=True)
class Rows:
    """A photo's features and how its batch went: the network's time and the batch's size."""

    features: np.ndarray
    network_ms: float
    batch: int


@dataclass
class _Job:
    """Images of one request (at most ``max_batch``) that go through the network in one pass."""

    images: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float


class Batcher:
    """Decode photos in threads and run their network passes in shared batches.

    Parameters
    ----------
    infer : callable
        ``infer(uint8 images (n, s, s, 3)) -> features (n, d)``; called from the network thread only.
    max_batch : int, default=32
    max_wait_ms : float, default=5
        How long a batch waits for more photos after its first one arrived.
    max_queue : int, default=256
        Photos admitted at a time (``admit``).
    decode_workers : int, default=None
        Decoding threads (None: up to 4).
    """

    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        decode_workers: int | None = None,
    ):
        workers = 1 if decode_workers is None else decode_workers
        for name, value, least in (("max_batch", max_batch, 1), ("max_wait_ms", max_wait_ms, 0),
                                   ("max_queue", max_queue, 1), ("decode_workers", workers, 1)):
            if value < least:
                raise InputError(f"{name} must be at least {least}. Received: {name}={value}")
        self.infer = infer
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self._pending: deque[_Job] = deque()
        self._waiting = 0  # images in _pending
        self._admitted = 0
        self._closing = False
        self._lock = threading.Lock()
        self._arrival = threading.Condition()
        self._decoders = ThreadPoolExecutor(decode_workers or min(4, os.cpu_count() or 1),
                                            thread_name_prefix="furnitype-decode")
        self._thread = threading.Thread(target=self._run, name="furnitype-network", daemon=True)
        self._thread.start()

    def stats(self) -> dict:
        """``{"admitted", "waiting", "max_batch", "max_wait_ms", "max_queue"}``: photos admitted and not answered,
        images waiting for the network, and the options."""
        return {"admitted": self._admitted, "waiting": self._waiting, "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait * 1000, "max_queue": self.max_queue}

    @contextlib.contextmanager
    def admit(self, n: int) -> Iterator[None]:
        """Hold ``n`` places of the queue for the block; ``QueueFull`` when there are not that many free."""
        with self._lock:
            if self._admitted + n > self.max_queue:
                raise QueueFull(f"{self._admitted} photos are waiting (the limit is {self.max_queue})")
            self._admitted += n
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= n

    async def decode(self, function: Callable[[bytes], T], data: bytes) -> T:
        """``function(data)`` in a decoding thread."""
        return await asyncio.get_running_loop().run_in_executor(self._decoders, function, data)

    async def features(self, images: Sequence[np.ndarray]) -> list[Rows]:
        """The features of decoded images, computed in batches with the images of other requests (the images of
        one call share a pass, ``max_batch`` at a time)."""
        loop = asyncio.get_running_loop()
        futures = []
        with self._arrival:
            for start in range(0, len(images), self.max_batch):
                chunk = np.stack(images[start : start + self.max_batch])
                futures.append(loop.create_future())
                self._pending.append(_Job(chunk, futures[-1], loop, time.monotonic()))
                self._waiting += len(chunk)
            self._arrival.notify()
        return [rows for part in await asyncio.gather(*futures) for rows in part]

    def close(self) -> None:
        """Finish the batches under way, then stop the network and decoding threads."""
        with self._arrival:
            self._closing = True
            self._arrival.notify()
        self._thread.join()
        self._decoders.shutdown(wait=True)

    def _run(self) -> None:
        while jobs := self._next():
            self._pass(jobs)

    def _next(self) -> list[_Job]:
        """The jobs of the next pass: up to ``max_batch`` images, once that many wait or the first has waited
        ``max_wait``; none when closing with nothing left."""
        with self._arrival:
            while not self._pending and not self._closing:
                self._arrival.wait()
            deadline = self._pending[0].arrived + self.max_wait if self._pending else 0.0
            while self._waiting < self.max_batch and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrival.wait(left)
            jobs: list[_Job] = []
            taken = 0
            while self._pending and taken + len(self._pending[0].images) <= self.max_batch:
                job = self._pending.popleft()
                jobs.append(job)
                taken += len(job.images)
            self._waiting -= taken
            return jobs

    def _pass(self, jobs: list[_Job]) -> None:
        """One network pass over the jobs' images; each job's future gets its rows (or the error)."""
        hold_point("serve-batch")
        started = time.perf_counter()
        try:
            X = np.asarray(self.infer(np.concatenate([job.images for job in jobs])))
        except Exception as err:  # noqa: BLE001 - the requests of the batch answer with it; the thread goes on
            for job in jobs:
                _hand(job, None, err)
            return
        network_ms = (time.perf_counter() - started) * 1000
        batch, start = len(X), 0
        for job in jobs:
            rows = [Rows(row, network_ms, batch) for row in X[start : start + len(job.images)]]
            start += len(job.images)
            _hand(job, rows, None)


def _hand(job: _Job, result: list[Rows] | None, error: BaseException | None) -> None:
    """Settle a job's future in its event loop's thread."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for the result any more
        job.loop.call_soon_threadsafe(_settle, job.future, result, error)


def _settle(future: asyncio.Future, result: list[Rows] | None, error: BaseException | None) -> None:
    if future.done():  # its request went away (the client disconnected)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
