"""``predict``: label new photos with a run's model, extracting them exactly as its training features were made.

The photos go through the same code path as ``extract`` (``ExtractSpec`` + ``feature_batches``) with the
settings the run records for the model's feature set; the network's features are rounded to the store's dtype,
as the model saw them in training, then the model gives class probabilities. Given a feature file of the same
settings (``store``), the photos whose content it holds take their stored rows instead: only the others are
extracted. A fused feature set (``classify --fuse``) is made part by part, each with its part's settings, and
the parts' rows put side by side. A file that cannot be used gets a row with the reason instead of a label.
Rows come in the order the photos were given (a folder's photos sorted by path).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np

from furnitype.classify.metadata import METRICS_FILE
from furnitype.classify.run import damaged, load_model, load_run, training_photos
from furnitype.classify.runfiles import Damage
from furnitype.errors import InputError, SettingsMismatchError
from furnitype.extract.backbones import check_memory, get_backbone, weights_files, weights_identity
from furnitype.extract.images import ImageDecodeError, ImageFile, decode_image, list_images, sha256_file
from furnitype.extract.pipeline import ExtractSpec, check_batching, feature_batches
from furnitype.extract.settings import as_stored, spec_for
from furnitype.features.store import SETTING_KEYS, read_meta, rows_by_sha256, short_id, short_ids, store_files
from furnitype.outputs import (
    check_output,
    data_frame,
    progress_bar,
    refuse_existing,
    refuse_inputs,
    refuse_photos,
    replace_file,
    significant,
)


@dataclass(frozen=True)
class Prediction:
    """The prediction for one file.

    Attributes
    ----------
    path : str
        Absolute path of the file.
    label : str or None
        The most probable class; None when the file could not be used.
    probability : float or None
        Its probability.
    top : list of (str, float)
        The ``top_k`` most probable classes, most probable first.
    given_label : str
        The file's folder label when a folder was walked (as ``extract`` labels it), else "".
    sha256 : str
        Hex digest of the file's bytes ("" when it could not be read).
    error : str
        Why the file could not be used ("" when it was).
    in_training : bool
        The photo (by content) is one the run trained this model's feature set on (its ``split.csv``).
    """

    path: str
    label: str | None
    probability: float | None
    top: list[tuple[str, float]] = field(default_factory=list)
    given_label: str = ""
    sha256: str = ""
    error: str = ""
    in_training: bool = False

    def as_dict(self) -> dict:
        """JSON-ready: ``path, label, probability, top_k [{label, probability}], given_label, sha256, error,
        in_training``.

        A value that does not apply is None; probabilities have 6 significant digits.
        """
        return {
            "path": self.path,
            "label": self.label,
            "probability": significant(self.probability),
            "top_k": [{"label": label, "probability": significant(p)} for label, p in self.top],
            "given_label": self.given_label or None,
            "sha256": self.sha256 or None,
            "error": self.error or None,
            "in_training": self.in_training,
        }


@dataclass(frozen=True)
class PredictResult:
    """What one ``predict`` call did.

    Attributes
    ----------
    predictions : list of Prediction
        One per listed file, in the order given (a folder's files sorted by path).
    run : str
    model : str
        ``dense``, ``logreg`` or ``svm``.
    features : str
        The run's feature set the model was trained on.
    weights : str
        The weights the network was built with (checked against the run's record).
    classes : list of str
    top_k : int
        Classes kept per prediction (at most the number of classes).
    seconds : float
        Wall time of the whole call.
    stored : int
        Photos whose features were taken from the feature file given (``store``), not made by the network.
    """

    predictions: list[Prediction]
    run: str
    model: str
    features: str
    weights: str
    classes: list[str]
    top_k: int
    seconds: float
    stored: int = 0

    def summary(self) -> str:
        """One line: photos labelled, files that could not be used, agreement with folder labels."""
        done = [p for p in self.predictions if p.error == ""]
        line = f"{len(done):,} of {len(self.predictions):,} photos labelled by {self.model} ({self.features})"
        failed = len(self.predictions) - len(done)
        if failed:
            line += f", {failed:,} could not be used"
        trained = sum(p.in_training for p in done)
        if trained:
            line += f"; {trained:,} {'is a training photo' if trained == 1 else 'are training photos'} of the run"
        judged = [p for p in done if p.given_label in self.classes and not p.in_training]
        if judged:
            agree = sum(p.label == p.given_label for p in judged)
            share = f"({agree / len(judged):.1%})"
            others = " others" if trained else ""
            line += f"; {agree:,} of {len(judged):,}{others} agree with their folder's label {share}"
        if self.stored:
            line += f"; {self.stored:,} taken from the feature file"
        return line + f"; {self.seconds:.1f} s"

    def csv_columns(self) -> list[str]:
        """``path, label, probability, label_1, probability_1, ..., given_label, sha256, error, in_training``."""
        ranked = [f"{name}_{i}" for i in range(1, self.top_k + 1) for name in ("label", "probability")]
        return ["path", "label", "probability", *ranked, "given_label", "sha256", "error", "in_training"]

    def write_csv(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the predictions as CSV (columns: ``csv_columns()``; an empty cell where there is no value,
        probabilities with 6 significant digits), replacing an existing ``path`` only with ``overwrite``;
        returns the path."""
        path = check_output(path)
        refuse_existing({"--out": path}, overwrite=overwrite)
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(self.csv_columns())
        for p in self.predictions:
            ranked = [value for label, prob in p.top for value in (label, significant(prob))]
            ranked += [""] * (2 * self.top_k - len(ranked))
            probability = "" if p.probability is None else significant(p.probability)
            writer.writerow([p.path, p.label or "", probability, *ranked, p.given_label, p.sha256, p.error,
                             str(p.in_training).lower()])
        # a file name that is not UTF-8 is written as the bytes the file system has, so it still names the file
        replace_file(path, text.getvalue().encode("utf-8", errors="surrogateescape"))
        return path

    def to_frame(self):
        """The predictions as a pandas DataFrame, one row per file in the order given: the CSV's columns
        (``csv_columns()``), a missing value as None. Needs pandas (``pip install 'furnitype[pandas]'``)."""
        records = []
        for p in self.predictions:
            record = {"path": p.path, "label": p.label, "probability": p.probability}
            for i in range(self.top_k):
                label, probability = p.top[i] if i < len(p.top) else (None, None)
                record |= {f"label_{i + 1}": label, f"probability_{i + 1}": probability}
            record |= {"given_label": p.given_label or None, "sha256": p.sha256 or None, "error": p.error or None,
                       "in_training": p.in_training}
            records.append(record)
        return data_frame(records, order=self.csv_columns(), attrs={"run": self.run, "model": self.model})

    def format_table(self) -> str:
        """Aligned text: path, the folder's (given) label, the label, its probability and the other top classes
        (or the error); a training photo of the run is marked so."""
        width = max((len(p.path) for p in self.predictions), default=4)
        lines = [f"{'path':<{width}}  {'given':<12} {'label':<12} {'prob':>6}  next"]
        for p in self.predictions:
            given = p.given_label or "-"
            if p.error:
                lines.append(f"{p.path:<{width}}  {given:<12} {'-':<12} {'-':>6}  error: {p.error}")
                continue
            others = ", ".join(f"{label} {prob:.3f}" for label, prob in p.top[1:])
            seen = "  (training photo)" if p.in_training else ""
            lines.append(f"{p.path:<{width}}  {given:<12} {p.label:<12} {p.probability:>6.3f}  {others}{seen}")
        return "\n".join(lines)


def predict(
    run: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    *,
    model: str | None = None,
    features: str | None = None,
    top_k: int = 3,
    weights: str | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
    store: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> PredictResult:
    """Label photos with a model of a run, extracting their features exactly as the run's features were made.

    Parameters
    ----------
    run : path
        A run folder written by ``furnitype classify``.
    images : sequence of path
        Image files and/or folders (walked like ``extract``: recursively, a subfolder's name is the
        ``given_label``). A path that does not exist gets a row with the error ``file not found``. Rows come
        in this order (a folder's files sorted by path).
    model : {"dense", "logreg", "svm", "best"} or None, default=None
        None or ``"best"``: the model of the run's best row.
    features : str, default=None
        The run's feature set (its training file's name without ``.h5``); None: the best row's for ``model``.
    top_k : int, default=3
        Most probable classes kept per photo (at most the number of classes).
    weights : str, default=None
        The backbone's weights (a file, ``imagenet`` or ``none``); None: the weights source recorded with the
        run's features. Weights whose identity differs from the recorded one are refused.
    batch_size : int, default=32
    workers : int, default=None
        Decoding workers, threads or processes past 4 (None: sized to the machine).
    device : str, default="auto"
        Where the network runs: ``auto`` (the first GPU the Keras backend sees, else the CPU), ``cpu``, ``gpu``
        or ``gpu:N``.
    out : path, default=None
        Also write the predictions as CSV there (``PredictResult.write_csv``); checked before any work. Never
        one of the photos.
    overwrite : bool, default=False
        Replace an existing ``out`` file.
    progress : bool, default=False
        Show a progress bar on stderr.
    store : path, or sequence of paths, default=None
        A feature file made with the settings of the run's feature set (checked): a photo whose content it
        holds (by sha256) takes its stored row instead of being extracted. With ``features`` None, its settings
        choose the feature set (the best row's among those with the same settings). For a fused feature set
        (``classify --fuse``), one feature file per part, in the parts' order, each with its part's settings: a
        photo every one of them holds takes their rows side by side.

    Returns
    -------
    PredictResult

    Raises
    ------
    SettingsMismatchError
        The weights are not the ones the run's features were made with, or ``store`` was made with other
        settings than the run's feature set.
    InputError
        No images given, a bad ``top_k``/``batch_size``/``workers``, the recorded weights file is gone (and no
        ``weights``), an ``out`` that cannot be written, a batch that does not fit in memory.
    """
    started = time.perf_counter()
    stores = [] if store is None else [store] if isinstance(store, (str, os.PathLike)) else list(store)
    if not images:
        raise InputError("give at least one image file or folder.")
    if top_k < 1:
        raise InputError(f"top_k must be at least 1. Received: top_k={top_k}")
    check_batching(batch_size, workers)
    if out is not None:
        check_output(out)
        beside = [file for store in stores for file in store_files(store)]
        refuse_inputs({"--out": out}, [*images, *weights_files(weights), *beside], kept=[run])
    files = _listing(images)
    refuse_photos({"--out": out}, (f.path for f in files))
    refuse_existing({"--out": out}, overwrite=overwrite)
    model = None if model in (None, "best") else model
    metas = [read_meta(file) for file in stores]
    if metas and features is None:
        features = _feature_set_like(run, metas, model)
    loaded = load_model(run, model, features=features)
    trained = training_photos(run, loaded.features)
    if stores:
        _check_stores(run, loaded, stores, metas)
    top_k = min(top_k, len(loaded.classes))
    classes = np.array(loaded.classes)
    labels = {f.path: f.label for f in files}
    by_path: dict[str, Prediction] = {}

    def predicted(outcomes: list[tuple[str, str]], X: np.ndarray, spec: ExtractSpec | None) -> None:
        """Predictions of ``(path, sha256)`` pairs from their features (made with ``spec``, else stored)."""
        if X.shape[1] != loaded.model.n_features_in_:
            _wrong_dimension(run, loaded, spec, X.shape[1], "+".join(map(str, stores)))
        for (path, sha), proba in zip(outcomes, loaded.model.predict_proba(X), strict=True):
            top = _ranked(proba, classes, top_k)
            by_path[path] = Prediction(path, top[0][0], top[0][1], top, labels[path], sha, in_training=sha in trained)

    held = _stored_rows(stores, list(labels)) if stores else {}
    if held:
        predicted([(path, sha) for path, (sha, _) in held.items()], np.stack([r for _, r in held.values()]), None)
    todo = [path for path in labels if path not in held]  # each file once; a missing one: "file not found"
    weights_used = None
    if loaded.parts is not None and (todo or weights is not None):
        specs = [
            _checked_spec(run, loaded, part.settings, part.meta, part_weights, batch_size, out, device)
            for part, part_weights in zip(loaded.parts, _weights_of_parts(run, loaded, weights), strict=True)
        ]
        weights_used = "+".join(spec.weights for spec in specs)
        with progress_bar(enabled=progress, total=len(todo) * len(specs), unit="img", desc="predict") as bar:
            made, failed = _fused_rows(run, loaded, specs, todo, batch_size, workers, bar.update)
        if made:
            predicted([(path, sha) for path, sha, _ in made], np.stack([row for _, _, row in made]), None)
        for path, reason in failed.items():
            by_path[path] = Prediction(path, None, None, given_label=labels[path], error=reason)
    spec = None
    if loaded.parts is None and (todo or weights is not None):
        spec = _checked_spec(run, loaded, loaded.settings, loaded.meta, weights, batch_size, out, device)
    if spec is not None and todo:
        with progress_bar(enabled=progress, total=len(todo), unit="img", desc="predict") as bar:
            for batch in feature_batches(spec, todo, batch_size=batch_size, workers=workers):
                done = [(o, o.features) for o in batch if o.features is not None]
                if done:
                    X = as_stored(np.stack([features for _, features in done]), loaded.settings["store_dtype"])
                    predicted([(o.path, o.sha256) for o, _ in done], X, spec)
                for o in batch:
                    if o.reason:
                        by_path[o.path] = Prediction(o.path, None, None, given_label=labels[o.path], error=o.reason)
                bar.update(len(batch))
    result = PredictResult(
        predictions=[by_path[f.path] for f in files],
        run=str(run),
        model=loaded.name,
        features=loaded.features,
        weights=(spec.weights if spec else weights_used
                 or str(loaded.meta.get("weights_source") or loaded.settings["weights"])),
        classes=list(loaded.classes),
        top_k=top_k,
        seconds=time.perf_counter() - started,
        stored=len(held),
    )
    if out is not None:
        result.write_csv(out, overwrite=overwrite)
    return result


class Predictor:
    """A run's model and the network that makes its features, loaded once, for photos that arrive one by one
    (``furnitype serve``): ``decode`` bytes, ``features`` of a batch of decoded images, ``label`` them.

    The results are ``predict``'s on the same files: the same decoding, network, rounding to the store's dtype
    and model.

    Parameters
    ----------
    run : path
        A run folder written by ``furnitype classify``.
    model, features, weights :
        As for ``predict``.
    store : path, default=None
        A feature file the features must match (the catalogue the server searches): with ``features`` None, its
        settings choose the feature set; a file of other settings than the feature set's is refused.
    batch_size : int, default=32
        The largest batch ``features`` will be given (checked to fit in memory).
    max_pixels : int, default=None
        ``decode`` refuses images of more pixels (from their header).
    device : str, default="auto"
        Where the network runs, as for ``predict``.

    Raises
    ------
    InputError, SettingsMismatchError, StoreError
        As ``predict``.
    """

    def __init__(
        self,
        run: str | os.PathLike,
        *,
        model: str | None = None,
        features: str | None = None,
        weights: str | None = None,
        store: str | os.PathLike | None = None,
        batch_size: int = 32,
        max_pixels: int | None = None,
        device: str = "auto",
    ):
        model = None if model in (None, "best") else model
        if store is not None and features is None:
            features = _feature_set_like(run, [read_meta(store)], model)
        self.loaded = load_model(run, model, features=features)
        if self.loaded.parts is not None:
            raise InputError(
                f"run {run}'s {self.loaded.name} model was trained on a fused feature set ({self.loaded.features}), "
                "which furnitype serve does not take yet; serve a model of one feature set (--model, or a run of "
                "one feature file)."
            )
        self.run = str(run)
        if store is not None:
            self.check_store(store)
        check_batching(batch_size, None)
        self.spec = _checked_spec(run, self.loaded, self.loaded.settings, self.loaded.meta, weights, batch_size, None,
                                  device)
        self.trained = training_photos(run, self.loaded.features)
        self.max_pixels = max_pixels
        self._classes = np.array(self.loaded.classes)
        self._infer: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.loaded.classes)

    def check_store(self, store: str | os.PathLike) -> None:
        """``SettingsMismatchError`` when the feature file ``store`` was made with other settings than the
        model's features (its rows could not be labelled by the model)."""
        _check_stores(self.run, self.loaded, [store], [read_meta(store)])

    def decode(self, data: bytes) -> np.ndarray:
        """A photo's bytes as the network's input (``ImageDecodeError`` when they are not a usable image)."""
        spec = self.spec
        return decode_image(data, spec.image_size, spec.interpolation, spec.decode, max_pixels=self.max_pixels)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Features of a batch of decoded images, as the run's store holds them (the network is built once)."""
        if self._infer is None:
            self._infer = self.spec.build()
        X = as_stored(np.asarray(self._infer(images)), self.loaded.settings["store_dtype"])
        if X.shape[1] != self.loaded.model.n_features_in_:
            _wrong_dimension(self.run, self.loaded, self.spec, X.shape[1], None)
        return X

    def warm(self) -> None:
        """Build the network and run it once, so that the first photo does not pay for it."""
        size = self.spec.image_size
        self.label(self.features(np.zeros((1, size, size, 3), np.uint8)), [""])

    def label(self, X: np.ndarray, sha256: Sequence[str], *, top_k: int = 3,
              names: Sequence[str] | None = None) -> list[Prediction]:
        """Predictions of feature rows (of photos with these ``sha256``; ``names`` their paths or file names)."""
        if top_k < 1:
            raise InputError(f"top_k must be at least 1. Received: top_k={top_k}")
        names = names if names is not None else [""] * len(sha256)
        predictions = []
        for name, sha, proba in zip(names, sha256, self.loaded.model.predict_proba(X), strict=True):
            top = _ranked(proba, self._classes, min(top_k, len(self._classes)))
            predictions.append(Prediction(name, top[0][0], top[0][1], top, sha256=sha, in_training=sha in self.trained))
        return predictions


def _ranked(proba: np.ndarray, classes: np.ndarray, top_k: int) -> list[tuple[str, float]]:
    """The ``top_k`` most probable classes with their probabilities, most probable first."""
    order = np.argsort(-proba, kind="stable")[:top_k]
    return [(str(classes[j]), float(proba[j])) for j in order]


def _checked_spec(run, loaded, settings: dict, meta: dict, weights: str | None, batch_size: int, out,
                  device: str) -> ExtractSpec:
    """The spec features with ``settings`` (the run's, or a fused part's) were made with (the weights checked),
    when a batch fits in memory."""
    spec = spec_for(
        settings,
        weights=weights,
        source=meta.get("weights_source"),
        calibration_photos=meta.get("calibration_photos"),
        what=f"run {run}'s {loaded.features} features",
        device=device,
    )
    refuse_inputs({"--out": out}, weights_files(spec.weights))  # the weights file the run records
    check_memory(get_backbone(spec.backbone), spec.image_size, batch_size)
    return spec


def _weights_of_parts(run, loaded, weights: str | None) -> list[str | None]:
    """The weights to build each part of a fused set with: ``weights`` for the parts made with weights of its
    identity (a moved weights file), the recorded ones (None) for the others.

    Raises
    ------
    SettingsMismatchError
        No part was made with weights of ``weights``' identity.
    """
    if weights is None:
        return [None] * len(loaded.parts)
    identity = weights_identity(weights)
    chosen = [weights if part.settings.get("weights") == identity else None for part in loaded.parts]
    if not any(chosen):
        made = ", ".join(f"{part.file}: {short_id(str(part.settings.get('weights')))}" for part in loaded.parts)
        raise SettingsMismatchError(
            f"weights {weights} are {short_id(identity)}, but no part of run {run}'s {loaded.features} features "
            f"was made with them ({made}); pass --weights with the weights of the part whose file has moved."
        )
    return chosen


def _fused_rows(run, loaded, specs: list[ExtractSpec], paths: list[str], batch_size: int, workers: int | None,
                advance) -> tuple[list[tuple[str, str, np.ndarray]], dict[str, str]]:
    """``(path, sha256, row)`` of each photo, its parts' features (as stored) side by side in the parts' order,
    and ``path -> reason`` of the files that could not be used; a file one part cannot use is not tried by the
    next."""
    rows: dict[str, list[np.ndarray]] = {path: [] for path in paths}
    digests: dict[str, str] = {}
    failed: dict[str, str] = {}
    for i, (part, spec) in enumerate(zip(loaded.parts, specs, strict=True)):
        todo = [path for path in paths if path not in failed]
        for batch in feature_batches(spec, todo, batch_size=batch_size, workers=workers):
            for o in batch:
                if o.features is None:
                    failed[o.path] = o.reason
                    continue
                if len(o.features) != part.feature_dim:
                    where = f"{METRICS_FILE} feature_sets.{loaded.features}.parts[{i}].settings"
                    raise damaged(run, Damage(where, f"they make {len(o.features)} features, not {part.feature_dim}"))
                rows[o.path].append(as_stored(o.features[None], part.settings["store_dtype"])[0])
                digests[o.path] = o.sha256
            advance(len(batch))
        advance(len(paths) - len(todo))
    done = [(path, digests[path], np.concatenate(rows[path])) for path in paths if path not in failed]
    return done, failed


def _wrong_dimension(run, loaded, spec, n_features: int, store) -> NoReturn:
    """Refuse features of another length than the model takes: from the store, or made with the run's settings
    (a ``flatten`` setting on an ``avg`` model, say: they describe other features than it was trained on)."""
    expected = loaded.model.n_features_in_
    if spec is None:
        raise SettingsMismatchError(
            f"{store} has {n_features} features per photo, but run {run}'s {loaded.name} model was trained on "
            f"{expected}."
        )
    where = f"{METRICS_FILE} feature_sets.{loaded.features}.settings"
    problem = (
        f"{spec.backbone} with {spec.pooling} pooling at {spec.image_size} px makes {n_features} features, but "
        f"the model takes {expected}"
    )
    raise damaged(run, Damage(where, problem))


def _differences(a: dict, b: dict) -> list[str]:
    return [key for key in SETTING_KEYS if str(a.get(key)) != str(b.get(key))]


def _part_settings(settings: dict, parts) -> list[dict]:
    """The settings of each part of a feature set (one part, its own, when it is not fused)."""
    return [part.settings for part in parts] if parts is not None else [settings]


def _feature_set_like(run, metas: list[dict], model: str | None) -> str | None:
    """The run's feature set (of the best row with ``model``) made with the stores' settings, one store per part
    in order; None: none is."""
    document = load_run(run).document
    for row in document.rows:  # best first
        feature_set = document.feature_sets[row.features]
        parts = _part_settings(feature_set.settings, feature_set.parts)
        if (model is None or row.model == model) and len(parts) == len(metas) and not any(
            _differences(part, meta) for part, meta in zip(parts, metas, strict=True)
        ):
            return row.features
    return None


def _check_stores(run, loaded, stores: list, metas: list[dict]) -> None:
    """Refuse feature files that are not one per part of the model's feature set, each of its part's settings."""
    parts = _part_settings(loaded.settings, loaded.parts)
    if len(stores) != len(parts):
        made = f"fused from {len(parts)} feature files" if loaded.parts is not None else "from one feature file"
        raise InputError(
            f"run {run}'s {loaded.features} features are {made}; give one feature file (--features FILE.h5) per "
            f"part, in the parts' order, not {len(stores)}, or leave --features out."
        )
    for i, (store, meta, settings) in enumerate(zip(stores, metas, parts, strict=True)):
        differing = _differences(settings, meta)
        if differing:
            had = ", ".join(f"{k}={meta.get(k)}" for k in differing)
            want = ", ".join(f"{k}={settings.get(k)}" for k in differing)
            part = f" (part {i + 1})" if loaded.parts is not None else ""
            raise SettingsMismatchError(
                f"{store} was made with {short_ids(had)}, but run {run}'s {loaded.features} features{part} with "
                f"{short_ids(want)}; give a feature file of the run's settings, or leave --features out."
            )


def _stored_rows(stores: list, paths: list[str]) -> dict[str, tuple[str, np.ndarray]]:
    """``path -> (sha256, stored features)`` for the files whose content every store holds: their rows side by
    side, in the stores' order."""
    digests = {}
    for path in paths:
        try:
            digests[path] = sha256_file(path)
        except ImageDecodeError:
            continue  # extracting it says why it cannot be used
    found = [rows_by_sha256(store, digests.values())[0] for store in stores]
    return {
        path: (sha, np.concatenate([rows[sha] for rows in found]))
        for path, sha in digests.items()
        if all(sha in rows for rows in found)
    }


def _listing(images: Sequence[str | os.PathLike]) -> list[ImageFile]:
    """The files of ``images`` in the order given: a folder's (walked like ``extract``) sorted by path, a file
    or a missing path as it is; a file given twice comes twice."""
    files: list[ImageFile] = []
    for given in images:
        if os.path.isdir(given):
            with contextlib.suppress(InputError):  # a folder without photos adds no rows
                files += list_images([given]).files
        else:
            files.append(ImageFile(os.path.abspath(given)))
    if not files:
        raise InputError(f"no images found in {', '.join(str(p) for p in images)}.")
    return files
