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
import functools
import logging
import math
import os
import re
import socket
import sys
from collections.abc import Iterator, Sequence

import numpy as np

from furnitype.errors import FurnitypeError, InputError, deferred_interrupts
from furnitype.extract.keras_backend import limit_threads
from furnitype.extract.pipeline import ExtractSpec, Outcome, feature_batches

RAY_MISSING = "the ray engine needs Ray: pip install 'furnitype[ray]'"
#: ``--address auto`` with no cluster on this machine.
NO_CLUSTER = "no Ray cluster runs on this machine; start one with ray start --head, or leave --address out"


def import_ray():
    """Import Ray with Ray Data and return the ``ray`` module; a one-line ``FurnitypeError`` when missing."""
    try:
        import ray
        import ray.data  # noqa: F401 - the extra furnitype[ray] installs it
    except ImportError as cause:
        raise FurnitypeError(RAY_MISSING) from cause
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
                ) from err

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

    ``threads`` decode files; the Keras backend gets as many threads per operation as the CPUs Ray reserved
    (``cpus``), so that several workers on one node do not each use every core.
    """

    def __init__(self, spec: ExtractSpec, threads: int | None, cpus: float):
        limit_threads(max(1, round(cpus)))
        self.spec = spec
        self.threads = threads
        self.infer = spec.build()
        # One image through the network: traces it now and gives the feature width for batches with no image.
        self.width = self.infer(np.zeros((1, spec.image_size, spec.image_size, 3), np.uint8)).shape[1]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        parts = feature_batches(self.spec, paths, batch_size=len(paths), workers=self.threads, infer=self.infer,
                                gpu=False)  # threads: a Ray worker decodes each batch on its own
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
    """Use the Ray this process has initialised, or connect to ``address`` (None: start a local one) and stop after.

    A cluster must answer within ``CONNECT_TIMEOUT_S`` before ``ray.init`` is called: given an address where no
    Ray listens, ``ray.init`` retries for many minutes, deaf to Ctrl-C.
    """
    ray = import_ray()
    _ray_lines_to_stderr()
    if ray.is_initialized():
        yield
        return
    # Ray's own lines (its log, its C++ core's, the workers' output) only with furnitype's progress lines (the
    # command line without -q); a failure still raises.
    quiet = not logging.getLogger("furnitype").isEnabledFor(logging.INFO)
    options = {"address": address, "logging_level": logging.CRITICAL if quiet else logging.ERROR,
               "log_to_driver": not quiet}
    if address is None:
        options["include_dashboard"] = False
    where = f"at {address}" if address else "locally"
    failure = None
    _RayLines.drop = quiet  # the raylet's error messages, which log_to_driver does not stop
    try:
        try:
            cluster = _cluster(address)
        except (ConnectionError, ValueError) as err:  # "auto" with no cluster, an address that is no address
            reason = _reason(err)
            if address == "auto" and reason.startswith("Could not find any running Ray instance"):
                reason = NO_CLUSTER  # Ray's own advice, to specify --address, is the option just given
            raise FurnitypeError(f"cannot start or reach Ray {where}: {reason}") from err
        if cluster and not _answers(cluster):
            raise FurnitypeError(_no_cluster(address, cluster))
        # Ctrl-C inside a local start would leave running the processes ray.init has started so far (ray.shutdown
        # does not know them yet): it is held back until ray.init returns, then raised, and ray.shutdown stops
        # them. Joining a cluster starts none.
        with deferred_interrupts() if cluster is None else contextlib.nullcontext(), _ray_core_log(quiet):
            try:
                ray.init(**options)
            except Exception as err:  # noqa: BLE001 - ConnectionError, ValueError, gRPC errors ...
                failure = _reason(err)
        if failure is not None:
            raise FurnitypeError(f"cannot start or reach Ray {where}: {failure}")
        yield
    finally:
        ray.shutdown()  # it waits for Ray's threads that print forwarded lines
        _RayLines.drop = False


class _RayLines:
    """The lines Ray forwards to this process, as it prints them: on stderr, none while ``drop``."""

    drop = False

    def __init__(self, print_to_stdstream):
        self.print_to_stdstream = print_to_stdstream

    def __call__(self, data: dict, ignore_prefix: bool) -> None:
        """Ray's ``print_to_stdstream``: a worker's stdout line is printed as one from its stderr."""
        if not _RayLines.drop:
            self.print_to_stdstream({**data, "is_err": True}, ignore_prefix)


def _client_line(_client, level: int, msg: str) -> None:
    """Ray Client's ``LogstreamClient.stdstream``: a worker's line, from its stdout or stderr, on stderr."""
    if not _RayLines.drop:
        print(msg, file=sys.stderr, end="")


def _ray_lines_to_stderr() -> None:
    """From now on, the lines Ray forwards to this process go to stderr: stdout is for furnitype's results
    (``--json``), and Ray prints such a line whenever one arrives while it is connected, even one about another
    driver's task.

    Ray's threads print a worker's output and the raylet's error messages (``(raylet) ...``) through
    ``ray._private.worker.print_to_stdstream``, on stdout unless the line came from stderr; ``ray.init`` binds
    that function as the handler of the workers' output. Ray Client prints through ``LogstreamClient.stdstream``.
    """
    from ray._private import worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    from ray.util.client.logsclient import LogstreamClient

    if not isinstance(worker.print_to_stdstream, _RayLines):
        worker.print_to_stdstream = _RayLines(worker.print_to_stdstream)
        LogstreamClient.stdstream = _client_line  # type: ignore[method-assign,assignment]
    lines = worker.print_to_stdstream
    dispatcher.handlers = [  # a Ray initialised before: its handler is bound to Ray's own function
        (name, functools.partial(lines, **handler.keywords))
        if isinstance(handler, functools.partial) and handler.func is lines.print_to_stdstream
        else (name, handler)
        for name, handler in dispatcher.handlers
    ]


#: Seconds a Ray cluster has to accept a connection, and then each of its answer's reads, before ``ray.init``.
CONNECT_TIMEOUT_S = 10.0
# A client's HTTP/2 connection preface and an empty SETTINGS frame: a gRPC server, as Ray's GCS and Ray Client's
# server are, answers with its own SETTINGS frame (RFC 9113, section 3.4).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS = 0x4


def _cluster(address: str | None) -> str | None:
    """``HOST:PORT`` of the cluster ``ray.init(address=address)`` would join, by Ray's own rule (``$RAY_ADDRESS``
    for None or ``auto``, then for those the cluster ``ray start`` made on this machine); None when it starts a
    local Ray, "" for a client of another protocol than ``ray://`` (not checked here)."""
    if address in (None, "auto") and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if address is not None and "://" in address:
        return address[len("ray://") :] if address.startswith("ray://") else ""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(address)  # type: ignore[arg-type]  # Ray reads None as "not given"


def _answers(cluster: str) -> bool:
    """Whether a gRPC server answers at ``HOST:PORT``, each step within ``CONNECT_TIMEOUT_S`` (with TLS: accepts
    a connection). Ctrl-C stops the wait."""
    host, _, port = cluster.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return True
            sock.sendall(_HTTP2_PREFACE)
            header = b""
            while len(header) < 9 and (chunk := sock.recv(9 - len(header))):
                header += chunk
    except (OSError, ValueError):  # refused, unreachable, timed out, no such host, no port
        return False
    return len(header) == 9 and header[3] == _SETTINGS and int.from_bytes(header[5:9], "big") & 0x7FFFFFFF == 0


def _no_cluster(address: str | None, cluster: str) -> str:
    if address is not None and address != "auto":
        return f"no Ray cluster answers at {address}: start one with 'ray start --head' or leave --address out"
    if os.environ.get("RAY_ADDRESS"):
        given = os.environ["RAY_ADDRESS"]
        return f"no Ray cluster answers at {given} ($RAY_ADDRESS): start one with 'ray start --head' or unset it"
    return (f"no Ray cluster answers at {cluster}, the cluster 'ray start' made on this machine: start it again "
            "with 'ray start --head', or forget it with 'ray stop'")


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
def _ray_core_log(quiet: bool) -> Iterator[None]:
    """With ``quiet``, Ray's C++ core in this process logs only fatal errors: it reads the level from the
    environment when ``ray.init`` starts it, and says so on stderr (file descriptor 2), muted meanwhile."""
    if not quiet:
        yield
        return
    saved = os.environ.get("RAY_BACKEND_LOG_LEVEL")
    os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
    sys.stderr.flush()
    stderr = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
        if saved is None:
            del os.environ["RAY_BACKEND_LOG_LEVEL"]
        else:
            os.environ["RAY_BACKEND_LOG_LEVEL"] = saved


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
