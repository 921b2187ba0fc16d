"""The backbone registry: name → builder of a pretrained Keras convolutional base, its input size and preprocessing.

Keras and TensorFlow are imported only when a network is built or images are preprocessed, so commands that
need no network (a rerun with nothing new, ``info``) start in well under a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from furnitype.errors import FurnitypeError, InputError, first_line
from furnitype.extract.keras_backend import (
    CPU,
    DEFAULT_BACKEND,
    Device,
    Inference,
    configured_backend,
    resolve_device,
)
from furnitype.keras_loader import import_keras

log = logging.getLogger("furnitype")

POOLINGS = ("avg", "max", "flatten")
#: Keras precisions (``mixed_*`` dtype policies); ``int8`` is OpenVINO's (``furnitype.extract.int8``).
KERAS_PRECISIONS = ("float32", "bfloat16", "float16")
PRECISIONS = (*KERAS_PRECISIONS, "int8")
#: The seed of random initialisation (``weights="none"``), so such features are reproducible.
RANDOM_INIT_SEED = 0
#: The largest input side: a network's memory grows with its square (VGG16's first layers take 256 MiB per
#: photo at 1024 px), and a received run must not be able to ask for more.
MAX_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class Backbone:
    """A convolutional base as furnitype uses it.

    Attributes
    ----------
    name : str
        Registry name (``vgg16``, ``inception``).
    keras_name : str
        Module of ``keras.applications`` holding the builder and ``preprocess_input``.
    builder : str
        The builder's name in that module.
    default_size, min_size : int
        Keras' own input size and the smallest size the network accepts.
    imagenet_file : str
        File name of the official notop weights in Keras' cache (``$KERAS_HOME/models``).
    weight_arrays, weight_parameters : int
        Arrays and numbers in the conv base's weights: a weights file is recognised by them.
    bytes_per_pixel : int
        Peak memory of inference per input pixel of one photo (float32, CPU; measured by
        ``benchmarks/memory.py``): it bounds the image size and the batch that fit in memory.
    blocks : tuple of str
        The blocks ``extract --layers`` can pool, in network order.
    block_layer : str
        The Keras layer whose output is a block's (``{}``: the block's name).
    """

    name: str
    keras_name: str
    builder: str
    default_size: int
    min_size: int
    imagenet_file: str
    weight_arrays: int
    weight_parameters: int
    bytes_per_pixel: int
    blocks: tuple[str, ...] = ()
    block_layer: str = "{}"

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        """Apply the backbone's own ``keras.applications.<module>.preprocess_input`` to float32 RGB 0-255."""
        keras = import_keras()
        module = getattr(keras.applications, self.keras_name)
        return module.preprocess_input(batch.astype(np.float32, copy=True), data_format="channels_last")


_REGISTRY: dict[str, Backbone] = {}
_ALIASES: dict[str, str] = {}


def register_backbone(backbone: Backbone, *aliases: str) -> Backbone:
    """Add a backbone (and optional alias names) to the registry."""
    _REGISTRY[backbone.name] = backbone
    for alias in aliases:
        _ALIASES[alias] = backbone.name
    return backbone


def list_backbones() -> list[str]:
    """Sorted registry names (the ``--backbone`` choices, aliases included)."""
    return sorted([*_REGISTRY, *_ALIASES])


def get_backbone(name: str) -> Backbone:
    """Look a backbone up by name or alias."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        raise InputError(f"unknown backbone {name!r}; choose one of {', '.join(list_backbones())}.")
    return _REGISTRY[key]


register_backbone(
    Backbone(
        "vgg16",
        "vgg16",
        "VGG16",
        default_size=224,
        min_size=32,
        imagenet_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        weight_arrays=26,
        weight_parameters=14_714_688,
        bytes_per_pixel=700,
        blocks=tuple(f"block{i}" for i in range(1, 6)),
        block_layer="{}_pool",  # the max-pooling that ends the block
    ),
)
register_backbone(
    Backbone(
        "inception",
        "inception_v3",
        "InceptionV3",
        default_size=299,
        min_size=75,
        imagenet_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        weight_arrays=376,
        weight_parameters=21_802_784,
        bytes_per_pixel=250,
        blocks=tuple(f"mixed{i}" for i in range(11)),
    ),
    "inception_v3",
    "inceptionv3",
)


#: ``--layers`` for the default: the backbone's own output, not normalised.
LAST_LAYER = "last"


def layer_names(backbone: Backbone, layers: str | Sequence[str] | None) -> tuple[str, ...]:
    """The blocks of ``layers`` (comma-separated, or a sequence) in network order, each once; () for the
    default (none, or ``last``). ``InputError`` naming the valid names for a name the backbone lacks."""
    names = [n.strip() for n in layers.split(",")] if isinstance(layers, str) else list(layers or ())
    if names in ([], [LAST_LAYER]):
        return ()
    unknown = [n for n in names if n not in backbone.blocks]
    if unknown:
        raise InputError(
            f"{backbone.name} has no layer {unknown[0]!r}; choose from {', '.join(backbone.blocks)} "
            f"(comma-separated), or {LAST_LAYER} (its output, the default). Received: layers={','.join(names)!r}"
        )
    return tuple(n for n in backbone.blocks if n in names)


def weights_files(*weights: str | None) -> list[str]:
    """Those of ``weights`` that name a file (not ``imagenet``, ``none`` or None): inputs no output may replace."""
    return [w for w in weights if w and w != "imagenet" and w.lower() != "none"]


def weights_identity(weights: str) -> str:
    """How the weights are recorded in a feature file: ``imagenet``, ``none(seed=0)`` or ``sha256:<hex>``."""
    if weights == "imagenet":
        return "imagenet"
    if weights.lower() == "none":
        return f"none(seed={RANDOM_INIT_SEED})"
    try:  # non-blocking, so that a FIFO does not wait for a writer: only a regular file is read
        fd = os.open(weights, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as cause:
        raise InputError(f"weights file not found: {weights}. Received: weights={weights!r}") from cause
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"weights {weights} is not a regular file. Received: weights={weights!r}")
        digest = hashlib.sha256()
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def weights_stamp(weights: str) -> tuple[int, int, int] | None:
    """What tells a weights file on disk apart from its replacement (inode, size, mtime); None for a name."""
    try:
        found = os.stat(weights)
    except OSError:
        return None
    return found.st_ino, found.st_size, found.st_mtime_ns


def check_options(backbone: Backbone, *, weights: str, pooling: str, image_size: int, precision: str) -> None:
    """Validate options before anything is built; an ``InputError`` whose message ends with ``Received: ...``."""
    if pooling not in POOLINGS:
        raise InputError(f"pooling must be one of {', '.join(POOLINGS)}. Received: pooling={pooling!r}")
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}. Received: precision={precision!r}")
    if image_size < backbone.min_size:
        raise InputError(
            f"{backbone.name} needs an input of at least {backbone.min_size} px. Received: image_size={image_size}"
        )
    if image_size > MAX_IMAGE_SIZE:
        raise InputError(
            f"image size must be at most {MAX_IMAGE_SIZE} px (a network's memory grows with its square). "
            f"Received: image_size={image_size}"
        )
    if weights == "imagenet" or weights.lower() == "none":
        return
    if not Path(weights).is_file():
        raise InputError(f"weights must be imagenet, none or an existing file. Received: weights={weights!r}")
    check_weights_file(backbone, weights)


def check_weights_file(backbone: Backbone, path: str | os.PathLike) -> None:
    """Refuse a weights file that cannot hold the conv base of ``backbone``, saying what it seems to hold.

    The file is recognised by its arrays and their sizes (Keras 3 ``.weights.h5`` and the older ``.h5`` layout
    alike), before TensorFlow is imported.
    """
    arrays, parameters = _weights_file_counts(path)
    if (arrays, parameters) == (backbone.weight_arrays, backbone.weight_parameters):
        return
    if arrays == 0:
        holds = "no weights"
    else:
        same = [b.name for b in _REGISTRY.values() if (b.weight_arrays, b.weight_parameters) == (arrays, parameters)]
        plural = "s" if arrays != 1 else ""
        holds = f"{same[0]} conv-base weights" if same else f"{arrays:,} array{plural} of {parameters:,} numbers"
    raise InputError(
        f"{path} does not hold {backbone.name} conv-base weights ({backbone.weight_arrays:,} arrays of "
        f"{backbone.weight_parameters:,} numbers): it holds {holds}."
    )


def _weights_file_counts(path: str | os.PathLike) -> tuple[int, int]:
    """Arrays and numbers in an HDF5 weights file; ``InputError`` when it is not one."""
    import h5py

    counts = [0, 0]

    def count(_name: str, item) -> None:
        if isinstance(item, h5py.Dataset) and item.shape:
            counts[0] += 1
            counts[1] += int(np.prod(item.shape))

    try:
        with h5py.File(path, "r") as h5:
            h5.visititems(count)
    except OSError as err:
        raise InputError(f"{path} is not a Keras weights file (HDF5): {first_line(err)}.") from err
    return counts[0], counts[1]


def check_memory(backbone: Backbone, image_size: int, batch_size: int = 1) -> None:
    """Refuse an image size (and batch) whose inference cannot fit in this machine's memory, with the reason.

    The need is ``bytes_per_pixel`` of the backbone plus the decoded and preprocessed copies of each photo,
    times the photos of a batch; what this machine has is its available memory (``MemAvailable``).
    """
    per_photo = image_size * image_size * (backbone.bytes_per_pixel + _COPY_BYTES_PER_PIXEL)
    available = available_memory()
    if per_photo > available:
        largest = int((available / (backbone.bytes_per_pixel + _COPY_BYTES_PER_PIXEL)) ** 0.5)
        raise InputError(
            f"image_size={image_size} does not fit: {backbone.name} needs about {_size(per_photo)} of memory for "
            f"one photo of that size, and this machine has {_size(available)} available; the largest that fits "
            f"is about {largest} px."
        )
    if per_photo * batch_size > available:
        raise InputError(
            f"a batch of {batch_size} photos of {image_size} px does not fit: {backbone.name} needs about "
            f"{_size(per_photo * batch_size)} of memory for it, and this machine has {_size(available)} "
            f"available; use a batch size of at most {available // per_photo}, or a smaller image size."
        )


#: Memory per input pixel of each photo besides the network's: the decoded uint8 image in the read-ahead
#: window (three batches), and the float32 batch before and after preprocessing.
_COPY_BYTES_PER_PIXEL = 3 * 3 + 2 * 12


def available_memory() -> int:
    """Bytes of memory this process can still get: ``MemAvailable`` (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _size(n: float) -> str:
    """``n`` bytes in decimal units: ``9.4 GB``."""
    exponent = min(max(int(np.log10(max(n, 1)) // 3), 1), 4)
    return f"{n / 1000**exponent:,.1f} {('KB', 'MB', 'GB', 'TB')[exponent - 1]}"


def build_model(
    backbone: Backbone,
    *,
    weights: str,
    pooling: str,
    image_size: int,
    precision: str = "float32",
    layers: Sequence[str] = (),
    device: str = "auto",
) -> Callable[[np.ndarray], np.ndarray]:
    """Build the convolutional base and return ``infer(preprocessed_batch) -> float32 features``.

    ``infer`` (``keras_backend.Inference``) runs Keras' compiled predict function on ``device`` (``auto``: the first
    GPU, else the CPU; ``cpu``; ``gpu`` or ``gpu:N``), halving a batch the device has no memory for.

    ``weights`` is ``"imagenet"`` (Keras' own download and cache), ``"none"`` (random, seeded) or a file path.
    ``precision`` ``bfloat16``/``float16`` builds the network under Keras' ``mixed_*`` dtype policy. ``layers``
    (``layer_names``): those blocks' outputs, each pooled and L2-normalised, concatenated (one pass for all).
    """
    check_options(backbone, weights=weights, pooling=pooling, image_size=image_size, precision=precision)
    on = resolve_device(device)  # checks the name too
    model = keras_model(
        backbone, weights=weights, pooling=pooling, image_size=image_size, precision=precision, layers=layers,
        device=on,
    )
    return Inference(model, on, f"{backbone.name} at {image_size} px")


def keras_model(
    backbone: Backbone,
    *,
    weights: str,
    pooling: str,
    image_size: int,
    precision: str = "float32",
    layers: Sequence[str] = (),
    device: Device = CPU,
):
    """The Keras convolutional base, for inference, with its pooling (``flatten``: a ``Flatten`` layer), its
    output float32 whatever the precision, built on ``device``; with ``layers``, one output: those blocks pooled,
    each L2-normalised, concatenated."""
    check_options(backbone, weights=weights, pooling=pooling, image_size=image_size, precision=precision)
    layers = layer_names(backbone, layers)
    if precision not in KERAS_PRECISIONS:
        raise FurnitypeError(f"{precision} networks are built by furnitype.extract.int8, not Keras.")
    check_memory(backbone, image_size)
    backend = configured_backend()
    log.info("loading %s (%s weights) on %s%s ...", backbone.name, _weights_name(weights), device.label,
             "" if backend == DEFAULT_BACKEND else f" with {backend}")
    # Keras' own output (download progress) goes to stderr, on lines of its own above any progress bar.
    with tqdm.external_write_mode(file=sys.stderr), contextlib.redirect_stdout(sys.stderr):
        keras = import_keras()
        builder = getattr(getattr(keras.applications, backbone.keras_name), backbone.builder)
        keras_weights = None if weights.lower() == "none" else weights
        previous_policy, previous_floatx = keras.config.dtype_policy(), keras.config.floatx()
        previous_format = keras.config.image_data_format()
        try:
            # Stated, not inherited: keras.json's floatx (or a notebook's policy) would make float32 rows float16,
            # and its channels_first would read a photo's rows as its channels.
            keras.config.set_floatx("float32")
            keras.config.set_image_data_format("channels_last")
            keras.config.set_dtype_policy("float32" if precision == "float32" else f"mixed_{precision}")
            if keras_weights is None:  # seeds every framework installed (TensorFlow too): only where it counts
                keras.utils.set_random_seed(RANDOM_INIT_SEED)
            with warnings.catch_warnings(), keras.device(device.keras_name):
                # A file that does not fit warns once per layer before failing: the error says it in one line.
                warnings.simplefilter("ignore")
                base = builder(
                    include_top=False,
                    weights=keras_weights,
                    input_shape=(image_size, image_size, 3),
                    pooling=None if pooling == "flatten" or layers else pooling,
                )
                if layers:
                    outputs = _pooled_blocks(keras, base, backbone, layers, pooling)
                else:
                    outputs = keras.layers.Flatten()(base.output) if pooling == "flatten" else base.output
                    # Cast inside the network, as Keras' mixed-precision guide does with its last layer.
                    outputs = keras.layers.Activation("linear", dtype="float32", name="float32_output")(outputs)
                model = keras.Model(base.input, outputs, name=f"{backbone.name}_{pooling}")
        except Exception as err:  # noqa: BLE001 - Keras raises many types for a download or a bad file
            raise _weights_error(backbone, weights, err) from err
        finally:
            keras.config.set_floatx(previous_floatx)
            keras.config.set_image_data_format(previous_format)
            keras.config.set_dtype_policy(previous_policy)
    return model


def _pooled_blocks(keras, base, backbone: Backbone, layers: Sequence[str], pooling: str):
    """The named blocks' outputs of ``base``, each pooled and L2-normalised, concatenated (float32)."""
    pool = {
        "avg": keras.layers.GlobalAveragePooling2D,
        "max": keras.layers.GlobalMaxPooling2D,
        "flatten": keras.layers.Flatten,
    }[pooling]
    parts = [
        keras.layers.UnitNormalization(dtype="float32")(pool()(base.get_layer(backbone.block_layer.format(name)).output))
        for name in layers
    ]
    return parts[0] if len(parts) == 1 else keras.layers.Concatenate(dtype="float32")(parts)


def _weights_name(weights: str) -> str:
    if weights.lower() == "none":
        return "random"
    return weights if weights == "imagenet" else os.path.basename(weights)


def _weights_error(backbone: Backbone, weights: str, err: Exception) -> FurnitypeError:
    reason = first_line(err).rstrip(":")
    if weights == "imagenet":
        cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
        return FurnitypeError(
            f"could not get the ImageNet weights for {backbone.name} ({reason}); what works offline: "
            f"--weights PATH (a weights file, or the official {backbone.imagenet_file} put into {cache}), "
            "or --weights none (random weights)."
        )
    return InputError(f"could not load {backbone.name} weights from {weights} ({reason}).")
