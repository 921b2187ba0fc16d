"""What differs between Keras' backends (TensorFlow, JAX, PyTorch): the one module that imports a backend itself.

Everything else builds and runs networks through Keras, so furnitype runs on whichever backend ``KERAS_BACKEND``
names (TensorFlow by default), and on a machine where only that backend is installed.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import numpy as np

from furnitype.errors import FurnitypeError, InputError, SettingsMismatchError
from furnitype.keras_loader import import_keras, keras_config

log = logging.getLogger("furnitype")

DEFAULT_BACKEND = "tensorflow"
#: ``--device`` values besides ``gpu:N``: ``auto`` takes the first GPU the backend sees, else the CPU.
DEVICES = ("auto", "cpu", "gpu")
#: Features of the float32 network agree across backends and devices within this relative L2 difference per row
#: (measured: at most 6e-7 between TensorFlow, JAX and PyTorch for VGG16 on the CPU; TensorFloat-32 is turned off
#: on GPUs). bfloat16 and float16 rows differ by 4e-3 to 8e-3 between backends, and each backend draws other random
#: weights from the same seed: those rows record their backend.
FLOAT32_TOLERANCE = 1e-4


def configured_backend() -> str:
    """The backend Keras runs on, or will once imported: ``KERAS_BACKEND``, else ``keras.json``'s, else TensorFlow.

    Read as Keras reads it (``keras.src.backend.config``) without importing Keras, which takes seconds: a rerun
    with nothing new to extract decides its settings without it.
    """
    if "keras" in sys.modules:
        return str(sys.modules["keras"].config.backend())
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    return str(keras_config().get("backend", DEFAULT_BACKEND))


def depends_on_backend(precision: str, weights: str) -> bool:
    """Whether feature rows of ``precision`` and ``weights`` (a name or its recorded identity) differ between
    backends: bfloat16, float16, and random weights (``none``); not float32 rows of given weights (equal within
    ``FLOAT32_TOLERANCE``) nor int8 rows (OpenVINO runs them)."""
    random = weights.lower() == "none" or weights.startswith("none(seed=")  # not a weights file named none...
    return precision != "int8" and (precision != "float32" or random)


def rows_backend(precision: str, weights: str) -> str | None:
    """The configured backend where rows of ``precision`` and ``weights`` depend on it, else None."""
    return configured_backend() if depends_on_backend(precision, weights) else None


def check_backend(needed: str | None, what: str = "these features") -> None:
    """Refuse to make rows that must come from backend ``needed`` on another one, with what to do."""
    if needed is not None and configured_backend() != needed:
        raise SettingsMismatchError(
            f"{what} were made with Keras' {needed} backend, and their rows (bfloat16, float16 or random weights) "
            f"differ between backends; run with KERAS_BACKEND={needed} (this is {configured_backend()})."
        )


@dataclass(frozen=True)
class Device:
    """Where a network runs: Keras' device name (``cpu``, ``gpu:1``) and how messages name it."""

    keras_name: str
    label: str

    @property
    def gpu(self) -> bool:
        return self.keras_name.startswith("gpu")


#: ``cpu``, not ``cpu:0``: Keras' torch backend moves each variable made under ``cpu:0`` there, a device torch
#: counts as another than ``cpu``, and the copy is no leaf tensor, which ``model.trainable = False`` cannot freeze.
CPU = Device("cpu", "CPU")


def check_device(device: str) -> None:
    """Refuse a ``--device`` that is not ``auto``, ``cpu``, ``gpu`` or ``gpu:N`` (before anything is imported)."""
    kind, _, index = device.partition(":")
    if device not in DEVICES and not (kind == "gpu" and index.isascii() and index.isdigit()):
        raise InputError(f"device must be auto, cpu, gpu or gpu:N. Received: device={device!r}")


def resolve_device(device: str = "auto") -> Device:
    """The device ``--device`` names on this machine: ``auto`` is the first GPU the backend sees, else the CPU."""
    check_device(device)
    if device == "cpu":
        return CPU
    count = gpu_count()
    if device == "auto":
        return Device("gpu:0", "GPU 0") if count else CPU
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        sees = f"sees {count} GPU{'s' if count != 1 else ''}" if count else "sees no GPU"
        raise InputError(f"Keras' {configured_backend()} backend {sees} here; use --device cpu. "
                         f"Received: device={device!r}")
    return Device(f"gpu:{index}", f"GPU {index}")


def gpu_count() -> int:
    """GPUs the running backend can use."""
    import_keras()  # first: its import silences the backend's start-up chatter
    backend = configured_backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        try:
            return len(jax.devices("gpu"))
        except RuntimeError:  # no GPU platform in this jaxlib
            return 0
    if backend == "torch":
        import torch

        return torch.cuda.device_count()
    return 0


def full_float32() -> None:
    """Make float32 mean float32 on GPUs: the backends' default TensorFloat-32 convolutions and matrix products
    round to 10-bit mantissas (~1e-3), outside ``FLOAT32_TOLERANCE``."""
    backend = configured_backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)
    elif backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    elif backend == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is the backend saying a device has no memory left (only modules already loaded are asked)."""
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(err, tf.errors.ResourceExhaustedError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, torch.OutOfMemoryError):
        return True
    # PyTorch's CPU allocator raises a plain RuntimeError.
    if torch is not None and isinstance(err, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(err):
        return True
    # JAX raises its runtime error with XLA's status code in the message.
    return type(err).__name__ in ("XlaRuntimeError", "JaxRuntimeError") and "RESOURCE_EXHAUSTED" in str(err)


def limit_threads(threads: int) -> None:
    """Give the backend at most ``threads`` threads per operation, where it can still be told (Ray workers
    sharing a node); JAX's CPU pool is fixed at start-up and keeps its size."""
    import_keras()  # first: its import silences the backend's start-up chatter
    backend = configured_backend()
    if backend == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:  # TensorFlow already running in this process: keep its pools
            pass
    elif backend == "torch":
        import torch

        torch.set_num_threads(threads)


class Inference:
    """``infer(batch) -> float32 features``: Keras' compiled predict function of ``model`` on ``device``.

    A batch the device has no memory for is run in halves, and later batches at that size, said once per
    halving; one photo that does not fit is a ``FurnitypeError`` naming the way out.
    """

    def __init__(self, model, device: Device, what: str):
        if device.gpu:
            full_float32()
        self.model = model
        self.device = device
        self.what = what
        self.limit: int | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        keras = import_keras()
        parts, start = [], 0
        while start < len(batch):
            part = batch[start : start + (self.limit or len(batch))]
            try:
                with keras.device(self.device.keras_name):
                    parts.append(np.asarray(self.model.predict_on_batch(part), dtype=np.float32))
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                self._halve(len(part), err)
                continue
            start += len(part)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _halve(self, size: int, err: BaseException) -> None:
        if size == 1:
            advice = "use --device cpu" if self.device.gpu else "free memory"
            raise FurnitypeError(
                f"{self.device.label} ran out of memory for {self.what} on one photo; {advice}, or a smaller "
                "--image-size."
            ) from err
        self.limit = size // 2
        log.warning("%s ran out of memory at a batch of %d photos; going on with batches of %d",
                    self.device.label, size, self.limit)

