"""Pictures of a run: a confusion matrix per row and a bar chart of the table (matplotlib, Agg, no pyplot)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from furnitype.classify.metadata import Row

#: The bars of the chart: (row key, legend label).
BAR_METRICS = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1"))


def plot_confusion(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str, path: str | os.PathLike
) -> Path:
    """Save a confusion matrix as PNG: colour is the share of each true class, the text the photo count.

    Parameters
    ----------
    confusion : (n_classes, n_classes) counts
        Rows are true classes, columns predicted classes.
    classes : sequence of str
    title : str
    path : str or path-like
        The PNG to write.

    Returns
    -------
    Path
        ``path``.
    """
    from matplotlib.figure import Figure

    counts = np.asarray(confusion, dtype=int)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.55 * len(classes) + 2.5)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=classes, rotation=45, ha="right")
    ax.set_yticks(ticks, labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    for (i, j), count in np.ndenumerate(counts):
        if count:
            colour = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_scores(rows: Sequence[Row], path: str | os.PathLike, *, title: str = "") -> Path:
    """Save ``scores_figure(rows, title=title)`` as PNG; returns ``path``."""
    path = Path(path)
    scores_figure(rows, title=title).savefig(path, dpi=110)
    return path


def scores_figure(rows: Sequence[Row], *, title: str = "") -> Figure:
    """A grouped bar chart of the table (accuracy, balanced accuracy, macro-F1 per row).

    Each group is named by its feature set (the training file's stem) and model; a black tick over each group
    marks the accuracy of the plain logistic-regression baseline on the same training and test rows. The y axis
    runs from 0 to 1, so bar heights compare; the legend sits under the chart, in one row when it fits.

    Parameters
    ----------
    rows : sequence of Row
        Table rows in display order.
    title : str, default=""

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    n = len(rows)
    fig = Figure(figsize=(max(6.0, 1.1 * n + 1.5), 4.8), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(BAR_METRICS)
    x = np.arange(n)
    for k, (key, label) in enumerate(BAR_METRICS):
        ax.bar(x + (k - 1) * width, [getattr(row, key) for row in rows], width, label=label)
    ax.hlines(
        [row.baseline_accuracy for row in rows],
        x - 0.45,
        x + 0.45,
        colors="black",
        linewidth=2,
        label="baseline accuracy (LogisticRegression C=0.1)",
    )
    ax.set_xticks(x, labels=[f"{r.features}\n{r.model}" for r in rows], fontsize=8)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("score on the test photos")
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    entries = len(BAR_METRICS) + 1
    legend = fig.legend(loc="outside lower center", ncols=entries, fontsize=8, frameon=False)
    fig.draw_without_rendering()
    if legend.get_window_extent().width > fig.bbox.width:  # a narrow chart: the legend in two rows
        legend.remove()
        fig.legend(loc="outside lower center", ncols=-(-entries // 2), fontsize=8, frameon=False)
    return fig
