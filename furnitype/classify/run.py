"""The run folder that ``furnitype classify`` writes, and reading it back (``report``, ``predict``).

Layout::

    RUN/metrics.json                      the whole result (a RunDocument): options, feature sets (their
                                          settings), rows (metrics, per-class scores, confusion matrix, choices)
    RUN/report.csv, report.md, report.html, scores.png, confusion-<features>-<model>.png
    RUN/split.csv                         features, sha256, path, label, part (train/test) of every row used
    RUN/mistakes.csv, mistakes/*.jpg      per feature set, misclassified test photos and possible label errors
                                          (``furnitype.classify.mistakes``), and their thumbnails
    RUN/models/<features>/settings.json   the feature settings a model needs at prediction time
    RUN/models/<features>/<model>/        model.json + model.keras (dense) or model.skops (logreg, svm)

Reading a run needs neither scikit-learn nor Keras until a model is loaded; every metadata file is read and
checked by ``furnitype.classify.metadata``, only from inside the run folder (``furnitype.classify.runfiles``),
and a model is loaded only once its folder, its record and its payload agree with the run's
``metrics.json``. Writing a run folder is ``furnitype.classify.output``'s.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from furnitype.classify.metadata import (
    METRICS_FILE,
    REPORT_KIND,
    ROW_SCALARS,
    RUN_KIND,
    SETTINGS_FILE,
    FeaturePart,
    FeatureSetRecord,
    Row,
    RunDocument,
    read_feature_set,
    read_run_document,
)
from furnitype.classify.output import recover
from furnitype.classify.runfiles import Damage, csv_rows, folder_inside, read_inside
from furnitype.errors import InputError, StoreError
from furnitype.outputs import data_frame, shown_name

if TYPE_CHECKING:
    from furnitype.classify.models import FeatureClassifier

SPLIT_FILE = "split.csv"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Run:
    """A classification run: its folder and the document stored in ``metrics.json``.

    Attributes
    ----------
    path : Path or None
        The run folder (``None`` for a merged view that was not written).
    document : RunDocument
        Options, feature sets with their settings, ranked rows, notes and warnings.
    """

    path: Path | None
    document: RunDocument

    @property
    def rows(self) -> list[Row]:
        """One row per feature set x model, best first."""
        return self.document.rows

    @property
    def warnings(self) -> list[str]:
        """Problems with the input that the run worked around (a dropped class, unlabelled rows ...)."""
        return self.document.warnings

    @property
    def notes(self) -> list[str]:
        """Remarks on the results (a row trailing the baseline, fewer CV folds than asked ...)."""
        return self.document.notes

    @property
    def report_html(self) -> Path | None:
        """The HTML report, when the run has a folder."""
        return self.path / "report.html" if self.path is not None else None

    def to_frame(self):
        """The table as a pandas DataFrame, best row first: the columns of report.csv (``ROW_SCALARS``);
        ``frame.attrs`` holds ``notes`` and ``warnings``. Needs pandas (``pip install 'furnitype[pandas]'``)."""
        return data_frame((row.scalars() for row in self.rows), order=ROW_SCALARS,
                          attrs={"run": str(self.path) if self.path else None, "notes": self.notes,
                                 "warnings": self.warnings})

    def summary(self) -> dict:
        """The JSON-ready result a command prints: paths, table rows (scalars only), notes and warnings."""
        return {
            "run": str(self.path) if self.path is not None else None,
            "report_html": str(self.report_html) if self.report_html is not None else None,
            "rows": [row.scalars() for row in self.rows],
            "notes": self.notes,
            "warnings": self.warnings,
        }


@dataclass(frozen=True)
class LoadedModel:
    """A fitted model of a run with what prediction needs to know.

    Attributes
    ----------
    model : FeatureClassifier
        Fitted; ``model.predict_proba(features)`` columns follow ``classes``.
    name : str
        ``dense``, ``logreg`` or ``svm``.
    features : str
        The feature set it was trained on (a key of the run's ``feature_sets``).
    settings : dict
        The feature settings new photos must be extracted with (``furnitype.features.SETTING_KEYS``).
    meta : dict
        The training feature file's provenance (feature_dim, versions, file ...).
    classes : list of str
    row : Row
        The model's row of the report (its test metrics).
    parts : list of FeaturePart or None
        A fused feature set's parts, in column order: new photos are extracted with each part's settings and
        their features put side by side (``settings`` then only names them). None for one feature file.
    """

    model: FeatureClassifier
    name: str
    features: str
    settings: dict
    meta: dict
    classes: list[str]
    row: Row
    parts: list[FeaturePart] | None = None


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read a run folder written by ``furnitype classify`` (no model is loaded).

    Raises
    ------
    InputError
        The folder does not exist or is not a furnitype run.
    StoreError
        Its ``metrics.json`` is damaged (``run X is damaged: <field>: <problem>``) or from a newer furnitype.
    """
    path = Path(run_dir)
    if not path.is_dir():
        recover(path)  # a replacement killed halfway, on a file system that cannot swap in one step
    if not path.is_dir():
        raise InputError(f"run folder not found: {path}")
    if not os.path.lexists(path / METRICS_FILE):
        raise InputError(f"{path} is not a furnitype run (no {METRICS_FILE}).")
    try:
        return Run(path, read_run_document(path))
    except Damage as damage:
        raise damaged(path, damage) from damage


def damaged(run_dir: str | os.PathLike, damage: Damage) -> StoreError:
    """The error for a run folder that is not what furnitype writes: ``run X is damaged: <field>: <problem>``."""
    return StoreError(f"run {run_dir} is damaged: {damage}")


def load_model(run_dir: str | os.PathLike, model: str | None = None, *, features: str | None = None) -> LoadedModel:
    """Load a fitted model of a run, with the feature settings that new photos must be extracted with.

    Parameters
    ----------
    run_dir : str or path-like
        A folder written by ``furnitype classify``.
    model : {"dense", "logreg", "svm"} or None, default=None
        ``None`` takes the best row's model.
    features : str or None, default=None
        Feature set key (the training file's name without ``.h5``); ``None``: the best row with ``model``.

    Returns
    -------
    LoadedModel

    Raises
    ------
    InputError
        No row of the run matches ``model`` and ``features``, or the folder is a report (it holds no models).
    StoreError
        The saved model is missing, damaged, holds untrusted types, or disagrees with ``metrics.json``.
    """
    run = load_run(run_dir)
    if run.document.kind != RUN_KIND:
        raise InputError(
            f"{run.path} is a report of {', '.join(run.document.merged_from or [])}; it holds no models: "
            "use one of those runs."
        )
    matches = [
        row
        for row in run.rows
        if (model is None or row.model == model) and (features is None or row.features == features)
    ]
    if not matches:
        available = ", ".join(f"{row.features}/{row.model}" for row in run.rows)
        raise InputError(
            f"{run.path} has no model {model or '(any)'} on features {features or '(any)'}; it has: {available}"
        )
    row = matches[0]
    feature_set = run.document.feature_sets[row.features]
    try:
        fitted = _loaded_model(Path(run_dir), row, feature_set)
    except Damage as damage:
        raise damaged(run_dir, damage) from damage
    return LoadedModel(
        model=fitted,
        name=row.model,
        features=row.features,
        settings=dict(feature_set.settings),
        meta=dict(feature_set.meta),
        classes=fitted.classes_.tolist(),
        row=row,
        parts=feature_set.parts,
    )


def _loaded_model(run_dir: Path, row: Row, feature_set: FeatureSetRecord):
    """The fitted model of ``row``, once its settings, record and payload agree with ``metrics.json``."""
    from furnitype.classify.models import FeatureClassifier

    settings = f"models/{row.features}/{SETTINGS_FILE}"
    stored = read_feature_set(run_dir, row.features)
    if _as_json(dataclasses.asdict(stored)) != _as_json(dataclasses.asdict(feature_set)):
        raise Damage(settings, f"differs from {METRICS_FILE} feature_sets.{row.features}")
    folder = folder_inside(run_dir, row.model_dir)
    try:
        model = FeatureClassifier.read(folder)
    except Damage as damage:
        raise damage.inside(row.model_dir) from damage
    record = f"{row.model_dir}/model.json"
    agree = {
        "model": (model.name, row.model),
        "classes": (model.classes_.tolist(), row.classes),
        "n_features_in": (model.n_features_in_, feature_set.feature_dim),
        "params": (model.get_params(), row.params),
        "fitted": (model.summary(), row.details),
    }
    for key, (found, expected) in agree.items():
        if _as_json(found) != _as_json(expected):  # as JSON: true is not 1
            raise Damage(f"{record} {key}", f"differs from what {METRICS_FILE} records for {row.features}/{row.model}")
    return model


def _as_json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def rank_rows(rows: Iterable[Row]) -> list[Row]:
    """Rows best first (accuracy, then macro-F1, then lower log loss), each with its ``rank``."""
    ordered = sorted(rows, key=lambda r: (-r.accuracy, -r.macro_f1, r.log_loss))
    return [dataclasses.replace(row, rank=i) for i, row in enumerate(ordered, start=1)]


def merge_documents(named: Sequence[tuple[str, RunDocument]]) -> RunDocument:
    """Merge run documents into one: rows re-ranked and named by run, feature sets keyed ``run/features``."""
    rows: list[Row] = []
    feature_sets: dict[str, FeatureSetRecord] = {}
    notes: list[str] = []
    warnings: list[str] = []
    for name, document in named:
        feature_sets.update({f"{name}/{key}": fs for key, fs in document.feature_sets.items()})
        rows += [dataclasses.replace(row, run=name, features=f"{name}/{row.features}") for row in document.rows]
        own_mix_note = mixed_test_sets_note(document.rows)
        notes += [f"{name}: {note}" for note in document.notes if note not in own_mix_note]
        warnings += [f"{name}: {warning}" for warning in document.warnings]
    return RunDocument(
        format=max(document.format for _, document in named),
        kind=REPORT_KIND,
        run=" + ".join(name for name, _ in named),
        merged_from=[name for name, _ in named],
        baseline=named[0][1].baseline,
        feature_sets=feature_sets,
        rows=rank_rows(rows),
        notes=notes + mixed_test_sets_note(rows),
        warnings=warnings,
    )


def mixed_test_sets_note(rows: Sequence[Row]) -> list[str]:
    """A note when rows were scored on different test photos (their accuracies are not comparable)."""
    test_sets = {row.test_set for row in rows}
    if len(test_sets) <= 1:
        return []
    return [
        f"The rows were scored on {len(test_sets)} different sets of test photos (column test_set): "
        "compare them only within one test set."
    ]


#: The columns of ``split.csv``; runs made before it listed paths have them without ``path``.
SPLIT_COLUMNS = ["features", "sha256", "path", "label", "part"]


def write_split(path: Path, rows: Iterable[tuple[str, str, str, str, str]]) -> None:
    """Write ``split.csv``: (features, sha256, path, label, part) of every row a run used."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(SPLIT_COLUMNS)
        writer.writerows((features, sha, shown_name(photo), label, part) for features, sha, photo, label, part in rows)


def training_photos(run_dir: str | os.PathLike, features: str) -> set[str]:
    """The sha256 of the photos a run trained its models of the feature set ``features`` on (``split.csv``).

    Every line is checked against ``metrics.json``: a feature set of the run, a 64-hex sha256, one of the
    feature set's classes, a part of ``train`` or ``test``, and as many training and test lines per feature set
    as the run recorded, with no photo in both parts.

    Raises
    ------
    StoreError
        ``split.csv`` is missing, cannot be read, or is not what ``classify`` writes.
    """
    document = load_run(run_dir).document
    try:
        return _read_split(read_inside(run_dir, SPLIT_FILE), document)[features]["train"]
    except Damage as damage:
        raise damaged(run_dir, damage) from damage


def _read_split(data: bytes, document: RunDocument) -> dict[str, dict[str, set[str]]]:
    """The sha256 of each feature set's training and test photos, checked against the run's document."""
    older = [c for c in SPLIT_COLUMNS if c != "path"]  # runs made before split.csv listed paths
    columns, rows = csv_rows(data, SPLIT_FILE, SPLIT_COLUMNS, older)
    parts: dict[str, dict[str, set[str]]] = {key: {"train": set(), "test": set()} for key in document.feature_sets}
    counts = {key: {"train": 0, "test": 0} for key in document.feature_sets}
    for line, row in enumerate(rows, start=2):
        where = f"{SPLIT_FILE} line {line}"
        if None in row or None in row.values():
            raise Damage(where, f"not {len(columns)} fields")
        key, part = row["features"], row["part"]
        if key not in document.feature_sets:
            raise Damage(where, f"features {key!r} is not a feature set of the run")
        if part not in ("train", "test"):
            raise Damage(where, f"part {part!r} is not train or test")
        if not _SHA256.fullmatch(row["sha256"]):
            raise Damage(where, "sha256 is not 64 hex digits")
        if row["label"] not in document.feature_sets[key].classes:
            raise Damage(where, f"label {row['label']!r} is not a class of feature set {key!r}")
        parts[key][part].add(row["sha256"])
        counts[key][part] += 1
    for key, record in document.feature_sets.items():
        recorded = {"train": record.n_train, "test": record.n_test}
        for part, n in counts[key].items():
            if n != recorded[part]:
                raise Damage(SPLIT_FILE, f"{n} {part} lines for {key!r}; metrics.json records n_{part} = "
                             f"{recorded[part]}")
        if parts[key]["train"] & parts[key]["test"]:
            raise Damage(SPLIT_FILE, f"a photo of {key!r} is both a training and a test photo")
    return parts
