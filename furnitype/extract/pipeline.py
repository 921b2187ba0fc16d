"""The per-batch code path shared by every engine: read + decode in workers, preprocess, infer.

Decoding of the next batches overlaps inference of the current one through a bounded window of futures, so
memory stays flat however many photos there are.
"""

from __future__ import annotations

import functools
import resource
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from furnitype.errors import InputError
from furnitype.extract import int8
from furnitype.extract.backbones import build_model, get_backbone, weights_stamp
from furnitype.extract.decoding import (
    Decoded,
    chunk_size,
    decode_pool,
    default_decode_workers,
    in_processes,
    load_each,
    max_decode_workers,
    read_ahead,
    result,
)
from furnitype.extract.images import ImageDecodeError, load_photo
from furnitype.extract.keras_backend import check_backend, check_device, resolve_device


@dataclass(frozen=True)
class ExtractSpec:
    """Everything that decides a feature row's value (picklable: Ray workers get one).

    ``quantization`` names the quantized network of ``precision="int8"`` (None for the Keras precisions).
    ``layers``: the blocks pooled, each L2-normalised, concatenated (``backbones.layer_names``; (): the network's
    output, not normalised). ``mirror``: each row is the mean of the photo's and its left-right mirror's.
    ``backend``: the Keras backend the rows need (bfloat16/float16 rows differ between backends; None: any,
    ``keras_backend.rows_backend``). ``device`` is where the network runs (``auto``, ``cpu``, ``gpu``, ``gpu:N``): not
    part of a row's value.
    """

    backbone: str
    weights: str
    pooling: str = "avg"
    image_size: int = 224
    interpolation: str = "bilinear"
    precision: str = "float32"
    decode: str = "exact"
    quantization: int8.Quantization | None = None
    layers: tuple[str, ...] = ()
    mirror: bool = False
    backend: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.precision == "int8" and self.device not in ("auto", "cpu"):
            raise InputError("int8 networks run on the CPU (OpenVINO); --device is for the Keras precisions. "
                             f"Received: device={self.device!r}")

    def build(self) -> Callable[[np.ndarray], np.ndarray]:
        """Build the network: ``infer(uint8 batch (n, s, s, 3)) -> float32 features (n, d)``.

        The network last built in this process is reused while the settings and the weights file are the same,
        so repeated ``extract`` calls in one process (a notebook, a benchmark) pay TensorFlow's start-up once.
        """
        return _network(self, weights_stamp(self.weights))

    def on_gpu(self) -> bool:
        """Whether the network runs on a GPU (``device``; int8 networks run on the CPU)."""
        return self.precision != "int8" and resolve_device(self.device).gpu

    def load(self, path: str) -> tuple[str, np.ndarray]:
        """Read, hash and decode one file: ``(sha256, uint8 image)``; ``ImageDecodeError`` when unusable."""
        return load_photo(path, self.image_size, self.interpolation, self.decode)


@functools.lru_cache(maxsize=1)
def _network(spec: ExtractSpec, stamp: tuple | None) -> Callable[[np.ndarray], np.ndarray]:
    if spec.precision == "int8":
        return int8.build(spec)
    check_backend(spec.backend)
    backbone = get_backbone(spec.backbone)
    model = build_model(
        backbone,
        weights=spec.weights,
        pooling=spec.pooling,
        image_size=spec.image_size,
        precision=spec.precision,
        layers=spec.layers,
        device=spec.device,
    )
    if spec.mirror:  # two passes of the batch's size, not one of twice its size: the memory check holds
        return lambda batch: (model(backbone.preprocess(batch)) + model(backbone.preprocess(batch[:, :, ::-1]))) / 2
    return lambda batch: model(backbone.preprocess(batch))


def cpu_seconds() -> float:
    """CPU seconds (user + system, all threads) this process has used: steadier than wall time where the
    usable cores vary."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Outcome:
    """The result for one file: features, or the reason it could not be used."""

    path: str
    sha256: str
    features: np.ndarray | None = None
    reason: str = ""


def decoded(
    spec: ExtractSpec, paths: Iterable[str], workers: int | None, window: int, *, gpu: bool = False
) -> Iterator[tuple[str, Decoded]]:
    """Yield ``(path, (sha256, image) | ImageDecodeError)`` in order, decoding up to ``window`` files ahead.

    ``workers`` (None: ``default_decode_workers(gpu=gpu)``) are threads calling ``spec.load`` on a file at a time,
    or processes past ``THREADS_SCALE_TO`` given a few files at a time (``chunk_size``) and ``spec``'s decoding
    settings, not ``spec`` (whose module builds networks); a chunk's photos are held until yielded.
    """
    workers = workers or default_decode_workers(gpu=gpu)
    load: Callable[[str], tuple[str, np.ndarray]] = spec.load
    chunk = 1
    if in_processes(workers):
        load = functools.partial(
            load_photo, image_size=spec.image_size, interpolation=spec.interpolation, decode=spec.decode
        )
        chunk = chunk_size(workers, window)
    task = functools.partial(load_each, load)
    with decode_pool(workers) as submit:
        pending: deque = deque()  # (paths, the future of their results)
        ahead = 0
        for group in _groups(paths, chunk):
            pending.append((group, submit(task, group)))
            ahead += len(group)
            while ahead > window:
                group, future = pending.popleft()
                ahead -= len(group)
                yield from zip(group, result(future), strict=True)
        while pending:
            group, future = pending.popleft()
            yield from zip(group, result(future), strict=True)


def _groups(paths: Iterable[str], size: int) -> Iterator[list[str]]:
    group: list[str] = []
    for path in paths:
        group.append(path)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def check_batching(batch_size: int, workers: int | None) -> None:
    """Refuse a batch size below 1, or a number of decoding workers below 1 or above ``max_decode_workers()``,
    before any work."""
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1. Received: batch_size={batch_size}")
    if workers is not None and workers < 1:
        raise InputError(f"decoding workers must be at least 1. Received: workers={workers}")
    if workers is not None and workers > max_decode_workers():
        raise InputError(
            f"decoding workers must be at most {max_decode_workers()} here (4 per usable core): more only share the "
            f"same cores and hold more photos decoded ahead. Received: workers={workers}"
        )


def feature_batches(
    spec: ExtractSpec,
    paths: Sequence[str],
    *,
    batch_size: int = 32,
    workers: int | None = None,
    infer: Callable[[np.ndarray], np.ndarray] | None = None,
    prefetch: int | None = None,
    gpu: bool | None = None,
) -> Iterator[list[Outcome]]:
    """Yield lists of ``Outcome`` (one per path, in order), one list per inference batch.

    ``infer`` is built from ``spec`` on first need when not given (no network is built for no images).
    ``prefetch`` files (default ``read_ahead(batch_size, workers)``: two batches, more for many processes) are
    read and decoded ahead while the network runs, so at most ``batch_size + prefetch`` decoded images (and a
    process's chunk) are held at a time. ``workers`` decode them: threads, or processes past ``THREADS_SCALE_TO``
    (default: ``default_decode_workers(gpu=gpu)``; ``gpu``: whether the network runs on a GPU, where decoding is
    what limits; None: ``spec.on_gpu()``).
    """
    if not paths:  # nothing to decode: not even the backend is asked where the network would run
        return
    workers = workers or default_decode_workers(gpu=spec.on_gpu() if gpu is None else gpu)
    prefetch = read_ahead(batch_size, workers) if prefetch is None else prefetch
    batch: list[Outcome] = []
    images: list[np.ndarray] = []
    for path, loaded in decoded(spec, paths, workers, window=prefetch):
        if isinstance(loaded, ImageDecodeError):
            batch.append(Outcome(path, loaded.sha256, reason=str(loaded)))
            continue
        sha256, image = loaded
        batch.append(Outcome(path, sha256))
        images.append(image)
        if len(images) == batch_size:
            infer = infer or spec.build()
            yield _fill(batch, infer(np.stack(images)))
            batch, images = [], []
    if images:
        infer = infer or spec.build()
        yield _fill(batch, infer(np.stack(images)))
    elif batch:
        yield batch


def _fill(batch: list[Outcome], features: np.ndarray) -> list[Outcome]:
    rows = iter(features)
    return [o if o.reason else Outcome(o.path, o.sha256, next(rows)) for o in batch]
