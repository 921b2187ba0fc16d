"""The HDF5 feature store: one row per image file, keyed by the sha256 of the file's bytes.

Rows are appended in place, in crash-safe transactions (``undo.py``), and removed by clearing ``live``;
``compact`` (or an extraction that leaves more than a quarter of the rows dead) writes the live rows into a new
file beside the store and renames it over. Readers hold a shared lock while they read, so they see only
committed rows. The format is in ``layout.py``; reading in ``view.py``; writing in ``writing.py``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from furnitype.errors import InputError, SettingsMismatchError, StoreError
from furnitype.features.layout import (
    BLOCK_ROWS,
    DEFAULTED_SETTING_KEYS,
    OPTIONAL_SETTING_KEYS,
    SETTING_KEYS,
    STAT_UNKNOWN,
    Folders,
    Layout,
)
from furnitype.features.locking import WriterLock, real_path
from furnitype.features.undo import undo_path
from furnitype.features.view import StoreView, open_store, recover, remove_leftovers
from furnitype.features.writing import StoreWriteError, copy_live, new_file, writable
from furnitype.outputs import data_frame

__all__ = [
    "FeatureSet",
    "SettingsMismatchError",
    "StoreError",
    "StoreWriteError",
    "check_settings",
    "compact",
    "load",
    "read_meta",
    "rows_by_sha256",
    "save",
    "settings_of",
    "short_id",
    "short_ids",
    "store_files",
    "summary",
]


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
        return settings_of(self.meta)

    def to_frame(self, *, features: bool = False):
        """The rows as a pandas DataFrame: ``path``, ``label``, ``sha256`` (and with ``features``, one column per
        feature, ``f0`` ...); ``frame.attrs`` holds ``settings``, ``meta``, ``file`` and ``skipped``. Needs pandas
        (``pip install 'furnitype[pandas]'``)."""
        columns: dict = {"path": self.paths, "label": self.labels, "sha256": self.sha256}
        if features:
            columns.update({f"f{j}": self.features[:, j] for j in range(self.features.shape[1])})
        attrs = {"settings": self.settings, "meta": dict(self.meta), "file": self.file, "skipped": list(self.skipped)}
        return data_frame(columns, attrs=attrs)


def load(path: str | os.PathLike) -> FeatureSet:
    """Read a feature file written by ``furnitype extract``.

    Parameters
    ----------
    path : str or path-like
        The HDF5 feature file.

    Returns
    -------
    FeatureSet
        The live rows, sorted by path; features as float32 whatever the stored dtype.
    """
    with open_store(path) as view:
        rows = view.live("rows")
        paths = view.column("rows", "path", rows)
        order = np.argsort(paths, kind="stable")
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        features = np.empty((len(rows), view.dim), np.float32)
        for start in range(0, len(rows), BLOCK_ROWS):
            block = rows[start : start + BLOCK_ROWS]
            features[position[start : start + len(block)]] = view.column("rows", "features", block)
        labels = view.column("rows", "label", rows)[order]
        sha256 = view.column("rows", "sha256", rows)[order].astype(str)
        skipped = _skipped(view)
        meta = view.meta
    paths = np.array(paths[order].tolist(), dtype=str)
    labels = np.array(labels.tolist(), dtype=str)
    classes = sorted({label for label in labels.tolist() if label})
    return FeatureSet(features, paths, labels, sha256, classes, skipped, meta, str(path))


def store_files(path: str | os.PathLike) -> list[Path]:
    """The files of the store at ``path``: it, and beside its real path its journal and writer lock
    (``FILE.undo``, ``FILE.lock``). An output must be none of them: a file written over the journal makes the
    store unreadable (``refuse_inputs``)."""
    real = real_path(path)
    return [Path(path), undo_path(real), WriterLock(real).path]


def rows_by_sha256(path: str | os.PathLike, sha256: Collection[str]) -> tuple[dict[str, np.ndarray], dict]:
    """The features of the live rows whose content is one of ``sha256`` (one row per content), and the file's
    settings and provenance; only those rows' features are read."""
    wanted = np.array(sorted(set(sha256)), dtype="S64")
    with open_store(path) as view:  # its reads say which damage they meet
        rows = view.live("rows")
        stored = view.column("rows", "sha256", rows)
        held = np.isin(stored, wanted)
        index = rows[held]
        digests = stored[held]
        features = view.column("rows", "features", index) if len(index) else np.zeros((0, view.dim), np.float32)
        meta = view.meta
    found = {digest.decode(): features[k] for k, digest in enumerate(digests.tolist())}
    return found, meta


def _skipped(view: StoreView) -> list[tuple[str, str]]:
    """The live skips as sorted ``(path, reason)`` pairs."""
    skips = view.live("skipped")
    paths = view.column("skipped", "path", skips).tolist()
    return sorted(zip(paths, view.column("skipped", "reason", skips).tolist(), strict=True))


def settings_of(meta: Mapping) -> dict:
    """The subset of a store's ``meta`` that decides feature values (``FeatureSet.settings``)."""
    return {key: meta.get(key) for key in SETTING_KEYS if key in meta or key not in OPTIONAL_SETTING_KEYS}


def read_meta(path: str | os.PathLike) -> dict:
    """Read only the settings and provenance of a feature file (fast: no features are loaded).

    ``n_rows`` is the number of rows (live rows: removed rows waiting for compaction are not counted).
    """
    with open_store(path) as view:
        return view.meta


def summary(path: str | os.PathLike) -> dict:
    """Counts of a feature file without loading its features (what ``furnitype info`` shows).

    Returns ``{"rows", "dead_rows", "feature_dim", "format", "bytes", "classes": {name: count}, "meta",
    "skipped": [(path, reason)]}``.
    """
    with open_store(path) as view:
        skipped = _skipped(view)
        classes = view.label_counts()  # from the rows: the label_counts attribute is for other readers
        return {
            "rows": view.meta["n_rows"],
            "dead_rows": view.dead_rows,
            "feature_dim": view.dim,
            "format": view.format,
            "bytes": os.path.getsize(view.file),
            "classes": dict(sorted(classes.items())),
            "meta": view.meta,
            "skipped": skipped,
        }


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
    """Write a complete feature file (beside it, then renamed over it), under the writer lock.

    ``skipped`` holds ``(path, sha256, reason)`` triples; ``meta["store_dtype"]`` (default float32) is the
    dtype of /features. Rows are written in the order given, in blocks (``features`` may be any array-like with
    ``shape`` and slicing, such as a memory map), as given (``extract`` itself never stores a row that is not
    finite: it records the file as skipped). What each file was when hashed is not known: the first ``extract``
    over these files hashes them once.

    Raises ``ValueError`` for features that are not finite numbers (NaN or infinity): no nearest neighbour or
    classifier can use them.
    """
    given = path
    features = features if hasattr(features, "shape") else np.asarray(features, dtype=np.float32)
    if len(features.shape) != 2:
        raise ValueError(f"features must be 2-D (rows, features). Received: shape={features.shape}")
    n_rows, dim = features.shape
    if not (len(paths) == len(labels) == len(sha256) == n_rows):
        raise ValueError("features, paths, labels and sha256 must have the same number of rows.")
    store_dtype = meta.get("store_dtype", "float32")
    real = writable(given)
    with WriterLock(real, given):
        recover(real, given)
        remove_leftovers(real)
        with new_file(real, given, rows_before=_rows_now(real)) as (h5, interrupts):
            layout = Layout(h5)
            layout.create(dim=dim, store_dtype=store_dtype, meta=meta)
            folders = Folders()
            for start in range(0, n_rows, BLOCK_ROWS):
                if interrupts:
                    raise KeyboardInterrupt
                stop = min(start + BLOCK_ROWS, n_rows)
                block = np.asarray(features[start:stop], dtype=np.float32)
                with np.errstate(over="ignore"):  # a float16 overflow is refused below
                    stored = block.astype(store_dtype)
                if not np.isfinite(stored).all():
                    row = start + int(np.flatnonzero(~np.isfinite(stored).all(axis=1))[0])
                    as_stored = f" as {store_dtype}" if np.isfinite(block).all() else ""
                    raise ValueError(
                        f"features must be finite numbers{as_stored}: row {row} ({paths[row]}) holds NaN or infinity."
                    )
                block_paths = [str(p) for p in paths[start:stop]]
                layout.append(
                    "rows",
                    features=stored,
                    sha256=np.array([str(s) for s in sha256[start:stop]], dtype="S64"),
                    path=block_paths,
                    label=[str(label) for label in labels[start:stop]],
                    live=np.ones(stop - start, np.uint8),
                    stat=np.tile(STAT_UNKNOWN, (stop - start, 1)),
                    folder=folders.ids(block_paths),
                )
            if skipped:
                skip_paths = [str(s[0]) for s in skipped]
                layout.append(
                    "skipped",
                    path=skip_paths,
                    sha256=np.array([s[1] for s in skipped], dtype="S64"),
                    reason=[str(s[2]) for s in skipped],
                    label=[""] * len(skipped),
                    live=np.ones(len(skipped), np.uint8),
                    stat=np.tile(STAT_UNKNOWN, (len(skipped), 1)),
                    folder=folders.ids(skip_paths),
                )
            layout.write_folders(folders.new())
            layout.set_counts(
                live_rows=n_rows, live_skipped=len(skipped), label_counts=Counter(str(x) for x in labels)
            )


@dataclass(frozen=True)
class CompactResult:
    """What ``compact`` did: rows kept, dead rows and skips dropped, file size before and after."""

    rows: int
    dropped: int
    bytes_before: int
    bytes_after: int


def compact(path: str | os.PathLike) -> CompactResult:
    """Rewrite a feature file with only its live rows (beside it, then renamed over it), under the writer lock.

    Also upgrades a format-1 file to format 2, and gives back the space that in-place appends leave unused.
    """
    if not os.path.lexists(real_path(path)):
        raise InputError(f"feature file not found: {path}")
    real = writable(path)
    with WriterLock(real, path):
        recover(real, path)
        remove_leftovers(real)
        if not os.path.lexists(real):
            raise InputError(f"feature file not found: {path}")
        return compact_locked(real, path)


def compact_locked(real: Path, given: str | os.PathLike) -> CompactResult:
    """``compact`` for a caller that holds the writer lock."""
    before = os.path.getsize(real)
    with open_store(real, given=given, check_undo=False) as view:
        dropped = view.dead_rows + view.dead_skipped
        rows = view.meta["n_rows"]
    with new_file(real, given, rows_before=rows) as (h5, interrupts):
        with open_store(real, given=given, check_undo=False) as view:  # closed before the rename
            copy_live(view, Layout(h5), interrupts)
    return CompactResult(rows, dropped, before, os.path.getsize(real))


def check_settings(existing: Mapping, wanted: Mapping, file: str | os.PathLike) -> None:
    """Raise ``SettingsMismatchError`` naming every setting where ``existing`` differs from ``wanted``.

    The message names the options (``--weights PATH``) that make rows like ``existing``'s, and what
    ``--overwrite`` would throw away. ``wanted`` may carry ``weights_source`` (the weights file given).
    """
    differing = [
        k
        for k in SETTING_KEYS
        if (k in wanted or k in DEFAULTED_SETTING_KEYS) and str(existing.get(k)) != str(wanted.get(k))
    ]
    if not differing:
        return
    had = ", ".join(_as_option(k, existing) for k in differing)
    asked = ", ".join(_as_option(k, wanted) for k in differing)
    options = [k for k in differing if k not in ("quantization", "backend")]
    advice = "pass those options (or leave them out)" if len(options) > 1 else "pass that option (or leave it out)"
    if "quantization" in differing:
        advice = f"{advice}, without --calibrate," if options else "leave --calibrate out"
    if "backend" in differing:  # bfloat16/float16 rows differ between Keras backends
        backend = f"run with KERAS_BACKEND={existing.get('backend', 'tensorflow')}"
        advice = f"{advice} and {backend}" if options or "quantization" in differing else backend
    rows = existing.get("n_rows")
    lost = f"its {rows:,} rows are thrown away" if isinstance(rows, int) else "its rows are thrown away"
    raise SettingsMismatchError(
        f"{file} was made with {had}, but this run asks for {asked}: {advice} to add to it, use another --out "
        f"for a new store, or --overwrite to replace it ({lost})."
    )


def _as_option(key: str, settings: Mapping) -> str:
    """A setting as the ``extract`` option that gives it: ``--weights /data/vgg.weights.h5 (sha256:a9f137547068…)``."""
    value = str(settings.get(key))
    if key == "quantization":
        calibration = value.partition("calibration=")[2].split(" (")[0]
        photos = value.partition(" (")[2].partition(")")[0]
        return f"the int8 calibration {short_id(calibration)} ({photos})"
    if key == "backend":  # not an option: the environment's choice of Keras backend
        return f"Keras' {settings.get(key, 'tensorflow')} backend"
    option = f"--{key.replace('_', '-')}"
    if key in DEFAULTED_SETTING_KEYS:
        return f"no {option}" if key not in settings else option if key == "mirror" else f"{option} {value}"
    if key == "weights" and value.startswith("sha256:"):
        source = settings.get("weights_source")
        named = source if source and source not in ("imagenet", "none") else "PATH"
        return f"{option} {named} ({short_id(value)})"
    if key == "weights" and value.startswith("none"):
        return f"{option} none"
    return f"{option} {value}"


def short_id(identity: str) -> str:
    """``sha256:a9f137547068…`` (12 hex digits), or the identity as it is."""
    return f"{identity[:19]}…" if identity.startswith("sha256:") else identity


def short_ids(text: str) -> str:
    """``text`` with every ``sha256:<64 hex digits>`` cut to 12 digits (``sha256:a9f137547068…``)."""
    return re.sub(r"(sha256:[0-9a-f]{12})[0-9a-f]{52}", r"\1…", text)


def _rows_now(real: Path) -> int:
    """Rows of the store being replaced (0 when there is none or it cannot be read), for messages."""
    try:
        with open_store(real, check_undo=False) as view:
            return view.meta["n_rows"]
    except (StoreError, InputError):
        return 0

