"""Stage two: classifiers on cached features, their training pieces and the run folder format.

Public API (imported on first use, so that reading a run does not import scikit-learn or Keras)::

    load_run(run_dir) -> Run                                             # a run's document, no models
    load_model(run_dir, model=None, features=None) -> LoadedModel       # fitted model + feature settings
    make_model(name, **params) -> FeatureClassifier; MODEL_NAMES        # the models (scikit-learn estimators)
    ContentSplit, ContentKFold                                           # splitters that keep photos together

Training a run and writing its report is the use case ``furnitype.training.classify``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Run": "furnitype.classify.run",
    "LoadedModel": "furnitype.classify.run",
    "load_run": "furnitype.classify.run",
    "load_model": "furnitype.classify.run",
    "Row": "furnitype.classify.metadata",
    "RunDocument": "furnitype.classify.metadata",
    "FeatureClassifier": "furnitype.classify.models",
    "MODEL_NAMES": "furnitype.classify.models",
    "make_model": "furnitype.classify.models",
    "ContentSplit": "furnitype.classify.split",
    "ContentKFold": "furnitype.classify.split",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
