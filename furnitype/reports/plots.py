"""Pictures of a run: a confusion matrix per row and a bar chart of the table (matplotlib, Agg, no pyplot)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
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


def plot_scores(rows: Sequence[Row], path: str | os.PathLike) -> Path:
    """Save a grouped bar chart of the table (accuracy, balanced accuracy, macro-F1 per row) as PNG.

    A black tick over each group marks the accuracy of the plain logistic-regression baseline on the same
    training and test rows.

    Parameters
    ----------
    rows : sequence of Row
        Table rows in display order.
    path : str or path-like

    Returns
    -------
    Path
        ``path``.
    """
    from matplotlib.figure import Figure

    n = len(rows)
    fig = Figure(figsize=(max(6.0, 1.3 * n + 2.0), 4.5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(BAR_METRICS)
    x = np.arange(n)
    values = [getattr(row, key) for row in rows for key, _ in BAR_METRICS]
    for k, (key, label) in enumerate(BAR_METRICS):
        ax.bar(x + (k - 1) * width, [getattr(row, key) for row in rows], width, label=label)
    baseline = [row.baseline_accuracy for row in rows]
    ax.hlines(
        baseline, x - 0.45, x + 0.45, colors="black", linewidth=2, label="baseline accuracy (LogisticRegression C=0.1)"
    )
    values += baseline
    ax.set_xticks(x, labels=[f"{r.backbone}\n{r.weights}\n{r.model}" for r in rows], fontsize=8)
    low = max(0.0, min(values) - 0.1) if values else 0.0
    ax.set_ylim(low, 1.0)
    ax.set_ylabel("score on the test photos")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
