"""The run folder that ``furnitype classify`` writes, and reading it back (``report``, ``predict``).

Layout::

    RUN/metrics.json                      the whole result: options, feature sets (their settings), rows
                                          (metrics, per-class scores, confusion matrix, chosen settings)
    RUN/report.csv, report.md, report.html, scores.png, confusion-<features>-<model>.png
    RUN/split.csv                         features, sha256, label, part (train/test) of every row used
    RUN/models/<features>/settings.json   the feature settings a model needs at prediction time
    RUN/models/<features>/<model>/        model.json + model.keras (dense) or model.skops (logreg, svm)

Reading a run needs neither scikit-learn nor Keras until a model is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from furnitype.errors import InputError, StoreError

#: Version of the run layout; a newer one is refused.
RUN_FORMAT = 1
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class Run:
    """A classification run: its folder and the document stored in ``metrics.json``.

    Attributes
    ----------
    path : Path or None
        The run folder (``None`` for a merged view that was not written).
    document : dict
        Options, feature sets with their settings, ranked rows, notes and warnings.
    """

    path: Path | None
    document: dict

    @property
    def rows(self) -> list[dict]:
        """One row per feature set x model, best first."""
        return self.document["rows"]

    @property
    def warnings(self) -> list[str]:
        """Problems with the input that the run worked around (a dropped class, unlabelled rows ...)."""
        return self.document.get("warnings", [])

    @property
    def notes(self) -> list[str]:
        """Remarks on the results (a row trailing the baseline, fewer CV folds than asked ...)."""
        return self.document.get("notes", [])

    @property
    def report_html(self) -> Path | None:
        """The HTML report, when the run has a folder."""
        return self.path / "report.html" if self.path is not None else None

    def summary(self) -> dict:
        """The JSON-ready result a command prints: paths, table rows (scalars only), notes and warnings."""
        from furnitype.reports.table import scalar_row

        return {
            "run": str(self.path) if self.path is not None else None,
            "report_html": str(self.report_html) if self.report_html is not None else None,
            "rows": [scalar_row(row) for row in self.rows],
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
    row : dict
        The model's row of the report (its test metrics).
    """

    model: object
    name: str
    features: str
    settings: dict
    meta: dict
    classes: list[str]
    row: dict


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
    metrics = path / METRICS_FILE
    if not path.is_dir():
        raise InputError(f"run folder not found: {path}")
    if not metrics.is_file():
        raise InputError(f"{path} is not a furnitype run (no {METRICS_FILE}).")
    try:
        document = json.loads(metrics.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StoreError(f"{metrics} cannot be read: {err}") from None
    if not isinstance(document, dict) or "rows" not in document:
        raise StoreError(f"{metrics} is not a furnitype run document.")
    if int(document.get("format", 0)) > RUN_FORMAT:
        raise StoreError(f"{path} was written by a newer furnitype (run format {document['format']}).")
    return Run(path, document)


def load_model(
    run_dir: str | os.PathLike, model: str | None = None, *, features: str | None = None
) -> LoadedModel:
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
        if (model is None or row["model"] == model) and (features is None or row["features"] == features)
    ]
    if not matches:
        available = ", ".join(f"{row['features']}/{row['model']}" for row in run.rows)
        raise InputError(
            f"{run.path} has no model {model or '(any)'} on features {features or '(any)'}; "
            f"it has: {available}"
        )
    row = matches[0]
    fitted = FeatureClassifier.load(run.path / row["model_dir"])
    feature_set = run.document["feature_sets"][row["features"]]
    return LoadedModel(
        model=fitted,
        name=row["model"],
        features=row["features"],
        settings=dict(feature_set["settings"]),
        meta=dict(feature_set["meta"]),
        classes=fitted.classes_.tolist(),
        row=row,
    )


def report_runs(run_dirs: Sequence[str | os.PathLike], *, out: str | os.PathLike | None = None) -> Run:
    """Reprint or merge saved runs without retraining; with ``out``, write the (merged) report files there.

    Parameters
    ----------
    run_dirs : sequence of str or path-like
        One or more run folders. Several give one table; rows keep their run's name.
    out : str or path-like, optional
        Folder for report.csv/md/html and the pictures (made from the stored confusion matrices).

    Returns
    -------
    Run
        One run as it is, or the merged view (``path`` is ``out``, or ``None``).
    """
    from furnitype.reports.table import merge_documents, write_report

    if not run_dirs:
        raise InputError("give at least one run folder.")
    runs = [load_run(d) for d in run_dirs]
    if len(runs) == 1 and out is None:
        return runs[0]
    document = (
        merge_documents([(run.path.name, run.document) for run in runs])
        if len(runs) > 1
        else runs[0].document
    )
    if out is None:
        return Run(None, document)
    out = Path(out)
    if any(out.resolve() == run.path.resolve() for run in runs):
        raise InputError(f"--out {out} is one of the runs being reported; choose another folder.")
    out.mkdir(parents=True, exist_ok=True)
    write_report(document, out)
    (out / METRICS_FILE).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return Run(out, document)


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
