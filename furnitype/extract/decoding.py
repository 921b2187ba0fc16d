"""Decoding workers sized to the machine: threads while threads scale, processes past that.

The processes are spawned (never forked: TensorFlow's or JAX's threads run in this process, and a forked copy of
their locks can hang) and import only what decoding needs (numpy, Pillow, furnitype.extract), never Keras. They ignore
Ctrl-C, which the terminal sends to the whole process group: the parent answers it. They exit when the parent
goes, even killed with -9.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from furnitype.errors import FurnitypeError
from furnitype.extract.images import ImageDecodeError

#: Decoding threads stop scaling at about 4: reading, hashing and Pillow's per-photo Python work hold the GIL.
#: Measured on a 16-core GPU machine: 482 photos/s with 4 threads, 410 with 16, while Pillow's decode +
#: resize costs 3.2 ms per photo on one core (2,696 photos/s over 16 processes) and the network alone does 3,000 to
#: 4,700 photos/s. More workers than this are processes.
THREADS_SCALE_TO = 4
#: Photos a decoding process decodes per task: their pixels come back in one message, which costs this process
#: less than half the CPU of one message per photo (0.12 instead of 0.30 ms per 224 px photo, benchmarks/decode.py).
CHUNK = 8

Decoded = tuple[str, np.ndarray] | ImageDecodeError


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_decode_workers(*, gpu: bool) -> int:
    """Decoding workers when none are asked for: with the network on a GPU, one per usable core (decoding is then
    what limits); on the CPU, up to ``THREADS_SCALE_TO`` (the network needs the cores, and decoding is 1.5 to 3 ms
    of the 100 ms or more a photo takes there)."""
    cores = usable_cores()
    return cores if gpu else min(THREADS_SCALE_TO, cores)


def max_decode_workers() -> int:
    """The most decoding workers ``--workers`` may ask for: 4 per usable core (8 at least). Each process holds its
    own Python and Pillow, and the photos read ahead grow with the workers: a million would decode a whole folder
    ahead in one process per 8 photos."""
    return max(2 * THREADS_SCALE_TO, 4 * usable_cores())


def in_processes(workers: int) -> bool:
    """Whether ``workers`` decoding workers are processes (more than threads scale to) rather than threads."""
    return workers > THREADS_SCALE_TO


def read_ahead(batch_size: int, workers: int) -> int:
    """Files decoded ahead of the network by default: two batches, and enough for two full chunks per process."""
    return max(2 * batch_size, 2 * workers * CHUNK if in_processes(workers) else 0)


def chunk_size(workers: int, window: int) -> int:
    """Files per task of a decoding process: up to ``CHUNK``, fewer when the window would not keep every process
    busy with two tasks."""
    return max(1, min(CHUNK, window // (2 * workers)))


def load_each(load: Callable[[str], tuple[str, np.ndarray]], paths: list[str]) -> list[Decoded]:
    """``load(path)`` of each path in order, an unusable file's ``ImageDecodeError`` returned, not raised (a
    decoding task)."""
    loaded: list[Decoded] = []
    for path in paths:
        try:
            loaded.append(load(path))
        except ImageDecodeError as err:
            loaded.append(err)
    return loaded


@contextlib.contextmanager
def decode_pool(workers: int) -> Iterator[Callable[..., Future]]:
    """``submit(fn, *args)`` to ``workers`` decoding workers (threads, or processes past ``THREADS_SCALE_TO``;
    ``fn`` and its arguments are pickled for processes). However the block ends, the workers are shut down:
    running work finishes, queued work is dropped."""
    pool: Executor
    submit: Callable[..., Future]
    if not in_processes(workers):
        pool = ThreadPoolExecutor(workers, thread_name_prefix="furnitype-decode")
        submit = pool.submit
    else:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker)
        submit = functools.partial(_submit_without_sigint, pool)
    try:
        yield submit
    finally:
        pool.shutdown(cancel_futures=True)


def result(future: Future) -> list[Decoded]:
    """A decoding task's results; a process that died (killed, out of memory) is one line, not damaged photos."""
    with _broken_pool_as_error():
        return future.result()


@contextlib.contextmanager
def _broken_pool_as_error() -> Iterator[None]:
    try:
        yield
    except BrokenProcessPool as err:
        raise FurnitypeError(
            "a decoding process ended unexpectedly (out of memory? killed? a script that calls furnitype needs "
            f'if __name__ == "__main__":); rerun, or give --workers {THREADS_SCALE_TO} or fewer to decode in threads'
        ) from err


def _submit_without_sigint(pool: Executor, fn: Callable, /, *args: object) -> Future:
    # A process starts on a submit; started with SIGINT blocked it keeps it blocked, so Ctrl-C cannot stop its
    # start-up (with a traceback) before it ignores SIGINT.
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks (nor process groups to share Ctrl-C)
        with _broken_pool_as_error():
            return pool.submit(fn, *args)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        with _broken_pool_as_error():
            return pool.submit(fn, *args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _start_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent answers it
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True).start()


def _exit_with_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])  # readable once the parent is gone, however it ended
    os._exit(1)
