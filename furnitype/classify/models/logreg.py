"""``logreg``: standardised features, multinomial logistic regression, C chosen by ``LogisticRegressionCV``."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import log_loss
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from furnitype.classify.models.base import (
    CLASS_WEIGHT,
    COUNT,
    FOLDS,
    NON_NEGATIVE_INT,
    POSITIVE,
    CrossValidatedClassifier,
    one_of,
    skops_dump,
    skops_load,
)

#: How cross-validation ranks the C values; the reported scores are the mean over folds.
SCORINGS = ("log_loss", "accuracy", "balanced_accuracy")

# scikit-learn 1.8 deprecated leaving ``l1_ratios`` and ``use_legacy_attributes`` unset (a FutureWarning on
# every fit); earlier versions have neither parameter.
_LOGREG_CV_API = (
    {"l1_ratios": (0.0,), "use_legacy_attributes": False}
    if "use_legacy_attributes" in LogisticRegressionCV().get_params()
    else {}
)


class LogRegModel(CrossValidatedClassifier):
    """``StandardScaler`` + multinomial ``LogisticRegression`` (L2, lbfgs); C chosen by cross-validation.

    ``LogisticRegressionCV`` scores the C values on folds that keep identical photos together, each fold
    fitting them in increasing order from the previous solution, to the looser tolerance ``cv_tol``: ranking
    candidates needs less precision than the final model, which is fitted on all rows to ``tol``.

    Parameters
    ----------
    Cs : list of float, default=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
        Inverse regularisation strengths to try.
    cv : int, default=5
        Folds (fewer when the largest class has fewer distinct photos).
    scoring : {"log_loss", "accuracy", "balanced_accuracy"}, default="log_loss"
        How folds rank the C values; ties go to the smaller C.
    class_weight : {None, "balanced"}, default=None
    tol : float, default=1e-4
        lbfgs stopping tolerance of the final fit.
    cv_tol : float, default=1e-3
        lbfgs stopping tolerance while cross-validating.
    max_iter : int, default=1000
    random_state : int, default=0
        Seeds the folds.

    Attributes
    ----------
    pipeline_ : Pipeline
        The scaler and the final ``LogisticRegression``.
    best_params_ : dict
        ``{"C": ...}``.
    cv_results_ : list of dict
        ``{"params": {"C": ...}, scoring: mean score over the folds}`` per C, in increasing C.
    n_splits_ : int
    converged_ : bool
        Whether the final fit stopped before ``max_iter``.
    """

    name = "logreg"
    payload = "model.skops"
    _parameter_constraints = {
        "Cs": ["array-like"],
        "cv": [FOLDS],
        "scoring": [one_of(SCORINGS)],
        "class_weight": CLASS_WEIGHT,
        "tol": [POSITIVE],
        "cv_tol": [POSITIVE],
        "max_iter": [COUNT],
        "random_state": [NON_NEGATIVE_INT],
    }
    _item_constraints = {"Cs": POSITIVE}
    _fitted_info = ("best_params", "cv_results", "n_splits", "converged")

    def __init__(
        self,
        *,
        Cs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0),  # noqa: N803 - scikit-learn's name
        cv: int = 5,
        scoring: str = "log_loss",
        class_weight: str | None = None,
        tol: float = 1e-4,
        cv_tol: float = 1e-3,
        max_iter: int = 1000,
        random_state: int = 0,
    ):
        self.Cs = Cs
        self.cv = cv
        self.scoring = scoring
        self.class_weight = class_weight
        self.tol = tol
        self.cv_tol = cv_tol
        self.max_iter = max_iter
        self.random_state = random_state

    def chosen(self) -> str:
        return f"C={self.best_params_['C']:g}"

    def fit_notes(self) -> list[str]:
        stopped = [] if self.converged_ else ["lbfgs stopped at max_iter before converging."]
        return stopped + super().fit_notes()

    def equivalence_to(self, reference) -> str:
        final, other = self.pipeline_[-1], reference[-1]
        if isinstance(other, LogisticRegression) and (final.C, final.class_weight) == (other.C, other.class_weight):
            return f"its cross-validation chose the baseline's own C={other.C:g}: the same model"
        return ""

    def _fit(self, X, y, groups, n_classes):
        folds = self._folds(X, y, groups)
        scaler = StandardScaler().fit(X)
        Xs = scaler.transform(X)
        Cs = sorted(float(c) for c in self.Cs)
        search = LogisticRegressionCV(
            Cs=Cs,
            cv=folds,
            scoring=_neg_log_loss if self.scoring == "log_loss" else self.scoring,
            tol=self.cv_tol,
            max_iter=self.max_iter,
            class_weight=self.class_weight,
            refit=False,
            **_LOGREG_CV_API,
        )
        # lbfgs multiplies thin matrices (rows x features by features x classes): more BLAS threads only add
        # overhead there. A solver stopped at max_iter while ranking C values does not matter; the final
        # fit's is reported (``converged_``).
        with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            # A validation fold need not hold every class (a small class has fewer photos than folds).
            warnings.filterwarnings("ignore", "y_pred contains classes not in y_true", UserWarning)
            search.fit(Xs, y)
            scores = _fold_scores(search, len(folds)).mean(axis=0)
            best = int(np.argmax(scores))
            final = LogisticRegression(C=Cs[best], tol=self.tol, max_iter=self.max_iter, class_weight=self.class_weight)
            final.fit(Xs, y)
        self.pipeline_ = Pipeline([("scale", scaler), ("logreg", final)])
        self.best_params_ = {"C": Cs[best]}
        sign = -1 if self.scoring == "log_loss" else 1
        self.cv_results_ = [
            {"params": {"C": C}, self.scoring: round(sign * float(s), 6)} for C, s in zip(Cs, scores, strict=True)
        ]
        self.converged_ = bool(np.max(final.n_iter_) < self.max_iter)

    def _predict_proba(self, X):
        return self.pipeline_.predict_proba(X)

    def _save_payload(self, path: Path) -> None:
        skops_dump({"pipeline": self.pipeline_}, path)

    def _load_payload(self, path: Path) -> None:
        self.pipeline_ = skops_load(path)["pipeline"]


def _neg_log_loss(estimator, X, y) -> float:
    """Minus the log loss over all the model's classes, also when a validation fold lacks some of them."""
    return -log_loss(y, estimator.predict_proba(X), labels=estimator.classes_)


def _fold_scores(search: LogisticRegressionCV, n_folds: int) -> np.ndarray:
    """The score of each fold (rows) and C (columns), whichever layout the scikit-learn version keeps."""
    scores = search.scores_
    if isinstance(scores, dict):  # one entry per class, all equal (before use_legacy_attributes=False)
        scores = next(iter(scores.values()))
    return np.asarray(scores).reshape(n_folds, -1)
