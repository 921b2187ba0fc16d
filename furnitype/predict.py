"""``predict``: label new photos with a run's model, extracting them exactly as its training features were made.

The photos go through the same code path as ``extract`` (``ExtractSpec`` + ``feature_batches``) with the
settings the run records for the model's feature set; the network's features are rounded to the store's dtype,
as the model saw them in training, then the model gives class probabilities. Given a feature file of the same
settings (``store``), the photos whose content it holds take their stored rows instead: only the others are
extracted. A file that cannot be used gets
a row with the reason instead of a label. Rows come in the order the photos were given (a folder's photos
sorted by path).
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
from furnitype.extract.backbones import check_memory, get_backbone, weights_files
from furnitype.extract.images import ImageDecodeError, ImageFile, decode_image, list_images, sha256_file
from furnitype.extract.pipeline import ExtractSpec, check_batching, feature_batches
from furnitype.extract.settings import as_stored, spec_for
from furnitype.features.store import SETTING_KEYS, read_meta, rows_by_sha256, short_ids
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
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
    store: str | os.PathLike | None = None,
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
        Decoding threads (None: up to 4).
    out : path, default=None
        Also write the predictions as CSV there (``PredictResult.write_csv``); checked before any work. Never
        one of the photos.
    overwrite : bool, default=False
        Replace an existing ``out`` file.
    progress : bool, default=False
        Show a progress bar on stderr.
    store : path, default=None
        A feature file made with the settings of the run's feature set (checked): a photo whose content it
        holds (by sha256) takes its stored row instead of being extracted. With ``features`` None, its settings
        choose the feature set (the best row's among those with the same settings).

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
    if not images:
        raise InputError("give at least one image file or folder.")
    if top_k < 1:
        raise InputError(f"top_k must be at least 1. Received: top_k={top_k}")
    check_batching(batch_size, workers)
    if out is not None:
        check_output(out)
        refuse_inputs({"--out": out}, [*images, *weights_files(weights), *([store] if store else [])], kept=[run])
    files = _listing(images)
    refuse_photos({"--out": out}, (f.path for f in files))
    refuse_existing({"--out": out}, overwrite=overwrite)
    model = None if model in (None, "best") else model
    stored_meta = read_meta(store) if store is not None else None
    if stored_meta is not None and features is None:
        features = _feature_set_like(run, stored_meta, model)
    loaded = load_model(run, model, features=features)
    trained = training_photos(run, loaded.features)
    if store is not None and stored_meta is not None:
        _check_store(run, loaded, store, stored_meta)
    top_k = min(top_k, len(loaded.classes))
    classes = np.array(loaded.classes)
    labels = {f.path: f.label for f in files}
    by_path: dict[str, Prediction] = {}

    def predicted(outcomes: list[tuple[str, str]], X: np.ndarray, spec: ExtractSpec | None) -> None:
        """Predictions of ``(path, sha256)`` pairs from their features (made with ``spec``, else stored)."""
        if X.shape[1] != loaded.model.n_features_in_:
            _wrong_dimension(run, loaded, spec, X.shape[1], store)
        for (path, sha), proba in zip(outcomes, loaded.model.predict_proba(X), strict=True):
            top = _ranked(proba, classes, top_k)
            by_path[path] = Prediction(path, top[0][0], top[0][1], top, labels[path], sha, in_training=sha in trained)

    held = _stored_rows(store, list(labels)) if store is not None else {}
    if held:
        predicted([(path, sha) for path, (sha, _) in held.items()], np.stack([r for _, r in held.values()]), None)
    todo = [path for path in labels if path not in held]  # each file once; a missing one: "file not found"
    spec = _checked_spec(run, loaded, weights, batch_size, out) if todo or weights is not None else None
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
        weights=spec.weights if spec else str(loaded.meta.get("weights_source") or loaded.settings["weights"]),
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
    ):
        model = None if model in (None, "best") else model
        stored_meta = read_meta(store) if store is not None else None
        if stored_meta is not None and features is None:
            features = _feature_set_like(run, stored_meta, model)
        self.loaded = load_model(run, model, features=features)
        if store is not None and stored_meta is not None:
            _check_store(run, self.loaded, store, stored_meta)
        self.run = str(run)
        check_batching(batch_size, None)
        self.spec = _checked_spec(run, self.loaded, weights, batch_size, None)
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
        _check_store(self.run, self.loaded, store, read_meta(store))

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


def _checked_spec(run, loaded, weights: str | None, batch_size: int, out) -> ExtractSpec:
    """The spec the run's features were made with (the weights checked), when a batch fits in memory."""
    spec = spec_for(
        loaded.settings,
        weights=weights,
        source=loaded.meta.get("weights_source"),
        calibration_photos=loaded.meta.get("calibration_photos"),
        what=f"run {run}'s {loaded.features} features",
    )
    refuse_inputs({"--out": out}, weights_files(spec.weights))  # the weights file the run records
    check_memory(get_backbone(spec.backbone), spec.image_size, batch_size)
    return spec


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


def _feature_set_like(run, meta: dict, model: str | None) -> str | None:
    """The run's feature set (of the best row with ``model``) made with the store's settings; None: none is."""
    document = load_run(run).document
    for row in document.rows:  # best first
        if (model is None or row.model == model) and not _differences(document.feature_sets[row.features].settings,
                                                                       meta):
            return row.features
    return None


def _check_store(run, loaded, store, meta: dict) -> None:
    """Refuse a feature file made with other settings than the model's feature set."""
    differing = _differences(loaded.settings, meta)
    if differing:
        had = ", ".join(f"{k}={meta.get(k)}" for k in differing)
        want = ", ".join(f"{k}={loaded.settings.get(k)}" for k in differing)
        raise SettingsMismatchError(
            f"{store} was made with {short_ids(had)}, but run {run}'s {loaded.features} features with "
            f"{short_ids(want)}; give a feature file of the run's settings, or leave --features out."
        )


def _stored_rows(store, paths: list[str]) -> dict[str, tuple[str, np.ndarray]]:
    """``path -> (sha256, stored features)`` for the files whose content ``store`` holds."""
    digests = {}
    for path in paths:
        try:
            digests[path] = sha256_file(path)
        except ImageDecodeError:
            continue  # extracting it says why it cannot be used
    rows, _ = rows_by_sha256(store, digests.values())
    return {path: (sha, rows[sha]) for path, sha in digests.items() if sha in rows}


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
