"""Remarks a run makes on its results: a row trailing the baseline and why, caveats of a fit, a best model
that does not beat the baseline. Model-specific words come from the models themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

from furnitype.classify.data import TrainTestSet
from furnitype.classify.evaluation import BASELINE, Baseline, Fit
from furnitype.classify.metrics import mcnemar_p

#: A row trailing the baseline's accuracy by more than this many points gets a note saying why.
TRAIL_POINTS = 2.0


def fit_notes(fit: Fit, data: TrainTestSet, baseline: Baseline) -> list[str]:
    """Say why a row trails the baseline by more than ``TRAIL_POINTS``, and the other caveats of its fit."""
    row = fit.row
    notes = []
    if row.vs_baseline_points < -TRAIL_POINTS:
        p = _mcnemar(fit, data, baseline)
        verdict = "the gap is within chance on this test set" if p >= 0.05 else "the gap is larger than chance"
        notes.append(
            f"{row.label} trails the baseline ({BASELINE}: accuracy {row.baseline_accuracy:.3f}) by "
            f"{-row.vs_baseline_points:.1f} points: McNemar p = {p:.3f} over {row.n_test} test photos, "
            f"{verdict}; {fit.model.tuning()}."
        )
    notes += [f"{row.label}: {note}" for note in fit.model.fit_notes()]
    if row.n_classes <= 3:
        notes.append(f"{row.label}: top-3 accuracy is 1 by definition with {row.n_classes} classes.")
    return notes


def baseline_note(data: TrainTestSet, fits: Sequence[Fit], baseline: Baseline) -> list[str]:
    """Say so when no model of a feature set beats the baseline's accuracy, and whether the gap is chance."""
    best = max(fits, key=lambda fit: (fit.row.accuracy, fit.row.macro_f1, -fit.row.log_loss))
    row = best.row
    if row.accuracy > row.baseline_accuracy:
        return []
    p = _mcnemar(best, data, baseline)
    how = "ties it" if row.accuracy == row.baseline_accuracy else f"trails it by {-row.vs_baseline_points:.1f} points"
    equivalence = best.model.equivalence_to(baseline.pipeline)
    same = f" ({equivalence})" if equivalence else ""
    return [
        f"{data.key}: no model beats the baseline ({BASELINE}, accuracy {row.baseline_accuracy:.3f}); "
        f"the best, {row.model}, {how}{same}; McNemar p = {p:.3f} over {row.n_test} test photos."
    ]


def _mcnemar(fit: Fit, data: TrainTestSet, baseline: Baseline) -> float:
    y_test = data.y_test
    return mcnemar_p(fit.predicted == y_test, baseline.scores.predicted == y_test)
