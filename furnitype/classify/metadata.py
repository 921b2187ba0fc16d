"""The metadata files of a run folder as typed records, and the one place where they are read and written.

- ``metrics.json``: a ``RunDocument`` (options, ``FeatureSetRecord`` per feature file, ``Row`` per feature file
  x model, notes, warnings);
- ``models/<features>/settings.json``: the ``FeatureSetRecord`` a model needs at prediction time;
- ``models/<features>/<model>/model.json``: a ``ModelRecord`` (parameters, classes, what the fit found).

The records' JSON keys are their field names, and the records are the schema: reading checks every key
(missing, unknown), every value's type (from the field's annotation), its range (the field's ``check``) and
what must agree between fields (a record's ``_check_consistency``). Anything else is a ``Damage`` naming the
file and the field. Files are read only from inside the run folder (``furnitype.classify.runfiles``).
Nothing here imports scikit-learn or Keras.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, Union

from furnitype.classify.confidence import wilson_interval
from furnitype.classify.runfiles import CONTROL_CHARACTERS, Damage, read_inside, relative_parts
from furnitype.errors import StoreError
from furnitype.outputs import significant

#: Version of the run folder layout (``metrics.json``, ``split.csv``, ``models/``); a newer one is refused.
RUN_FORMAT = 1
#: Version of the saved-model layout (``model.json`` + payload); a newer one is refused.
MODEL_FORMAT = 1
METRICS_FILE = "metrics.json"
MODEL_FILE = "model.json"
SETTINGS_FILE = "settings.json"
#: ``kind`` of a run folder written by ``classify``, and of a folder written by ``report --out``.
RUN_KIND = "furnitype classify run"
REPORT_KIND = "furnitype merged report"
#: Seeds are what numpy's generators take.
MAX_SEED = 2**32 - 1

#: The summary test scores of a row (and of a baseline), in table order.
SCORE_NAMES = ("accuracy", "balanced_accuracy", "macro_f1", "top3_accuracy", "log_loss")
#: The scalar fields of a row, in the order of report.csv.
ROW_SCALARS = (
    "rank",
    "backbone",
    "weights",
    "weights_identity",
    "model",
    "accuracy",
    "accuracy_low",
    "accuracy_high",
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


# -- what a value may be (a field's ``check``: the value -> the problem, or None) --------------------------------


def rule(check) -> dict:
    """The metadata of a record field whose value must also pass ``check`` (which returns the problem, or None):
    ``name: str = field(metadata=rule(label))``."""
    return {"check": check}


def at_least(low: float):
    """The check "a number, at least ``low``"."""
    return lambda value: None if value >= low else f"{value!r} is less than {low}"


def between(low: float, high: float):
    """The check "a number from ``low`` to ``high``"."""
    return lambda value: None if low <= value <= high else f"{value!r} is not between {low} and {high}"


def one_of(*allowed):
    """The check "one of these values"."""
    return lambda value: None if value in allowed else f"{value!r} is not one of {', '.join(map(repr, allowed))}"


def name(value: str) -> str | None:
    """The check for a name that is also a file or folder name: not empty, no ``/``, ``.`` or ``..``, no controls."""
    if value in ("", ".", "..") or "/" in value or "\\" in value or CONTROL_CHARACTERS.search(value):
        return f"{value!r} is not a plain name"
    return None


def label(value: str) -> str | None:
    """The check for text shown on one line (a class name, a key): not empty, no control characters."""
    return f"{value!r} is not a one-line name" if value == "" or CONTROL_CHARACTERS.search(value) else None


def one_line(value: list) -> str | None:
    """The check for lines of text (notes, warnings): no control characters, so none reach a terminal."""
    found = [line for line in value if CONTROL_CHARACTERS.search(line)]
    return f"{found[0]!r} holds control characters" if found else None


def class_names(value: list) -> str | None:
    """The check for a model's classes: two or more one-line names, sorted, each once."""
    problems = [label(c) for c in value if label(c)]
    if problems:
        return problems[0]
    if len(value) < 2:
        return f"{len(value)} classes; a model has at least 2"
    if value != sorted(set(value)):
        return "not sorted, or a class is listed twice"
    return None


def short_hex(value: str) -> str | None:
    """The check for ``test_set``: 12 lowercase hex digits."""
    return None if re.fullmatch(r"[0-9a-f]{12}", value) else f"{value!r} is not 12 hex digits"


def weights_identity(value: str) -> str | None:
    """The check for a weights identity as a feature file records it: ``imagenet``, ``none(seed=N)`` or
    ``sha256:`` and 64 hex digits."""
    if re.fullmatch(r"imagenet|none\(seed=[0-9]+\)|sha256:[0-9a-f]{64}", value):
        return None
    return f"{value[:80]!r} is not imagenet, none(seed=N) or sha256:<64 hex digits>"


def iso_time(value: str) -> str | None:
    """The check for an ISO 8601 time."""
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return f"{value!r} is not an ISO 8601 time"
    return None


def share_of_photos(value: float) -> str | None:
    """The check for a share of the photos held out: from 0 (none) to less than 1."""
    return None if 0 <= value < 1 else f"{value!r} is not from 0 to less than 1"


SHARE = between(0, 1)
NON_NEGATIVE = at_least(0)
COUNT = at_least(1)
#: The scalar values a feature file's settings and provenance hold.
Scalar = Union[str, int, float, bool, None]  # noqa: UP007 - resolved at runtime by typing.get_type_hints


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
    weights_identity : str or None
        The weights' full identity as the feature file records it (``imagenet``, ``none(seed=0)``,
        ``sha256:<hex>``); None in runs written before it was recorded.
    """

    features: str = field(metadata=rule(label))
    backbone: str = field(metadata=rule(label))
    weights: str = field(metadata=rule(label))
    model: str = field(metadata=rule(name))
    accuracy: float = field(metadata=rule(SHARE))
    balanced_accuracy: float = field(metadata=rule(SHARE))
    macro_f1: float = field(metadata=rule(SHARE))
    top3_accuracy: float = field(metadata=rule(SHARE))
    log_loss: float = field(metadata=rule(NON_NEGATIVE))
    fit_seconds: float = field(metadata=rule(NON_NEGATIVE))
    fit_cpu_seconds: float = field(metadata=rule(NON_NEGATIVE))
    predict_ms_per_image: float = field(metadata=rule(NON_NEGATIVE))
    n_train: int = field(metadata=rule(COUNT))
    n_test: int = field(metadata=rule(COUNT))
    n_classes: int = field(metadata=rule(at_least(2)))
    test_set: str = field(metadata=rule(short_hex))
    chosen: str = field(metadata=rule(label))
    details: dict
    params: dict
    classes: list[str] = field(metadata=rule(class_names))
    confusion: list[list[int]]
    per_class: dict[str, list[float]]
    model_dir: str
    run: str = field(metadata=rule(label))
    baseline_accuracy: float = field(metadata=rule(SHARE))
    vs_baseline_points: float = field(metadata=rule(between(-100, 100)))
    rank: int = field(default=0, metadata={"check": NON_NEGATIVE})
    weights_identity: str | None = field(default=None, metadata={"check": weights_identity})

    @property
    def accuracy_interval(self) -> tuple[float, float]:
        """The 95 % Wilson score interval of the accuracy on the ``n_test`` photos (from the confusion matrix)."""
        return wilson_interval(sum(line[i] for i, line in enumerate(self.confusion)), self.n_test)

    @property
    def accuracy_low(self) -> float:
        return self.accuracy_interval[0]

    @property
    def accuracy_high(self) -> float:
        return self.accuracy_interval[1]

    @property
    def label(self) -> str:
        """``model on features (backbone, weights)``, as notes and pictures name a row."""
        return f"{self.model} on {self.features} ({self.backbone}, {self.weights})"

    def scalars(self) -> dict:
        """The report.csv (and ``--json``) columns of the row (``ROW_SCALARS``; no per-class lists or confusion
        matrix); floats with 6 significant digits."""
        values = {key: getattr(self, key) for key in ROW_SCALARS}
        return {key: significant(v) if isinstance(v, float) else v for key, v in values.items()}

    def _check_consistency(self, where: str) -> None:
        n = len(self.classes)
        if self.n_classes != n:
            raise Damage(_child(where, "n_classes"), f"{self.n_classes}, but classes lists {n}")
        confusion = self.confusion
        if len(confusion) != n or any(len(line) != n or min(line) < 0 for line in confusion):
            raise Damage(_child(where, "confusion"), f"not a {n} x {n} matrix of counts")
        if sum(map(sum, confusion)) != self.n_test:
            raise Damage(_child(where, "confusion"), f"counts {sum(map(sum, confusion))} photos, not n_test")
        if set(self.per_class) != set(PER_CLASS):
            raise Damage(_child(where, "per_class"), f"keys are not {', '.join(PER_CLASS)}")
        for key, values in self.per_class.items():
            check = PER_CLASS[key]
            if len(values) != n or any(check(v) for v in values):
                raise Damage(_child(where, f"per_class.{key}"), f"not {n} values {PER_CLASS_WORDS[key]}")
        support = sum(self.per_class["support"])
        if support != self.n_test:
            raise Damage(_child(where, "per_class.support"), f"counts {support} photos, not n_test")
        gap = 100 * (self.accuracy - self.baseline_accuracy)
        if abs(self.vs_baseline_points - gap) > 0.01:
            raise Damage(_child(where, "vs_baseline_points"), f"{self.vs_baseline_points}, not the accuracy's gap")
        relative_parts(self.model_dir, _child(where, "model_dir"))


#: ``Row.per_class``: what each list holds.
PER_CLASS = {
    "precision": lambda v: not 0 <= v <= 1,
    "recall": lambda v: not 0 <= v <= 1,
    "f1": lambda v: not 0 <= v <= 1,
    "support": lambda v: not isinstance(v, int) or v < 0,
}
PER_CLASS_WORDS = {"precision": "in [0, 1]", "recall": "in [0, 1]", "f1": "in [0, 1]", "support": "of photos"}


@dataclass(frozen=True)
class FeaturePart:
    """One feature file of a fused feature set: new photos are extracted with its settings, in the parts' order.

    Attributes
    ----------
    file, test_file : str
        The part's training feature file, and its separate test file ("" when the test photos were held out).
    backbone : str or None
    weights : str
        Short name of the weights (see ``Row.weights``).
    settings : dict
        The feature settings of this part's columns (``furnitype.features.SETTING_KEYS``).
    meta : dict
        The part's feature file's scalar metadata.
    feature_dim : int
        Its columns: the fused rows are the parts' rows side by side, in this order.
    """

    file: str
    test_file: str
    backbone: str | None
    weights: str = field(metadata=rule(label))
    settings: dict[str, Scalar]
    meta: dict[str, Scalar]
    feature_dim: int = field(metadata=rule(COUNT))


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
    parts : list of FeaturePart or None
        A fused feature set's feature files, in column order (``classify --fuse``); None for one feature file.
        Then ``file``, ``backbone``, ``weights`` and each setting join the parts' values with ``+`` (one value
        when they agree): names for the report, while new photos are extracted part by part.
    """

    file: str
    test_file: str
    backbone: str | None
    weights: str = field(metadata=rule(label))
    settings: dict[str, Scalar]
    meta: dict[str, Scalar]
    feature_dim: int = field(metadata=rule(COUNT))
    classes: list[str] = field(metadata=rule(class_names))
    dropped_classes: list[str]
    n_train: int = field(metadata=rule(COUNT))
    n_test: int = field(metadata=rule(COUNT))
    baseline: dict[str, float]
    parts: list[FeaturePart] | None = None

    def as_dict(self) -> dict:
        """The JSON form; ``parts`` only when fused, so a run of single feature files reads as before."""
        data = dataclasses.asdict(self)
        if self.parts is None:
            del data["parts"]
        return data

    @property
    def extract_cpu_ms(self) -> float | None:
        """CPU milliseconds ``extract`` spent per row of the feature file (``meta``'s ``extract_cpu_seconds`` over
        ``extract_cpu_rows``); None when the file records none."""
        seconds, rows = self.meta.get("extract_cpu_seconds"), self.meta.get("extract_cpu_rows")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (seconds, rows))
        if not numbers or not rows > 0 or not 0 <= seconds < float("inf"):  # type: ignore[operator]
            return None
        return 1000.0 * seconds / rows  # type: ignore[operator]

    def _check_consistency(self, where: str) -> None:
        if self.parts is not None:
            if len(self.parts) < 2:
                raise Damage(_child(where, "parts"), f"{len(self.parts)} parts; a fused feature set has at least 2")
            if sum(part.feature_dim for part in self.parts) != self.feature_dim:
                raise Damage(_child(where, "parts"), f"their feature_dim do not add up to {self.feature_dim}")
        if set(self.dropped_classes) & set(self.classes) or len(set(self.dropped_classes)) < len(self.dropped_classes):
            raise Damage(_child(where, "dropped_classes"), "a class is listed twice, or also trained on")
        recorded_dim = self.meta.get("feature_dim", self.feature_dim)
        if recorded_dim != self.feature_dim:
            raise Damage(_child(where, "meta.feature_dim"), f"{recorded_dim!r}, but feature_dim is {self.feature_dim}")
        source = self.meta.get("weights_source")
        if source is not None and not isinstance(source, str):
            raise Damage(_child(where, "meta.weights_source"), "not a string")
        if self.baseline:
            if set(self.baseline) != {*SCORE_NAMES, "fit_seconds"}:
                raise Damage(_child(where, "baseline"), f"keys are not {', '.join(SCORE_NAMES)}, fit_seconds")
            for key, value in self.baseline.items():
                check = NON_NEGATIVE if key in ("log_loss", "fit_seconds") else SHARE
                if check(value):
                    raise Damage(_child(where, f"baseline.{key}"), check(value))


@dataclass(frozen=True)
class RunOptions:
    """The options a run was trained with (see ``furnitype.training.classify``)."""

    feature_files: list[str]
    models: list[str]
    test_files: list[str]
    test_size: float | None = field(metadata=rule(share_of_photos))
    val_size: float = field(metadata=rule(share_of_photos))
    cv: int = field(metadata=rule(at_least(2)))
    seed: int = field(metadata=rule(between(0, MAX_SEED)))
    class_weight: str | None = field(metadata=rule(one_of("balanced")))
    min_photos_per_class: int = field(metadata=rule(COUNT))
    fuse: bool = False

    def _check_consistency(self, where: str) -> None:
        if not self.feature_files:
            raise Damage(_child(where, "feature_files"), "empty")
        if not self.models or len(set(self.models)) < len(self.models) or any(map(name, self.models)):
            raise Damage(_child(where, "models"), "not a list of model names, each once")
        if (self.test_size is None) != bool(self.test_files) or self.test_size == 0:
            raise Damage(_child(where, "test_size"), "a run has test files or a test size above 0, not both")


@dataclass(frozen=True)
class RunDocument:
    """The content of ``metrics.json``: a run, or a merged view of several (``merged_from``).

    Attributes
    ----------
    format : int
    kind : str
        ``RUN_KIND`` (written by ``classify``) or ``REPORT_KIND`` (by ``report --out``).
    run : str
        The run's name, or the merged runs' names joined by `` + ``.
    created : str or None
        ISO time of a run (None when merged).
    versions : dict or None
        Package versions of a run (None when merged).
    options : RunOptions or None
        A run's options (None when merged from several).
    merged_from : list of str or None
        The runs a report combines (None for a run).
    baseline : str or None
        The reference model every row is compared with.
    feature_sets : dict of str to FeatureSetRecord
    rows : list of Row
        Best first.
    notes, warnings : list of str
        Remarks on the results; problems with the input that the run worked around.
    """

    format: int = field(metadata=rule(COUNT))
    kind: str = field(metadata=rule(one_of(RUN_KIND, REPORT_KIND)))
    run: str = field(metadata=rule(label))
    baseline: str | None
    feature_sets: dict[str, FeatureSetRecord]
    rows: list[Row]
    notes: list[str] = field(metadata=rule(one_line))
    warnings: list[str] = field(metadata=rule(one_line))
    created: str | None = field(default=None, metadata={"check": iso_time})
    versions: dict[str, str] | None = None
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
            "feature_sets": {key: fs.as_dict() for key, fs in self.feature_sets.items()},
            "rows": [dataclasses.asdict(row) for row in self.rows],
            "notes": self.notes,
            "warnings": self.warnings,
        }
        optional = ("created", "versions", "options", "merged_from")
        return {key: value for key, value in data.items() if value is not None or key not in optional}

    @classmethod
    def from_dict(cls, data: Any) -> RunDocument:
        """Build from the JSON form; raises ``Damage`` naming the first problem found."""
        return _record(cls, data, _in_file(METRICS_FILE))

    def _check_consistency(self, where: str) -> None:
        if self.kind == RUN_KIND:
            for key in ("created", "versions", "options"):
                if getattr(self, key) is None:
                    raise Damage(_child(where, key), f"missing (a {RUN_KIND} records it)")
            if self.merged_from is not None:
                raise Damage(_child(where, "merged_from"), f"set, but this is a {RUN_KIND}")
        elif not self.merged_from:
            raise Damage(_child(where, "merged_from"), f"missing (a {REPORT_KIND} names the runs it merges)")
        if not self.rows:
            raise Damage(_child(where, "rows"), "empty")
        if self.options is not None:
            for key, fs in self.feature_sets.items():
                if (fs.parts is not None) != self.options.fuse:
                    found = "missing" if self.options.fuse else "set"
                    fuse = str(self.options.fuse).lower()
                    raise Damage(_child(where, f"feature_sets.{key}.parts"), f"{found}, but options.fuse is {fuse}")
        seen = set()
        for i, row in enumerate(self.rows):
            at = f"{_child(where, 'rows')}[{i}]"
            self._check_row(row, at)
            if (row.features, row.model) in seen:
                raise Damage(at, f"a second row of {row.features}/{row.model}")
            seen.add((row.features, row.model))
            if row.rank != i + 1:
                raise Damage(f"{at}.rank", f"{row.rank}, but it is row {i + 1} of a ranked table")

    def _check_row(self, row: Row, at: str) -> None:
        feature_set = self.feature_sets.get(row.features)
        if feature_set is None:
            raise Damage(f"{at}.features", f"{row.features!r} is not a key of feature_sets")
        for key in ("classes", "n_train", "n_test", "weights"):
            if getattr(row, key) != getattr(feature_set, key):
                raise Damage(f"{at}.{key}", f"differs from feature_sets.{row.features}.{key}")
        if row.weights_identity is not None and row.weights_identity != feature_set.settings.get("weights"):
            raise Damage(f"{at}.weights_identity", f"differs from feature_sets.{row.features}.settings.weights")
        if self.kind != RUN_KIND:
            return
        if problem := name(row.features):
            raise Damage(f"{at}.features", problem)
        if row.model_dir != model_dir(row.features, row.model):
            raise Damage(f"{at}.model_dir", f"{row.model_dir!r} is not {model_dir(row.features, row.model)!r}")
        if row.run != self.run:
            raise Damage(f"{at}.run", f"{row.run!r}, but the run is {self.run!r}")
        if row.model not in (self.options.models if self.options is not None else []):
            raise Damage(f"{at}.model", f"{row.model!r} is not one of options.models")


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

    format: int = field(metadata=rule(COUNT))
    model: str = field(metadata=rule(name))
    params: dict
    classes: list[str] = field(metadata=rule(class_names))
    n_features_in: int = field(metadata=rule(COUNT))
    fitted: dict
    payload: str = field(metadata=rule(name))
    versions: dict[str, str] = field(default_factory=dict)


def model_dir(features: str, model: str) -> str:
    """Where a run keeps the model ``model`` fitted on the feature set ``features``, relative to the run."""
    return f"models/{features}/{model}"


# -- reading and writing ---------------------------------------------------------------------------------------


def read_run_document(run_dir: str | os.PathLike) -> RunDocument:
    """Read and check ``metrics.json`` of a run folder.

    Raises
    ------
    Damage
        The file is missing, not JSON, or not a run document furnitype writes (the first problem found).
    StoreError
        The file cannot be read, or is from a newer furnitype.
    """
    data = _read_json(run_dir, METRICS_FILE)
    if _format(data, _in_file(METRICS_FILE)) > RUN_FORMAT:
        raise StoreError(f"{run_dir} was written by a newer furnitype (run format {data['format']}).")
    return RunDocument.from_dict(data)


def write_run_document(run_dir: str | os.PathLike, document: RunDocument) -> Path:
    """Write ``metrics.json`` into a run folder; returns its path."""
    return _write_json(Path(run_dir) / METRICS_FILE, document.as_dict())


def read_feature_set(run_dir: str | os.PathLike, features: str) -> FeatureSetRecord:
    """Read and check ``models/<features>/settings.json`` of a run folder; raises ``Damage`` as reading does."""
    relative = f"models/{features}/{SETTINGS_FILE}"
    return _record(FeatureSetRecord, _read_json(run_dir, relative), _in_file(relative))


def write_feature_set(model_dir: str | os.PathLike, record: FeatureSetRecord) -> Path:
    """Write ``settings.json`` (the feature set's record) beside a feature set's models; returns its path."""
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    return _write_json(Path(model_dir) / SETTINGS_FILE, record.as_dict())


def read_model_record(model_dir: str | os.PathLike) -> ModelRecord:
    """Read and check ``model.json`` of a saved model's folder.

    Raises
    ------
    Damage
        Named from the model's folder (``model.json params``): missing, not JSON, or not what ``save`` writes.
    StoreError
        The file cannot be read, or is from a newer furnitype.
    """
    data = _read_json(model_dir, MODEL_FILE)
    if _format(data, _in_file(MODEL_FILE)) > MODEL_FORMAT:
        raise StoreError(f"{model_dir} was saved by a newer furnitype (model format {data['format']}).")
    return _record(ModelRecord, data, _in_file(MODEL_FILE))


def write_model_record(model_dir: str | os.PathLike, record: ModelRecord) -> Path:
    """Write ``model.json`` into a saved model's folder; returns its path."""
    return _write_json(Path(model_dir) / MODEL_FILE, dataclasses.asdict(record))


def _read_json(folder: str | os.PathLike, relative: str) -> Any:
    data = read_inside(folder, relative)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise Damage(relative, f"not JSON ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def _format(data: Any, where: str) -> int:
    """The layout version a file declares (0 when it declares none: the record check names it missing)."""
    if not isinstance(data, dict):
        raise Damage(where, f"{_kind(data)}, not an object")
    found = data.get("format", 0)
    if not isinstance(found, int) or isinstance(found, bool):
        raise Damage(_child(where, "format"), f"{_kind(found)}, not an integer")
    return found


# -- the schema: a record's annotations and checks, applied to JSON ---------------------------------------------


def _record(cls: type, data: Any, where: str):
    """Build the record ``cls`` from its JSON form, checking keys, types, ranges and consistency."""
    if not isinstance(data, dict):
        raise Damage(where, f"{_kind(data)}, not an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise Damage(_child(where, str(key)), "unknown key")
    values = {}
    for key, spec in fields.items():
        at = _child(where, key)
        if key not in data:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise Damage(at, "missing")
            continue
        value = _typed(_hints(cls)[key], data[key], at)
        check = spec.metadata.get("check")
        problem = check(value) if check is not None and value is not None else None
        if problem:
            raise Damage(at, problem)
        values[key] = value
    record = cls(**values)
    if hasattr(record, "_check_consistency"):
        record._check_consistency(where)
    return record


@cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _typed(hint: Any, value: Any, where: str) -> Any:
    """``value`` checked against the annotation ``hint`` (records built, lists and mappings item by item)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _record(hint, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # X or null: X's own problem
            return _typed(arms[0], value, where)
        for arm in arms:
            try:
                return _typed(arm, value, where)
            except Damage:
                continue
        raise Damage(where, f"{_kind(value)}, not {' or '.join(_kind_of(a) for a in args)}")
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise Damage(where, f"{_kind(value)}, not a list")
        return [_typed(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)] if args else value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise Damage(where, f"{_kind(value)}, not an object")
        return {key: _typed(args[1], item, _child(where, key)) for key, item in value.items()} if args else value
    if hint is Any:
        return value
    if not _is(hint, value):
        raise Damage(where, f"{_kind(value)}, not {_kind_of(hint)}")
    return value


def _is(hint: type, value: Any) -> bool:
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}


def _kind_of(hint: Any) -> str:
    if hint in _KINDS:
        return _KINDS[hint]
    return "a list" if typing.get_origin(hint) is list else "an object"


def _kind(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value!r}"
    for kind in (bool, int, float, str, type(None)):
        if isinstance(value, kind):
            return f"{_KINDS[kind]} ({json.dumps(value)[:40]})"
    return "a list" if isinstance(value, list) else "an object"


def _in_file(relative: str) -> str:
    """Where a file's top-level fields are: ``metrics.json `` (``_child`` adds ``rows``)."""
    return f"{relative} "


def _child(where: str, key: str) -> str:
    """``metrics.json rows`` under a file, ``rows[0].accuracy`` under a field."""
    return f"{where}{key}" if where.endswith(" ") else f"{where}.{key}"
