"""A summary of a feature file for ``furnitype info`` (rows, classes, settings, skipped files)."""

from __future__ import annotations

import os
from collections import Counter

from furnitype.features.store import load


def describe(path: str | os.PathLike) -> dict:
    """Return ``{"rows", "feature_dim", "classes": {name: count}, "meta", "skipped": [(path, reason)]}``."""
    feature_set = load(path)
    return {
        "rows": len(feature_set),
        "feature_dim": int(feature_set.meta.get("feature_dim", feature_set.features.shape[1])),
        "classes": dict(sorted(Counter(feature_set.labels.tolist()).items())),
        "meta": feature_set.meta,
        "skipped": feature_set.skipped,
    }
