"""``extract``: list images, hash them, compute only the features the store lacks, keep everything."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm

from furnitype import __version__
from furnitype.engines import batch_source
from furnitype.errors import InputError
from furnitype.extract.backbones import get_backbone
from furnitype.extract.images import ImageFile, list_images, sha256_file
from furnitype.extract.pipeline import ExtractSpec, Outcome
from furnitype.extract.settings import calibrated, resolve_settings
from furnitype.features import store
from furnitype.features.journal import Journal, Row, Skip


@dataclass(frozen=True)
class ExtractResult:
    """What one ``extract`` call did.

    Attributes
    ----------
    out : str
        The feature file.
    listed, extracted, reused, skipped : int
        Files listed; rows computed by the network now; rows taken from the cache (same content seen before,
        in the store, an interrupted run's journal or a duplicate in this listing); files that could not be used.
    removed : int
        Rows dropped because their file is no longer in a listed folder.
    rows : int
        Rows in the store now.
    seconds : float
        Wall time of the whole call.
    """

    out: str
    listed: int
    extracted: int
    reused: int
    skipped: int
    removed: int
    rows: int
    seconds: float

    def summary(self) -> str:
        """One line: ``2,655 extracted, 2 skipped (see: furnitype info FILE)``."""
        parts = [f"{self.extracted:,} extracted"]
        if self.reused:
            parts.append(f"{self.reused:,} reused from the cache")
        if self.removed:
            parts.append(f"{self.removed:,} removed (no longer on disk)")
        line = ", ".join(parts) + f", {self.skipped:,} skipped"
        hint = f"see: furnitype info {self.out}" if self.skipped else f"{self.out}, {self.seconds:.1f} s"
        return f"{line} ({hint})"

    def as_dict(self) -> dict:
        return asdict(self)


def extract(
    inputs: Sequence[str | os.PathLike],
    *,
    backbone: str = "vgg16",
    weights: str = "imagenet",
    pooling: str = "avg",
    image_size: int | None = None,
    batch_size: int = 32,
    precision: str = "float32",
    store_dtype: str = "float32",
    interpolation: str = "bilinear",
    decode: str = "exact",
    calibrate: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    ray_workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
) -> ExtractResult:
    """Extract pooled convolutional features of images into an HDF5 feature store (the cache).

    Parameters
    ----------
    inputs : sequence of path
        Folders (one subfolder per class, or unlabelled photos) and/or image files.
    backbone : str, default="vgg16"
        ``vgg16`` or ``inception`` (InceptionV3).
    weights : str, default="imagenet"
        ``imagenet``, ``none`` (random, seeded) or the path of a Keras weights file.
    pooling : {"avg", "max", "flatten"}, default="avg"
    image_size : int, default=None
        Square input side; None keeps Keras' size (224 for VGG16, 299 for InceptionV3).
    batch_size : int, default=32
    precision : {"float32", "bfloat16", "float16", "int8"}, default="float32"
        Compute precision (Keras mixed precision; ``int8``: OpenVINO, needs ``furnitype[int8]``); rows are
        stored as ``store_dtype``.
    store_dtype : {"float32", "float16"}, default="float32"
    interpolation : str, default="bilinear"
        Resize filter, as ``keras.utils.load_img`` names them.
    decode : {"exact", "draft"}, default="exact"
        ``draft`` lets the JPEG decoder downscale first (faster on large photos).
    calibrate : path, default=None
        int8 only: the photos (folder or file) to calibrate the quantized network on; None: the ones the store
        was made with, else a fixed, seeded sample of the listed photos (``furnitype.extract.int8``).
    out : path, default=None
        The feature file; None gives ``features-<backbone>.h5``.
    manifest : path, default=None
        A CSV of ``path,label`` rows, added to ``inputs``.
    overwrite : bool, default=False
        Replace a store (or interrupted run) made with other settings, or a damaged store, instead of refusing
        it. A store made with the same settings is always kept and reused.
    progress : bool, default=True
        Show a progress bar on stderr.
    workers : int, default=None
        Decoding threads (None: up to 4), in each Ray worker with ``engine="ray"``.
    engine : {"local", "ray"}, default="local"
        Where the network runs: this process, or Ray actors (``furnitype.engines.ray``; needs
        ``furnitype[ray]``). Listing, hashing, the cache and the store stay here either way.
    ray_address, ray_workers, gpus_per_worker, cpus_per_worker
        The Ray cluster, its number of workers (one network each) and resources per worker (see
        ``furnitype.engines.ray.RayEngine``); only with ``engine="ray"``.

    Returns
    -------
    ExtractResult
    """
    started = time.perf_counter()
    spec, settings = resolve_settings(
        backbone, weights, pooling, image_size, precision, store_dtype, interpolation, decode
    )
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1. Received: batch_size={batch_size}")
    batches = batch_source(
        engine,
        ray_address=ray_address,
        ray_workers=ray_workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
    )
    listing = list_images(inputs, manifest)
    out = Path(out or f"features-{spec.backbone}.h5")
    _check_writable(out)
    if spec.precision == "int8":
        spec, settings = calibrated(spec, settings, [f.path for f in listing.files], calibrate=calibrate, store=out)
    elif calibrate is not None:
        raise InputError(f"--calibrate is for --precision int8 only. Received: precision={precision!r}")
    previous = _previous_store(out, settings, overwrite)

    with Journal(out, settings, overwrite=overwrite) as journal:
        features_by_sha = {sha: f for sha, f in zip(previous.sha256, previous.features, strict=True)}
        features_by_sha.update({row.sha256: row.features for row in journal.rows})
        previous_skips = _skips_of(previous)
        reasons_by_sha = {sha: reason for _, sha, reason in previous_skips if sha}
        reasons_by_sha.update({skip.sha256: skip.reason for skip in journal.skips if skip.sha256})

        sha_by_path, unreadable = _hash_all(listing.files, progress)
        known = features_by_sha.keys() | reasons_by_sha.keys()
        todo = sorted({sha: p for p, sha in sha_by_path.items() if sha not in known}.values())
        labels = {f.path: f.label for f in listing.files}
        extracted = 0
        bar = tqdm(
            total=len(todo),
            unit="img",
            desc=f"extract {spec.backbone}",
            disable=not progress or not todo,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        with bar:
            for batch in batches(spec, todo, batch_size=batch_size, workers=workers):
                rows, skips = _journal_records(batch, sha_by_path, labels)
                journal.append(rows, skips)
                features_by_sha.update({row.sha256: row.features for row in rows})
                reasons_by_sha.update({skip.sha256: skip.reason for skip in skips if skip.sha256})
                unreadable.update({skip.path: skip.reason for skip in skips if not skip.sha256})
                extracted += len(rows)
                bar.update(len(batch))

        merged = _merge(previous, previous_skips, listing, sha_by_path, unreadable, features_by_sha, reasons_by_sha)
        if merged != _contents(previous, previous_skips) or journal.rows or extracted:
            _save(out, merged, features_by_sha, spec, settings)
        journal.remove()

    skipped_paths = {s[0] for s in merged["skipped"]}
    skipped = sum(1 for f in listing.files if f.path in skipped_paths)
    return ExtractResult(
        out=str(out),
        listed=len(listing.files),
        extracted=extracted,
        reused=len(listing.files) - skipped - extracted,
        skipped=skipped,
        removed=len(set(previous.paths) - set(merged["paths"]) - skipped_paths),
        rows=len(merged["paths"]),
        seconds=time.perf_counter() - started,
    )


def _check_writable(out: Path) -> None:
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"cannot write {out}: folder {folder} does not exist.")
    if not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise InputError(f"cannot write {out}: permission denied.")


def _previous_store(out: Path, settings: dict, overwrite: bool) -> store.FeatureSet:
    if out.exists():
        try:
            store.check_settings(store.read_meta(out), settings, out)
            return store.load(out)
        except (store.SettingsMismatchError, store.StoreError):
            if not overwrite:
                raise
    empty = np.array([], dtype=str)
    return store.FeatureSet(np.zeros((0, 0), np.float32), empty, empty, empty)


def _skips_of(feature_set: store.FeatureSet) -> list[tuple[str, str, str]]:
    """Skipped ``(path, sha256, reason)`` of a store (sha256 read beside the public pairs)."""
    if not feature_set.file:
        return []
    import h5py

    with h5py.File(feature_set.file, "r") as h5:
        shas = h5["skipped/sha256"].asstr()[...] if len(h5["skipped/sha256"]) else []
    return [(p, sha, r) for (p, r), sha in zip(feature_set.skipped, shas, strict=True)]


def _hash_all(files: list[ImageFile], progress: bool) -> tuple[dict[str, str], dict[str, str]]:
    """sha256 of every listed file (threads: hashlib releases the GIL); unreadable files with their reason."""

    def digest(f: ImageFile):
        try:
            return sha256_file(f.path)
        except FileNotFoundError:
            return None, "file not found"
        except OSError as err:
            return None, f"unreadable: {err.strerror or err}"

    sha_by_path, unreadable = {}, {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = pool.map(digest, files)
        for f, result in tqdm(
            zip(files, results, strict=True),
            total=len(files),
            unit="file",
            desc="hash",
            disable=not progress,
            delay=2.0,
            leave=False,
            file=sys.stderr,
        ):
            if isinstance(result, str):
                sha_by_path[f.path] = result
            else:
                unreadable[f.path] = result[1]
    return sha_by_path, unreadable


def _journal_records(batch: list[Outcome], sha_by_path: dict, labels: dict) -> tuple[list[Row], list[Skip]]:
    rows, skips = [], []
    for outcome in batch:
        if outcome.reason:
            same_bytes = outcome.sha256 == sha_by_path[outcome.path]
            skips.append(Skip(outcome.path, labels[outcome.path], outcome.sha256 if same_bytes else "", outcome.reason))
        elif outcome.sha256 != sha_by_path[outcome.path]:
            skips.append(Skip(outcome.path, labels[outcome.path], "", "changed while being read; rerun to include it"))
        else:
            rows.append(Row(outcome.path, labels[outcome.path], outcome.sha256, outcome.features))
    return rows, skips


def _contents(feature_set: store.FeatureSet, skips: list[tuple[str, str, str]]) -> dict:
    return {
        "paths": list(feature_set.paths),
        "labels": list(feature_set.labels),
        "sha256": list(feature_set.sha256),
        "skipped": sorted(skips),
    }


def _merge(previous, previous_skips, listing, sha_by_path, unreadable, features_by_sha, reasons_by_sha) -> dict:
    """Rows and skips of the new store: the listing's files, plus earlier rows outside the listed folders."""
    listed = {f.path for f in listing.files}
    folders = tuple(folder.rstrip(os.sep) + os.sep for folder in listing.folders)

    def kept(path: str) -> bool:
        return path not in listed and not path.startswith(folders)

    rows = {
        p: (lab, sha) for p, lab, sha in zip(previous.paths, previous.labels, previous.sha256, strict=True) if kept(p)
    }
    skips = {p: (sha, reason) for p, sha, reason in previous_skips if kept(p)}
    for f in listing.files:
        sha = sha_by_path.get(f.path)
        if f.path in unreadable:
            skips[f.path] = ("", unreadable[f.path])
        elif sha in features_by_sha:
            rows[f.path] = (f.label, sha)
        else:
            skips[f.path] = (sha, reasons_by_sha[sha])
    ordered = sorted(rows)
    return {
        "paths": ordered,
        "labels": [rows[p][0] for p in ordered],
        "sha256": [rows[p][1] for p in ordered],
        "skipped": sorted((p, *skips[p]) for p in skips),
    }


def _save(out: Path, merged: dict, features_by_sha: dict, spec: ExtractSpec, settings: dict) -> None:
    features = np.stack([features_by_sha[sha] for sha in merged["sha256"]]) if merged["sha256"] else None
    if features is None:
        features = np.zeros((0, 0), np.float32)
    meta = {
        **settings,
        "preprocessing": f"keras.applications.{get_backbone(spec.backbone).keras_name}.preprocess_input",
        "weights_source": spec.weights,
        "furnitype_version": __version__,
        **{f"{package}_version": _version(package) for package in ("keras", "tensorflow", "h5py", "pillow")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    store.save(
        out,
        features=features,
        paths=merged["paths"],
        labels=merged["labels"],
        sha256=merged["sha256"],
        skipped=merged["skipped"],
        meta=meta,
    )


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"
