"""The splitters: stratified, seeded, grouped by image content (sha256); scikit-learn cross-validators."""

from collections import Counter

import numpy as np
import pytest
from sklearn.model_selection import cross_validate
from sklearn.neighbors import NearestCentroid

from furnitype.classify.split import ContentKFold, ContentSplit, group_labels, max_splits


def _labels(counts: dict[str, int]) -> np.ndarray:
    return np.array([label for label, n in counts.items() for _ in range(n)])


def split_by_content(labels, groups, *, test_size, seed):
    """The one (train, test) pair of ``ContentSplit``."""
    labels = np.asarray(labels)
    return next(ContentSplit(test_size, random_state=seed).split(np.zeros((len(labels), 1)), labels, groups))


def content_folds(labels, groups, *, n_splits, seed):
    labels = np.asarray(labels)
    return list(ContentKFold(n_splits, random_state=seed).split(np.zeros((len(labels), 1)), labels, groups))


def test_split_is_stratified_per_class():
    labels = _labels({"bed": 20, "chair": 40, "tv": 5})
    train, test = split_by_content(labels, None, test_size=0.2, seed=1)
    assert Counter(labels[test].tolist()) == {"bed": 4, "chair": 8, "tv": 1}
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))


def test_split_is_seeded():
    labels = _labels({"bed": 30, "chair": 30})
    first = split_by_content(labels, None, test_size=0.3, seed=7)[1]
    again = split_by_content(labels, None, test_size=0.3, seed=7)[1]
    other = split_by_content(labels, None, test_size=0.3, seed=8)[1]
    assert first.tolist() == again.tolist()
    assert first.tolist() != other.tolist()


def test_identical_photos_never_straddle_the_split():
    labels = _labels({"bed": 30, "chair": 30})
    groups = np.array([f"sha{i // 3}" for i in range(len(labels))])  # every photo three times
    for seed in range(5):
        train, test = split_by_content(labels, groups, test_size=0.25, seed=seed)
        assert not set(groups[train]) & set(groups[test])
        assert len(test) % 3 == 0


def test_same_photos_in_another_order_get_the_same_split():
    labels = _labels({"bed": 12, "chair": 12})
    groups = np.array([f"sha{i:02d}" for i in range(len(labels))])
    order = np.random.default_rng(0).permutation(len(labels))
    _, test = split_by_content(labels, groups, test_size=0.25, seed=3)
    _, test_shuffled = split_by_content(labels[order], groups[order], test_size=0.25, seed=3)
    assert set(groups[test]) == set(groups[order][test_shuffled])


def test_every_class_with_two_photos_is_tested_and_trained():
    labels = _labels({"bed": 2, "chair": 2, "sofa": 50})
    train, test = split_by_content(labels, None, test_size=0.1, seed=0)
    assert set(labels[test]) == {"bed", "chair", "sofa"}
    assert set(labels[train]) == {"bed", "chair", "sofa"}


def test_a_class_of_one_photo_stays_in_training():
    labels = _labels({"bed": 1, "chair": 10})
    train, test = split_by_content(labels, None, test_size=0.5, seed=0)
    assert "bed" in labels[train] and "bed" not in labels[test]


@pytest.mark.parametrize("test_size", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_a_bad_size(test_size):
    with pytest.raises(ValueError, match="test_size must be in"):
        split_by_content(["a", "b"], None, test_size=test_size, seed=0)


def test_group_label_is_the_most_common_label():
    assert group_labels(["a", "b", "b", "c"], ["g", "g", "g", "h"]) == {"g": "b", "h": "c"}
    assert group_labels(["b", "a"], ["g", "g"]) == {"g": "a"}  # a tie goes to the first name


def test_folds_partition_rows_keep_groups_and_all_classes():
    labels = _labels({"bed": 10, "chair": 17, "tv": 1})
    groups = np.array([f"sha{i // 2}" for i in range(len(labels))])
    groups[-1] = "single-tv"
    folds = content_folds(labels, groups, n_splits=4, seed=0)
    held = np.concatenate([val for _, val in folds])
    assert sorted(held.tolist()) == [i for i in range(len(labels)) if labels[i] != "tv"]
    for train, val in folds:
        assert len(val) > 0
        assert not set(groups[train]) & set(groups[val])
        assert set(labels[train]) == {"bed", "chair", "tv"}
        assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))


def test_folds_are_balanced_and_seeded():
    labels = _labels({"bed": 10, "chair": 10, "sofa": 10})
    folds = content_folds(labels, None, n_splits=5, seed=2)
    assert [len(val) for _, val in folds] == [6] * 5
    assert all(Counter(labels[val].tolist()) == {"bed": 2, "chair": 2, "sofa": 2} for _, val in folds)
    again = content_folds(labels, None, n_splits=5, seed=2)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again, strict=True))


def test_folds_reject_more_splits_than_photos():
    labels = _labels({"bed": 3, "chair": 2})
    assert max_splits(labels, None) == 3
    with pytest.raises(ValueError, match="n_splits must be at least 2 and at most"):
        content_folds(labels, None, n_splits=4, seed=0)


def test_splitters_work_inside_scikit_learn_cross_validation():
    labels = _labels({"bed": 12, "chair": 12})
    X = np.random.default_rng(0).normal(size=(len(labels), 2)) + (labels == "chair")[:, None] * 4
    groups = np.array([f"sha{i // 2}" for i in range(len(labels))])
    splitter = ContentKFold(3, random_state=0)
    assert splitter.get_n_splits() == 3 and ContentSplit().get_n_splits() == 1
    assert repr(splitter) == "ContentKFold(n_splits=3, random_state=0)"
    result = cross_validate(NearestCentroid(), X, labels, groups=groups, cv=splitter, return_indices=True)
    assert result["test_score"].tolist() == [1.0, 1.0, 1.0]
    for train, test in zip(result["indices"]["train"], result["indices"]["test"], strict=True):
        assert not set(groups[train]) & set(groups[test])
