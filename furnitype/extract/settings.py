"""The settings that decide a feature row's value, both ways: options to ``ExtractSpec`` + recorded settings
(``resolve_settings``, ``recorded_settings``, for ``extract``), and recorded settings back to the
``ExtractSpec`` that made them (``spec_for``, for ``predict`` and ``similar``).

A feature file records these settings (``furnitype.features.SETTING_KEYS``), and a run records its training
file's; ``spec_for`` refuses weights whose identity (sha256 of the file, ``imagenet`` or ``none(seed=0)``) is not
the recorded one. With ``precision="int8"`` a file also records its quantized network (``quantization``: the
calibration photos' and the network's hashes) and, beside it, the calibration photos (``calibration_photos``),
so ``spec_for`` names exactly the same network (``calibrated`` makes it for ``extract``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from numbers import Integral
from pathlib import Path

import numpy as np

from furnitype.errors import FurnitypeError, InputError, SettingsMismatchError, StoreError
from furnitype.extract import int8
from furnitype.extract.backbones import LAST_LAYER, check_options, get_backbone, layer_names, weights_identity
from furnitype.extract.images import DECODE_MODES, check_interpolation, list_images
from furnitype.extract.keras_backend import (
    DEFAULT_BACKEND,
    check_backend,
    check_device,
    depends_on_backend,
    rows_backend,
)
from furnitype.extract.pipeline import ExtractSpec
from furnitype.features.layout import OPTIONAL_SETTING_KEYS, SETTING_KEYS
from furnitype.features.store import read_meta, short_id
from furnitype.keras_loader import BACKENDS

STORE_DTYPES = ("float32", "float16")
#: The settings an ``extract`` option gives (the int8 quantization comes from the calibration photos).
STORED_OPTIONS = (
    "backbone",
    "weights",
    "pooling",
    "image_size",
    "precision",
    "interpolation",
    "decode",
    "store_dtype",
    "layers",
    "mirror",
)
#: How a feature file records ``mirror=True`` (a file made without mirror averaging records no ``mirror``).
MIRRORED = "yes"


def resolve_settings(
    backbone: str,
    weights: str,
    pooling: str,
    image_size: int | None,
    precision: str,
    store_dtype: str,
    interpolation: str,
    decode: str,
    layers: str | Sequence[str] | None = None,
    mirror: bool | str | None = None,
) -> tuple[ExtractSpec, dict]:
    """Check extraction options; return the ``ExtractSpec`` and the settings a feature file records.

    ``layers``: comma-separated block names (or a sequence; None or ``last``: the network's output); ``mirror``:
    True (or the recorded ``yes``) averages each photo's features with its left-right mirror's.
    """
    entry = get_backbone(backbone)
    spec = ExtractSpec(
        entry.name,
        str(weights),
        pooling,
        image_size or entry.default_size,
        interpolation,
        precision,
        decode,
        layers=layer_names(entry, layers),
        mirror=mirror in (True, MIRRORED),
        backend=rows_backend(precision, str(weights)),
    )
    return spec, recorded_settings(spec, store_dtype)


def recorded_settings(spec: ExtractSpec, store_dtype: str) -> dict:
    """Check a spec (and the store dtype) before any work; return the settings a feature file records."""
    entry = get_backbone(spec.backbone)
    check_options(
        entry, weights=spec.weights, pooling=spec.pooling, image_size=spec.image_size, precision=spec.precision
    )
    check_interpolation(spec.interpolation)
    if spec.decode not in DECODE_MODES:
        raise InputError(f"decode must be one of {', '.join(DECODE_MODES)}. Received: decode={spec.decode!r}")
    if store_dtype not in STORE_DTYPES:
        raise InputError(f"store dtype must be one of {', '.join(STORE_DTYPES)}. Received: {store_dtype!r}")
    layers = layer_names(entry, spec.layers)
    if layers != tuple(spec.layers):
        raise InputError(f"layers must be in network order, each once: {', '.join(layers)}. Received: {spec.layers}")
    check_layers_precision(spec)
    backend = spec.backend or rows_backend(spec.precision, spec.weights)
    if spec.precision == "int8":  # before listing and hashing: fail fast on a CPU or an install that cannot run it
        int8.check_cpu(int8.cpu_flags())
        int8.import_runtime()
        int8.check_cache_dir()
    return {
        "backbone": entry.name,
        "weights": weights_identity(spec.weights),
        "pooling": spec.pooling,
        "image_size": spec.image_size,
        "interpolation": spec.interpolation,
        "precision": spec.precision,
        "decode": spec.decode,
        "store_dtype": store_dtype,
        **({"layers": ",".join(layers)} if layers else {}),
        **({"mirror": MIRRORED} if spec.mirror else {}),
        **({"backend": backend} if backend not in (None, DEFAULT_BACKEND) else {}),
    }


def check_layers_precision(spec: ExtractSpec) -> None:
    """Refuse ``layers`` or ``mirror`` with int8: its quantized network has the backbone's one output."""
    if spec.precision == "int8" and (spec.layers or spec.mirror):
        raise InputError(
            "--layers and --mirror are for the Keras precisions (float32, bfloat16, float16), not int8. "
            f"Received: layers={','.join(spec.layers) or LAST_LAYER}, mirror={spec.mirror}"
        )


def stored_options(meta: Mapping, given: Mapping, *, what: str) -> dict:
    """``extract``'s options for rows like a feature file's: ``given`` (options the user gave, not None), and for
    every other setting the one ``meta`` (the file's settings) records (the image size and a weights file only
    for the same backbone); the weights file by its recorded path.

    Raises ``InputError`` when the recorded weights file is gone and no weights were given.
    """
    options = {key: meta[key] for key in STORED_OPTIONS if key not in given and meta.get(key) not in (None, "")}
    if "backbone" in given and get_backbone(str(given["backbone"])).name != meta.get("backbone"):
        options.pop("image_size", None)  # another backbone: its own default size and layers, not the other one's,
        options.pop("layers", None)
        if str(options.get("weights", "")).startswith("sha256:"):  # nor the other one's weights file
            del options["weights"]
    if "image_size" in options:
        options["image_size"] = int(options["image_size"])
    if "weights" in options:
        options["weights"] = _recorded_weights(str(options["weights"]), meta.get("weights_source"), what)
    return {**options, **given}


def calibrated(
    spec: ExtractSpec,
    settings: Mapping,
    listed: Sequence[str],
    *,
    calibrate: str | os.PathLike | None = None,
    store: str | os.PathLike | None = None,
) -> tuple[ExtractSpec, dict]:
    """For ``precision="int8"``: the spec and settings naming the quantized network, made (or found) now.

    The calibration photos are ``calibrate``'s (a folder, or image files), else those of the int8 feature file
    ``store`` when it was made with the same other settings (so a store grows with the same network), else a
    fixed, seeded sample of ``listed``.
    """
    recorded = _recorded_quantization(store, settings) if calibrate is None else None
    if recorded is not None:
        quantization = recorded
    elif calibrate is not None:
        folder = [f.path for f in list_images([calibrate]).files]
        quantization = int8.Quantization(int8.choose_photos(spec, folder, f"--calibrate {calibrate}"))
    else:
        quantization = int8.Quantization(int8.choose_photos(spec, listed, "the listed photos"))
    spec = int8.prepare(replace(spec, quantization=quantization))
    prepared = int8.quantization_of(spec)
    return spec, {
        **settings,
        "quantization": prepared.describe(),
        "calibration_photos": prepared.photos_json(),
    }


def _recorded_quantization(store: str | os.PathLike | None, settings: Mapping) -> int8.Quantization | None:
    """The quantization an int8 feature file records, when its other settings are ``settings``."""
    if store is None or not Path(store).is_file():
        return None
    try:
        meta = read_meta(store)
        if any(str(meta.get(key)) != str(value) for key, value in settings.items() if key in SETTING_KEYS):
            return None
        return int8.Quantization.parse(str(meta["quantization"]), str(meta["calibration_photos"]))
    except (StoreError, InputError, KeyError, ValueError, TypeError):
        return None  # not an int8 file of these settings, or damaged: extract reports it when it opens it


def spec_for(
    settings: Mapping,
    *,
    weights: str | None = None,
    source: str | None = None,
    calibration_photos: str | None = None,
    what: str = "the features",
    device: str = "auto",
) -> ExtractSpec:
    """The ``ExtractSpec`` that made features with ``settings``, using checked weights.

    Parameters
    ----------
    settings : mapping
        ``backbone``, ``weights`` (the identity), ``pooling``, ``image_size``, ``interpolation``, ``precision``,
        ``decode`` and ``store_dtype``, and ``layers`` and ``mirror`` when not the default, as a feature file
        records them.
    weights : str, default=None
        The weights to build the network with (a file, ``imagenet`` or ``none``); None: ``source`` when the
        identity is a file's sha256, else the identity's own name.
    source : str, default=None
        Where the weights file was when the features were made (the feature file's ``weights_source``).
    calibration_photos : str, default=None
        For int8 features: the feature file's ``calibration_photos``, to make the quantized network again when
        it is not in the cache.
    what : str, default="the features"
        How error messages name the features (``"run runs/x's features"``).
    device : str, default="auto"
        Where the network will run (``ExtractSpec.device``).

    Raises
    ------
    SettingsMismatchError
        The weights are not the recorded ones, or the settings are incomplete or unknown to this furnitype.
    InputError
        The recorded weights file is gone and no ``weights`` were given, or ``weights`` is not a file.
    """
    optional = [k for k in OPTIONAL_SETTING_KEYS if not (k == "quantization" and settings.get("precision") == "int8")]
    check_device(device)
    missing = [key for key in SETTING_KEYS if key not in optional and settings.get(key) in (None, "")]
    if missing:
        raise SettingsMismatchError(f"{what} record no {', '.join(missing)}; cannot extract new photos the same way.")
    identity = str(settings["weights"])
    chosen = str(weights) if weights is not None else _recorded_weights(identity, source, what)
    try:
        backbone = get_backbone(str(settings["backbone"]))
        image_size = settings["image_size"]
        if not isinstance(image_size, Integral) or isinstance(image_size, (bool, np.bool_)):
            raise ValueError(f"image_size={image_size!r} is not a whole number of pixels")
        image_size = int(image_size)
        check_options(
            backbone,
            weights="none",
            pooling=str(settings["pooling"]),
            image_size=image_size,
            precision=str(settings["precision"]),
        )
        check_interpolation(str(settings["interpolation"]))
        if settings["decode"] not in DECODE_MODES or settings["store_dtype"] not in STORE_DTYPES:
            raise FurnitypeError(f"decode={settings['decode']}, store_dtype={settings['store_dtype']}")
        recorded_layers = settings.get("layers")
        layers = layer_names(backbone, recorded_layers) if recorded_layers is not None else ()
        if recorded_layers is not None and ",".join(layers) != recorded_layers:
            raise ValueError(f"layers={recorded_layers!r} is not a list of {backbone.name} blocks in network order")
        if settings.get("mirror") not in (None, MIRRORED):
            raise ValueError(f"mirror={settings['mirror']!r} is not {MIRRORED}")
        if str(settings["precision"]) == "int8" and (layers or settings.get("mirror")):
            raise ValueError("int8 features with layers or mirror")
        backend = settings.get("backend")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    except (FurnitypeError, ValueError) as err:
        raise SettingsMismatchError(f"{what} were made with settings this furnitype cannot reproduce: {err}") from err
    depends = depends_on_backend(str(settings["precision"]), identity)
    backend = str(settings.get("backend", DEFAULT_BACKEND)) if depends else None
    check_backend(backend, what)
    got = weights_identity(chosen)
    if got != identity:
        raise SettingsMismatchError(
            f"weights {chosen} are {short_id(got)}, but {what} were made with {short_id(identity)}; "
            "pass --weights with the weights they were made with."
        )
    quantization = None
    if settings["precision"] == "int8":
        int8.check_cache_dir()
        try:
            quantization = int8.Quantization.parse(str(settings["quantization"]), str(calibration_photos))
        except (ValueError, TypeError) as cause:
            raise SettingsMismatchError(
                f"{what} record no usable int8 calibration photos; cannot make their quantized network again."
            ) from cause
    return ExtractSpec(
        backbone.name,
        chosen,
        str(settings["pooling"]),
        image_size,
        str(settings["interpolation"]),
        str(settings["precision"]),
        str(settings["decode"]),
        quantization,
        layers,
        settings.get("mirror") == MIRRORED,
        backend,
        device,
    )


def as_stored(features: np.ndarray, store_dtype: str) -> np.ndarray:
    """Features as a store of ``store_dtype`` gives them back (float16 stores round each value)."""
    return np.asarray(features, dtype=store_dtype).astype(np.float32)


def _recorded_weights(identity: str, source: str | None, what: str) -> str:
    if identity == "imagenet" or identity.startswith("none"):
        return "imagenet" if identity == "imagenet" else "none"
    if source and source not in ("imagenet", "none") and Path(source).is_file():
        return source
    where = f"the weights file {source}" if source else "a weights file"
    raise InputError(
        f"{what} were made with {where} ({short_id(identity)}), which is not there any more; "
        "pass --weights PATH to a copy of it."
    )
