"""The classifiers of bottleneck features, scikit-learn estimators that save, load and describe their fit.

- ``dense``: a Keras head (standardisation, one hidden ReLU layer, dropout, softmax), early stopping on photos
  held out by content (``dense.py``);
- ``logreg``: ``StandardScaler`` + multinomial ``LogisticRegression``, C by cross-validation (``logreg.py``);
- ``svm``: ``StandardScaler`` + ``SVC``, kernel, C and gamma by cross-validation, calibrated (``svm.py``).

Cross-validation folds keep identical photos (same sha256, passed as ``groups``) in one fold. The
scikit-learn models are stored with skops, which rebuilds objects from data instead of unpickling code and
refuses any type outside its trusted list. A new model is a ``FeatureClassifier`` subclass in its own module
and a line in ``MODELS``.
"""

from __future__ import annotations

from furnitype.classify.models.base import CLASS_WEIGHTS, CrossValidatedClassifier, FeatureClassifier
from furnitype.classify.models.dense import DenseModel
from furnitype.classify.models.logreg import LogRegModel
from furnitype.classify.models.svm import SVMModel

#: The registry of model kinds: name → class (the ``--models`` choices, in table order).
MODELS: dict[str, type[FeatureClassifier]] = {model.name: model for model in (DenseModel, LogRegModel, SVMModel)}
MODEL_NAMES = tuple(MODELS)

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
]


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
    accepted = model_cls().get_params()
    return model_cls(**{k: v for k, v in params.items() if v is not None and k in accepted})
