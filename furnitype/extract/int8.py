"""int8 inference (``--precision int8``): the backbone quantized after training by NNCF and run by OpenVINO.

The quantized network is made once from the float32 Keras network (preprocessing included, so it takes the
decoded uint8 photos) and a calibration set of the user's own photos, then cached on disk: one zip file per
(backbone, weights identity, pooling, image size, interpolation, decoding, calibration photos) under
``int8_cache_dir()``. A cache file is trusted only when it reads back whole and its hash is the one expected;
anything else is rebuilt. Reading the cache needs neither TensorFlow nor NNCF.

A ``Quantization`` names a quantized network: its calibration photos (path and sha256 of each, in order) and
the sha256 of the network itself. Feature files record it, so rows of different quantizations are never mixed
and ``predict`` runs exactly the same network (from the cache, or rebuilt from the same photos).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import logging
import os
import re
import stat
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from furnitype.errors import FurnitypeError, InputError
from furnitype.extract.backbones import get_backbone, keras_model, weights_identity, weights_stamp
from furnitype.extract.images import ImageDecodeError
from furnitype.keras_loader import import_keras
from furnitype.outputs import write_replacing

if TYPE_CHECKING:
    from furnitype.extract.pipeline import ExtractSpec

log = logging.getLogger("furnitype")
INSTALL = "pip install 'furnitype[int8]'"
#: Photos in a calibration sample: more did not bring the features closer to float32 (see docs/benchmarks.md).
CALIBRATION_PHOTOS = 64
MIN_CALIBRATION_PHOTOS = 32
CALIBRATION_SEED = 0
#: CPU flags of int8 dot-product instructions; without them int8 is no faster than bfloat16 (docs/benchmarks.md).
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class Quantization:
    """Which quantized network: made from ``photos`` (``(path, sha256)`` pairs, in order), hashed ``network``.

    ``network`` is "" until the network has been built or found in the cache (``prepare``).
    """

    photos: tuple[tuple[str, str], ...]
    network: str = ""

    @property
    def calibration(self) -> str:
        """``sha256:<hex>`` of the calibration photos' contents, in order (their paths do not count)."""
        return "sha256:" + hashlib.sha256("\n".join(sha for _, sha in self.photos).encode()).hexdigest()

    def describe(self) -> str:
        """The recorded setting: ``openvino-nncf calibration=sha256:... (64 photos) network=sha256:...``."""
        return f"openvino-nncf calibration={self.calibration} ({len(self.photos)} photos) network={self.network}"

    def photos_json(self) -> str:
        """The calibration photos as recorded beside the setting: JSON ``[[path, sha256], ...]``."""
        return json.dumps([list(pair) for pair in self.photos])

    @classmethod
    def parse(cls, described: str, photos_json: str) -> Quantization:
        """The ``Quantization`` recorded as ``describe()`` and ``photos_json()``; ``ValueError`` if they disagree."""
        network = re.search(r"network=(sha256:[0-9a-f]{64})", described)
        calibration = re.search(r"calibration=(sha256:[0-9a-f]{64})", described)
        photos = tuple((str(path), str(sha)) for path, sha in json.loads(photos_json))
        quantization = cls(photos, network.group(1) if network else "")
        if not network or not calibration or calibration.group(1) != quantization.calibration:
            raise ValueError("the recorded int8 quantization and its calibration photos do not match")
        return quantization


def int8_cache_dir() -> Path:
    """Where quantized networks are cached: ``$FURNITYPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/furnitype``, else
    ``~/.cache/furnitype``; then ``int8/``."""
    root = os.environ.get("FURNITYPE_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "furnitype"
    )
    return Path(root) / "int8"


def check_cache_dir() -> None:
    """Refuse a cache folder that cannot be one (it, or a path above it, is a file) before any work: found out
    only when the quantized network is written, it would cost the quantization. A read-only cache is fine while
    it holds the network."""
    cache = int8_cache_dir()
    above = cache
    while not os.path.lexists(above) and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise InputError(
            f"the int8 network cache {cache} cannot be made: {above} is not a folder; set FURNITYPE_CACHE_DIR to "
            "a folder."
        )


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo``; None where the system does not say (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


def check_cpu(flags: set[str] | None) -> None:
    """Refuse int8 on a CPU without int8 dot-product instructions (VNNI), saying why; None (unknown) passes."""
    if flags is None or flags & set(VNNI_FLAGS):
        return
    raise FurnitypeError(
        "--precision int8 needs a CPU with VNNI (avx512_vnni, avx_vnni or amx_int8), which this one lacks: "
        "without it int8 takes 2x (AVX-512) to 4x (AVX2) the time per photo, no faster than bfloat16 or "
        "float32; use --precision bfloat16 or float32."
    )


def import_runtime():
    """Import OpenVINO; return the module. A one-line ``FurnitypeError`` when missing or unloadable."""
    try:
        import openvino
    except ImportError as err:
        if err.name and err.name.split(".")[0] == "openvino":
            raise FurnitypeError(f"--precision int8 needs OpenVINO and NNCF: {INSTALL}") from err
        raise FurnitypeError(f"OpenVINO cannot load ({_reason(err)}); reinstall it: {INSTALL}") from err
    except Exception as err:  # noqa: BLE001 - a broken native library raises OSError, RuntimeError ...
        raise FurnitypeError(f"OpenVINO cannot load ({_reason(err)}); reinstall it: {INSTALL}") from err
    return openvino


def _import_nncf():
    # NNCF reports usage to its maker unless it believes it runs in CI; furnitype's users did not agree to that.
    os.environ.setdefault("NNCF_CI", "1")
    try:
        import nncf
    except ImportError as cause:
        raise FurnitypeError(f"--precision int8 needs NNCF to quantize the network: {INSTALL}") from cause
    nncf.set_log_level(40)  # logging.ERROR: its INFO lines go to stdout, where --json prints
    return nncf


def choose_photos(spec: ExtractSpec, paths: Sequence[str], source: str) -> tuple[tuple[str, str], ...]:
    """A fixed, seeded sample of up to ``CALIBRATION_PHOTOS`` usable photos of ``paths`` (distinct contents).

    Raises
    ------
    InputError
        Fewer than ``MIN_CALIBRATION_PHOTOS`` usable photos; ``source`` says where they came from.
    """
    ordered = sorted(set(paths))
    chosen: dict[str, str] = {}
    for index in np.random.default_rng(CALIBRATION_SEED).permutation(len(ordered)):
        try:
            sha256, _ = spec.load(ordered[index])
        except ImageDecodeError:
            continue
        chosen.setdefault(sha256, ordered[index])
        if len(chosen) == CALIBRATION_PHOTOS:
            break
    if len(chosen) < MIN_CALIBRATION_PHOTOS:
        raise InputError(
            f"int8 calibration needs at least {MIN_CALIBRATION_PHOTOS} usable photos, found {len(chosen)} in "
            f"{source}; give --calibrate FOLDER with more photos like yours, or use --precision bfloat16."
        )
    return tuple((path, sha) for sha, path in chosen.items())


def prepare(spec: ExtractSpec) -> ExtractSpec:
    """``spec`` with its quantized network's hash, building the network (or finding it in the cache) now."""
    network, _, _ = _network_files(spec)
    return replace(spec, quantization=replace(quantization_of(spec), network=network))


def quantization_of(spec: ExtractSpec) -> Quantization:
    """The quantization an int8 ``spec`` names (a spec of another precision names none: a ``ValueError``)."""
    if spec.quantization is None:
        raise ValueError(f"this {spec.precision} spec names no quantized network")
    return spec.quantization


def build(spec: ExtractSpec) -> Callable[[np.ndarray], np.ndarray]:
    """The quantized network of ``spec``: ``infer(uint8 batch (n, s, s, 3)) -> float32 features (n, d)``."""
    ov = import_runtime()
    _, xml, weights = _network_files(spec)
    try:
        core = ov.Core()
        # The layers left unquantized run in float32, so features do not depend on the CPU having bfloat16.
        # Throughput streams: each stream runs whole networks on its own threads, so no thread waits (spinning)
        # for another to finish a layer while decoding threads or other processes hold a core.
        compiled = core.compile_model(
            core.read_model(xml, weights),
            "CPU",
            {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"},
        )
        streams = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        requests = [compiled.create_infer_request() for _ in range(streams)]
    except Exception as err:  # noqa: BLE001 - OpenVINO raises RuntimeError with a multi-line report
        raise FurnitypeError(f"OpenVINO cannot run the int8 network on this CPU: {_reason(err)}") from err

    def infer(batch: np.ndarray) -> np.ndarray:
        # A part of the batch per stream, run at the same time; a photo's features do not depend on its part.
        parts = np.array_split(batch, min(len(requests), len(batch)))
        running = requests[: len(parts)]
        for request, part in zip(running, parts, strict=True):
            # share_inputs: the request reads the caller's array (kept alive until wait) instead of a copy.
            request.start_async({0: part}, share_inputs=True)
        for request in running:
            request.wait()
        # concatenate copies: the requests' output buffers are reused by the next batch.
        return np.concatenate([request.get_output_tensor(0).data for request in running], dtype=np.float32)

    return infer


def _network_files(spec: ExtractSpec) -> tuple[str, bytes, bytes]:
    """``(sha256:<hex>, IR xml, IR weights)`` of the quantized network: from the cache, else built and cached."""
    check_cpu(cpu_flags())
    import_runtime()
    quantization = spec.quantization
    if quantization is None or not quantization.photos:
        raise FurnitypeError("--precision int8 needs calibration photos (furnitype.extract.settings).")
    unnamed = replace(spec, quantization=replace(quantization, network=""))
    path, network = _last_network(unnamed, weights_stamp(spec.weights), str(int8_cache_dir()))
    if quantization.network not in ("", network[0]):
        raise FurnitypeError(
            f"the int8 network made from the calibration photos is {network[0][:19]}…, not the recorded "
            f"{quantization.network[:19]}… (made by another OpenVINO/NNCF version?); put back the cache file "
            f"{path} it was made with, or extract the photos again with --overwrite."
        )
    return network


@functools.lru_cache(maxsize=1)
def _last_network(spec: ExtractSpec, stamp: tuple | None, cache: str) -> tuple[Path, tuple]:
    """The cache file's path and the network: the one last found or built in this process (verified bytes), so
    repeated ``extract`` calls in one process hash the weights file and read the cache file once."""
    made_from = _made_from(spec)
    key = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()
    path = Path(cache) / f"{spec.backbone}-{key[:32]}.zip"
    network = _read_cache(path, made_from)
    if network is None:
        network = _quantize(spec)
        _write_cache(path, made_from, *network)
    return path, network


def _made_from(spec: ExtractSpec) -> dict:
    return {
        "format": _CACHE_FORMAT,
        "backbone": spec.backbone,
        "weights": weights_identity(spec.weights),
        "pooling": spec.pooling,
        "image_size": spec.image_size,
        "interpolation": spec.interpolation,
        "decode": spec.decode,
        "calibration": [sha for _, sha in quantization_of(spec).photos],
    }


def _network_hash(xml: bytes, weights: bytes) -> str:
    digest = hashlib.sha256(len(xml).to_bytes(8, "little"))
    digest.update(xml)
    digest.update(weights)
    return f"sha256:{digest.hexdigest()}"


def _read_cache(path: Path, made_from: dict) -> tuple[str, bytes, bytes] | None:
    """The cached network when the file is a regular file that reads back whole and is what it says; else None."""
    try:
        # O_NONBLOCK: opening a FIFO in the cache's place must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return None
            data = fh.read()
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            manifest = json.loads(archive.read("manifest.json"))
            xml, weights = archive.read("network.xml"), archive.read("network.bin")
    # zipfile raises RuntimeError for an encrypted member, NotImplementedError for an unknown compression
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError, EOFError, zipfile.BadZipFile,
            zipfile.LargeZipFile):
        return None  # damaged or foreign: rebuilt, never trusted
    network = _network_hash(xml, weights)
    if not isinstance(manifest, dict) or manifest.get("made_from") != made_from or manifest.get("network") != network:
        return None
    return network, xml, weights


def _write_cache(path: Path, made_from: dict, network: str, xml: bytes, weights: bytes) -> None:
    """Write the cache file beside its place, fsync, rename over (a reader sees the old file or the new one)."""
    versions = {name: _version(name) for name in ("openvino", "nncf", "keras", "tensorflow")}
    manifest = {"made_from": made_from, "network": network, "versions": versions}
    buffer = io.BytesIO()
    members = {"manifest.json": json.dumps(manifest, indent=1, sort_keys=True).encode(), "network.xml": xml,
               "network.bin": weights}
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():  # a fixed date: the same network gives the same file
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_replacing(path, buffer.getbuffer())
    except OSError as err:
        fix = "free space there or set" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "set"
        raise FurnitypeError(
            f"cannot write the int8 network cache {path}: {err.strerror or err}; {fix} FURNITYPE_CACHE_DIR to "
            "another folder."
        ) from err


def _quantize(spec: ExtractSpec) -> tuple[str, bytes, bytes]:
    """Quantize the float32 Keras network (with its preprocessing) on the calibration photos; IR bytes."""
    ov = import_runtime()
    nncf = _import_nncf()
    images = [_calibration_image(spec, path, sha) for path, sha in quantization_of(spec).photos]
    backbone = get_backbone(spec.backbone)
    keras = import_keras()
    if keras.config.backend() != "tensorflow":
        raise InputError(
            f"making the int8 network converts Keras' TensorFlow graph, and this is Keras on "
            f"{keras.config.backend()}: run this extract once with KERAS_BACKEND=tensorflow (the int8 network is "
            "then cached and runs on any backend), or choose --precision bfloat16."
        )
    import tensorflow as tf

    model = keras_model(backbone, weights=spec.weights, pooling=spec.pooling, image_size=spec.image_size)
    preprocess = getattr(keras.applications, backbone.keras_name).preprocess_input
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve",
        lambda batch: model(preprocess(tf.cast(batch, tf.float32), data_format="channels_last"), training=False),
        input_signature=[tf.TensorSpec((None, spec.image_size, spec.image_size, 3), tf.uint8)],
    )
    with tempfile.TemporaryDirectory(prefix="furnitype-int8-") as tmp:
        archive.write_out(os.path.join(tmp, "saved_model"), verbose=False)
        float_model = ov.Core().read_model(os.path.join(tmp, "saved_model"))
        log.info("quantizing %s to int8 on %d calibration photos (NNCF; once, then cached) ...",
                 spec.backbone, len(images))
        # NNCF draws progress bars on stdout, where --json prints: they go to stderr when furnitype's progress
        # shows (the command line without -q) and stderr is a terminal, else nowhere.
        shown = logging.getLogger("furnitype").isEnabledFor(logging.INFO) and sys.stderr.isatty()
        with contextlib.redirect_stdout(sys.stderr if shown else io.StringIO()):
            quantized = nncf.quantize(
                float_model, nncf.Dataset([image[None] for image in images]), subset_size=len(images)
            )
        # Node names come from process-wide counters; numbered in graph order, equal networks hash equal.
        for index, op in enumerate(quantized.get_ordered_ops()):
            op.set_friendly_name(f"n{index}")
        ov.save_model(quantized, os.path.join(tmp, "network.xml"), compress_to_fp16=False)
        xml = Path(tmp, "network.xml").read_bytes()
        weights = Path(tmp, "network.bin").read_bytes()
    return _network_hash(xml, weights), xml, weights


def _calibration_image(spec: ExtractSpec, path: str, sha256: str) -> np.ndarray:
    try:
        found, image = spec.load(path)
    except ImageDecodeError as err:
        raise _calibration_gone(path, f"unusable ({err})") from err
    if found != sha256:
        raise _calibration_gone(path, "changed")
    return image


def _calibration_gone(path: str, state: str) -> InputError:
    return InputError(
        f"int8 calibration photo {path} is {state}: the quantized network cannot be made again "
        "as recorded; put the photo back, or extract the photos again with --overwrite."
    )


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _reason(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
