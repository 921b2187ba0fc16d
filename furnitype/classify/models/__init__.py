"""The classifiers of bottleneck features, scikit-learn estimators that save, load and describe their fit.

- ``dense``: a Keras head (standardisation, one hidden ReLU layer, dropout, softmax), early stopping on photos
  held out by content (``dense.py``);
- ``logreg``: ``StandardScaler`` + multinomial ``LogisticRegression``, C by cross-validation (``logreg.py``);
- ``svm``: ``StandardScaler`` + ``SVC``, kernel, C and gamma by cross-validation, calibrated (``svm.py``).

Cross-validation folds keep identical photos (same sha256, passed as ``groups``) in one fold. The
scikit-learn models are stored with skops, which rebuilds objects from data instead of unpickling code and
refuses any type outside its trusted list. A new model is a ``FeatureClassifier`` subclass in its own module
and a line in ``_CLASSES``.

The names (``MODEL_NAMES``, ``CLASS_WEIGHTS``) cost nothing to import; the classes are imported on first use,
because scikit-learn and Keras take seconds to import and a command line needs the names at once (``--help``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from furnitype.classify.models.base import CrossValidatedClassifier, FeatureClassifier
    from furnitype.classify.models.dense import DenseModel
    from furnitype.classify.models.logreg import LogRegModel
    from furnitype.classify.models.svm import SVMModel

#: The registry of model kinds: name -> (module, class) in this package, in table order.
_CLASSES = {"dense": ("dense", "DenseModel"), "logreg": ("logreg", "LogRegModel"), "svm": ("svm", "SVMModel")}
#: The model names (the ``--models`` choices), in table order.
MODEL_NAMES = tuple(_CLASSES)
#: The ``class_weight`` values every model takes.
CLASS_WEIGHTS = (None, "balanced")
_BASE = ("FeatureClassifier", "CrossValidatedClassifier")

__all__ = [
    "CLASS_WEIGHTS",
    "MODELS",
    "MODEL_NAMES",
    "CrossValidatedClassifier",
    "DenseModel",
    "FeatureClassifier",
    "LogRegModel",
    "SVMModel",
    "make_model",
    "model_class",
]


def model_class(name: str) -> type[FeatureClassifier]:
    """The class of the model kind ``name`` (its module is imported now)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}.")
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def make_model(name: str, **params) -> FeatureClassifier:
    """Create an unfitted model by registry name; ``None`` values keep the model's defaults.

    Parameters
    ----------
    name : {"dense", "logreg", "svm"}
    **params
        Constructor arguments; those the model does not take are ignored (``cv`` means nothing to ``dense``).
    """
    model_cls = model_class(name)
    accepted = model_cls().get_params()
    return model_cls(**{k: v for k, v in params.items() if v is not None and k in accepted})


def __getattr__(name: str):
    if name == "MODELS":
        return {model: model_class(model) for model in MODEL_NAMES}
    if name in _BASE:
        return getattr(importlib.import_module(f"{__name__}.base"), name)
    for model, (_, cls) in _CLASSES.items():
        if name == cls:
            return model_class(model)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
