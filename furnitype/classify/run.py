"""The run folder that ``furnitype classify`` writes, and reading it back (``report``, ``predict``).

Layout::

    RUN/metrics.json                      the whole result (a RunDocument): options, feature sets (their
                                          settings), rows (metrics, per-class scores, confusion matrix, choices)
    RUN/report.csv, report.md, report.html, scores.png, confusion-<features>-<model>.png
    RUN/split.csv                         features, sha256, label, part (train/test) of every row used
    RUN/models/<features>/settings.json   the feature settings a model needs at prediction time
    RUN/models/<features>/<model>/        model.json + model.keras (dense) or model.skops (logreg, svm)

Reading a run needs neither scikit-learn nor Keras until a model is loaded; every metadata file is read by
``furnitype.classify.metadata``.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from furnitype.classify.metadata import METRICS_FILE, FeatureSetRecord, Row, RunDocument, read_run_document
from furnitype.errors import InputError

SPLIT_FILE = "split.csv"


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
    """

    model: object
    name: str
    features: str
    settings: dict
    meta: dict
    classes: list[str]
    row: Row


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read a run folder written by ``furnitype classify`` (no model is loaded).

    Raises
    ------
    InputError
        The folder does not exist or is not a furnitype run.
    StoreError
        Its ``metrics.json`` is damaged or from a newer furnitype.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise InputError(f"run folder not found: {path}")
    if not (path / METRICS_FILE).is_file():
        raise InputError(f"{path} is not a furnitype run (no {METRICS_FILE}).")
    return Run(path, read_run_document(path))


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
        No row of the run matches ``model`` and ``features``.
    StoreError
        The saved model is missing, damaged or holds untrusted types.
    """
    from furnitype.classify.models import FeatureClassifier

    run = load_run(run_dir)
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
    fitted = FeatureClassifier.load(run.path / row.model_dir)
    feature_set = run.document.feature_sets[row.features]
    return LoadedModel(
        model=fitted,
        name=row.model,
        features=row.features,
        settings=dict(feature_set.settings),
        meta=dict(feature_set.meta),
        classes=fitted.classes_.tolist(),
        row=row,
    )


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
        kind="furnitype merged report",
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


def write_split(path: Path, rows: Iterable[tuple[str, str, str, str]]) -> None:
    """Write ``split.csv``: (features, sha256, label, part) of every row a run used."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["features", "sha256", "label", "part"])
        writer.writerows(rows)


def prepare_out(out: Path, *, overwrite: bool) -> Path:
    """Check that a run may be written to ``out``; return the temporary folder to build it in.

    A run is built beside its final place and renamed at the end, so a failed run leaves nothing half-made.
    An existing non-empty folder is replaced only when it is a run and ``overwrite`` is set.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / METRICS_FILE).is_file():
            raise InputError(f"{out} exists and is not a furnitype run; choose another --out.")
        if not overwrite:
            raise InputError(f"{out} already holds a run; use another --out, or --overwrite to replace it.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as err:
        raise InputError(f"cannot write {out}: {err.strerror or err}") from None
    return tmp


def commit_out(tmp: Path, out: Path) -> None:
    """Move a finished run from its temporary folder to ``out`` (replacing an old run there)."""
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
