"""Fit a model on a feature set's training rows, time it, and score it on the test rows; and the baseline.

Every row is compared with a fixed reference, a plain ``StandardScaler + LogisticRegression(C=0.1)`` fitted
on the same training rows: a model that cannot beat it is not worth its tuning.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from furnitype.classify.data import TrainTestSet
from furnitype.classify.metadata import Row, model_dir
from furnitype.classify.metrics import Scores, score
from furnitype.classify.models import FeatureClassifier
from furnitype.extract.pipeline import cpu_seconds

#: The fixed reference every row is compared with.
BASELINE = "StandardScaler + LogisticRegression(C=0.1)"
BASELINE_C = 0.1


@dataclass(frozen=True)
class Baseline:
    """The reference model fitted on a feature set's training rows and scored on its test rows."""

    pipeline: Pipeline
    scores: Scores
    fit_seconds: float

    def summary(self) -> dict:
        """Its test scores and fit time, JSON-ready (a feature set record's ``baseline``)."""
        return {**self.scores.summary(), "fit_seconds": round(self.fit_seconds, 3)}


@dataclass(frozen=True)
class Fit:
    """A model fitted on a feature set and scored on its test rows.

    Attributes
    ----------
    model : FeatureClassifier
        Fitted.
    row : Row
        Its line of the table.
    predicted : ndarray of int
        The predicted class index of each test row.
    proba : ndarray of shape (n_test, n_classes)
        The class probabilities of each test row.
    """

    model: FeatureClassifier
    row: Row
    predicted: np.ndarray
    proba: np.ndarray


def reference_model() -> Pipeline:
    """The baseline, unfitted: ``StandardScaler`` + ``LogisticRegression(C=BASELINE_C)``."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=BASELINE_C, max_iter=1000))


def fit_baseline(data: TrainTestSet) -> Baseline:
    """Fit and score the reference model on a feature set."""
    y_train = np.searchsorted(data.classes, data.train.labels)
    wall = time.perf_counter()
    # Thin lbfgs products: more BLAS threads only add overhead (see LogRegModel).
    with threadpool_limits(limits=1, user_api="blas"):
        pipeline = reference_model().fit(data.train.features, y_train)
    fit_seconds = time.perf_counter() - wall
    return Baseline(pipeline, score(data.y_test, pipeline.predict_proba(data.test.features)), fit_seconds)


def fit_and_score(
    data: TrainTestSet,
    model: FeatureClassifier,
    *,
    baseline: Baseline,
    run: str,
    say: Callable[[str], None],
) -> Fit:
    """Fit ``model`` on the training rows, time the fit and the prediction, and score it on the test rows.

    Parameters
    ----------
    data : TrainTestSet
    model : FeatureClassifier
        Unfitted.
    baseline : Baseline
        The reference fitted on the same rows.
    run : str
        The run's name, recorded in the row.
    say : callable taking a str
        Progress lines.
    """
    model.prepare()
    say(f"{data.key}: fitting {model.name} ...")
    wall, cpu = time.perf_counter(), cpu_seconds()
    model.fit(data.train.features, data.train.labels, groups=data.train.sha256)
    fit_seconds, fit_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    model.predict_proba(data.test.features[:1])  # warm-up: the first call of a Keras model traces it
    start = time.perf_counter()
    proba = model.predict_proba(data.test.features)
    predict_ms = 1000 * (time.perf_counter() - start) / len(data.test)
    scores = score(data.y_test, proba)
    baseline_accuracy = baseline.summary()["accuracy"]
    summary = scores.summary()
    row = Row(
        features=data.key,
        backbone=data.backbone,
        weights=data.weights,
        weights_identity=data.weights_identity,
        model=model.name,
        accuracy=summary["accuracy"],
        balanced_accuracy=summary["balanced_accuracy"],
        macro_f1=summary["macro_f1"],
        top3_accuracy=summary["top3_accuracy"],
        log_loss=summary["log_loss"],
        fit_seconds=round(fit_seconds, 3),
        fit_cpu_seconds=round(fit_cpu, 3),
        predict_ms_per_image=round(predict_ms, 4),
        n_train=len(data.train),
        n_test=len(data.test),
        n_classes=len(model.classes_),
        test_set=data.test_set_id,
        chosen=model.chosen(),
        details=model.summary(),
        params={k: (list(v) if isinstance(v, tuple) else v) for k, v in model.get_params().items()},
        classes=model.classes_.tolist(),
        confusion=scores.confusion,
        per_class=scores.per_class,
        model_dir=model_dir(data.key, model.name),
        run=run,
        baseline_accuracy=baseline_accuracy,
        vs_baseline_points=round(100 * (summary["accuracy"] - baseline_accuracy), 2),
    )
    say(
        f"{data.key}: {model.name} accuracy {row.accuracy:.3f} ({row.chosen}), fit {fit_seconds:.1f} s, "
        f"{predict_ms:.3f} ms/image"
    )
    return Fit(model, row, scores.predicted, proba)
