"""Three classifiers of bottleneck features behind one small interface: ``fit``, ``predict_proba``, ``save``,
``load``.

- ``dense``: a Keras head (standardisation, one hidden ReLU layer, dropout, softmax), Adam, early stopping
  on a validation split made by image content; stored as a ``.keras`` file and loaded with ``safe_mode=True``.
- ``logreg``: ``StandardScaler`` + multinomial ``LogisticRegression``, C chosen by stratified
  cross-validation.
- ``svm``: ``StandardScaler`` + ``SVC``; the linear and the RBF kernel, C and gamma chosen by stratified
  cross-validation; probabilities calibrated on the out-of-fold decision values.

The scikit-learn models are stored with skops, which rebuilds objects from data instead of unpickling code and
refuses any type outside its trusted list. Keras and TensorFlow are imported only when a dense model is used.
Cross-validation folds keep identical photos (same sha256, passed as ``groups``) in one fold.
"""

from __future__ import annotations

import abc
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import sklearn
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

import furnitype
from furnitype.classify.split import content_folds, max_folds, split_by_content
from furnitype.errors import StoreError

#: Version of the saved-model layout (``model.json`` + payload); a newer one is refused.
MODEL_FORMAT = 1
CLASS_WEIGHTS = (None, "balanced")
KERNELS = ("linear", "rbf")
#: How cross-validation ranks candidates; every score is "higher is better" (log loss is negated).
SCORINGS = ("accuracy", "balanced_accuracy", "log_loss")
#: Types a skops file may hold beyond skops' own trusted defaults (numpy, scikit-learn estimators): none.
TRUSTED_SKOPS_TYPES: tuple[str, ...] = ()


# -- allowed parameter values, declared as data ------------------------------------------------------------


@dataclass(frozen=True)
class _Range:
    """A number in [low, high]; an end is excluded when ``open_low`` / ``open_high``."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    integer: bool = False

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            return False
        if self.integer and not isinstance(value, (int, np.integer)):
            return False
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.open_high and value == self.high))

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.high is None:
            return f"{kind} {'>' if self.open_low else '>='} {self.low}"
        left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"{kind} in {left}{self.low}, {self.high}{right}"


@dataclass(frozen=True)
class _OneOf:
    """One of a fixed set of values."""

    values: tuple

    def accepts(self, value) -> bool:
        return any(value == v and type(value) is type(v) for v in self.values)

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


@dataclass(frozen=True)
class _Several:
    """A non-empty list or tuple whose items each satisfy ``item``."""

    item: _Range | _OneOf

    def accepts(self, value) -> bool:
        return (
            isinstance(value, (list, tuple)) and len(value) > 0 and all(self.item.accepts(v) for v in value)
        )

    def __str__(self) -> str:
        return f"a non-empty list, each item {self.item}"


_POSITIVE = _Range(0, open_low=True)
_COUNT = _Range(1, integer=True)
_SEED = _Range(0, integer=True)


# -- the interface ---------------------------------------------------------------------------------------


class FeatureClassifier(abc.ABC):
    """A classifier of feature vectors: ``fit``, ``predict_proba``, ``predict``, ``save``, ``load``.

    Subclasses declare ``name``, their parameters with allowed values (``_parameters``), the fitted facts
    worth keeping (``_fitted_info``) and the payload file name; ``__init__`` only stores parameters.

    Attributes (after ``fit``)
    --------------------------
    classes_ : ndarray of str
        The sorted class names; column ``j`` of ``predict_proba`` is ``classes_[j]``.
    n_features_in_ : int
        The feature dimension seen in ``fit``.
    """

    name: ClassVar[str]
    _parameters: ClassVar[dict[str, _Range | _OneOf | _Several]]
    _fitted_info: ClassVar[tuple[str, ...]]
    _payload: ClassVar[str]

    def get_params(self) -> dict:
        """The constructor's parameters and their values."""
        return {key: getattr(self, key) for key in self._parameters}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @classmethod  # noqa: B027 - an optional hook, a no-op for most models
    def prepare(cls) -> None:
        """Import heavy dependencies now, so that a timed ``fit`` measures fitting only."""

    def fit(self, X: np.ndarray, y: np.ndarray, *, groups: np.ndarray | None = None) -> FeatureClassifier:
        """Fit on features ``X`` (n_rows, n_features) and class names ``y``.

        Parameters
        ----------
        X : array-like of shape (n_rows, n_features)
        y : array-like of str, shape (n_rows,)
        groups : array-like of str, shape (n_rows,), default=None
            Content key (sha256) of each row: identical photos stay in one validation fold.

        Returns
        -------
        self
        """
        self._validate_params()
        X = _check_features(X)
        y = np.asarray(y).astype(str)
        if y.shape != (len(X),):
            raise ValueError(f"y must have one label per row of X ({len(X)}). Received: y.shape={y.shape}")
        if groups is not None and len(groups) != len(X):
            raise ValueError(f"groups must have one entry per row of X ({len(X)}). Received: {len(groups)}")
        classes, y_index = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"fit needs at least 2 classes. Received: classes={classes.tolist()}")
        self._fit(X, y_index, groups, len(classes))
        self.classes_ = classes
        self.n_features_in_ = X.shape[1]
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n_rows, n_classes), columns in ``classes_`` order."""
        self._check_fitted()
        X = _check_features(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but this {self.name} model was fitted on "
                f"{self.n_features_in_}."
            )
        return self._predict_proba(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The most probable class name of each row."""
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def summary(self) -> dict:
        """What ``fit`` found (chosen hyper-parameters, epochs ...), JSON-ready."""
        self._check_fitted()
        return {key: getattr(self, f"{key}_") for key in self._fitted_info}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``model.json`` (parameters, classes, fitted facts, versions) and the payload to a folder."""
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_payload(directory / self._payload)
        description = {
            "format": MODEL_FORMAT,
            "model": self.name,
            "params": self.get_params(),
            "classes": self.classes_.tolist(),
            "n_features_in": int(self.n_features_in_),
            "fitted": self.summary(),
            "payload": self._payload,
            "versions": _versions(self.name == "dense"),
        }
        (directory / "model.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> FeatureClassifier:
        """Read a model written by ``save``; on the base class, any model kind.

        Raises
        ------
        StoreError
            No saved model there, a newer format, another kind than asked for, or an untrusted payload.
        """
        directory = Path(directory)
        try:
            description = json.loads((directory / "model.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"{directory} holds no saved model (no model.json).") from None
        except (OSError, ValueError) as err:
            raise StoreError(f"{directory}/model.json cannot be read: {err}") from None
        if int(description.get("format", 0)) > MODEL_FORMAT:
            raise StoreError(
                f"{directory} was saved by a newer furnitype (model format {description['format']})."
            )
        model_cls = MODELS.get(description.get("model"))
        if model_cls is None:
            raise StoreError(f"{directory} holds an unknown model kind {description.get('model')!r}.")
        if cls is not FeatureClassifier and model_cls is not cls:
            raise StoreError(f"{directory} holds a {model_cls.name} model, not a {cls.name} model.")
        model = model_cls(**description["params"])
        payload = directory / description["payload"]
        if not payload.is_file():
            raise StoreError(f"{directory} is incomplete: {payload.name} is missing.")
        model._load_payload(payload)
        model.classes_ = np.array(description["classes"], dtype=str)
        model.n_features_in_ = int(description["n_features_in"])
        for key, value in description["fitted"].items():
            setattr(model, f"{key}_", value)
        return model

    # -- for subclasses --

    @abc.abstractmethod
    def _fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, n_classes: int) -> None:
        """Fit on class indices ``y`` in 0..n_classes-1; set the payload and ``_fitted_info`` attributes."""

    @abc.abstractmethod
    def _predict_proba(self, X: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def _save_payload(self, path: Path) -> None: ...

    @abc.abstractmethod
    def _load_payload(self, path: Path) -> None: ...

    def _validate_params(self) -> None:
        for key, allowed in self._parameters.items():
            value = getattr(self, key)
            if not allowed.accepts(value):
                raise ValueError(f"{type(self).__name__}: {key} must be {allowed}. Received: {key}={value!r}")

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet; call fit first.")

    def _cv_folds(self, y: np.ndarray, groups: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """``self.cv`` folds (fewer when the largest class has fewer distinct photos); sets ``n_splits_``."""
        n_splits = min(self.cv, max_folds(y, groups))
        if n_splits < 2:
            raise ValueError("cannot cross-validate: every class has a single distinct photo.")
        self.n_splits_ = n_splits
        return content_folds(y, groups, n_splits=n_splits, seed=self.random_state)


# -- dense head (Keras) ----------------------------------------------------------------------------------


class DenseModel(FeatureClassifier):
    """Keras head: standardisation, ``Dense(hidden_units, relu)``, ``Dropout``, ``Dense(softmax)``.

    Trained with Adam on sparse categorical cross-entropy; early stopping watches the loss on a validation
    part of the training rows (``validation_fraction`` of each class's distinct photos) and restores the best
    epoch's weights. Without validation rows it trains ``max_epochs``.

    Parameters
    ----------
    hidden_units : int, default=256
    dropout : float, default=0.5
        Dropout rate after the hidden layer, in [0, 1).
    learning_rate : float, default=1e-3
    batch_size : int, default=64
    max_epochs : int, default=200
    patience : int, default=10
        Epochs without a better validation loss before training stops.
    validation_fraction : float, default=0.15
        Share of the training photos held out for early stopping, in [0, 1); 0 trains ``max_epochs``.
    class_weight : {None, "balanced"}, default=None
        ``"balanced"`` weights each class by ``n_rows / (n_classes * class_rows)`` in the loss.
    random_state : int, default=0
        Seeds the validation split, the initial weights, dropout and shuffling.
    """

    name = "dense"
    _payload = "model.keras"
    _parameters = {
        "hidden_units": _COUNT,
        "dropout": _Range(0, 1, open_high=True),
        "learning_rate": _POSITIVE,
        "batch_size": _COUNT,
        "max_epochs": _COUNT,
        "patience": _COUNT,
        "validation_fraction": _Range(0, 1, open_high=True),
        "class_weight": _OneOf(CLASS_WEIGHTS),
        "random_state": _SEED,
    }
    _fitted_info = ("best_epoch", "epochs_run", "n_validation")

    def __init__(
        self,
        *,
        hidden_units: int = 256,
        dropout: float = 0.5,
        learning_rate: float = 1e-3,
        batch_size: int = 64,
        max_epochs: int = 200,
        patience: int = 10,
        validation_fraction: float = 0.15,
        class_weight: str | None = None,
        random_state: int = 0,
    ):
        self.hidden_units = hidden_units
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.class_weight = class_weight
        self.random_state = random_state

    @classmethod
    def prepare(cls) -> None:
        """Import Keras (and TensorFlow) now."""
        _keras()

    def _fit(self, X, y, groups, n_classes):
        keras = _keras()
        keras.utils.set_random_seed(self.random_state)
        if self.validation_fraction > 0:
            fit_rows, val_rows = split_by_content(
                y.astype(str), groups, test_size=self.validation_fraction, seed=self.random_state
            )
        else:
            fit_rows, val_rows = np.arange(len(y)), np.array([], dtype=int)
        X_fit, y_fit = X[fit_rows], y[fit_rows]
        model = keras.Sequential(
            [
                keras.Input(shape=(X.shape[1],)),
                keras.layers.Normalization(mean=X_fit.mean(axis=0), variance=X_fit.var(axis=0)),
                keras.layers.Dense(self.hidden_units, activation="relu"),
                keras.layers.Dropout(self.dropout, seed=self.random_state),
                keras.layers.Dense(n_classes, activation="softmax"),
            ],
            name="furnitype_dense_head",
        )
        model.compile(
            optimizer=keras.optimizers.Adam(self.learning_rate), loss="sparse_categorical_crossentropy"
        )
        callbacks, validation = [], None
        if len(val_rows):
            stopper = keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=self.patience, restore_best_weights=True
            )
            callbacks, validation = [stopper], (X[val_rows], y[val_rows])
        history = model.fit(
            X_fit,
            y_fit,
            batch_size=self.batch_size,
            epochs=self.max_epochs,
            validation_data=validation,
            class_weight=_class_weights(y_fit, n_classes) if self.class_weight == "balanced" else None,
            callbacks=callbacks,
            shuffle=True,
            verbose=0,
        )
        self.model_ = model
        self.epochs_run_ = len(history.history["loss"])
        self.best_epoch_ = int(callbacks[0].best_epoch) + 1 if callbacks else self.epochs_run_
        self.n_validation_ = len(val_rows)

    def _predict_proba(self, X):
        to_numpy = _keras().ops.convert_to_numpy
        chunks = [to_numpy(self.model_(X[i : i + 4096], training=False)) for i in range(0, len(X), 4096)]
        proba = np.concatenate(chunks).astype(np.float64) if chunks else np.zeros((0, len(self.classes_)))
        return proba / proba.sum(axis=1, keepdims=True).clip(min=1e-12)

    def _save_payload(self, path):
        with warnings.catch_warnings():  # raised inside Keras' own saving code with numpy 2 (harmless)
            warnings.filterwarnings("ignore", "__array__ implementation doesn't accept", DeprecationWarning)
            self.model_.save(path)

    def _load_payload(self, path):
        keras = _keras()
        try:
            self.model_ = keras.saving.load_model(path, compile=False, safe_mode=True)
        except Exception as err:  # noqa: BLE001 - Keras raises many types for a damaged or foreign file
            raise StoreError(f"{path} is not a loadable Keras model: {_first_line(err)}") from None


# -- logistic regression --------------------------------------------------------------------------------


class LogRegModel(FeatureClassifier):
    """``StandardScaler`` + multinomial ``LogisticRegression`` (L2, lbfgs); C chosen by stratified CV.

    For each fold the C values are fitted in increasing order, each starting from the previous solution,
    to the looser tolerance ``cv_tol``: ranking candidates needs less precision than the final model, which is
    fitted on all rows to ``tol``. (On 2,126 x 2,048 random-weight InceptionV3 features of the shared photos
    this cut the whole fit from 43 s to 18 s; the chosen C and the test accuracy stayed the same.)

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
    """

    name = "logreg"
    _payload = "model.skops"
    _parameters = {
        "Cs": _Several(_POSITIVE),
        "cv": _Range(2, integer=True),
        "scoring": _OneOf(SCORINGS),
        "class_weight": _OneOf(CLASS_WEIGHTS),
        "tol": _POSITIVE,
        "cv_tol": _POSITIVE,
        "max_iter": _COUNT,
        "random_state": _SEED,
    }
    _fitted_info = ("best_params", "cv_results", "n_splits", "converged")

    def __init__(
        self,
        *,
        Cs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0),  # noqa: N803 - sklearn's name
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

    def _fit(self, X, y, groups, n_classes):
        folds = self._cv_folds(y, groups)
        scaler = StandardScaler().fit(X)
        Xs = scaler.transform(X)
        Cs = sorted(float(c) for c in self.Cs)
        oof = np.zeros((len(Cs), len(y), n_classes))
        # lbfgs multiplies thin matrices (rows x features by features x classes): BLAS threads only add
        # overhead there (a 5-fold CV took 33 s with 2 OpenBLAS threads, 10 s with 1, on a 2-core machine).
        with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            # A joblib task per fold: run here one after the other, or on Ray under ``joblib_backend("ray")``.
            paths = Parallel()(
                delayed(_logreg_path)(Xs[train], y[train], Xs[val], Cs, self.cv_tol, self.max_iter, self.class_weight)
                for train, val in folds
            )
            for (_, val), proba in zip(folds, paths, strict=True):
                oof[:, val] = proba
            held = np.concatenate([val for _, val in folds])
            scores = [_score(self.scoring, y[held], proba[held]) for proba in oof]
            best = int(np.argmax(scores))
            final = LogisticRegression(
                C=Cs[best], tol=self.tol, max_iter=self.max_iter, class_weight=self.class_weight
            )
            final.fit(Xs, y)
        self.pipeline_ = Pipeline([("scale", scaler), ("logreg", final)])
        self.best_params_ = {"C": Cs[best]}
        self.cv_results_ = [
            {"params": {"C": C}, self.scoring: _report_score(self.scoring, s)}
            for C, s in zip(Cs, scores, strict=True)
        ]
        self.converged_ = bool(np.max(final.n_iter_) < self.max_iter)

    def _predict_proba(self, X):
        return self.pipeline_.predict_proba(X)

    def _save_payload(self, path):
        _skops_dump({"pipeline": self.pipeline_}, path)

    def _load_payload(self, path):
        self.pipeline_ = _skops_load(path)["pipeline"]


# -- support vector machine -----------------------------------------------------------------------------


class SVMModel(FeatureClassifier):
    """``StandardScaler`` + ``SVC``, kernel, C and gamma chosen by stratified CV; calibrated probabilities.

    Every candidate (``linear`` with each of ``linear_Cs``; ``rbf`` with each of ``rbf_Cs`` x ``rbf_gammas``)
    is scored on the same folds. Up to ``precompute_max_rows`` training rows, the kernel matrix is computed
    once and shared by all candidates and folds (the same result, many times faster); above, each fit
    computes its own kernel. The chosen SVM is refitted on all rows, and a multinomial logistic regression on
    its out-of-fold decision values turns decisions into probabilities (Platt scaling for many classes).

    Parameters
    ----------
    kernels : list of {"linear", "rbf"}, default=("linear", "rbf")
    linear_Cs : list of float, default=(0.001, 0.01, 0.1, 1.0)
    rbf_Cs : list of float, default=(1.0, 10.0, 100.0)
    rbf_gammas : list of float, default=(0.25, 0.5, 1.0, 2.0)
        Multiples of scikit-learn's ``gamma="scale"``, ``1 / (n_features * variance)`` of the scaled features.
    cv : int, default=5
    scoring : {"accuracy", "balanced_accuracy"}, default="accuracy"
        How folds rank the candidates; ties go to the earlier (simpler) one.
    class_weight : {None, "balanced"}, default=None
    precompute_max_rows : int, default=6000
    random_state : int, default=0
        Seeds the folds.
    """

    name = "svm"
    _payload = "model.skops"
    _parameters = {
        "kernels": _Several(_OneOf(KERNELS)),
        "linear_Cs": _Several(_POSITIVE),
        "rbf_Cs": _Several(_POSITIVE),
        "rbf_gammas": _Several(_POSITIVE),
        "cv": _Range(2, integer=True),
        "scoring": _OneOf(("accuracy", "balanced_accuracy")),
        "class_weight": _OneOf(CLASS_WEIGHTS),
        "precompute_max_rows": _Range(0, integer=True),
        "random_state": _SEED,
    }
    _fitted_info = ("best_params", "cv_results", "n_splits")

    def __init__(
        self,
        *,
        kernels: tuple[str, ...] = KERNELS,
        linear_Cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0),  # noqa: N803 - sklearn's name
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
        folds = self._cv_folds(y, groups)
        scaler = StandardScaler().fit(X)
        Xs = scaler.transform(X).astype(np.float64)
        variance = float(Xs.var())
        candidates = self._candidates(1.0 / (Xs.shape[1] * variance) if variance > 0 else 1.0)
        kernels = _Kernels(Xs) if len(Xs) <= self.precompute_max_rows else None
        held = np.concatenate([val for _, val in folds])
        scores, decisions = [], []
        # A joblib task per candidate: run here one after the other, or on Ray under ``joblib_backend("ray")``.
        results = Parallel()(
            delayed(_svm_out_of_fold)(
                candidate,
                kernels(candidate) if kernels is not None else Xs,
                kernels is not None,
                y,
                folds,
                self.class_weight,
                _decision_width(n_classes),
            )
            for candidate in candidates
        )
        for decision, predicted in results:
            scores.append(_score(self.scoring, y[held], None, predicted[held]))
            decisions.append(decision)
        best = int(np.argmax(scores))
        final = _svc(candidates[best], self.class_weight, precomputed=False).fit(Xs, y)
        # Calibrate on out-of-fold decisions; classes never held out (one photo) add their in-sample ones.
        calibration_rows = np.union1d(held, np.flatnonzero(~np.isin(y, y[held])))
        calibration_input = decisions[best].copy()
        in_sample = np.setdiff1d(calibration_rows, held)
        if len(in_sample):
            calibration_input[in_sample] = _as_columns(final.decision_function(Xs[in_sample]))
        calibrator = LogisticRegression(C=1.0, max_iter=1000)
        with threadpool_limits(limits=1, user_api="blas"):
            calibrator.fit(calibration_input[calibration_rows], y[calibration_rows])
        self.pipeline_ = Pipeline([("scale", scaler), ("svc", final)])
        self.calibrator_ = calibrator
        self.best_params_ = candidates[best]
        self.cv_results_ = [
            {"params": c, self.scoring: _report_score(self.scoring, s)}
            for c, s in zip(candidates, scores, strict=True)
        ]

    def _predict_proba(self, X):
        decision = _as_columns(self.pipeline_.decision_function(X))
        proba = np.zeros((len(X), len(self.classes_)))
        proba[:, self.calibrator_.classes_] = self.calibrator_.predict_proba(decision)
        return proba

    def _save_payload(self, path):
        _skops_dump({"pipeline": self.pipeline_, "calibrator": self.calibrator_}, path)

    def _load_payload(self, path):
        loaded = _skops_load(path)
        self.pipeline_, self.calibrator_ = loaded["pipeline"], loaded["calibrator"]


#: The registry of model kinds: name → class (the ``--models`` choices, in table order).
MODELS: dict[str, type[FeatureClassifier]] = {"dense": DenseModel, "logreg": LogRegModel, "svm": SVMModel}
MODEL_NAMES = tuple(MODELS)


def make_model(name: str, **params) -> FeatureClassifier:
    """Create an unfitted model by registry name; ``None`` values keep the model's defaults.

    Parameters
    ----------
    name : {"dense", "logreg", "svm"}
    **params
        Constructor arguments; those the model does not take are ignored (``cv`` means nothing to ``dense``).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}.")
    model_cls = MODELS[name]
    return model_cls(**{k: v for k, v in params.items() if v is not None and k in model_cls._parameters})


# -- helpers ---------------------------------------------------------------------------------------------


def _logreg_path(X, y, X_val, Cs, tol, max_iter, class_weight) -> np.ndarray:
    """Validation probabilities ``(len(Cs), len(X_val), n_classes)`` along a warm-started path of C values."""
    model = LogisticRegression(C=Cs[0], warm_start=True, tol=tol, max_iter=max_iter, class_weight=class_weight)
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return np.stack([model.set_params(C=C).fit(X, y).predict_proba(X_val) for C in Cs])


def _svm_out_of_fold(candidate, data, precomputed, y, folds, class_weight, width) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold decision values and predicted classes of one candidate; ``data``: its kernel matrix, or rows."""
    decision = np.zeros((len(y), width))
    predicted = np.zeros(len(y), dtype=int)
    for train, val in folds:
        svc = _svc(candidate, class_weight, precomputed=precomputed)
        if precomputed:
            svc.fit(data[np.ix_(train, train)], y[train])
            fold_input = data[np.ix_(val, train)]
        else:
            svc.fit(data[train], y[train])
            fold_input = data[val]
        decision[val] = _as_columns(svc.decision_function(fold_input))
        predicted[val] = svc.predict(fold_input)
    return decision, predicted


class _Kernels:
    """Linear and RBF kernel matrices of one feature matrix, computed once."""

    def __init__(self, X: np.ndarray):
        self.gram = X @ X.T
        norms = np.diag(self.gram)
        self.sq_dist = np.maximum(norms[:, None] + norms[None, :] - 2.0 * self.gram, 0.0)

    def __call__(self, candidate: dict) -> np.ndarray:
        if candidate["kernel"] == "linear":
            return self.gram
        return np.exp(-candidate["gamma"] * self.sq_dist)


def _svc(candidate: dict, class_weight: str | None, *, precomputed: bool) -> SVC:
    kernel = "precomputed" if precomputed else candidate["kernel"]
    gamma = candidate.get("gamma", "scale")
    return SVC(kernel=kernel, C=candidate["C"], gamma=gamma, class_weight=class_weight)


def _decision_width(n_classes: int) -> int:
    return 1 if n_classes == 2 else n_classes


def _as_columns(decision: np.ndarray) -> np.ndarray:
    return decision.reshape(len(decision), -1)


def _score(
    scoring: str, y: np.ndarray, proba: np.ndarray | None, predicted: np.ndarray | None = None
) -> float:
    """A cross-validation score, higher is better (``log_loss`` is negated)."""
    if scoring == "log_loss":
        return float(np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0))))
    if predicted is None:
        predicted = np.argmax(proba, axis=1)
    if scoring == "accuracy":
        return float(np.mean(predicted == y))
    return float(np.mean([np.mean(predicted[y == c] == c) for c in np.unique(y)]))


def _report_score(scoring: str, score: float) -> float:
    return round(-score if scoring == "log_loss" else score, 6)


def _class_weights(y: np.ndarray, n_classes: int) -> dict[int, float]:
    counts = np.bincount(y, minlength=n_classes)
    return {c: float(len(y) / (n_classes * counts[c])) for c in range(n_classes) if counts[c]}


def _check_features(X) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"X must be a 2-D numeric array (rows, features). Received: shape={X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values.")
    return X.astype(np.float32, copy=False)


def _skops_dump(obj: dict, path: Path) -> None:
    import skops.io

    skops.io.dump(obj, path)


def _skops_load(path: Path) -> dict:
    import skops.io

    try:
        untrusted = skops.io.get_untrusted_types(file=path)
        if set(untrusted) - set(TRUSTED_SKOPS_TYPES):
            raise StoreError(f"{path} holds types furnitype does not trust: {', '.join(untrusted)}")
        return skops.io.load(path, trusted=list(TRUSTED_SKOPS_TYPES))
    except StoreError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged zip, a foreign file: one clear message
        raise StoreError(f"{path} is not a loadable skops model: {_first_line(err)}") from None


def _keras():
    from furnitype.keras_loader import import_keras

    return import_keras()


def _versions(with_keras: bool) -> dict:
    versions = {
        "furnitype": furnitype.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }
    if with_keras:
        versions["keras"] = _keras().__version__
    return versions


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]
