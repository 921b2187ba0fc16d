"""The per-batch code path shared by every engine: read + decode in threads, preprocess, infer.

Decoding of the next batches overlaps inference of the current one through a bounded window of futures, so
memory stays flat however many photos there are.
"""

from __future__ import annotations

import functools
import os
import resource
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from furnitype.errors import InputError
from furnitype.extract import int8
from furnitype.extract.backbones import build_model, get_backbone, weights_stamp
from furnitype.extract.images import ImageDecodeError, decode_image, read_file
from furnitype.extract.keras_backend import check_backend


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

    def build(self) -> Callable[[np.ndarray], np.ndarray]:
        """Build the network: ``infer(uint8 batch (n, s, s, 3)) -> float32 features (n, d)``.

        The network last built in this process is reused while the settings and the weights file are the same,
        so repeated ``extract`` calls in one process (a notebook, a benchmark) pay TensorFlow's start-up once.
        """
        return _network(self, weights_stamp(self.weights))

    def load(self, path: str) -> tuple[str, np.ndarray]:
        """Read, hash and decode one file: ``(sha256, uint8 image)``; ``ImageDecodeError`` when unusable."""
        data, sha256 = read_file(path)
        try:
            return sha256, decode_image(data, self.image_size, self.interpolation, self.decode)
        except ImageDecodeError as err:
            err.sha256 = sha256  # the bytes are known bad: the cache remembers them by content
            raise


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
    spec: ExtractSpec, paths: Iterable[str], workers: int, window: int
) -> Iterator[tuple[str, tuple[str, np.ndarray] | ImageDecodeError]]:
    """Yield ``(path, (sha256, image) | ImageDecodeError)`` in order, decoding ``window`` files ahead."""

    def load(path: str) -> tuple[str, np.ndarray] | ImageDecodeError:
        try:
            return spec.load(path)
        except ImageDecodeError as err:
            return err

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="furnitype-decode") as pool:
        pending: deque = deque()
        for path in paths:
            pending.append((path, pool.submit(load, path)))
            if len(pending) > window:
                head, future = pending.popleft()
                yield head, future.result()
        while pending:
            head, future = pending.popleft()
            yield head, future.result()


def check_batching(batch_size: int, workers: int | None) -> None:
    """Refuse a batch size or a number of decoding threads below 1, before any work."""
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1. Received: batch_size={batch_size}")
    if workers is not None and workers < 1:
        raise InputError(f"decoding threads must be at least 1. Received: workers={workers}")


def feature_batches(
    spec: ExtractSpec,
    paths: Sequence[str],
    *,
    batch_size: int = 32,
    workers: int | None = None,
    infer: Callable[[np.ndarray], np.ndarray] | None = None,
    prefetch: int | None = None,
) -> Iterator[list[Outcome]]:
    """Yield lists of ``Outcome`` (one per path, in order), one list per inference batch.

    ``infer`` is built from ``spec`` on first need when not given (no network is built for no images).
    ``prefetch`` files (default ``2 * batch_size``) are read and decoded ahead in ``workers`` threads (default:
    up to 4) while the network runs, so at most ``batch_size + prefetch`` decoded images are held at a time.
    """
    workers = workers or min(4, os.cpu_count() or 1)
    prefetch = 2 * batch_size if prefetch is None else prefetch
    batch: list[Outcome] = []
    images: list[np.ndarray] = []
    for path, result in decoded(spec, paths, workers, window=prefetch):
        if isinstance(result, ImageDecodeError):
            batch.append(Outcome(path, result.sha256, reason=str(result)))
            continue
        sha256, image = result
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
