"""``suggest``: the photos of a new source most worth labelling, to adapt a run's model to that source.

The rows of a feature file (made with the run's feature settings; any labels it has are ignored) are scored
by the run's best model for those settings, and ``furnitype.classify.selection.labelling_order`` picks the
ones whose labels would teach the model most. Photos already in the run's training data are never suggested,
and a photo stored twice is suggested once. The list goes out as a CSV whose ``label`` column is the model's
guess, for a person to correct; ``extract --manifest`` then adds the photos with their labels to the training
store, and ``classify`` retrains.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from furnitype.classify.fused import fuse, missing_warning
from furnitype.classify.run import LoadedModel, load_model, load_run, training_photos
from furnitype.classify.selection import labelling_order
from furnitype.errors import InputError, SettingsMismatchError
from furnitype.features.store import SETTING_KEYS, FeatureSet, load, store_files
from furnitype.outputs import (
    check_output,
    data_frame,
    refuse_existing,
    refuse_inputs,
    refuse_photos,
    replace_file,
    significant,
)
from furnitype.reports.sheet import labelling_sheet

#: The columns of the CSV ``suggest`` writes, in order.
CSV_COLUMNS = ("path", "label", "probability", "label_2", "probability_2", "sha256")


@dataclass(frozen=True)
class Suggestion:
    """A photo worth labelling, with the model's two most probable classes.

    Attributes
    ----------
    path : str
        The photo's path as the feature file stores it.
    label, probability : str, float
        The model's guess and its probability (the person labelling corrects the guess).
    label_2, probability_2 : str, float
        The runner-up.
    sha256 : str
        Hex digest of the photo's bytes.
    """

    path: str
    label: str
    probability: float
    label_2: str
    probability_2: float
    sha256: str

    def as_dict(self) -> dict:
        """The CSV's columns as a dict; probabilities with 6 significant digits."""
        values = {key: getattr(self, key) for key in CSV_COLUMNS}
        return {key: significant(v) if isinstance(v, float) else v for key, v in values.items()}


@dataclass(frozen=True)
class SuggestResult:
    """What one ``suggest`` call found.

    Attributes
    ----------
    suggestions : list of Suggestion
        Most worth labelling first.
    run, file : str
        The run folder and the feature file.
    model, features : str
        The run's model (``dense``, ``logreg`` or ``svm``) and the feature set it was trained on.
    rows : int
        Rows of the feature file.
    in_training : int
        Rows left out because their photo is one of the run's training photos.
    notes : list of str
        What the call worked around (``n`` capped, duplicate photos, unusable rows).
    seconds : float
    """

    suggestions: list[Suggestion]
    run: str
    file: str
    model: str
    features: str
    rows: int
    in_training: int
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line: how many photos are suggested, out of how many, by which model."""
        line = (
            f"{len(self.suggestions):,} of {self.rows:,} photos of {self.file} suggested for labelling by "
            f"{self.model} ({self.features})"
        )
        if self.in_training:
            line += f"; {self.in_training:,} already training photos left out"
        return line + f"; {self.seconds:.1f} s"

    def as_dict(self) -> dict:
        """JSON-ready: the run, model, counts, notes and the suggestions (CSV columns)."""
        return {
            "run": self.run,
            "file": self.file,
            "model": self.model,
            "features": self.features,
            "rows": self.rows,
            "in_training": self.in_training,
            "notes": self.notes,
            "suggestions": [s.as_dict() for s in self.suggestions],
        }

    def to_frame(self):
        """The suggestions as a pandas DataFrame, most worth labelling first: the CSV's columns
        (``CSV_COLUMNS``). Needs pandas (``pip install 'furnitype[pandas]'``)."""
        records = ({key: getattr(s, key) for key in CSV_COLUMNS} for s in self.suggestions)
        return data_frame(records, order=CSV_COLUMNS, attrs={"run": self.run, "file": self.file, "notes": self.notes})

    def format_table(self) -> str:
        """Aligned text: rank, guess and its probability, the runner-up, path."""
        lines = [f"{'#':>3}  {'guess':<14} {'prob':>5}  {'or':<14} {'prob':>5}  path"]
        for rank, s in enumerate(self.suggestions, 1):
            lines.append(
                f"{rank:>3}  {s.label:<14} {s.probability:>5.3f}  {s.label_2:<14} {s.probability_2:>5.3f}  {s.path}"
            )
        return "\n".join(lines)

    def write_csv(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the suggestions as CSV (``CSV_COLUMNS``), replacing ``path`` only with ``overwrite``.

        The file is written beside ``path`` and renamed into place, so a failed write leaves the previous file
        (perhaps a list already being labelled) as it was.
        """
        path = _check_csv(path, overwrite)
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for s in self.suggestions:
            writer.writerow(list(s.as_dict().values()))
        return replace_file(path, text.getvalue().encode("utf-8"))


def suggest(
    run: str | os.PathLike,
    features: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    n: int = 40,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    sheet: str | os.PathLike | None = None,
    leave_out: Collection[str] = (),
) -> SuggestResult:
    """Rank the photos of a feature file by how much labelling them would teach the run's model; keep ``n``.

    Parameters
    ----------
    run : path
        A run folder written by ``furnitype classify``.
    features : path, or sequence of paths
        A feature file of new photos (``furnitype extract``), made with the settings of one of the run's
        feature sets; its labels, if any, are ignored. For a fused feature set (``classify --fuse``), one
        feature file per part, in the parts' order, each with its part's settings: their rows of the same
        photos are put side by side (photos that not every file holds are left out, with a note).
    n : int, default=40
        Photos to suggest; capped (with a note) at the photos that can be suggested.
    out : path, default=None
        Also write the CSV there (``SuggestResult.write_csv``); an existing file is replaced only with
        ``overwrite``.
    overwrite : bool, default=False
        Replace an existing ``out`` or ``sheet`` file.
    sheet : path, default=None
        Also draw the suggested photos with the model's guesses there, as a PNG
        (``furnitype.reports.sheet.labelling_sheet``). ``out`` and ``sheet`` are checked before any work; neither
        is ever one of the photos of ``features``.
    leave_out : collection of str, default=()
        Paths of photos not to suggest (those already labelled); when they leave none, no photo is suggested.

    Returns
    -------
    SuggestResult

    Raises
    ------
    InputError
        ``n`` below 1, a report folder instead of a run (it holds no models), an empty feature file, no photo
        left to suggest, or an ``out`` or ``sheet`` that cannot be written.
    SettingsMismatchError
        The feature file's settings are not those of any of the run's feature sets.
    StoreError
        The run (its models, its split) or the feature file is damaged.
    """
    started = time.perf_counter()
    if n < 1:
        raise InputError(f"n must be at least 1. Received: n={n}")
    outputs = {"--out": out, "--sheet": sheet}
    for path in (out, sheet):
        if path is not None:
            check_output(path)
    files = [features] if isinstance(features, (str, os.PathLike)) else list(features)
    if not files:
        raise InputError("give at least one feature file.")
    refuse_inputs(outputs, [beside for file in files for beside in store_files(file)], kept=[run])
    stores = [load(file) for file in files]
    for store in stores:
        refuse_photos(outputs, store.paths)  # the photos suggested, listed and drawn, are among them
    if out is not None:
        _check_csv(out, overwrite)
    refuse_existing({"--sheet": sheet}, overwrite=overwrite)
    for file, store in zip(files, stores, strict=True):
        if len(store) == 0:
            raise InputError(f"{file} is empty: it holds no photos.")
    loaded = _model_for(run, stores)
    notes: list[str] = []
    fs = stores[0]
    if loaded.parts is not None:
        fs, missing = fuse([dataclasses.replace(s, labels=np.full(len(s), "", dtype=object)) for s in stores])
        if missing:
            notes.append(missing_warning(loaded.features, missing))
        if len(fs) == 0:
            raise InputError(f"no photo is in every one of {', '.join(map(str, files))}; nothing to suggest.")
    if fs.features.shape[1] != loaded.model.n_features_in_:
        raise SettingsMismatchError(
            f"{features} has {fs.features.shape[1]} features per photo, but run {run}'s {loaded.name} model was "
            f"trained on {loaded.model.n_features_in_}."
        )
    in_training = np.isin(fs.sha256, list(training_photos(run, loaded.features)))
    candidates, found = _candidates(fs, in_training, run)
    notes += found
    if leave_out:
        candidates = candidates[~np.isin(fs.paths[candidates], list(leave_out))]
    if n > len(candidates):
        notes.append(f"only {len(candidates)} photos can be suggested (asked for {n}); suggesting all of them.")
        n = len(candidates)
    classes = np.asarray(loaded.classes)
    suggestions = []
    proba = loaded.model.predict_proba(fs.features[candidates]) if n else np.zeros((0, len(classes)))
    picked = labelling_order(proba, n) if n else np.zeros(0, int)
    for row, p in zip(candidates[picked], proba[picked], strict=True):
        guess, runner_up = np.argsort(-p, kind="stable")[:2]
        suggestions.append(
            Suggestion(str(fs.paths[row]), str(classes[guess]), float(p[guess]), str(classes[runner_up]),
                       float(p[runner_up]), str(fs.sha256[row]))
        )
    result = SuggestResult(
        suggestions=suggestions,
        run=str(run),
        file="+".join(map(str, files)),
        model=loaded.name,
        features=loaded.features,
        rows=len(fs),
        in_training=int(np.sum(in_training)),
        notes=notes,
        seconds=time.perf_counter() - started,
    )
    if out is not None:
        result.write_csv(out, overwrite=overwrite)
    if sheet is not None:
        labelling_sheet(suggestions, sheet, title=f"{features}: to label for run {run} ({loaded.name})")
    return result


def _check_csv(path: str | os.PathLike, overwrite: bool) -> Path:
    """The CSV's path, when it may be written: an existing file (a list being labelled?) only with ``overwrite``."""
    path = check_output(path)
    if os.path.lexists(path) and not overwrite:
        raise InputError(
            f"{path} already exists (a list being labelled?); choose another --out, or --overwrite to replace it."
        )
    return path


def _candidates(fs: FeatureSet, in_training: np.ndarray, run: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Rows that may be suggested (not training photos, each photo once), and notes (a store's rows are finite:
    ``load`` reports one that is not as damage)."""
    notes = []
    first_of_photo = np.zeros(len(fs), dtype=bool)
    first_of_photo[np.unique(fs.sha256, return_index=True)[1]] = True
    repeated = ~first_of_photo & ~in_training
    if repeated.any():
        notes.append(f"{int(repeated.sum())} rows repeat another row's photo; each photo is suggested once.")
    candidates = np.flatnonzero(first_of_photo & ~in_training)
    if len(candidates) == 0:  # the first row of every photo is a training photo: all its rows are
        raise InputError(f"every photo of {fs.file} is already a training photo of run {run}; nothing to suggest.")
    return candidates, notes


def _model_for(run: str | os.PathLike, stores: Sequence[FeatureSet]) -> LoadedModel:
    """The run's best model on features with the stores' settings (a fused set's parts', in order, for several);
    refuse stores whose settings no feature set has."""
    document = load_run(run).document
    for row in document.rows:  # best first
        feature_set = document.feature_sets[row.features]
        parts = [p.settings for p in feature_set.parts] if feature_set.parts is not None else [feature_set.settings]
        if len(parts) == len(stores) and not any(
            _differences(part, store.settings) for part, store in zip(parts, stores, strict=True)
        ):
            return load_model(run, row.model, features=row.features)
    key = document.rows[0].features
    feature_set = document.feature_sets[key]
    if feature_set.parts is not None and len(feature_set.parts) != len(stores):
        raise InputError(
            f"run {run}'s {key} features are fused from {len(feature_set.parts)} feature files "
            f"({' and '.join(p.file for p in feature_set.parts)}); give one feature file of the new photos per part, "
            f"in that order, not {len(stores)}."
        )
    if feature_set.parts is None and len(stores) > 1:
        raise InputError(f"run {run}'s {key} features come from one feature file; give one, not {len(stores)}.")
    wanted = [p.settings for p in feature_set.parts] if feature_set.parts is not None else [feature_set.settings]
    store, want = next(((s, w) for s, w in zip(stores, wanted, strict=True) if _differences(w, s.settings)),
                       (stores[0], wanted[0]))
    differing = _differences(want, store.settings)
    had = ", ".join(f"{k}={store.settings.get(k)}" for k in differing)
    want_text = ", ".join(f"{k}={want.get(k)}" for k in differing)
    raise SettingsMismatchError(
        f"{store.file} was made with {had}, but run {run}'s {key} features with {want_text}; "
        "extract the photos with the run's settings."
    )


def _differences(a: dict, b: dict) -> list[str]:
    return [key for key in SETTING_KEYS if str(a.get(key)) != str(b.get(key))]
