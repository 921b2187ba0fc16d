"""The metadata files of a run folder as typed records, and the one place where they are read and written.

- ``metrics.json``: a ``RunDocument`` (options, ``FeatureSetRecord`` per feature file, ``Row`` per feature file
  x model, notes, warnings);
- ``models/<features>/settings.json``: the ``FeatureSetRecord`` a model needs at prediction time;
- ``models/<features>/<model>/model.json``: a ``ModelRecord`` (parameters, classes, what the fit found).

The records' JSON keys are their field names. Reading turns every problem (unreadable file, not JSON, missing
or unknown keys, a newer format) into one ``StoreError`` line naming the file. Nothing here imports
scikit-learn or Keras.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from furnitype.errors import StoreError

#: Version of the run folder layout (``metrics.json``, ``split.csv``, ``models/``); a newer one is refused.
RUN_FORMAT = 1
#: Version of the saved-model layout (``model.json`` + payload); a newer one is refused.
MODEL_FORMAT = 1
METRICS_FILE = "metrics.json"
MODEL_FILE = "model.json"
SETTINGS_FILE = "settings.json"

#: The summary test scores of a row (and of a baseline), in table order.
SCORE_NAMES = ("accuracy", "balanced_accuracy", "macro_f1", "top3_accuracy", "log_loss")
#: The scalar fields of a row, in the order of report.csv.
ROW_SCALARS = (
    "rank",
    "backbone",
    "weights",
    "model",
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "top3_accuracy",
    "log_loss",
    "fit_seconds",
    "predict_ms_per_image",
    "fit_cpu_seconds",
    "baseline_accuracy",
    "vs_baseline_points",
    "chosen",
    "n_train",
    "n_test",
    "n_classes",
    "features",
    "run",
    "test_set",
)


@dataclass(frozen=True)
class Row:
    """One model fitted on one feature file, scored on the test photos: a line of the comparison table.

    Attributes
    ----------
    features : str
        Key of the feature set (the training file's name without ``.h5``; ``run/key`` in a merged report).
    backbone, weights : str
        The network that made the features, and a short name of its weights (``imagenet``, ``random``,
        ``file a9f13754``).
    model : str
        The model's registry name (``dense``, ``logreg``, ``svm``).
    accuracy, balanced_accuracy, macro_f1, top3_accuracy, log_loss : float
        Test scores (see ``furnitype.classify.metrics.Scores``).
    fit_seconds, fit_cpu_seconds, predict_ms_per_image : float
    n_train, n_test, n_classes : int
    test_set : str
        Short digest of the test photos' sha256 set: rows with the same one were scored on the same photos.
    chosen : str
        What the fit chose, in a few words (``C=0.1``, ``epoch 9/19`` ...).
    details : dict
        What the fit found (``model.json``'s ``fitted``: chosen parameters, CV results, epochs ...).
    params : dict
        The model's constructor parameters.
    classes : list of str
    confusion : list of list of int
        Rows: true class, columns: predicted class.
    per_class : dict of str to list
        ``precision``, ``recall``, ``f1``, ``support`` per class.
    model_dir : str
        The saved model's folder, relative to the run folder.
    run : str
        The run's name (its folder's name).
    baseline_accuracy : float
        Accuracy of the plain reference model on the same photos.
    vs_baseline_points : float
        ``accuracy - baseline_accuracy`` in points.
    rank : int
        Place in the table, 1 = best (0 before ranking).
    """

    features: str
    backbone: str
    weights: str
    model: str
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    top3_accuracy: float
    log_loss: float
    fit_seconds: float
    fit_cpu_seconds: float
    predict_ms_per_image: float
    n_train: int
    n_test: int
    n_classes: int
    test_set: str
    chosen: str
    details: dict
    params: dict
    classes: list[str]
    confusion: list[list[int]]
    per_class: dict[str, list]
    model_dir: str
    run: str
    baseline_accuracy: float
    vs_baseline_points: float
    rank: int = 0

    @property
    def label(self) -> str:
        """``backbone (weights) / model``, as notes and pictures name a row."""
        return f"{self.backbone} ({self.weights}) / {self.model}"

    def scalars(self) -> dict:
        """The report.csv columns of the row (``ROW_SCALARS``; no per-class lists or confusion matrix)."""
        return {key: getattr(self, key) for key in ROW_SCALARS}


@dataclass(frozen=True)
class FeatureSetRecord:
    """A feature file as a run used it: where it came from, its settings, its split and its baseline.

    Attributes
    ----------
    file, test_file : str
        The training feature file, and the separate test file ("" when the test photos were held out).
    backbone : str or None
    weights : str
        Short name of the weights (see ``Row.weights``).
    settings : dict
        The feature settings new photos must be extracted with (``furnitype.features.SETTING_KEYS``).
    meta : dict
        The feature file's scalar metadata (provenance: versions, weights source, feature_dim ...).
    feature_dim : int
    classes, dropped_classes : list of str
        Classes trained on, and classes left out for having too few photos.
    n_train, n_test : int
    baseline : dict
        The reference model's test scores and ``fit_seconds``.
    """

    file: str
    test_file: str
    backbone: str | None
    weights: str
    settings: dict
    meta: dict
    feature_dim: int
    classes: list[str]
    dropped_classes: list[str]
    n_train: int
    n_test: int
    baseline: dict


@dataclass(frozen=True)
class RunOptions:
    """The options a run was trained with (see ``furnitype.training.classify``)."""

    feature_files: list[str]
    models: list[str]
    test_files: list[str]
    test_size: float | None
    val_size: float
    cv: int
    seed: int
    class_weight: str | None
    min_photos_per_class: int


@dataclass(frozen=True)
class RunDocument:
    """The content of ``metrics.json``: a run, or a merged view of several (``merged_from``).

    Attributes
    ----------
    format : int
    kind : str
        ``furnitype classify run`` or ``furnitype merged report``.
    run : str
        The run's name, or the merged runs' names joined by `` + ``.
    created : str or None
        ISO time of a run (None when merged).
    versions : dict or None
        Package versions of a run (None when merged).
    options : RunOptions or None
        A run's options (None when merged).
    merged_from : list of str or None
        The runs a merged view combines (None for a run).
    baseline : str or None
        The reference model every row is compared with.
    feature_sets : dict of str to FeatureSetRecord
    rows : list of Row
        Best first.
    notes, warnings : list of str
        Remarks on the results; problems with the input that the run worked around.
    """

    format: int
    kind: str
    run: str
    baseline: str | None
    feature_sets: dict[str, FeatureSetRecord]
    rows: list[Row]
    notes: list[str]
    warnings: list[str]
    created: str | None = None
    versions: dict | None = None
    options: RunOptions | None = None
    merged_from: list[str] | None = None

    def as_dict(self) -> dict:
        """The JSON form: fields in ``metrics.json``'s order, the unset optional ones left out."""
        data = {
            "format": self.format,
            "kind": self.kind,
            "run": self.run,
            "created": self.created,
            "versions": self.versions,
            "options": dataclasses.asdict(self.options) if self.options is not None else None,
            "merged_from": self.merged_from,
            "baseline": self.baseline,
            "feature_sets": {key: dataclasses.asdict(fs) for key, fs in self.feature_sets.items()},
            "rows": [dataclasses.asdict(row) for row in self.rows],
            "notes": self.notes,
            "warnings": self.warnings,
        }
        optional = ("created", "versions", "options", "merged_from")
        return {key: value for key, value in data.items() if value is not None or key not in optional}

    @classmethod
    def from_dict(cls, data: Any) -> RunDocument:
        """Build from the JSON form; raises ``ValueError`` naming the first problem found."""
        data = _checked(cls, data, "metrics")
        options = data.get("options")
        feature_sets = _mapping(data["feature_sets"], "feature_sets")
        return cls(
            **{
                **data,
                "options": RunOptions(**_checked(RunOptions, options, "options")) if options is not None else None,
                "feature_sets": {
                    key: FeatureSetRecord(**_checked(FeatureSetRecord, fs, f"feature_sets.{key}"))
                    for key, fs in feature_sets.items()
                },
                "rows": [
                    Row(**_checked(Row, row, f"rows[{i}]")) for i, row in enumerate(_sequence(data["rows"], "rows"))
                ],
            }
        )


@dataclass(frozen=True)
class ModelRecord:
    """The content of ``model.json``: what rebuilds a fitted model around its payload file.

    Attributes
    ----------
    format : int
    model : str
        Registry name of the model kind.
    params : dict
        Constructor parameters.
    classes : list of str
    n_features_in : int
    fitted : dict
        The fitted facts (``FeatureClassifier.summary()``), restored as attributes ending in ``_``.
    payload : str
        File name of the fitted estimator(s) beside ``model.json``.
    versions : dict
        Package versions that wrote it.
    """

    format: int
    model: str
    params: dict
    classes: list[str]
    n_features_in: int
    fitted: dict
    payload: str
    versions: dict = field(default_factory=dict)


def model_dir(features: str, model: str) -> str:
    """Where a run keeps the model ``model`` fitted on the feature set ``features``, relative to the run."""
    return f"models/{features}/{model}"


def read_run_document(run_dir: str | os.PathLike) -> RunDocument:
    """Read ``metrics.json`` of a run folder.

    Raises
    ------
    StoreError
        The file cannot be read, is not a run document, is damaged, or is from a newer furnitype.
    """
    path = Path(run_dir) / METRICS_FILE
    data = _read_json(path)
    if not isinstance(data, dict) or "rows" not in data:
        raise StoreError(f"{path} is not a furnitype run document.")
    try:
        if _format(data) > RUN_FORMAT:
            raise StoreError(f"{run_dir} was written by a newer furnitype (run format {data['format']}).")
        return RunDocument.from_dict(data)
    except ValueError as err:
        raise StoreError(f"{path} is damaged: {err}") from None


def write_run_document(run_dir: str | os.PathLike, document: RunDocument) -> Path:
    """Write ``metrics.json`` into a run folder; returns its path."""
    return _write_json(Path(run_dir) / METRICS_FILE, document.as_dict())


def write_feature_set(model_dir: str | os.PathLike, record: FeatureSetRecord) -> Path:
    """Write ``settings.json`` (the feature set's record) beside a feature set's models; returns its path."""
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    return _write_json(Path(model_dir) / SETTINGS_FILE, dataclasses.asdict(record))


def read_model_record(model_dir: str | os.PathLike) -> ModelRecord:
    """Read ``model.json`` of a saved model's folder.

    Raises
    ------
    StoreError
        No ``model.json`` there, or one that cannot be read, is damaged, or is from a newer furnitype.
    """
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise StoreError(f"{model_dir} holds no saved model (no {MODEL_FILE}).")
    data = _read_json(path)
    try:
        if _format(_mapping(data, "model")) > MODEL_FORMAT:
            raise StoreError(f"{model_dir} was saved by a newer furnitype (model format {data['format']}).")
        return ModelRecord(**_checked(ModelRecord, data, "model"))
    except ValueError as err:
        raise StoreError(f"{path} is damaged: {err}") from None


def write_model_record(model_dir: str | os.PathLike, record: ModelRecord) -> Path:
    """Write ``model.json`` into a saved model's folder; returns its path."""
    return _write_json(Path(model_dir) / MODEL_FILE, dataclasses.asdict(record))


def _checked(cls: type, data: Any, where: str) -> dict:
    """``data`` as keyword arguments of the record ``cls``; the missing and unknown keys are named."""
    data = _mapping(data, where)
    fields = dataclasses.fields(cls)
    required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    problems = [f"unknown key {where}.{key}" for key in sorted(set(data) - {f.name for f in fields})]
    problems += [f"missing key {where}.{key}" for key in sorted(required - set(data))]
    if problems:
        raise ValueError(", ".join(problems))
    return data


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where} is not a JSON object")
    return value


def _sequence(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{where} is not a JSON list")
    return value


def _format(data: dict) -> int:
    """The layout version a file declares (0 when it declares none)."""
    found = data.get("format", 0)
    if not isinstance(found, int) or isinstance(found, bool):
        raise ValueError(f"format {found!r} is not an integer")
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StoreError(f"{path} cannot be read: {err}") from None


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path
