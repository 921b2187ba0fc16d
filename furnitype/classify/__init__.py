"""Stage two: classifiers on cached features, compared in one report.

Public API (imported on first use, so that reading a run does not import scikit-learn or Keras)::

    classify(feature_files, models=..., test_files=..., ...) -> Run     # train, score, write a run folder
    load_run(run_dir) -> Run                                             # a run's document, no models
    load_model(run_dir, model=None, features=None) -> LoadedModel       # fitted model + feature settings
    report_runs(run_dirs, out=None) -> Run                               # reprint or merge saved runs
    make_model(name, **params) -> FeatureClassifier; MODEL_NAMES
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "classify": "furnitype.classify.train",
    "score": "furnitype.classify.train",
    "Run": "furnitype.classify.run",
    "LoadedModel": "furnitype.classify.run",
    "load_run": "furnitype.classify.run",
    "load_model": "furnitype.classify.run",
    "report_runs": "furnitype.classify.run",
    "FeatureClassifier": "furnitype.classify.models",
    "MODEL_NAMES": "furnitype.classify.models",
    "make_model": "furnitype.classify.models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
