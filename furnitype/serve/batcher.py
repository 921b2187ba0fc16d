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
import queue
import threading
import time
from collections.abc import Callable, Iterator
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
    image: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class Batcher:
    """Decode photos in threads and run their network passes in shared batches.

    Parameters
    ----------
    infer : callable
        ``infer(uint8 images (n, s, s, 3)) -> features (n, d)``; called from the network thread only.
    max_batch : int, default=32
    max_wait_ms : float, default=5
        How long a batch waits for more photos after its first one.
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
        for name, value, least in (("max_batch", max_batch, 1), ("max_wait_ms", max_wait_ms, 0),
                                   ("max_queue", max_queue, 1), ("decode_workers", decode_workers or 1, 1)):
            if value < least:
                raise InputError(f"{name} must be at least {least}. Received: {name}={value}")
        self.infer = infer
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._admitted = 0
        self._lock = threading.Lock()
        self._decoders = ThreadPoolExecutor(decode_workers or min(4, os.cpu_count() or 1),
                                            thread_name_prefix="furnitype-decode")
        self._thread = threading.Thread(target=self._run, name="furnitype-network", daemon=True)
        self._thread.start()

    @property
    def admitted(self) -> int:
        """Photos admitted and not finished."""
        return self._admitted

    def full(self) -> bool:
        return self._admitted >= self.max_queue

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

    async def features(self, image: np.ndarray) -> Rows:
        """The features of one decoded image, computed in a batch with the images of other requests."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put(_Job(image, future, loop))
        return await future

    def close(self) -> None:
        """Finish the batches under way, then stop the network and decoding threads."""
        self._jobs.put(None)
        self._thread.join()
        self._decoders.shutdown(wait=True)

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._jobs.get()
            if first is None:
                return
            jobs = [first]
            deadline = time.monotonic() + self.max_wait
            while len(jobs) < self.max_batch:
                try:
                    job = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            self._pass(jobs)

    def _pass(self, jobs: list[_Job]) -> None:
        """One network pass over the jobs' images; each job's future gets its row (or the error)."""
        hold_point("serve-batch")
        started = time.perf_counter()
        try:
            X = np.asarray(self.infer(np.stack([job.image for job in jobs])))
        except Exception as err:  # noqa: BLE001 - the requests of the batch answer with it; the thread goes on
            for job in jobs:
                _hand(job, None, err)
            return
        network_ms = (time.perf_counter() - started) * 1000
        for job, row in zip(jobs, X, strict=True):
            _hand(job, Rows(row, network_ms, len(jobs)), None)


def _hand(job: _Job, result: Rows | None, error: BaseException | None) -> None:
    """Settle a job's future in its event loop's thread."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for the result any more
        job.loop.call_soon_threadsafe(_settle, job.future, result, error)


def _settle(future: asyncio.Future, result: Rows | None, error: BaseException | None) -> None:
    if future.done():  # its request went away (the client disconnected)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
