"""Class-structured synthetic features, for tests and benchmarks (no photos, no network needed).

Each class has a centre in a small latent space; a row is its class centre plus latent noise, projected to
``dim`` features, plus feature noise, shifted and clipped at 0 like the output of a ReLU network's pooling.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

#: Class names used when none are given (the shared furniture photos' classes, then numbered ones).
CLASS_NAMES = ("bed", "chair", "cupboard", "fridge", "sofa", "table", "tv")


def make_features(
    counts: Sequence[int],
    dim: int,
    *,
    seed: int = 0,
    latent: int = 16,
    separation: float = 1.0,
    noise: float = 1.0,
    classes: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make features of ``sum(counts)`` rows in ``len(counts)`` classes.

    Parameters
    ----------
    counts : sequence of int
        Rows per class.
    dim : int
        Feature dimension.
    seed : int, default=0
    latent : int, default=16
        Dimension of the space the class centres live in.
    separation : float, default=1.0
        Spread of the class centres relative to the within-class noise: larger is easier.
    noise : float, default=1.0
        Standard deviation of the per-feature noise.
    classes : sequence of str, optional
        Class names; defaults to ``CLASS_NAMES`` then ``class7``, ``class8`` ...

    Returns
    -------
    features : ndarray of float32, shape (n_rows, dim)
    labels : ndarray of str, shape (n_rows,)
    sha256 : ndarray of str, shape (n_rows,)
        A distinct made-up content digest per row.
    """
    rng = np.random.default_rng(seed)
    names = list(classes) if classes is not None else [*CLASS_NAMES, *(f"class{i}" for i in range(7, 64))]
    if len(names) < len(counts):
        raise ValueError(f"need {len(counts)} class names. Received: classes={classes!r}")
    y = np.repeat(np.arange(len(counts)), counts)
    basis = rng.normal(size=(latent, dim)) / np.sqrt(latent)
    centres = rng.normal(size=(len(counts), latent)) * separation
    codes = centres[y] + rng.normal(size=(len(y), latent))
    features = np.maximum(codes @ basis + rng.normal(size=(len(y), dim)) * noise + 0.5, 0.0)
    labels = np.array(names[: len(counts)])[y]
    sha256 = np.array([hashlib.sha256(f"{seed}/{i}".encode()).hexdigest() for i in range(len(y))])
    return features.astype(np.float32), labels, sha256
