"""Stratified, seeded splits made by image content, so that identical photos never straddle two parts.

Every row belongs to a *group*: the sha256 of its image file. Identical photos share a group, and a group
always goes to one side of a split as a whole. Each group gets one label (the most common label of its
rows), and groups are drawn class by class, so every part keeps the class proportions. A class with a single
group stays on the training side: it can be learned, but not held out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def group_labels(labels: Sequence[str], groups: Sequence[str]) -> dict[str, str]:
    """The label of each group: the most common label of its rows (ties: the first in sorted order).

    Parameters
    ----------
    labels, groups : sequence of str, shape (n_rows,)
        Class name and group (sha256) of each row.

    Returns
    -------
    dict of str to str
        Group → label, in first-seen order of the groups.
    """
    counts: dict[str, Counter] = {}
    for label, group in zip(labels, groups, strict=True):
        counts.setdefault(group, Counter())[label] += 1
    return {g: min(c.items(), key=lambda item: (-item[1], item[0]))[0] for g, c in counts.items()}


def split_by_content(
    labels: Sequence[str], groups: Sequence[str] | None, *, test_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into a training and a held-out part, stratified by class and grouped by content.

    Each class with ``g >= 2`` groups sends ``round(g * test_size)`` of them, at least 1 and at most
    ``g - 1``, to the held-out part; a class with one group stays in training.

    Parameters
    ----------
    labels : sequence of str, shape (n_rows,)
    groups : sequence of str, shape (n_rows,), or None
        Content key (sha256) of each row; ``None`` makes every row its own group.
    test_size : float
        Fraction of each class's groups to hold out, in (0, 1).
    seed : int
        Seed of the draw: the same inputs and seed always give the same split.

    Returns
    -------
    train_index, test_index : ndarray of int
        Sorted row indices of the two parts.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1). Received: test_size={test_size!r}")
    labels = np.asarray(labels, dtype=str)
    groups = _groups(labels, groups)
    rng = np.random.default_rng(seed)
    held_out: set[str] = set()
    for _, members in _groups_by_class(labels, groups):
        if len(members) < 2:
            continue
        n_test = min(max(int(round(len(members) * test_size)), 1), len(members) - 1)
        held_out.update(rng.permutation(members)[:n_test].tolist())
    is_test = np.fromiter((g in held_out for g in groups), dtype=bool, count=len(groups))
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def content_folds(
    labels: Sequence[str], groups: Sequence[str] | None, *, n_splits: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold cross-validation folds that keep identical photos together.

    Each class's groups are shuffled and dealt round-robin to the folds (continuing where the previous class
    stopped, so fold sizes stay even). A class with one group is never held out, so every fold's training
    part holds every class.

    Parameters
    ----------
    labels : sequence of str, shape (n_rows,)
    groups : sequence of str, shape (n_rows,), or None
        Content key (sha256) of each row; ``None`` makes every row its own group.
    n_splits : int
        Number of folds, at least 2 and at most the number of groups of the largest class.
    seed : int
        Seed of the shuffle.

    Returns
    -------
    list of (train_index, validation_index)
        One pair of sorted row-index arrays per fold; no fold's validation part is empty.
    """
    labels = np.asarray(labels, dtype=str)
    groups = _groups(labels, groups)
    per_class = _groups_by_class(labels, groups)
    largest = max((len(members) for _, members in per_class), default=0)
    if not 2 <= n_splits <= largest:
        raise ValueError(
            f"n_splits must be at least 2 and at most the photos of the largest class ({largest}). "
            f"Received: n_splits={n_splits!r}"
        )
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    position = 0
    for _, members in per_class:
        if len(members) < 2:
            continue
        for group in rng.permutation(members).tolist():
            fold_of[group] = position % n_splits
            position += 1
    fold = np.fromiter((fold_of.get(g, -1) for g in groups), dtype=int, count=len(groups))
    return [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in range(n_splits)]


def max_folds(labels: Sequence[str], groups: Sequence[str] | None) -> int:
    """Distinct photos (groups) of the largest class: the most folds ``content_folds`` allows."""
    labels = np.asarray(labels, dtype=str)
    return max((len(m) for _, m in _groups_by_class(labels, _groups(labels, groups))), default=0)


def _groups(labels: np.ndarray, groups: Sequence[str] | None) -> np.ndarray:
    if groups is None:
        return np.array([f"row{i}" for i in range(len(labels))])
    groups = np.asarray(groups, dtype=str)
    if groups.shape != labels.shape:
        raise ValueError(f"labels and groups must have the same length ({len(labels)} != {len(groups)}).")
    return groups


def _groups_by_class(labels: np.ndarray, groups: np.ndarray) -> list[tuple[str, list[str]]]:
    """(class, its groups sorted) for each class in sorted order: a deterministic base for the shuffles."""
    by_class: dict[str, list[str]] = {}
    for group, label in group_labels(labels, groups).items():
        by_class.setdefault(label, []).append(group)
    return [(label, sorted(by_class[label])) for label in sorted(by_class)]
