"""``labelling_order``: least confident first, ties by the smaller margin, then by row."""

import numpy as np
import pytest

from furnitype.classify.selection import labelling_order


def test_least_confident_rows_come_first():
    proba = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.6, 0.3, 0.1], [0.34, 0.33, 0.33]])

    assert labelling_order(proba).tolist() == [3, 1, 2, 0]
    assert labelling_order(proba, 2).tolist() == [3, 1]


def test_ties_go_to_the_smaller_margin_then_to_the_earlier_row():
    proba = np.array([[0.5, 0.1, 0.4], [0.5, 0.3, 0.2], [0.5, 0.45, 0.05], [0.5, 0.45, 0.05]])

    assert labelling_order(proba).tolist() == [2, 3, 0, 1]


def test_n_above_the_rows_returns_them_all():
    proba = np.array([[0.7, 0.3], [0.55, 0.45]])

    assert labelling_order(proba, 10).tolist() == [1, 0]


@pytest.mark.parametrize("shape", [(4,), (4, 1), (2, 2, 2)])
def test_probabilities_of_another_shape_are_refused(shape):
    with pytest.raises(ValueError, match="proba must have shape"):
        labelling_order(np.full(shape, 0.5))
