"""Which unlabelled photos to label first: a ranking over a model's class probabilities (provisional)."""

from __future__ import annotations

import numpy as np


def labelling_order(proba: np.ndarray, features: np.ndarray, n: int) -> np.ndarray:
    """Rows to label, most worth labelling first (provisional: smallest margin first)."""
    top2 = np.sort(proba, axis=1)[:, -2:]
    return np.argsort(top2[:, 1] - top2[:, 0], kind="stable")[:n]
