"""Which unlabelled photos to label first: the least confident first (uncertainty sampling).

A model's least confident prediction is the one whose most probable class gets the lowest probability; labels
of such photos move the model most (Lewis & Gale 1994; Settles, *Active Learning Literature Survey*, 2009).
The choice among uncertainty measures, diversity among the uncertain and random picks was made by measurement:
``benchmarks/adapt.py``, figures in docs/benchmarks.md.
"""

from __future__ import annotations

import numpy as np


def labelling_order(proba: np.ndarray, n: int | None = None) -> np.ndarray:
    """Rows in the order they are worth labelling: lowest top-class probability first.

    Ties go to the row with the smaller margin between its two most probable classes, then to the earlier row.

    Parameters
    ----------
    proba : ndarray of shape (n_rows, n_classes)
        Class probabilities of the unlabelled rows (rows sum to 1).
    n : int, default=None
        Rows to return; None returns all.

    Returns
    -------
    ndarray of int, shape (min(n, n_rows),)
        Row indices, most worth labelling first.
    """
    proba = np.asarray(proba, dtype=float)
    if proba.ndim != 2 or proba.shape[1] < 2:
        raise ValueError(f"proba must have shape (n_rows, n_classes >= 2). Received: shape={proba.shape}")
    ranked = np.sort(proba, axis=1)
    top, margin = ranked[:, -1], ranked[:, -1] - ranked[:, -2]
    order = np.lexsort((np.arange(len(proba)), margin, top))
    return order if n is None else order[:n]
