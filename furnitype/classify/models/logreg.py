"""``logreg``: standardised features, multinomial logistic regression, C chosen by cross-validation.

The C values are scored on folds that keep identical photos together, each fold fitting them in increasing
order from the previous solution (scikit-learn's ``warm_start``). ``LogisticRegressionCV`` follows the same
path but converts the features to float64 first, while ``LogisticRegression`` computes in the features' own
float32, which halves the arithmetic of every lbfgs step.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from furnitype.classify.metrics import as_float64, balanced_accuracy
from furnitype.classify.models.base import (
    CLASS_WEIGHT,
    COUNT,
    FOLDS,
    NON_NEGATIVE_INT,
    POSITIVE,
    CrossValidatedClassifier,
    one_of,
)
from furnitype.classify.models.payload import logistic, scaled_pipeline, skops_dump, skops_load

#: How cross-validation ranks the C values.
SCORINGS = ("log_loss", "accuracy", "balanced_accuracy")


class LogRegModel(CrossValidatedClassifier):
    """``StandardScaler`` + multinomial ``LogisticRegression`` (L2, lbfgs); C chosen by cross-validation.

    Each fold fits the C values in increasing order, each from the previous solution, to the looser tolerance
    ``cv_tol``: ranking candidates needs less precision than the final model, which is fitted on all rows to
    ``tol``. The C with the best score over all folds' out-of-fold probabilities wins.

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
        ``{"params": {"C": ...}, scoring: out-of-fold score}`` per C, in increasing C.
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
    _fitted_info = {"best_params": [dict], "cv_results": [list], "n_splits": [FOLDS], "converged": ["boolean"]}

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

    @property
    def n_iter_(self) -> np.ndarray:
        """lbfgs iterations of the final fit."""
        return self.pipeline_[-1].n_iter_

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
        path = LogisticRegression(
            warm_start=True, tol=self.cv_tol, max_iter=self.max_iter, class_weight=self.class_weight
        )
        # A joblib task per fold: run here one after the other, or on Ray under ``joblib_backend("ray")``.
        paths = Parallel()(delayed(_c_path)(clone(path), Xs[train], y[train], Xs[val], Cs) for train, val in folds)
        out_of_fold = np.zeros((len(Cs), len(y), n_classes))
        for (_, val), proba in zip(folds, paths, strict=True):
            out_of_fold[:, val] = proba
        held = np.concatenate([val for _, val in folds])
        scorer = _SCORERS[self.scoring]
        scores = [scorer(y[held], proba[held]) for proba in out_of_fold]
        best = int(np.argmax(scores))
        final = LogisticRegression(C=Cs[best], tol=self.tol, max_iter=self.max_iter, class_weight=self.class_weight)
        with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # reported as converged_
            final.fit(Xs, y)
        self.pipeline_ = Pipeline([("scale", scaler), ("logreg", final)])
        self.best_params_ = {"C": Cs[best]}
        sign = -1 if self.scoring == "log_loss" else 1
        self.cv_results_ = [
            {"params": {"C": C}, self.scoring: round(sign * s, 6)} for C, s in zip(Cs, scores, strict=True)
        ]
        self.converged_ = bool(np.max(final.n_iter_) < self.max_iter)

    def _predict_proba(self, X):
        return self.pipeline_.predict_proba(X)

    def _save_payload(self, path: Path) -> None:
        skops_dump({"pipeline": self.pipeline_}, path)

    def _load_payload(self, directory: Path) -> None:
        pipeline = skops_load(directory, self.payload, ["pipeline"])["pipeline"]
        scaled_pipeline(pipeline, ("logreg", LogisticRegression), self.n_features_in_, self.payload)
        logistic(pipeline[-1], self.n_features_in_, np.arange(len(self.classes_)), self.payload)
        self.pipeline_ = pipeline


def _c_path(model: LogisticRegression, X, y, X_val, Cs: list[float]) -> np.ndarray:
    """Validation probabilities ``(len(Cs), len(X_val), n_classes)``; each C starts from the previous solution."""
    # lbfgs multiplies thin matrices (rows x features by features x classes): more BLAS threads only add
    # overhead. A C value stopped at max_iter still ranks; only the final fit's convergence is reported.
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return np.stack([model.set_params(C=C).fit(X, y).predict_proba(X_val) for C in Cs])


def _neg_log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    return -log_loss(y, as_float64(proba), labels=np.arange(proba.shape[1]))


#: Cross-validation scores of out-of-fold probabilities, higher is better.
_SCORERS = {
    "log_loss": _neg_log_loss,
    "accuracy": lambda y, proba: accuracy_score(y, np.argmax(proba, axis=1)),
    "balanced_accuracy": lambda y, proba: balanced_accuracy(y, np.argmax(proba, axis=1)),
}
