"""``svm``: standardised features, ``SVC`` with kernel, C and gamma chosen by cross-validation, calibrated.

Every candidate is scored on the same folds, and up to ``precompute_max_rows`` rows all candidates share one
precomputed kernel matrix (the linear one, or the squared distances every RBF gamma exponentiates): the
scaled features' products are computed once instead of once per candidate and fold.

The probabilities come from stacking: a multinomial logistic regression on the chosen candidate's
out-of-fold decision values, which the search already computed. scikit-learn's ``StackingClassifier`` and
``CalibratedClassifierCV(ensemble=False)`` would compute them again, and both need validation parts that cover
every row, which a class with a single distinct training photo cannot give (holding it out leaves a fold
that never saw the class); ``CalibratedClassifierCV``'s methods (sigmoid per class, isotonic, temperature)
are also not this multinomial calibration.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from furnitype.classify.metrics import balanced_accuracy
from furnitype.classify.models.base import (
    CLASS_WEIGHT,
    FOLDS,
    NON_NEGATIVE_INT,
    POSITIVE,
    CrossValidatedClassifier,
    one_of,
)
from furnitype.classify.models.payload import logistic, scaled_pipeline, skops_dump, skops_load, svc

KERNELS = ("linear", "rbf")
#: How cross-validation ranks the candidates; ties go to the earlier (simpler) one.
SCORINGS = ("accuracy", "balanced_accuracy")
_SCORERS = {"accuracy": accuracy_score, "balanced_accuracy": balanced_accuracy}


class SVMModel(CrossValidatedClassifier):
    """``StandardScaler`` + ``SVC``, kernel, C and gamma chosen by cross-validation; calibrated probabilities.

    The candidates are ``linear`` with each of ``linear_Cs``, and ``rbf`` with each of ``rbf_Cs`` x
    ``rbf_gammas``, scored on the out-of-fold predictions of all folds together. The chosen SVM is refitted on
    all rows, and a multinomial logistic regression on its out-of-fold decision values turns decisions into
    probabilities (Platt scaling for many classes).

    Parameters
    ----------
    kernels : list of {"linear", "rbf"}, default=("linear", "rbf")
    linear_Cs : list of float, default=(0.001, 0.01, 0.1, 1.0)
    rbf_Cs : list of float, default=(1.0, 10.0, 100.0)
    rbf_gammas : list of float, default=(0.25, 0.5, 1.0, 2.0)
        Multiples of scikit-learn's ``gamma="scale"``, ``1 / (n_features * variance)`` of the scaled features.
    cv : int, default=5
    scoring : {"accuracy", "balanced_accuracy"}, default="accuracy"
    class_weight : {None, "balanced"}, default=None
    precompute_max_rows : int, default=6000
        Up to this many training rows, candidates share a precomputed kernel matrix (memory grows with the
        square of the rows); above, every fit computes its own kernel.
    random_state : int, default=0
        Seeds the folds.

    Attributes
    ----------
    pipeline_ : Pipeline
        The scaler and the chosen ``SVC``, fitted on all rows.
    calibrator_ : LogisticRegression
        Decision values to probabilities.
    best_params_ : dict
        ``kernel``, ``C``, and for rbf ``gamma`` and ``gamma_factor``.
    cv_results_ : list of dict
        ``{"params": ..., scoring: score}`` per candidate.
    n_splits_ : int
    """

    name = "svm"
    payload = "model.skops"
    _parameter_constraints = {
        "kernels": ["array-like"],
        "linear_Cs": ["array-like"],
        "rbf_Cs": ["array-like"],
        "rbf_gammas": ["array-like"],
        "cv": [FOLDS],
        "scoring": [one_of(SCORINGS)],
        "class_weight": CLASS_WEIGHT,
        "precompute_max_rows": [NON_NEGATIVE_INT],
        "random_state": [NON_NEGATIVE_INT],
    }
    _item_constraints = {"kernels": one_of(KERNELS), "linear_Cs": POSITIVE, "rbf_Cs": POSITIVE, "rbf_gammas": POSITIVE}
    _fitted_info = {"best_params": [dict], "cv_results": [list], "n_splits": [FOLDS]}

    def __init__(
        self,
        *,
        kernels: tuple[str, ...] = KERNELS,
        linear_Cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0),  # noqa: N803 - scikit-learn's name
        rbf_Cs: tuple[float, ...] = (1.0, 10.0, 100.0),  # noqa: N803
        rbf_gammas: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0),
        cv: int = 5,
        scoring: str = "accuracy",
        class_weight: str | None = None,
        precompute_max_rows: int = 6000,
        random_state: int = 0,
    ):
        self.kernels = kernels
        self.linear_Cs = linear_Cs
        self.rbf_Cs = rbf_Cs
        self.rbf_gammas = rbf_gammas
        self.cv = cv
        self.scoring = scoring
        self.class_weight = class_weight
        self.precompute_max_rows = precompute_max_rows
        self.random_state = random_state

    def chosen(self) -> str:
        params = self.best_params_
        if params["kernel"] == "linear":
            return f"linear, C={params['C']:g}"
        return f"rbf, C={params['C']:g}, gamma={params['gamma_factor']:g}x scale"

    def _candidates(self, gamma_scale: float) -> list[dict]:
        found = []
        if "linear" in self.kernels:
            found += [{"kernel": "linear", "C": float(C)} for C in sorted(self.linear_Cs)]
        if "rbf" in self.kernels:
            found += [
                {"kernel": "rbf", "C": float(C), "gamma": float(g) * gamma_scale, "gamma_factor": float(g)}
                for C in sorted(self.rbf_Cs)
                for g in sorted(self.rbf_gammas)
            ]
        return found

    def _fit(self, X, y, groups, n_classes):
        folds = self._folds(X, y, groups)
        scaler = StandardScaler().fit(X)
        Xs = scaler.transform(X).astype(np.float64)
        variance = float(Xs.var())
        candidates = self._candidates(1.0 / (Xs.shape[1] * variance) if variance > 0 else 1.0)
        kernels = _SharedKernels(Xs) if len(Xs) <= self.precompute_max_rows else None
        held = np.concatenate([val for _, val in folds])
        width = 1 if n_classes == 2 else n_classes
        # A joblib task per candidate: run here one after the other, or on Ray under ``joblib_backend("ray")``.
        results = Parallel()(
            delayed(_out_of_fold)(
                _svc(candidate, self.class_weight, precomputed=kernels is not None),
                kernels(candidate) if kernels is not None else Xs,
                y,
                folds,
                width,
            )
            for candidate in candidates
        )
        score = _SCORERS[self.scoring]
        scores = [float(score(y[held], predicted[held])) for _, predicted in results]
        best = int(np.argmax(scores))
        final = _svc(candidates[best], self.class_weight, precomputed=False).fit(Xs, y)
        # Calibrate on out-of-fold decisions; classes never held out (one photo) add their in-sample ones.
        calibration_rows = np.union1d(held, np.flatnonzero(~np.isin(y, y[held])))
        decisions = results[best][0].copy()
        in_sample = np.setdiff1d(calibration_rows, held)
        if len(in_sample):
            decisions[in_sample] = _as_columns(final.decision_function(Xs[in_sample]))
        calibrator = LogisticRegression(C=1.0, max_iter=1000)
        with threadpool_limits(limits=1, user_api="blas"):
            calibrator.fit(decisions[calibration_rows], y[calibration_rows])
        self.pipeline_ = Pipeline([("scale", scaler), ("svc", final)])
        self.calibrator_ = calibrator
        self.best_params_ = candidates[best]
        self.cv_results_ = [
            {"params": c, self.scoring: round(s, 6)} for c, s in zip(candidates, scores, strict=True)
        ]

    def _predict_proba(self, X):
        decision = _as_columns(self.pipeline_.decision_function(X))
        proba = np.zeros((len(X), len(self.classes_)))
        proba[:, self.calibrator_.classes_] = self.calibrator_.predict_proba(decision)
        return proba

    def _save_payload(self, path: Path) -> None:
        skops_dump({"pipeline": self.pipeline_, "calibrator": self.calibrator_}, path)

    def _load_payload(self, directory: Path) -> None:
        loaded = skops_load(directory, self.payload, ["pipeline", "calibrator"])
        n_features, n_classes = self.n_features_in_, len(self.classes_)
        pipeline = scaled_pipeline(loaded["pipeline"], ("svc", SVC), n_features, self.payload)
        svc(pipeline[-1], n_features, n_classes, self.payload)
        width = 1 if n_classes == 2 else n_classes
        self.calibrator_ = logistic(loaded["calibrator"], width, np.arange(n_classes), self.payload)
        self.pipeline_ = pipeline


class _SharedKernels:
    """The linear kernel and the squared distances of one feature matrix, computed once for every candidate."""

    def __init__(self, X: np.ndarray):  # noqa: N803
        self.gram = X @ X.T
        norms = np.diag(self.gram)
        self.sq_dist = np.maximum(norms[:, None] + norms[None, :] - 2.0 * self.gram, 0.0)

    def __call__(self, candidate: dict) -> np.ndarray:
        if candidate["kernel"] == "linear":
            return self.gram
        return np.exp(-candidate["gamma"] * self.sq_dist)


def _out_of_fold(svc: SVC, data: np.ndarray, y, folds, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold decision values and predicted classes of one candidate; ``data``: its kernel, or the rows."""
    precomputed = svc.kernel == "precomputed"
    decision = np.zeros((len(y), width))
    predicted = np.zeros(len(y), dtype=int)
    for train, val in folds:
        if precomputed:
            svc.fit(data[np.ix_(train, train)], y[train])
            fold_input = data[np.ix_(val, train)]
        else:
            svc.fit(data[train], y[train])
            fold_input = data[val]
        decision[val] = _as_columns(svc.decision_function(fold_input))
        predicted[val] = svc.predict(fold_input)
    return decision, predicted


def _svc(candidate: dict, class_weight: str | None, *, precomputed: bool) -> SVC:
    kernel = "precomputed" if precomputed else candidate["kernel"]
    return SVC(kernel=kernel, C=candidate["C"], gamma=candidate.get("gamma", "scale"), class_weight=class_weight)


def _as_columns(decision: np.ndarray) -> np.ndarray:
    return decision.reshape(len(decision), -1)
