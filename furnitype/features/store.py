"""The HDF5 feature store: one row per image file, keyed by the sha256 of the file's bytes.

Layout (format 1), readable with plain h5py or pandas::

    /features   float32 or float16 (N, D), chunked by rows, gzip-compressed
    /sha256     fixed-length ASCII (N,), hex digest of the file's bytes
    /path       UTF-8 (N,), absolute path of the file when it was extracted
    /label      UTF-8 (N,), class name ("" when unlabelled)
    /classes    UTF-8 (C,), the sorted distinct non-empty labels
    /skipped/path, /skipped/sha256, /skipped/reason   UTF-8 (S,), files that could not be used
    attributes  the settings that made the rows (backbone, weights, pooling, ...) and provenance

Rows are sorted by path. The file is only ever replaced whole (written beside, then renamed), so a reader
never sees a half-written row; a running extraction keeps its progress in a journal (see journal.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from furnitype.errors import InputError, SettingsMismatchError, StoreError

__all__ = ["FeatureSet", "SettingsMismatchError", "StoreError", "check_settings", "load", "read_meta", "save"]

FORMAT_VERSION = 1
#: Settings that decide a feature's value: rows made with different values are never mixed.
SETTING_KEYS = (
    "backbone",
    "weights",
    "pooling",
    "image_size",
    "interpolation",
    "precision",
    "decode",
    "store_dtype",
    "quantization",
)
#: Settings that only some files record (int8 stores: their quantized network); absent from ``settings`` else.
OPTIONAL_SETTING_KEYS = ("quantization",)
_STR = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class FeatureSet:
    """The contents of a feature file, as arrays aligned by row.

    Attributes
    ----------
    features : ndarray of shape (n_rows, n_features), float32
    paths, labels, sha256 : ndarray of str, shape (n_rows,)
        Absolute file paths, class names ("" when unlabelled) and hex content digests.
    classes : list of str
        Sorted distinct non-empty labels.
    skipped : list of (path, reason)
        Files that could not be used, with the reason.
    meta : dict
        Settings (see ``SETTING_KEYS``) and provenance (versions, creation time, feature_dim).
    file : str
        The HDF5 file these rows were read from ("" when not from a file).
    """

    features: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    sha256: np.ndarray
    classes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    file: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def settings(self) -> dict:
        """The subset of ``meta`` that decides feature values."""
        return {key: self.meta.get(key) for key in SETTING_KEYS if key in self.meta or key not in OPTIONAL_SETTING_KEYS}


def load(path: str | os.PathLike) -> FeatureSet:
    """Read a feature file written by ``furnitype extract``.

    Parameters
    ----------
    path : str or path-like
        The HDF5 feature file.

    Returns
    -------
    FeatureSet
        Features as float32 whatever the stored dtype.
    """
    path = Path(path)
    with _open_for_reading(path) as h5:
        meta = _read_meta(h5, path)
        features = np.asarray(h5["features"][...], dtype=np.float32)
        paths = _strings(h5["path"])
        labels = _strings(h5["label"])
        sha256 = np.array([s.decode("ascii") for s in h5["sha256"][...]], dtype=str)
        classes = _strings(h5["classes"]).tolist()
        skipped_paths = _strings(h5["skipped/path"]).tolist()
        skipped = list(zip(skipped_paths, _strings(h5["skipped/reason"]).tolist(), strict=True))
    if not (len(features) == len(paths) == len(labels) == len(sha256)):
        raise StoreError(f"{path} is damaged: its datasets have different row counts.")
    return FeatureSet(features, paths, labels, sha256, classes, skipped, meta, str(path))


def read_meta(path: str | os.PathLike) -> dict:
    """Read only the settings and provenance of a feature file (fast: no features are loaded)."""
    path = Path(path)
    with _open_for_reading(path) as h5:
        return _read_meta(h5, path)


def save(
    path: str | os.PathLike,
    *,
    features: np.ndarray,
    paths: Sequence[str],
    labels: Sequence[str],
    sha256: Sequence[str],
    skipped: Sequence[tuple[str, str, str]] = (),
    meta: Mapping,
) -> None:
    """Write a complete feature file atomically (beside it, then renamed over it).

    ``skipped`` holds ``(path, sha256, reason)`` triples; ``meta["store_dtype"]`` (default float32) is the
    dtype of /features. Rows are written in the order given.
    """
    path = Path(path)
    features = np.asarray(features, dtype=np.float32)
    store_dtype = meta.get("store_dtype", "float32")
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (rows, features). Received: shape={features.shape}")
    n_rows, dim = features.shape
    if not (len(paths) == len(labels) == len(sha256) == n_rows):
        raise ValueError("features, paths, labels and sha256 must have the same number of rows.")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as h5:
            rows_per_chunk = max(1, min(max(n_rows, 1), _CHUNK_BYTES // max(4 * dim, 1)))
            h5.create_dataset(
                "features",
                data=features.astype(store_dtype),
                maxshape=(None, dim),
                chunks=(rows_per_chunk, max(dim, 1)) if dim else None,
                compression="gzip",
                compression_opts=1,
                shuffle=True,
            )
            h5.create_dataset("sha256", data=np.array(list(sha256), dtype="S64"), maxshape=(None,))
            h5.create_dataset("path", data=list(paths), dtype=_STR, maxshape=(None,))
            h5.create_dataset("label", data=list(labels), dtype=_STR, maxshape=(None,))
            h5.create_dataset("classes", data=sorted({lab for lab in labels if lab}), dtype=_STR)
            group = h5.create_group("skipped")
            for i, name in enumerate(("path", "sha256", "reason")):
                group.create_dataset(name, data=[s[i] for s in skipped], dtype=_STR, maxshape=(None,))
            for key, value in meta.items():
                h5.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
            h5.attrs["furnitype_format"] = FORMAT_VERSION
            h5.attrs["feature_dim"] = dim
        os.replace(tmp, path)
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def check_settings(existing: Mapping, wanted: Mapping, file: str | os.PathLike) -> None:
    """Raise ``SettingsMismatchError`` naming every setting where ``existing`` differs from ``wanted``."""
    differing = [k for k in SETTING_KEYS if k in wanted and str(existing.get(k)) != str(wanted[k])]
    if differing:
        had = ", ".join(f"{k}={existing.get(k)}" for k in differing)
        asked = ", ".join(f"{k}={wanted[k]}" for k in differing)
        raise SettingsMismatchError(
            f"{file} was made with {had}, but this run asks for {asked}; "
            "use another --out, or --overwrite to replace it."
        )


def _open_for_reading(path: Path) -> h5py.File:
    if not path.exists():
        raise InputError(f"feature file not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise StoreError(f"{path} is not a readable HDF5 feature file ({_first_line(err)}).") from None


def _read_meta(h5: h5py.File, path: Path) -> dict:
    if "furnitype_format" not in h5.attrs or "features" not in h5:
        raise StoreError(f"{path} is not a furnitype feature file (no furnitype_format attribute).")
    if int(h5.attrs["furnitype_format"]) > FORMAT_VERSION:
        raise StoreError(f"{path} was written by a newer furnitype (format {h5.attrs['furnitype_format']}).")
    meta = {key: _plain(value) for key, value in h5.attrs.items()}
    meta["n_rows"] = int(h5["features"].shape[0])
    return meta


def _plain(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _strings(dataset: h5py.Dataset) -> np.ndarray:
    return np.array(dataset.asstr()[...], dtype=str) if len(dataset) else np.array([], dtype=str)


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__
