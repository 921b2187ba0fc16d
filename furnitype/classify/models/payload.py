"""A saved model's fitted estimators: written with skops, and checked on loading to be exactly what was written.

skops rebuilds objects from a JSON schema and numpy arrays instead of unpickling code, and only creates the
types on its trusted list (numpy, scikit-learn); furnitype adds nothing to that list. Trusted types can still
be assembled into something else than a fitted model: a list, ``numpy.add`` where a pipeline should be, an
unfitted estimator, or arrays whose shapes disagree (scikit-learn's compiled SVM code trusts them). So a
loaded payload must be the very objects furnitype saves, fitted, with the shapes its ``model.json`` implies;
anything else is a ``Damage`` naming the file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.validation import check_is_fitted

from furnitype.classify.runfiles import Damage, read_inside
from furnitype.errors import first_line

#: Types a skops file may hold beyond skops' own trusted defaults (numpy, scikit-learn estimators): none.
TRUSTED_SKOPS_TYPES: tuple[str, ...] = ()


def skops_dump(obj: dict, path: Path) -> None:
    """Save scikit-learn objects with skops, which stores data rather than pickled code."""
    import skops.io

    skops.io.dump(obj, path)


def skops_load(directory: str | os.PathLike, name: str, keys: Sequence[str]) -> dict:
    """Load the skops file ``name`` inside ``directory``: a dict of exactly ``keys``, no untrusted type.

    Raises
    ------
    Damage
        The file is missing, not regular, not a skops file, holds an untrusted type, or is not such a dict.
    """
    import skops.io

    data = read_inside(directory, name, limit=None)
    try:
        untrusted = sorted(set(skops.io.get_untrusted_types(data=data)) - set(TRUSTED_SKOPS_TYPES))
        if not untrusted:
            loaded = skops.io.load(io.BytesIO(data), trusted=list(TRUSTED_SKOPS_TYPES))
    except Exception as err:  # noqa: BLE001 - a damaged zip, a foreign file: one clear message
        raise Damage(name, f"not a loadable skops file ({first_line(err)})") from err
    if untrusted:
        raise Damage(name, f"holds types furnitype does not trust: {', '.join(untrusted)}")
    if not isinstance(loaded, dict) or set(loaded) != set(keys):
        found = sorted(map(str, loaded)) if isinstance(loaded, dict) else _what(loaded)
        raise Damage(name, f"holds {found}, not a dict of {', '.join(keys)}")
    return loaded


def scaled_pipeline(pipeline: object, final: tuple[str, type], n_features: int, where: str) -> Pipeline:
    """``pipeline`` if it is a fitted ``Pipeline([("scale", StandardScaler), final])`` on ``n_features``."""
    steps = getattr(pipeline, "steps", None) if type(pipeline) is Pipeline else None
    expected = [("scale", StandardScaler), final]
    if not isinstance(steps, list) or [(n, type(s)) for n, s in steps] != expected:
        shown = " + ".join(cls.__name__ for _, cls in expected)
        raise Damage(where, f"the pipeline is {_what(pipeline)}, not a fitted {shown}")
    scaler = steps[0][1]
    fitted(scaler, where)
    arrays(scaler, where, mean_=(n_features,), scale_=(n_features,))
    return pipeline


def logistic(model: object, n_features: int, classes: np.ndarray, where: str) -> LogisticRegression:
    """``model`` if it is a fitted ``LogisticRegression`` on ``n_features`` with these ``classes_``."""
    if type(model) is not LogisticRegression:
        raise Damage(where, f"{_what(model)}, not a fitted LogisticRegression")
    fitted(model, where)
    rows = 1 if len(classes) == 2 else len(classes)
    arrays(model, where, coef_=(rows, n_features), intercept_=(rows,))
    same_classes(model, classes, where)
    return model


def svc(model: object, n_features: int, n_classes: int, where: str) -> SVC:
    """``model`` if it is a fitted linear or RBF ``SVC`` on ``n_features`` and classes ``0..n_classes-1``.

    The compiled prediction code reads the support vectors by the counts it is given, so they must agree.
    """
    if not isinstance(model, SVC) or type(model) is not SVC or model.kernel not in ("linear", "rbf"):
        raise Damage(where, f"{_what(model)}, not a fitted linear or rbf SVC")
    fitted(model, where)
    n_vectors = int(np.sum(getattr(model, "_n_support", 0)))
    pairs = n_classes * (n_classes - 1) // 2
    arrays(
        model,
        where,
        support_vectors_=(n_vectors, n_features),
        support_=(n_vectors,),
        _n_support=(n_classes,),
        _dual_coef_=(n_classes - 1, n_vectors),
        _intercept_=(pairs,),
        _probA=(0,),
        _probB=(0,),
    )
    counts = ("support_", "_n_support")
    for key in ("support_vectors_", "_dual_coef_", "_intercept_", *counts):
        value = getattr(model, key)
        dtype = np.int32 if key in counts else np.float64
        if value.dtype != dtype or not value.flags.c_contiguous or (key in counts and np.any(value < 0)):
            raise Damage(where, f"the SVC's {key} is not what scikit-learn makes")
    gamma = np.asarray(getattr(model, "_gamma", np.nan), dtype=float)
    if gamma.shape != () or not np.isfinite(gamma) or gamma <= 0 or getattr(model, "_sparse", True) is not False:
        raise Damage(where, "the SVC's gamma or input type is not what scikit-learn makes")
    if tuple(getattr(model, "shape_fit_", ()))[1:] != (n_features,):
        raise Damage(where, f"the SVC was not fitted on {n_features} features")
    same_classes(model, np.arange(n_classes), where)
    return model


def fitted(estimator: object, where: str) -> None:
    """Refuse an unfitted estimator."""
    try:
        check_is_fitted(estimator)
    except (NotFittedError, TypeError) as cause:
        raise Damage(where, f"the {type(estimator).__name__} is not fitted") from cause


def arrays(estimator: object, where: str, **shapes: tuple[int, ...]) -> None:
    """Refuse an estimator whose fitted arrays do not have these shapes, or hold non-finite values."""
    for key, shape in shapes.items():
        value = getattr(estimator, key, None)
        if not isinstance(value, np.ndarray) or value.shape != shape or not np.all(np.isfinite(value)):
            got = value.shape if isinstance(value, np.ndarray) else _what(value)
            raise Damage(where, f"the {type(estimator).__name__}'s {key} is {got}, not {shape}")


def same_classes(estimator: object, classes: np.ndarray, where: str) -> None:
    """Refuse an estimator that does not predict exactly ``classes`` (class indices)."""
    found = getattr(estimator, "classes_", None)
    if not isinstance(found, np.ndarray) or found.shape != classes.shape or not np.array_equal(found, classes):
        raise Damage(where, f"the {type(estimator).__name__} predicts other classes than model.json lists")


def _what(value: object) -> str:
    """How a message names what was found instead: ``a list``, ``numpy.ufunc``..."""
    kind = type(value)
    if kind.__module__ == "builtins":
        return f"a {kind.__name__}"
    return f"{kind.__module__}.{kind.__qualname__}"
