"""The ray engine: feature extraction on a pool of Ray actors (Ray Data ``map_batches``).

The driver keeps the listing, the hashing, the cache and the store; it sends Ray only the paths whose content
the store lacks. Each actor builds the network once (``ExtractSpec.build``) and runs the local engine's own
per-batch code (``feature_batches``: read, hash, decode, infer) on one batch of paths at a time; each batch comes
back as one block and the driver commits it to the store (one transaction) before taking the next, so a killed
driver resumes at batch granularity. Workers read the photos (and a weights file) by path: on a cluster every
node must see them at the same path (a shared file system); a worker that reads other bytes than the driver
hashed is caught by the sha256 check and the file is skipped ("changed while being read").
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np

from furnitype.errors import FurnitypeError, InputError, deferred_interrupts
from furnitype.extract.pipeline import ExtractSpec, Outcome, feature_batches
from furnitype.keras_loader import import_keras

RAY_MISSING = "the ray engine needs Ray: pip install 'furnitype[ray]'"
#: ``--address auto`` with no cluster on this machine.
NO_CLUSTER = "no Ray cluster runs on this machine; start one with ray start --head, or leave --address out"


def import_ray():
    """Import Ray with Ray Data and return the ``ray`` module; a one-line ``FurnitypeError`` when missing."""
    try:
        import ray
        import ray.data  # noqa: F401 - the extra furnitype[ray] installs it
    except ImportError:
        raise FurnitypeError(RAY_MISSING) from None
    return ray


class RayEngine:
    """Compute feature batches on Ray actors, each holding one network.

    Parameters
    ----------
    address : str, default=None
        The cluster: ``auto`` (the one ``ray start`` made on this machine), ``HOST:PORT`` or
        ``ray://HOST:PORT`` (Ray Client). None connects to ``$RAY_ADDRESS`` if set, else starts a local Ray for
        the call. A Ray already initialised in this process (a notebook, a test) is used as it is.
    workers : int, default=None
        Actors; None gives as many as the cluster's GPUs (with ``gpus_per_worker``) or CPUs allow.
    gpus_per_worker : float, default=0
        GPUs reserved per actor (a fraction lets several actors share one GPU).
    cpus_per_worker : float, default=1
        CPUs reserved per actor.
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        workers: int | None = None,
        gpus_per_worker: float = 0.0,
        cpus_per_worker: float = 1.0,
    ):
        if workers is not None and workers < 1:
            raise InputError(f"ray workers must be at least 1. Received: workers={workers}")
        if gpus_per_worker < 0:
            raise InputError(f"gpus per worker must be 0 or more. Received: gpus_per_worker={gpus_per_worker}")
        if cpus_per_worker <= 0:
            raise InputError(f"cpus per worker must be more than 0. Received: cpus_per_worker={cpus_per_worker}")
        import_ray()
        self.address = address
        self.workers = workers
        self.gpus_per_worker = float(gpus_per_worker)
        self.cpus_per_worker = float(cpus_per_worker)

    def __call__(
        self, spec: ExtractSpec, paths: Sequence[str], *, batch_size: int = 32, workers: int | None = None
    ) -> Iterator[list[Outcome]]:
        """Yield one list of ``Outcome`` per batch of up to ``batch_size`` paths, in the order Ray finishes them.

        ``workers`` is the number of decoding threads inside each actor (None: up to 4), as for the local engine.
        Nothing is started for no paths.
        """
        if not paths:
            return
        ray = import_ray()
        if os.path.isfile(spec.weights):  # workers may run elsewhere than this folder
            spec = dataclasses.replace(spec, weights=os.path.abspath(spec.weights))
        batches = math.ceil(len(paths) / batch_size)
        with connected(self.address), _quiet_ray_data(ray):
            dataset = ray.data.from_items([{"path": str(p)} for p in paths], override_num_blocks=batches).map_batches(
                _Worker,
                fn_constructor_kwargs={"spec": spec, "threads": workers, "cpus": self.cpus_per_worker},
                batch_size=batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=min(batches, self.workers or self._default_workers(ray))),
                num_cpus=self.cpus_per_worker,
                num_gpus=self.gpus_per_worker,
            )
            try:
                for block in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    yield _outcomes(block)
            except ray.exceptions.RayError as err:
                raise FurnitypeError(
                    f"the ray engine failed ({_reason(err)}); the batches done so far are kept: rerun to resume."
                ) from None

    def _default_workers(self, ray) -> int:
        resources = ray.cluster_resources()
        if self.gpus_per_worker:
            count = int(resources.get("GPU", 0) // self.gpus_per_worker)
            if count < 1:
                raise FurnitypeError(
                    f"the Ray cluster has {resources.get('GPU', 0):g} GPUs, fewer than gpus_per_worker="
                    f"{self.gpus_per_worker:g}; give the number of workers to wait for GPUs an autoscaler adds."
                )
            return count
        return max(1, int(resources.get("CPU", 1) // self.cpus_per_worker))


class _Worker:
    """One Ray actor: builds the network once, then runs the local engine's per-batch code on each batch.

    ``threads`` decode files; TensorFlow gets as many threads per operation as the CPUs Ray reserved (``cpus``),
    so that several workers on one node do not each use every core.
    """

    def __init__(self, spec: ExtractSpec, threads: int | None, cpus: float):
        import_keras()
        import tensorflow as tf

        with contextlib.suppress(RuntimeError):  # TensorFlow already running in this process: keep its pools
            tf.config.threading.set_intra_op_parallelism_threads(max(1, round(cpus)))
        self.spec = spec
        self.threads = threads
        self.infer = spec.build()
        # One image through the network: traces it now and gives the feature width for batches with no image.
        self.width = self.infer(np.zeros((1, spec.image_size, spec.image_size, 3), np.uint8)).shape[1]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        parts = feature_batches(self.spec, paths, batch_size=len(paths), workers=self.threads, infer=self.infer)
        outcomes = [outcome for part in parts for outcome in part]
        features = np.zeros((len(outcomes), self.width), np.float32)
        for row, outcome in enumerate(outcomes):
            if not outcome.reason:
                features[row] = outcome.features
        return {
            "path": np.array([o.path for o in outcomes], dtype=object),
            "sha256": np.array([o.sha256 for o in outcomes], dtype=object),
            "reason": np.array([o.reason for o in outcomes], dtype=object),
            "features": features,
        }


def _outcomes(block: dict[str, np.ndarray]) -> list[Outcome]:
    """A returned block as ``Outcome`` objects (features copied out of Ray's object store)."""
    features = np.array(block["features"], dtype=np.float32)
    return [
        Outcome(str(path), str(sha256), None if reason else features[row], str(reason))
        for row, (path, sha256, reason) in enumerate(zip(block["path"], block["sha256"], block["reason"], strict=True))
    ]


@contextlib.contextmanager
def connected(address: str | None = None) -> Iterator[None]:
    """Use the Ray this process has initialised, or connect to ``address`` (None: start a local one) and stop after."""
    ray = import_ray()
    if ray.is_initialized():
        yield
        return
    options = {"address": address, "logging_level": logging.ERROR}
    if address is None:
        options["include_dashboard"] = False
    # Ctrl-C inside ray.init would leave running the processes it has started so far (ray.shutdown does not know
    # them yet): it is held back until ray.init returns, then raised, and ray.shutdown stops them.
    failure = None
    try:
        with deferred_interrupts():
            try:
                ray.init(**options)
            except Exception as err:  # noqa: BLE001 - ConnectionError, ValueError, gRPC errors ...
                failure = _reason(err)
        if failure is not None:
            if address == "auto" and failure.startswith("Could not find any running Ray instance"):
                failure = NO_CLUSTER  # Ray's own advice, to specify --address, is the option just given
            where = f"at {address}" if address else "locally"
            raise FurnitypeError(f"cannot start or reach Ray {where}: {failure}")
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def joblib_on_ray(address: str | None = None) -> Iterator[None]:
    """Send ``joblib.Parallel`` tasks to Ray (``ray.util.joblib``), using every CPU of the cluster."""
    import joblib

    import_ray()
    from ray.util.joblib import register_ray

    with connected(address):
        register_ray()
        with joblib.parallel_backend("ray"):
            yield


@contextlib.contextmanager
def _quiet_ray_data(ray) -> Iterator[None]:
    """No Ray Data progress bars or log lines (its failures still raise): the caller shows its own progress."""
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars
    logger = logging.getLogger("ray.data")
    level = logger.level
    context.enable_progress_bars = False
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        context.enable_progress_bars = saved
        logger.setLevel(level)


def _reason(err: BaseException) -> str:
    """One line for a Ray error: the worker's own exception (its traceback's last line) when Ray passes it on."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", getattr(err, "error_msg", None) or str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt): ", line)]
    if raised:
        return re.sub(r"^[\w.]*\.(?=\w+: )", "", raised[-1], count=1)
    return lines[0] if lines else type(err).__name__
