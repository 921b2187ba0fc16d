"""A run's mistakes: the test photos its best models got wrong, and training photos whose label looks wrong.

Per feature set, ``classify`` keeps two lists in the run folder's ``mistakes.csv``:

- ``misclassified``: the test photos the feature set's best model labels wrongly, most confident first;
- ``label_issue``: training photos whose given label is unlikely, by confident learning (Northcutt, Jiang &
  Chuang, *Confident Learning: Estimating Uncertainty in Dataset Labels*, JAIR 2021, as in cleanlab). Every
  training photo is scored by the reference model (``furnitype.classify.evaluation.BASELINE``) fitted without
  it (out of fold, on folds that keep identical photos together); a photo is a possible label error when
  another class is confidently predicted for it, i.e. that class's probability reaches the class's threshold
  (its mean probability over the photos labelled with it) and is the highest such class. They are listed
  least likely label first.

The reference model is the same for every kind of best model and cheap to refit k times; the dense head
has no folds of its own to reuse.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
from sklearn.base import clone
from threadpoolctl import threadpool_limits

from furnitype.classify.data import TrainTestSet
from furnitype.classify.evaluation import Fit, reference_model
from furnitype.classify.run import damaged
from furnitype.classify.runfiles import Damage, csv_rows, read_inside
from furnitype.classify.split import ContentKFold, max_splits
from furnitype.outputs import significant

MISTAKES_FILE = "mistakes.csv"
KINDS = ("misclassified", "label_issue")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Mistake:
    """A photo in one of a run's lists of mistakes.

    Attributes
    ----------
    features : str
        The feature set (``run/key`` in a merged report).
    model : str
        The model that judged it: the feature set's best model for ``misclassified``, ``reference`` (out of
        fold) for ``label_issue``.
    kind : {"misclassified", "label_issue"}
    path : str
        The photo's path, as its feature file records it.
    label : str
        Its given (true) label.
    predicted : str
        The class the model favours.
    probability : float
        The model's probability of ``predicted``.
    label_probability : float
        The model's probability of ``label``.
    sha256 : str
    """

    features: str
    model: str
    kind: str
    path: str
    label: str
    predicted: str
    probability: float
    label_probability: float
    sha256: str


#: The columns of mistakes.csv (``furnitype report --mistakes`` writes the same).
COLUMNS = tuple(f.name for f in fields(Mistake))


def find_mistakes(data: TrainTestSet, best: Fit, *, n_splits: int, seed: int) -> list[Mistake]:
    """A feature set's misclassified test photos (by its best model) and possible label errors in training.

    Parameters
    ----------
    data : TrainTestSet
    best : Fit
        The feature set's best model, scored on ``data.test``.
    n_splits : int
        Folds of the out-of-fold reference model (fewer when the largest class has fewer photos).
    seed : int
        Seeds the folds.
    """
    classes = data.classes
    test_y = data.y_test
    found = as_mistakes(
        misclassified(test_y, best.proba), features=data.key, model=best.row.model, kind="misclassified",
        classes=classes, y=test_y, proba=best.proba, paths=data.test.paths, sha256=data.test.sha256,
    )
    train = data.train
    proba = out_of_fold_proba(reference_model(), train.features, train.labels, train.sha256,
                              n_splits=n_splits, seed=seed)
    train_y = np.searchsorted(classes, train.labels)
    return found + as_mistakes(
        label_issues(train_y, proba), features=data.key, model="reference", kind="label_issue",
        classes=classes, y=train_y, proba=proba, paths=train.paths, sha256=train.sha256,
    )


def misclassified(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Rows whose most probable class is not their class, the most confidently wrong first.

    Parameters
    ----------
    y : ndarray of int, shape (n_rows,)
        Class indices.
    proba : ndarray of shape (n_rows, n_classes)

    Returns
    -------
    ndarray of int
        Row indices, highest predicted probability first (ties: the earlier row).
    """
    wrong = np.flatnonzero(np.argmax(proba, axis=1) != y)
    return wrong[np.argsort(-proba[wrong].max(axis=1), kind="stable")]


def label_issues(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Rows whose given class confident learning doubts, the least likely given class first.

    Parameters
    ----------
    y : ndarray of int, shape (n_rows,)
        Given class indices.
    proba : ndarray of shape (n_rows, n_classes)
        Out-of-sample probabilities; a row of NaN (never held out) is never an issue.

    Returns
    -------
    ndarray of int
        Row indices, lowest probability of the given class first (ties: the earlier row).
    """
    scored = ~np.isnan(proba).any(axis=1)
    n_classes = proba.shape[1]
    thresholds = np.full(n_classes, np.inf)
    for j in range(n_classes):
        own = scored & (y == j)
        if own.any():
            thresholds[j] = proba[own, j].mean()
    confident = np.where(proba >= thresholds, proba, -np.inf)
    confident[~scored] = -np.inf
    has_confident = np.isfinite(confident.max(axis=1))
    issues = np.flatnonzero(has_confident & (np.argmax(confident, axis=1) != y))
    return issues[np.argsort(proba[issues, y[issues]], kind="stable")]


def out_of_fold_proba(
    estimator, X: np.ndarray, y: np.ndarray, groups: np.ndarray, *, n_splits: int, seed: int
) -> np.ndarray:
    """Probabilities of each row from ``estimator`` fitted on the folds without it (NaN when never held out).

    Folds keep identical photos together (``ContentKFold``, at most ``n_splits``); a class with one photo is
    never held out, so its rows stay NaN.
    """
    classes = np.unique(y)
    proba = np.full((len(y), len(classes)), np.nan)
    n_splits = min(n_splits, max_splits(y, groups))
    if n_splits < 2:
        return proba
    with threadpool_limits(limits=1, user_api="blas"):
        for train, held in ContentKFold(n_splits, random_state=seed).split(X, y, groups):
            model = clone(estimator).fit(X[train], y[train])
            proba[np.ix_(held, np.searchsorted(classes, model.classes_))] = model.predict_proba(X[held])
    return proba


def as_mistakes(
    rows: np.ndarray,
    *,
    features: str,
    model: str,
    kind: str,
    classes: Sequence[str] | np.ndarray,
    y: np.ndarray,
    proba: np.ndarray,
    paths: np.ndarray,
    sha256: np.ndarray,
) -> list[Mistake]:
    """``Mistake`` records of the given rows (in their order); ``predicted`` is the most probable class."""
    found = []
    for i in rows:
        j = int(np.nanargmax(proba[i]))
        found.append(
            Mistake(features, model, kind, str(paths[i]), str(classes[y[i]]), str(classes[j]),
                    significant(float(proba[i, j])), significant(float(proba[i, y[i]])), str(sha256[i]))
        )
    return found


def write_mistakes(path: str | os.PathLike, mistakes: Iterable[Mistake]) -> Path:
    """Write mistakes as CSV (``COLUMNS``); returns the path."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows(astuple(m) for m in mistakes)
    return path


def read_mistakes(run_dir: str | os.PathLike) -> list[Mistake] | None:
    """The mistakes a run (or report) recorded, in file order; None when it has no ``mistakes.csv``.

    The file is read as received data (``furnitype.classify.runfiles``): from inside the folder only, and
    every field checked, since the sha256 names the thumbnail files.

    Raises
    ------
    StoreError
        The file cannot be read or is not what ``classify`` writes (``run X is damaged: mistakes.csv ...``).
    """
    try:
        data = read_inside(run_dir, MISTAKES_FILE)
    except Damage as damage:
        if damage.where == MISTAKES_FILE and damage.problem == "missing":
            return None
        raise damaged(run_dir, damage) from damage
    try:
        return _parse(data)
    except Damage as damage:
        raise damaged(run_dir, damage) from damage


def _parse(data: bytes) -> list[Mistake]:
    _, rows = csv_rows(data, MISTAKES_FILE, COLUMNS)
    found = []
    for i, row in enumerate(rows, start=2):
        where = f"{MISTAKES_FILE} line {i}"
        if None in row or None in row.values():
            raise Damage(where, f"not {len(COLUMNS)} fields")
        if row["kind"] not in KINDS:
            raise Damage(where, f"kind {row['kind']!r} is not one of {', '.join(KINDS)}")
        if not _SHA256.fullmatch(row["sha256"]):
            raise Damage(where, "sha256 is not 64 hex digits")
        try:
            probabilities = {key: float(row[key]) for key in ("probability", "label_probability")}
        except ValueError as cause:
            raise Damage(where, "a probability is not a number") from cause
        if not all(0.0 <= p <= 1.0 for p in probabilities.values()):
            raise Damage(where, "a probability is not between 0 and 1")
        found.append(
            Mistake(
                features=row["features"],
                model=row["model"],
                kind=row["kind"],
                path=row["path"],
                label=row["label"],
                predicted=row["predicted"],
                probability=probabilities["probability"],
                label_probability=probabilities["label_probability"],
                sha256=row["sha256"],
            )
        )
    return found
