"""Fused feature sets (``classify --fuse``): several feature files' rows of the same photos, side by side.

The parts' rows are matched by content (sha256): a fused row is the first part's row (its path and label)
followed by every other part's row of the same photo, in the parts' order. A photo that some parts lack is
left out and listed (``Missing``); a photo labelled differently by two parts is refused. Each part is
standardised by the model itself: every model scales each column on its training photos only (logreg's and
the SVM's ``StandardScaler``, the dense head's normalisation layer), so each part is standardised without
seeing the test photos, and the scaling is saved with the model.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from furnitype import features as store
from furnitype.errors import InputError
from furnitype.features.store import SETTING_KEYS
from furnitype.outputs import replace_file

T = TypeVar("T")
#: The file, in a fused feature set's models folder, that lists the photos some parts lack.
MISSING_FILE = "missing.csv"
MISSING_COLUMNS = ("file", "path", "sha256", "label", "missing_from")


@dataclass(frozen=True)
class Missing:
    """A photo of one part that another part lacks: left out of the fused set."""

    file: str
    path: str
    sha256: str
    label: str
    missing_from: tuple[str, ...]


def joined(values: Sequence[T]) -> T | str:
    """The parts' values as one name: the common value when they agree (``224``), else their texts joined by
    ``+`` in the parts' order (``vgg16+inception``)."""
    texts = [str(v) for v in values]
    return values[0] if len(set(texts)) == 1 else "+".join(texts)


def fuse(parts: Sequence[store.FeatureSet]) -> tuple[store.FeatureSet, list[Missing]]:
    """The parts' rows of the same photos side by side, and the photos some parts lack.

    Raises
    ------
    InputError
        A part given twice, or a photo labelled differently by two parts.
    """
    files = [part.file for part in parts]
    for i, file in enumerate(files):
        if file in files[:i]:
            raise InputError(f"{file} is given twice; fuse each feature file once.")
    rows = [{sha: i for i, sha in reversed(list(enumerate(part.sha256.tolist())))} for part in parts]
    common = set.intersection(*(set(r) for r in rows))
    _refuse_conflicts(parts, common)
    missing = [
        Missing(part.file, str(path), str(sha), str(label), _lacking(parts, rows, sha))
        for part in parts
        for path, sha, label in zip(part.paths, part.sha256, part.labels, strict=True)
        if sha not in common
    ]
    keep = np.flatnonzero(np.isin(parts[0].sha256, list(common)))
    kept = parts[0].sha256[keep].tolist()
    features = np.hstack([part.features[[r[sha] for sha in kept]] for part, r in zip(parts, rows, strict=True)])
    labels = parts[0].labels[keep]
    meta: dict[str, object] = {key: joined([part.meta.get(key) for part in parts]) for key in SETTING_KEYS
            if any(key in part.meta for part in parts)}
    meta["feature_dim"] = int(features.shape[1])
    fused = store.FeatureSet(
        features=features,
        paths=parts[0].paths[keep],
        labels=labels,
        sha256=parts[0].sha256[keep],
        classes=sorted(set(labels.tolist())),
        meta=meta,
        file="+".join(files),
    )
    return fused, missing


def missing_warning(key: str, missing: Sequence[Missing], where: str | None = None) -> str:
    """One line: how many photos of which parts are left out, and where they are listed (when they are)."""
    lacking: dict[str, int] = {}
    for m in missing:
        for file in m.missing_from:
            lacking[file] = lacking.get(file, 0) + 1
    counts = ", ".join(f"{n:,} not in {file}" for file, n in lacking.items())
    photos = len({m.sha256 for m in missing})
    listed = f"; listed in {where}" if where else ""
    return (
        f"{key}: {photos:,} photo{'s' if photos != 1 else ''} that not every fused feature file holds "
        f"({counts}) {'are' if photos != 1 else 'is'} left out{listed}."
    )


def write_missing(path: Path, missing: Sequence[Missing]) -> None:
    """Write the left-out photos as CSV (``MISSING_COLUMNS``; ``missing_from`` joined by ``+``)."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(MISSING_COLUMNS)
    for m in missing:
        writer.writerow([m.file, m.path, m.sha256, m.label, "+".join(m.missing_from)])
    replace_file(path, text.getvalue().encode("utf-8", errors="surrogateescape"))


def _lacking(parts: Sequence[store.FeatureSet], rows: Sequence[dict[str, int]], sha: str) -> tuple[str, ...]:
    return tuple(part.file for part, found in zip(parts, rows, strict=True) if sha not in found)


def _refuse_conflicts(parts: Sequence[store.FeatureSet], common: set[str]) -> None:
    """Refuse photos (of ``common``) whose labels differ between parts, in one line."""
    labels = []
    for part in parts:
        found: dict[str, set[str]] = {}
        for sha, label in zip(part.sha256.tolist(), part.labels.tolist(), strict=True):
            if sha in common:
                found.setdefault(sha, set()).add(label)
        labels.append(found)
    for part, found in zip(parts[1:], labels[1:], strict=True):
        differ = list(dict.fromkeys(sha for sha in parts[0].sha256.tolist() if sha in common
                                    and found[sha] != labels[0][sha]))
        if differ:
            sha = differ[0]
            path = parts[0].paths[parts[0].sha256 == sha][0]
            more = f" (and {len(differ) - 1:,} more photos)" if len(differ) > 1 else ""
            raise InputError(
                f"{path} is labelled {', '.join(sorted(labels[0][sha]))} in {parts[0].file} but "
                f"{', '.join(sorted(found[sha]))} in {part.file}{more}; fused feature files must agree on every "
                "photo's label: extract them from the same folders (or manifest)."
            )
