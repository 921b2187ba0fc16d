"""What every classifier of feature vectors shares: a scikit-learn estimator that saves, loads and reports.

``FeatureClassifier`` is a ``BaseEstimator`` + ``ClassifierMixin``: ``__init__`` stores keyword-only
parameters, ``fit`` validates them (``_parameter_constraints``, scikit-learn's own validation) and the data,
and returns self; learned attributes end in ``_``. On top of that, a model saves itself to a folder
(``model.json`` + a payload file), and says in words what its fit chose and what to know about it, so that
the training loop and the report need no knowledge of any model kind.

scikit-learn's parameter validation (``sklearn.utils._param_validation``) is semi-private: it is what every
scikit-learn estimator declares and what ``check_estimator`` tests, so parameters are checked, and errors
worded, as in scikit-learn itself; it is imported here only, so a change in it is met in one place.
"""

from __future__ import annotations

import abc
import os
from numbers import Integral, Real
from pathlib import Path
from typing import ClassVar

import numpy as np
import sklearn
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import (
    Interval,
    InvalidParameterError,
    StrOptions,
    validate_parameter_constraints,
)
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

import furnitype
from furnitype.classify.metadata import (
    MODEL_FILE,
    MODEL_FORMAT,
    ModelRecord,
    read_model_record,
    write_model_record,
)
from furnitype.classify.models import CLASS_WEIGHTS
from furnitype.classify.runfiles import Damage
from furnitype.classify.split import ContentKFold, max_splits
from furnitype.errors import StoreError, first_line

#: Allowed values of common parameters, as scikit-learn constraints.
POSITIVE = Interval(Real, 0, None, closed="neither")
COUNT = Interval(Integral, 1, None, closed="left")
NON_NEGATIVE_INT = Interval(Integral, 0, None, closed="left")
FRACTION = Interval(Real, 0, 1, closed="left")
FOLDS = Interval(Integral, 2, None, closed="left")
CLASS_WEIGHT = [StrOptions({weight for weight in CLASS_WEIGHTS if weight}), None]


def one_of(values) -> StrOptions:
    """The constraint "one of these strings"."""
    return StrOptions(set(values))


class FeatureClassifier(ClassifierMixin, BaseEstimator, abc.ABC):
    """A classifier of feature vectors (rows of a feature file) into class names.

    Subclasses declare ``name`` (their registry name), ``payload`` (the file their fitted estimator is saved
    to), ``_parameter_constraints`` (scikit-learn's format), ``_item_constraints`` (for list-valued
    parameters: the constraint of each item), ``_fitted_info`` (fitted facts worth keeping, saved in
    ``model.json``, with their constraints in scikit-learn's format) and implement ``_fit``,
    ``_predict_proba``, the payload's saving and loading (which checks that the payload is what was saved),
    ``chosen`` and ``tuning``.

    Attributes (after ``fit``)
    --------------------------
    classes_ : ndarray
        The sorted class labels (names); column ``j`` of ``predict_proba`` is ``classes_[j]``.
    n_features_in_ : int
        The feature dimension seen in ``fit``.
    """

    name: ClassVar[str]
    payload: ClassVar[str]
    _parameter_constraints: ClassVar[dict]
    _item_constraints: ClassVar[dict] = {}
    _fitted_info: ClassVar[dict]

    @classmethod  # noqa: B027 - an optional hook, a no-op for most models
    def prepare(cls) -> None:
        """Import heavy dependencies now, so that a timed ``fit`` measures fitting only."""

    def fit(self, X, y, *, groups=None) -> FeatureClassifier:
        """Fit on features ``X`` and class names ``y``.

        Parameters
        ----------
        X : array-like of shape (n_rows, n_features)
        y : array-like of str, shape (n_rows,)
        groups : array-like of str, shape (n_rows,), default=None
            Content key (sha256) of each row: identical photos stay on one side of every internal split.

        Returns
        -------
        self
        """
        self._validate_params()
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        if groups is not None and len(groups) != len(X):
            raise ValueError(f"groups must have one entry per row of X ({len(X)}). Received: {len(groups)}")
        classes, y_index = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"fit needs at least 2 classes; y has {len(classes)} class: {classes.tolist()}")
        self._fit(X, y_index, groups, len(classes))
        self.classes_ = classes
        return self

    def check_params(self) -> FeatureClassifier:
        """Check the parameters now, as ``fit`` would (raises scikit-learn's ``InvalidParameterError``)."""
        self._validate_params()
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, shape (n_rows, n_classes), columns in ``classes_`` order."""
        check_is_fitted(self)
        return self._predict_proba(validate_data(self, X, dtype=np.float32, reset=False))

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def summary(self) -> dict:
        """What ``fit`` found (chosen hyper-parameters, epochs ...), JSON-ready."""
        check_is_fitted(self)
        return {key: getattr(self, f"{key}_") for key in self._fitted_info}

    # -- what the model says about its fit --

    @abc.abstractmethod
    def chosen(self) -> str:
        """What the fit chose, in a few words (the table's ``chosen`` column)."""

    @abc.abstractmethod
    def tuning(self) -> str:
        """How the fit was tuned, a clause for the note on a row that trails the baseline."""

    def fit_notes(self) -> list[str]:
        """Caveats of this fit worth a note in the report (a solver that did not converge ...)."""
        return []

    def equivalence_to(self, reference: BaseEstimator) -> str:
        """A clause saying how the fitted model amounts to the reference pipeline, or "" when it does not."""
        return ""

    # -- saving --

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``model.json`` (parameters, classes, fitted facts, versions) and the payload to a folder."""
        check_is_fitted(self)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_payload(directory / self.payload)
        record = ModelRecord(
            format=MODEL_FORMAT,
            model=self.name,
            params=self.get_params(),
            classes=self.classes_.tolist(),
            n_features_in=int(self.n_features_in_),
            fitted=self.summary(),
            payload=self.payload,
            versions=self.versions(),
        )
        write_model_record(directory, record)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> FeatureClassifier:
        """Read a model written by ``save``; on the base class, any model kind.

        Everything in the folder is checked before use (see ``read``).

        Raises
        ------
        StoreError
            No saved model there, a newer format, another kind than asked for, or a damaged model.
        """
        directory = Path(directory)
        if not os.path.lexists(directory / MODEL_FILE):
            raise StoreError(f"{directory} holds no saved model (no {MODEL_FILE}).")
        try:
            return cls.read(directory)
        except Damage as damage:
            raise StoreError(f"model {directory} is damaged: {damage}") from damage

    @classmethod
    def read(cls, directory: str | os.PathLike) -> FeatureClassifier:
        """Read a saved model, checking that it is exactly what ``save`` writes.

        ``model.json`` is checked against its schema, the parameters by the estimator's own constraints and
        the fitted facts by the model's ``_fitted_info``; the payload must hold the fitted objects the model
        saves, with the record's classes and feature count. Only files inside ``directory`` are read.

        Raises
        ------
        Damage
            Named from ``directory`` (``model.json params``, ``model.skops``).
        StoreError
            A newer format, another kind than asked for, or a file that cannot be read.
        """
        from furnitype.classify.models import MODEL_NAMES, model_class

        directory = Path(directory)
        record = read_model_record(directory)
        if record.model not in MODEL_NAMES:
            raise Damage(f"{MODEL_FILE} model", f"{record.model!r} is not a model kind ({', '.join(MODEL_NAMES)})")
        model_cls = model_class(record.model)
        if cls is not FeatureClassifier and model_cls is not cls:
            raise StoreError(f"{directory} holds a {model_cls.name} model, not a {cls.name} model.")
        if record.payload != model_cls.payload:
            raise Damage(f"{MODEL_FILE} payload", f"{record.payload!r}, not {model_cls.payload!r}")
        model = model_cls._from_params(record.params)
        if set(record.fitted) != set(model_cls._fitted_info):
            raise Damage(f"{MODEL_FILE} fitted", f"keys are not {', '.join(model_cls._fitted_info)}")
        try:
            validate_parameter_constraints(model_cls._fitted_info, record.fitted, caller_name=model_cls.__name__)
        except InvalidParameterError as err:
            raise Damage(f"{MODEL_FILE} fitted", first_line(err)) from err
        model.classes_ = np.array(record.classes)
        model.n_features_in_ = record.n_features_in
        for key, value in record.fitted.items():
            setattr(model, f"{key}_", value)
        model._load_payload(directory)
        return model

    @classmethod
    def _from_params(cls, params: dict) -> FeatureClassifier:
        """An unfitted model of the parameters ``model.json`` records, checked as ``fit`` checks them."""
        accepted = cls().get_params()
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise Damage(f"{MODEL_FILE} params.{unknown[0]}", f"not a parameter of the {cls.name} model")
        missing = sorted(set(accepted) - set(params))
        if missing:
            raise Damage(f"{MODEL_FILE} params.{missing[0]}", "missing")
        try:
            model = cls(**params).check_params()
        except InvalidParameterError as err:
            raise Damage(f"{MODEL_FILE} params", first_line(err)) from err
        return model

    def versions(self) -> dict:
        """Versions of the packages the fitted model depends on, recorded in ``model.json``."""
        return {"furnitype": furnitype.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__}

    # -- for subclasses --

    @abc.abstractmethod
    def _fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, n_classes: int) -> None:
        """Fit on class indices ``y`` in 0..n_classes-1; set the payload and ``_fitted_info`` attributes."""

    @abc.abstractmethod
    def _predict_proba(self, X: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def _save_payload(self, path: Path) -> None: ...

    @abc.abstractmethod
    def _load_payload(self, directory: Path) -> None:
        """Load ``self.payload`` from ``directory`` (``classes_`` and ``n_features_in_`` are set); check that it
        holds what ``_save_payload`` writes, else raise ``Damage``."""

    def _validate_params(self) -> None:
        super()._validate_params()
        for key, constraint in self._item_constraints.items():
            values = getattr(self, key)
            if len(values) == 0 or not all(constraint.is_satisfied_by(v) for v in values):
                raise InvalidParameterError(
                    f"The {key!r} parameter of {type(self).__name__} must be a non-empty list, each item "
                    f"{constraint}. Got {values!r} instead."
                )


class CrossValidatedClassifier(FeatureClassifier):
    """A model that chooses among candidate settings by cross-validation on folds that keep photos together.

    Subclasses have the parameters ``cv``, ``scoring`` and ``random_state``, and set ``best_params_``,
    ``cv_results_`` (one ``{"params": ..., scoring: score}`` per candidate) and, through ``_folds``,
    ``n_splits_``.
    """

    def tuning(self) -> str:
        best = next(r for r in self.cv_results_ if r["params"] == self.best_params_)
        return f"its cross-validated {self.scoring} was {best[self.scoring]:.3f} with {self.chosen()}"

    def fit_notes(self) -> list[str]:
        if self.n_splits_ >= self.cv:
            return []
        return [
            f"{self.n_splits_}-fold CV instead of {self.cv} (the largest class has too few distinct training photos)."
        ]

    def _folds(self, X: np.ndarray, y: np.ndarray, groups) -> list[tuple[np.ndarray, np.ndarray]]:
        """``cv`` folds (fewer when the largest class has fewer distinct photos); sets ``n_splits_``."""
        n_splits = min(self.cv, max_splits(y, groups))
        if n_splits < 2:
            raise ValueError("cannot cross-validate: every class has a single distinct photo.")
        self.n_splits_ = n_splits
        return list(ContentKFold(n_splits, random_state=self.random_state).split(X, y, groups))
