"""What the server does for each endpoint, apart from HTTP: the routes (``app.py``) parse a request, call one
method here and send its dict back as JSON. A request that cannot be answered raises ``HTTPError``.

The run's model and the network are loaded once (``furnitype.predict.Predictor``); an uploaded photo is decoded
with the run's settings and its features made in a shared batch (``Batcher``), so ``/v1/predict`` gives what
``furnitype predict`` gives on the same file, and ``/v1/similar`` what ``furnitype similar`` gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

import furnitype
from furnitype.extract.images import ImageDecodeError
from furnitype.labels import append_label, count_labels, labelled_paths
from furnitype.predict import Predictor
from furnitype.serve.batcher import Batcher, QueueFull
from furnitype.serve.catalogue import FollowedStore, Snapshot
from furnitype.similar import Neighbour
from furnitype.suggest import suggest

#: Seconds a client is asked to wait (Retry-After) when the queue is full or the server is starting.
RETRY_AFTER_S = 1


class HTTPError(Exception):
    """A request the server answers with ``status`` and ``{"error": message}`` (one line)."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class Upload:
    """One uploaded photo: the file name the client gave and its bytes."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class _Decoded:
    sha256: str
    image: np.ndarray
    decode_ms: float


class Service:
    """The loaded run, catalogue, queue and labels file of one server.

    Parameters are ``create_app``'s. Loading may take a while (the model, the stores); ``warm`` then builds and
    runs the network once.
    """

    def __init__(
        self,
        run: str | os.PathLike,
        catalogue: str | os.PathLike,
        *,
        queue: str | os.PathLike | None = None,
        labels: str | os.PathLike | None = None,
        model: str | None = None,
        weights: str | None = None,
        top_k: int = 3,
        max_batch: int = 32,
        max_wait_ms: float = 5,
        max_queue: int = 256,
        max_pixels: int = 40_000_000,
        decode_workers: int | None = None,
        device: str = "auto",
    ):
        self.run = os.fspath(run)
        self.catalogue = FollowedStore(catalogue)
        self.predictor = Predictor(run, model=model, weights=weights, store=catalogue, batch_size=max_batch,
                                   max_pixels=max_pixels, device=device)
        if queue is not None:  # refused at the start, not at every /v1/suggest
            self.predictor.check_store(queue)
        self.queue = FollowedStore(queue, index=False) if queue is not None else None
        self.labels = os.fspath(labels) if labels is not None else None
        self.top_k = top_k
        self.batcher = Batcher(self.predictor.features, max_batch=max_batch, max_wait_ms=max_wait_ms,
                               max_queue=max_queue, decode_workers=decode_workers)

    def warm(self) -> None:
        self.predictor.warm()

    def close(self) -> None:
        self.batcher.close()

    def refresh(self) -> None:
        """Read the catalogue and the queue again where they changed."""
        for store in (self.catalogue, self.queue):
            if store is not None:
                store.refresh()

    # -- the endpoints ----------------------------------------------------------------------------------------

    def info(self) -> dict:
        loaded = self.predictor.loaded
        labels = None
        if self.labels is not None:
            labels = {"count": count_labels(self.labels)}
        return {
            "version": furnitype.__version__,
            "run": os.path.basename(os.path.normpath(self.run)),
            "model": loaded.name,
            "features": loaded.features,
            "classes": self.predictor.classes,
            "top_k": self.top_k,
            "catalogue": {"rows": len(self.catalogue.snapshot), "path": self.catalogue.name},
            "queue": {"rows": len(self.queue.snapshot)} if self.queue is not None else None,
            "labels": labels,
            "settings": dict(loaded.settings),
            "batching": self.batcher.stats(),
        }

    async def predict(self, uploads: Sequence[Upload], top_k: int | None, started: float) -> dict:
        """Label each photo: ``{"model", "features", "predictions": [...]}`` (the caller holds their places in
        the queue: ``admitted``)."""
        top_k = self.top_k if top_k is None else top_k
        decoded = await self._decode_all(uploads)
        rows = await self.batcher.features([d.image for d in decoded])
        X = np.stack([r.features for r in rows])
        names = [u.filename for u in uploads]
        predictions = await asyncio.to_thread(self.predictor.label, X, [d.sha256 for d in decoded], top_k=top_k,
                                              names=names)
        total_ms = (time.perf_counter() - started) * 1000
        return {
            "model": self.predictor.loaded.name,
            "features": self.predictor.loaded.features,
            "predictions": [
                {
                    "filename": p.path,
                    "sha256": p.sha256,
                    "label": p.label,
                    "probability": p.probability,
                    "top_k": [{"label": label, "probability": prob} for label, prob in p.top],
                    "timings": _timings(d.decode_ms, r.network_ms, total_ms, r.batch),
                }
                for p, d, r in zip(predictions, decoded, rows, strict=True)
            ],
        }

    async def similar_upload(self, upload: Upload, k: int, max_distance: float | None, started: float) -> dict:
        """The catalogue's photos nearest to an uploaded photo (as ``furnitype similar`` on that file: a photo the
        catalogue holds uses its row and finds itself first)."""
        sha256 = hashlib.sha256(upload.data).hexdigest()
        snapshot = self.catalogue.snapshot
        if sha256 in snapshot.rows:
            return _by_row(snapshot, sha256, k, max_distance, exclude_self=False, started=started)
        decoded = (await self._decode_all([upload]))[0]
        rows = (await self.batcher.features([decoded.image]))[0]
        assert snapshot.index is not None  # the catalogue is indexed
        neighbours = snapshot.index.search_vectors(rows.features[np.newaxis], k=k)[0]
        total_ms = (time.perf_counter() - started) * 1000
        return {
            "query": {"sha256": sha256, "in_catalogue": False, "label": None},
            "neighbours": _neighbours(neighbours, max_distance),
            "timings": _timings(decoded.decode_ms, rows.network_ms, total_ms, rows.batch),
        }

    def similar_sha256(self, sha256: str, k: int, max_distance: float | None, started: float) -> dict:
        """"More like this": the catalogue's photos nearest to one of its rows, the row itself left out."""
        snapshot = self.catalogue.snapshot
        if sha256 not in snapshot.rows:
            raise HTTPError(404, f"no photo of the catalogue has sha256 {sha256}")
        return _by_row(snapshot, sha256, k, max_distance, exclude_self=True, started=started)

    def thumbnail(self, sha256: str, size: int) -> bytes:
        """A JPEG of a photo of the catalogue or the queue."""
        for store in (self.catalogue, self.queue):
            if store is not None and sha256 in store.snapshot.rows:
                picture = store.thumbnail(sha256, size)
                if picture is not None:
                    return picture
                raise HTTPError(404, f"the photo with sha256 {sha256} is gone or changed since it was extracted")
        raise HTTPError(404, f"no photo of the catalogue or the queue has sha256 {sha256}")

    def suggest(self, n: int) -> dict:
        """The queue's photos most worth labelling (as ``furnitype suggest``), those already labelled left out."""
        if self.queue is None:
            raise HTTPError(404, "no queue of photos to label: start the server with --queue NEW.h5")
        labelled: set[str] = set()
        if self.labels is not None:
            labelled = labelled_paths(self.labels)
        result = suggest(self.run, self.queue.path, n=n, leave_out=labelled)
        return {
            "classes": self.predictor.classes,
            "photos": [
                {"sha256": s.sha256, "predicted": s.label, "probability": s.probability,
                 "score": 1.0 - s.probability}
                for s in result.suggestions
            ],
        }

    def label(self, sha256: str, label: str) -> dict:
        """Append ``path,label`` for a photo of the queue to the labels file; the count of labels saved."""
        if self.queue is None or self.labels is None:
            raise HTTPError(404, "labels are not taken: start the server with --queue NEW.h5 --labels labels.csv")
        if label not in self.predictor.classes:
            raise HTTPError(400, f"label must be one of {', '.join(self.predictor.classes)}. Received: {label!r}")
        path = self.queue.snapshot.path_of(sha256)
        if path is None:
            raise HTTPError(400, f"no photo of the queue has sha256 {sha256}")
        count = append_label(self.labels, path, label)
        return {"sha256": sha256, "label": label, "count": count}

    # -- helpers ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def admitted(self, n: int) -> Iterator[None]:
        """Hold ``n`` places of the batcher's queue while a request reads and answers its photos; 503 when
        the queue is full."""
        try:
            with self.batcher.admit(n):
                yield
        except QueueFull as err:
            raise HTTPError(503, f"busy: {err}; try again", retry_after=RETRY_AFTER_S) from err

    async def _decode_all(self, uploads: Sequence[Upload]) -> list[_Decoded]:
        """Decode the uploads in the decoding threads; 422 naming the first that is not a usable image."""
        results = await asyncio.gather(*(self.batcher.decode(self._decode, u.data) for u in uploads),
                                       return_exceptions=True)
        for upload, result in zip(uploads, results, strict=True):
            if isinstance(result, ImageDecodeError):
                raise HTTPError(422, f"{upload.filename or 'the photo'}: {result}")
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, _Decoded)]

    def _decode(self, data: bytes) -> _Decoded:
        started = time.perf_counter()
        image = self.predictor.decode(data)
        return _Decoded(hashlib.sha256(data).hexdigest(), image, (time.perf_counter() - started) * 1000)


def _by_row(snapshot: Snapshot, sha256: str, k: int, max_distance: float | None, *, exclude_self: bool,
            started: float) -> dict:
    """The neighbours of a row of the catalogue (as it was read in ``snapshot``)."""
    assert snapshot.index is not None  # the catalogue is indexed
    match = snapshot.index.search_sha256(sha256, k=k, exclude_self=exclude_self)
    total_ms = (time.perf_counter() - started) * 1000
    return {
        "query": {"sha256": sha256, "in_catalogue": True, "label": snapshot.label_of(sha256) or None},
        "neighbours": _neighbours(match.neighbours, max_distance),
        "timings": _timings(0.0, 0.0, total_ms, 0),
    }


def _neighbours(neighbours: Sequence[Neighbour], max_distance: float | None) -> list[dict]:
    return [
        {"sha256": n.sha256, "label": n.label or None, "distance": n.distance, "score": 1.0 - n.distance}
        for n in neighbours
        if max_distance is None or n.distance <= max_distance
    ]


def _timings(decode_ms: float, network_ms: float, total_ms: float, batch: int) -> dict:
    """Milliseconds: decoding the photo, the network pass it shared with ``batch`` photos in all, the request."""
    return {"decode_ms": round(decode_ms, 3), "network_ms": round(network_ms, 3), "total_ms": round(total_ms, 3),
            "batch": batch}

