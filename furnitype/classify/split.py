"""Stratified, seeded splits made by image content, so that identical photos never straddle two parts.

Every row belongs to a *group*: the sha256 of its image file. Identical photos share a group, and a group
always goes to one side of a split as a whole. Each group gets one label (the most common label of its
rows), and groups are drawn class by class, so every part keeps the class proportions. A class with a single
group stays on the training side: it can be learned, but not held out, so every training part holds every
class.

Both splitters are scikit-learn cross-validators (``split(X, y, groups)``, ``get_n_splits``), usable wherever
scikit-learn takes a ``cv``. scikit-learn's ``StratifiedGroupKFold`` is not used: it may hold out a class's
only group (leaving a fold whose training part lacks the class), its shuffle only reorders groups of similar
class mix, and it offers no single train/test split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
from sklearn.model_selection import BaseCrossValidator


class ContentSplit(BaseCrossValidator):
    """One train/test split: ``test_size`` of each class's groups are held out.

    Each class with ``g >= 2`` groups sends ``round(g * test_size)`` of them, at least 1 and at most
    ``g - 1``, to the test part; a class with one group stays in training.

    Parameters
    ----------
    test_size : float, default=0.2
        Fraction of each class's groups to hold out, in (0, 1).
    random_state : int, default=0
        Seed of the draw: the same rows, labels, groups and seed always give the same split, whatever the
        row order.
    """

    def __init__(self, test_size: float = 0.2, *, random_state: int = 0):
        self.test_size = test_size
        self.random_state = random_state

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        """One split."""
        return 1

    def _iter_test_indices(self, X, y, groups) -> Iterator[np.ndarray]:
        if not 0.0 < self.test_size < 1.0:
            raise ValueError(f"test_size must be in (0, 1). Received: test_size={self.test_size!r}")
        labels, groups = _labels_and_groups(y, groups)
        rng = np.random.default_rng(self.random_state)
        held_out: set[str] = set()
        for members in _groups_by_class(labels, groups):
            if len(members) < 2:
                continue
            n_test = min(max(int(round(len(members) * self.test_size)), 1), len(members) - 1)
            held_out.update(rng.permutation(members)[:n_test].tolist())
        yield np.flatnonzero(np.isin(groups, list(held_out)))


class ContentKFold(BaseCrossValidator):
    """Stratified k-fold cross-validation that keeps identical photos together.

    Each class's groups are shuffled and dealt round-robin to the folds (continuing where the previous class
    stopped, so fold sizes stay even). A class with one group is never held out, so the validation parts
    need not cover every row, and every fold's training part holds every class.

    Parameters
    ----------
    n_splits : int, default=5
        Number of folds, at least 2 and at most the number of groups of the largest class
        (``max_splits``).
    random_state : int, default=0
        Seed of the shuffle.
    """

    def __init__(self, n_splits: int = 5, *, random_state: int = 0):
        self.n_splits = n_splits
        self.random_state = random_state

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        """``n_splits``."""
        return self.n_splits

    def _iter_test_indices(self, X, y, groups) -> Iterator[np.ndarray]:
        labels, groups = _labels_and_groups(y, groups)
        per_class = _groups_by_class(labels, groups)
        largest = max((len(members) for members in per_class), default=0)
        if not 2 <= self.n_splits <= largest:
            raise ValueError(
                f"n_splits must be at least 2 and at most the photos of the largest class ({largest}). "
                f"Received: n_splits={self.n_splits!r}"
            )
        rng = np.random.default_rng(self.random_state)
        fold_of: dict[str, int] = {}
        position = 0
        for members in per_class:
            if len(members) < 2:
                continue
            for group in rng.permutation(members).tolist():
                fold_of[group] = position % self.n_splits
                position += 1
        fold = np.fromiter((fold_of.get(g, -1) for g in groups), dtype=int, count=len(groups))
        for k in range(self.n_splits):
            yield np.flatnonzero(fold == k)


def max_splits(y: npt.ArrayLike, groups: npt.ArrayLike | None) -> int:
    """Distinct photos (groups) of the largest class: the most folds ``ContentKFold`` allows."""
    labels, group_of_row = _labels_and_groups(y, groups)
    return max((len(members) for members in _groups_by_class(labels, group_of_row)), default=0)


def group_labels(labels: npt.ArrayLike, groups: npt.ArrayLike) -> dict[str, str]:
    """The label of each group: the most common label of its rows (ties: the first in sorted order).

    Parameters
    ----------
    labels, groups : array-like of str, shape (n_rows,)
        Class name and group (sha256) of each row.

    Returns
    -------
    dict of str to str
        Group → label, in first-seen order of the groups.
    """
    counts: dict[str, Counter] = {}
    for label, group in zip(np.asarray(labels).tolist(), np.asarray(groups).tolist(), strict=True):
        counts.setdefault(group, Counter())[label] += 1
    return {g: min(c.items(), key=lambda item: (-item[1], item[0]))[0] for g, c in counts.items()}


def _labels_and_groups(y, groups) -> tuple[np.ndarray, np.ndarray]:
    """Labels as str; ``None`` groups make every row its own group."""
    labels = np.asarray(y, dtype=str)
    if groups is None:
        return labels, np.array([f"row{i}" for i in range(len(labels))])
    groups = np.asarray(groups, dtype=str)
    if groups.shape != labels.shape:
        raise ValueError(f"labels and groups must have the same length ({len(labels)} != {len(groups)}).")
    return labels, groups


def _groups_by_class(labels: np.ndarray, groups: np.ndarray) -> list[list[str]]:
    """Each class's groups, sorted, classes in sorted order: a deterministic base for the shuffles."""
    by_class: dict[str, list[str]] = {}
    for group, label in group_labels(labels, groups).items():
        by_class.setdefault(label, []).append(group)
    return [sorted(by_class[label]) for label in sorted(by_class)]
