"""A summary of a feature file for ``furnitype info`` (rows, classes, settings, skipped files)."""

from __future__ import annotations

import os

from furnitype.features.store import summary


def describe(path: str | os.PathLike) -> dict:
    """Return ``{"rows", "dead_rows", "feature_dim", "format", "bytes", "classes": {name: count}, "meta",
    "skipped": [(path, reason)]}`` without loading the features."""
    return summary(path)
