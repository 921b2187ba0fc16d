"""Test metrics of predicted probabilities (scikit-learn's), and McNemar's test for comparing two classifiers."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from furnitype.classify.metadata import SCORE_NAMES


@dataclass(frozen=True)
class Scores:
    """How well predicted probabilities match the true classes of the test photos.

    Attributes
    ----------
    accuracy, balanced_accuracy, macro_f1, top3_accuracy, log_loss : float
        Balanced accuracy is the mean recall over the classes present; macro-F1 averages the classes
        present or predicted; top-3 counts a hit when the true class is among the min(3, n_classes) most
        probable.
    confusion : list of list of int
        Rows: true class, columns: predicted class.
    per_class : dict of str to list
        ``precision``, ``recall``, ``f1``, ``support`` per class.
    predicted : ndarray of int
        The predicted class index of each row.
    """

    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    top3_accuracy: float
    log_loss: float
    confusion: list[list[int]]
    per_class: dict[str, list]
    predicted: np.ndarray

    def summary(self) -> dict[str, float]:
        """The scores of ``SCORE_NAMES``, rounded to 6 decimals."""
        return {name: round(getattr(self, name), 6) for name in SCORE_NAMES}


def score(y_true: np.ndarray, proba: np.ndarray) -> Scores:
    """Score predicted probabilities against true class indices.

    Parameters
    ----------
    y_true : ndarray of int, shape (n_rows,)
        Class indices, columns of ``proba``.
    proba : ndarray of shape (n_rows, n_classes)

    Returns
    -------
    Scores
    """
    proba = as_float64(proba)
    n_classes = proba.shape[1]
    labels = np.arange(n_classes)
    predicted = np.argmax(proba, axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, predicted, labels=labels, zero_division=0
    )
    # Binary top-k takes the positive class's column; with k >= n_classes it is 1 by definition, which the
    # run's notes say, so scikit-learn's warning about it would only repeat that.
    top_k_scores = proba[:, 1] if n_classes == 2 else proba
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        top_k = top_k_accuracy_score(y_true, top_k_scores, k=min(3, n_classes), labels=labels)
    return Scores(
        accuracy=float(accuracy_score(y_true, predicted)),
        balanced_accuracy=balanced_accuracy(y_true, predicted),
        macro_f1=float(f1_score(y_true, predicted, average="macro", zero_division=0)),
        top3_accuracy=float(top_k),
        log_loss=float(log_loss(y_true, proba, labels=labels)),
        confusion=confusion_matrix(y_true, predicted, labels=labels).tolist(),
        per_class={
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": support.tolist(),
        },
        predicted=predicted,
    )


def as_float64(proba: np.ndarray) -> np.ndarray:
    """Probabilities in float64, rows summing to 1 to float64 precision.

    A float32 model's probabilities would clip log loss at float32's epsilon (1e-7), and sum to 1 only to
    float32 precision, which scikit-learn's log loss warns about in float64.
    """
    proba = np.asarray(proba, dtype=np.float64)
    return proba / proba.sum(axis=1, keepdims=True)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The mean recall over the classes present in ``y_true`` (scikit-learn's, without its warning)."""
    with warnings.catch_warnings():
        # A class predicted but absent from y_true has no recall: it is left out, as intended here.
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true", UserWarning)
        return float(balanced_accuracy_score(y_true, y_pred))


def mcnemar_p(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value: could two classifiers' accuracy on the same rows differ by chance?"""
    b = int(np.sum(correct_a & ~correct_b))
    c = int(np.sum(~correct_a & correct_b))
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)
