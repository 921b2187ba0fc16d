"""``extract``: list images, read only what changed, compute only the features the store lacks, keep everything.

What to compute is an ``ExtractSpec``; where it runs is an engine (``furnitype.engines``); what the store holds
and how it changes is the ``FeatureCache`` (``furnitype.features.cache``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

import numpy as np

from furnitype import __version__
from furnitype.engines import BatchSource, batch_source
from furnitype.errors import FurnitypeError, InputError, Interrupted, SettingsMismatchError, StoreError
from furnitype.extract.backbones import check_memory, get_backbone, weights_files
from furnitype.extract.decoding import THREADS_SCALE_TO
from furnitype.extract.images import (
    ImageDecodeError,
    Listing,
    bad_label,
    check_folder_labels,
    hash_file,
    list_images,
)
from furnitype.extract.keras_backend import configured_backend
from furnitype.extract.pipeline import ExtractSpec, check_batching, cpu_seconds
from furnitype.extract.settings import calibrated, recorded_settings, resolve_settings, stored_options
from furnitype.features.cache import NOT_UTF8, FeatureCache, Hashed
from furnitype.features.locking import WriterLock, real_path
from furnitype.features.store import read_meta, short_id
from furnitype.features.view import DamagedStoreError
from furnitype.outputs import check_output, progress_bar, refuse_inputs, refuse_photos, significant

#: ``extract``'s keyword form of an ``ExtractSpec`` (with their defaults) and of the Ray engine.
SPEC_OPTIONS = {
    "backbone": "vgg16",
    "weights": "imagenet",
    "pooling": "avg",
    "image_size": None,
    "precision": "float32",
    "interpolation": "bilinear",
    "decode": "exact",
    "layers": None,
    "mirror": None,
}
ENGINE_OPTIONS = ("ray_address", "ray_workers", "gpus_per_worker", "cpus_per_worker")


@dataclass(frozen=True)
class ExtractResult:
    """What one ``extract`` call did.

    Attributes
    ----------
    out : str
        The feature file.
    listed, extracted, reused, skipped : int
        Files listed; rows computed by the network now; listed files whose row came from the cache (unchanged,
        or the same content seen before, or a duplicate in this listing); files that could not be used.
    removed : int
        Rows dropped because their file is no longer in a listed folder (a file moved to another listed folder
        is not removed: its content is listed under the new path).
    relabelled : int
        Rows whose label changed (a listed label, or ``label``, differs from the stored one; a file moved to
        another class folder).
    hashed : int
        Files read to compute their sha256 (new files, files whose size, mtime, inode or ctime changed).
    rows : int
        Rows in the store now.
    seconds : float
        Wall time of the whole call.
    warnings : list of str
        Folders that could not be listed (their rows are kept), files that could not be read this time.
    skipped_files : list of (str, str)
        The listed files that could not be used: ``(path, reason)``.
    """

    out: str
    listed: int
    extracted: int
    reused: int
    skipped: int
    removed: int
    relabelled: int
    hashed: int
    rows: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line: ``2,655 extracted, 2 skipped, 2,657 hashed (see: furnitype info FILE)``."""
        parts = [f"{self.extracted:,} extracted"]
        if self.reused:
            parts.append(f"{self.reused:,} reused from the cache")
        if self.removed:
            parts.append(f"{self.removed:,} removed (no longer on disk)")
        if self.relabelled:
            parts.append(f"{self.relabelled:,} relabelled")
        parts += [f"{self.skipped:,} skipped", f"{self.hashed:,} hashed"]
        recorded = sum(reason != NOT_UTF8 for _, reason in self.skipped_files)
        hint = f"see: furnitype info {self.out}" if recorded else f"{self.out}, {self.seconds:.1f} s"
        if self.skipped > recorded:  # names the store cannot record: only the warnings name them
            hint += " and the warnings" if recorded else "; the warnings name the skipped files"
        return f"{', '.join(parts)} ({hint})"

    def as_dict(self) -> dict:
        """JSON-ready: the counts, ``seconds`` (6 significant digits), ``warnings`` and ``skipped_files`` as
        ``[{"path", "reason"}]``."""
        data = asdict(self)
        data["seconds"] = significant(self.seconds)
        data["skipped_files"] = [{"path": path, "reason": reason} for path, reason in self.skipped_files]
        return data


def extract(
    inputs: Sequence[str | os.PathLike] = (),
    *,
    spec: ExtractSpec | None = None,
    engine: str | BatchSource = "local",
    out: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    label: str | None = None,
    store_dtype: str | None = None,
    calibrate: str | os.PathLike | None = None,
    like: str | os.PathLike | None = None,
    overwrite: bool = False,
    rehash: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    progress: bool = True,
    **options,
) -> ExtractResult:
    """Extract pooled convolutional features of images into an HDF5 feature store (the cache).

    Parameters
    ----------
    inputs : sequence of path
        Folders (one subfolder per class, or unlabelled photos) and/or image files.
    spec : ExtractSpec, default=None
        What to compute (backbone, weights, pooling, image size, interpolation, precision, decoding, layers,
        mirror). None: made from the keyword form ``backbone="vgg16", weights="imagenet", pooling="avg",
        image_size=None (Keras' size), precision="float32", interpolation="bilinear", decode="exact",
        layers=None (the network's output; or ``"block4,block5"``: those blocks pooled, each L2-normalised,
        concatenated), mirror=None (False; True: each row the mean of the photo's and its left-right mirror's,
        twice the network work)`` given in ``options``; a setting not given (or None) is the one ``like``
        records, else the one the existing ``out`` records, else the default.
    engine : {"local", "ray"} or callable, default="local"
        Where the network runs: this process, Ray actors (``furnitype.engines.ray``, needs ``furnitype[ray]``;
        its keyword form ``ray_address``, ``ray_workers``, ``gpus_per_worker``, ``cpus_per_worker`` in
        ``options``), or any callable ``engine(spec, paths, batch_size=, workers=)`` yielding batches of
        ``Outcome``. Listing, hashing, the cache and the store stay here either way.
    out : path, default=None
        The feature file; None gives ``features-<backbone>.h5``. A symbolic link is followed.
    manifest : path, default=None
        A CSV of ``path,label`` rows, added to ``inputs``.
    label : str, default=None
        Label every listed photo with this class. Otherwise a photo takes its folder's (or the manifest's)
        label, and one listed without a label keeps the label its row has.
    store_dtype : {"float32", "float16"}, default=None
        None: ``like``'s, else the existing ``out``'s, else ``"float32"``.
    calibrate : path, default=None
        ``precision="int8"`` only: the photos (folder or file) to calibrate the quantized network on; None: the
        ones the store was made with, else a fixed, seeded sample of the listed photos
        (``furnitype.extract.int8``).
    like : path, default=None
        A feature file whose settings the rows take, int8's quantized network included (a test store that
        ``classify`` pairs with a training store). Options given override its settings.
    overwrite : bool, default=False
        Replace a store (or an unfinished write) made with other settings, or a damaged store, instead of
        refusing it. A store made with the same settings is read whole first: kept and reused when intact,
        rebuilt when damaged.
    rehash : bool, default=False
        Read every listed file again (by default a file whose size, mtime, inode and ctime are unchanged keeps
        its recorded sha256).
    batch_size : int, default=32
    workers : int, default=None
        Decoding workers, threads or processes past 4 (None: sized to the machine), in each Ray worker with
        ``engine="ray"``.
    device : str, default="auto"
        Where the network runs: ``auto`` (the first GPU the Keras backend sees, else the CPU), ``cpu``, ``gpu``
        or ``gpu:N``. Not a setting: float32 rows agree across devices and backends
        (``furnitype.extract.keras_backend.FLOAT32_TOLERANCE``).
    progress : bool, default=True
        Show a progress bar on stderr.

    Returns
    -------
    ExtractResult

    Raises
    ------
    SettingsMismatchError
        ``out`` holds rows made with other settings than the options given (without ``overwrite``).
    Interrupted
        Ctrl-C: the batches finished before it are kept (a ``KeyboardInterrupt`` saying how many rows).
    """
    started = time.perf_counter()
    given = {key: options.pop(key) for key in SPEC_OPTIONS if options.get(key) is not None}
    options = {key: value for key, value in options.items() if key not in SPEC_OPTIONS}
    if store_dtype is not None:
        given["store_dtype"] = store_dtype
    batches = _engine(engine, options)
    if spec is not None and like is not None:
        raise InputError("give spec or like, not both.")
    template = _like(like) if like is not None else {}
    backbone = spec.backbone if spec else given.get("backbone", template.get("backbone", SPEC_OPTIONS["backbone"]))
    out = check_output(out or f"features-{backbone}.h5")
    if like is None:
        template = _existing_settings(out)
    spec, settings = _spec(spec, given, template, what=f"the rows of {like or out}")
    spec = replace(spec, device=device)
    check_batching(batch_size, workers)
    if engine == "ray" and workers is not None and workers > THREADS_SCALE_TO:
        raise InputError(  # a Ray worker decodes each batch on its own: a pool of processes per batch costs more
            f"with --engine ray, --workers is decoding threads in each Ray worker, at most {THREADS_SCALE_TO}; "
            f"more Ray workers (--ray-workers, --cpus-per-worker) decode more at once. Received: workers={workers}"
        )
    check_memory(get_backbone(spec.backbone), spec.image_size, batch_size)
    if label is not None:
        if not label.strip():
            raise InputError(f"label must not be empty. Received: label={label!r}")
        if bad_label(label):
            raise InputError(bad_label(label))
        label = label.strip()  # as a manifest's labels are
    if calibrate is not None and spec.precision != "int8":
        raise InputError(f"--calibrate is for --precision int8 only. Received: precision={spec.precision!r}")
    refuse_inputs({"--out": out}, [*(p for p in (*inputs, manifest, calibrate) if p is not None),
                                   *weights_files(spec.weights)])
    cache = FeatureCache(out, settings, meta=_provenance(spec, settings), overwrite=overwrite)
    try:
        listing = list_images(inputs, manifest)
        if label is None:  # a folder's name becomes its photos' label
            check_folder_labels(listing)
        refuse_photos({"--out": out}, _photos_read(listing, out, calibrate))
        with _rebuild_hint(overwrite), cache:
            spec, todo = _plan(
                cache, spec, settings, listing, label=label, rehash=rehash, calibrate=calibrate, like=like,
                progress=progress,
            )
            del listing  # the cache has let go of it too: the network's memory comes on top of what is left
            bar = progress_bar(
                enabled=progress and bool(todo), total=len(todo), unit="img", desc=f"extract {spec.backbone}",
                dynamic_ncols=True,
            )
            with bar:
                # This process's CPU from one batch to the next (the first carries the network's start-up); the
                # Ray engine's network runs in other processes.
                clock = None
                for batch in batches(spec, todo, batch_size=batch_size, workers=workers):
                    now = cpu_seconds() if engine == "local" else None
                    cache.add(batch, cpu_seconds=None if clock is None or now is None else now - clock)
                    clock = now
                    bar.update(len(batch))
            counts = cache.finish()
    except KeyboardInterrupt as cause:
        raise Interrupted(f"interrupted: {cache.counts.extracted:,} rows kept; rerun to go on") from cause
    return ExtractResult(
        out=str(out),
        listed=counts.listed,
        extracted=counts.extracted,
        reused=counts.reused,
        skipped=counts.skipped,
        removed=counts.removed,
        relabelled=counts.relabelled,
        hashed=counts.hashed,
        rows=counts.rows,
        seconds=time.perf_counter() - started,
        warnings=counts.warnings,
        skipped_files=counts.skipped_files,
    )


def _plan(
    cache: FeatureCache, spec: ExtractSpec, settings: dict, listing: Listing, *, label, rehash, calibrate, like,
    progress,
) -> tuple[ExtractSpec, list[str]]:
    """Compare the listing with the store, hash what changed: the spec (int8: with its quantized network) and the
    paths the network must see."""
    if spec.precision == "int8":  # the quantized network is part of the settings: made (or found) now
        store = like if like is not None else cache.real
        spec, settings = calibrated(spec, settings, listing.paths, calibrate=calibrate, store=store)
        cache.require(settings, meta=_provenance(spec, settings))
    to_hash = cache.compare(listing, label=label, rehash=rehash)
    cache.hashed(_hash_all(listing, to_hash, progress))
    return spec, cache.todo()


def _photos_read(listing: Listing, out: Path, calibrate: str | os.PathLike | None) -> Iterator[str]:
    """The photos that may be ``out`` (``refuse_photos`` compares the files): the listed ones with its inode and
    size, and those of a ``calibrate`` folder."""
    try:
        found = os.stat(out)
    except OSError:  # gone since refuse_photos looked
        return
    same = (listing.stats[:, 2] == found.st_ino) & (listing.stats[:, 0] == found.st_size)
    yield from (listing.paths[i] for i in np.flatnonzero(same))
    if calibrate is not None and os.path.isdir(calibrate):
        with contextlib.suppress(InputError):  # no photos there: said when calibrating
            yield from list_images([calibrate]).paths


@contextmanager
def _rebuild_hint(overwrite: bool) -> Iterator[None]:
    """A damaged store's message, with what rebuilds it: ``--overwrite`` (when not given already)."""
    try:
        yield
    except DamagedStoreError as err:
        if overwrite:
            raise
        raise DamagedStoreError(f"{str(err).rstrip('.')}; --overwrite rebuilds it.") from err


def _spec(spec: ExtractSpec | None, given: dict, template: dict, *, what: str) -> tuple[ExtractSpec, dict]:
    """The spec (given, or made from its keyword form, the template's settings filling in what is not given) and
    the settings the store records."""
    if spec is not None:
        options = sorted(set(given) - {"store_dtype"})
        if options:
            raise InputError(f"give spec or its options ({', '.join(options)}), not both.")
        store_dtype = given.get("store_dtype", template.get("store_dtype", "float32"))
        return spec, recorded_settings(spec, str(store_dtype))
    chosen = {**SPEC_OPTIONS, "store_dtype": "float32", **stored_options(template, given, what=what)}
    spec, settings = resolve_settings(**chosen)
    recorded = str(template.get("weights"))
    if "weights" not in given and spec.weights == template.get("weights_source") and settings["weights"] != recorded:
        raise SettingsMismatchError(  # the recorded path now holds another file
            f"{what} were made with the weights file {spec.weights} when it was {short_id(recorded)}, "
            f"but it is now {short_id(settings['weights'])}; pass --weights PATH to a copy of the one they were "
            "made with."
        )
    return spec, settings


def _like(like: str | os.PathLike) -> dict:
    """The settings of the ``like`` feature file; one line when it is not one."""
    try:
        return read_meta(like)
    except StoreError as err:  # its advice is for the file being written, which --like is not
        raise InputError(f"--like: {err}") from err


def _existing_settings(out: Path) -> dict:
    """The settings of the store at ``out`` (what a run adding to it does not repeat); {} when there is none or
    it cannot be read (opening it for writing says why)."""
    if not os.path.isfile(out):  # False for a name the system refuses too: checking the output says why
        return {}
    # Another writer is refused at once, as FeatureCache refuses it, not after a reader's wait for its transaction.
    lock = WriterLock(real_path(out), out).acquire()
    try:
        return read_meta(out)
    except FurnitypeError:
        return {}
    finally:
        lock.release()


def _engine(engine: str | BatchSource, options: dict) -> BatchSource:
    ray_options = {key: options.pop(key) for key in ENGINE_OPTIONS if key in options}
    if options:
        raise TypeError(f"extract() got an unexpected keyword argument {next(iter(options))!r}")
    if callable(engine):
        if any(value is not None for value in ray_options.values()):
            raise InputError(f"{', '.join(ray_options)} only apply to engine='ray'; configure the engine given.")
        return engine
    return batch_source(engine, **ray_options)


def _hash_all(listing: Listing, indices: list[int], progress: bool) -> dict[int, Hashed]:
    """sha256 and stat of the listed files at ``indices`` (threads: hashlib releases the GIL)."""

    def digest(i: int) -> Hashed:
        try:
            sha, stat = hash_file(listing.paths[i])
        except ImageDecodeError as err:
            return Hashed(reason=str(err), gone=err.gone)
        return Hashed(sha, stat)

    bar = progress_bar(enabled=progress, total=len(indices), unit="file", desc="hash", delay=2.0, leave=False)
    results = {}
    with bar, ThreadPoolExecutor(max_workers=4) as pool:
        for i, result in zip(indices, pool.map(digest, indices), strict=True):
            results[i] = result
            bar.update()
    return results


def _provenance(spec: ExtractSpec, settings: dict) -> dict:
    """What a new store records beside its settings."""
    return {
        **settings,
        "preprocessing": f"keras.applications.{get_backbone(spec.backbone).keras_name}.preprocess_input",
        "weights_source": _weights_source(spec.weights),
        "furnitype_version": __version__,
        "keras_backend": (backend := configured_backend()),
        **{f"{package}_version": _version(package) for package in ("keras", backend, "h5py", "pillow")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _weights_source(weights: str) -> str:
    """A weights file as an absolute path (``predict`` from another folder finds it); a name as it is."""
    return weights if weights == "imagenet" or weights.lower() == "none" else os.path.abspath(weights)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"
