"""A previous run's models scored on this run's test photos: a before/after on the same photos.

After labelling photos of a new source and training again (docs/adapt.md), the test photos that were
labelled leave the test set; comparing the new run's accuracy with the previous run's recorded one then
compares different photos. Scoring the previous run's models on the new test photos compares like with like.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from furnitype.classify.confidence import wilson_interval
from furnitype.classify.data import TrainTestSet
from furnitype.classify.metadata import RUN_KIND, Row
from furnitype.classify.run import load_model, load_run
from furnitype.errors import InputError, SettingsMismatchError


@dataclass(frozen=True)
class PreviousScore:
    """A previous run's model on this run's test photos of one feature set."""

    run: str
    features: str
    model: str
    right: int
    n_test: int
    recorded: float

    @property
    def accuracy(self) -> float:
        return self.right / self.n_test

    def note(self, key: str, best: Row) -> str:
        low, high = wilson_interval(self.right, self.n_test)
        return (
            f"{key}: on the same {self.n_test} test photos, the previous run {self.run}'s {self.model} scores "
            f"{self.accuracy:.3f} ({low:.3f}-{high:.3f}; {self.recorded:.3f} on its own test photos) and this "
            f"run's {best.model} {best.accuracy:.3f} ({best.accuracy_low:.3f}-{best.accuracy_high:.3f})."
        )


def check_previous(run_dir: str | os.PathLike) -> None:
    """Refuse, before any training, a ``previous`` that is not a run with models."""
    run = load_run(run_dir)
    if run.document.kind != RUN_KIND:
        raise InputError(f"--previous {run_dir} is a report; it holds no models: give the run it was made from.")


def score_previous(run_dir: str | os.PathLike, data: TrainTestSet) -> list[PreviousScore]:
    """Each model of the previous run trained on features with ``data``'s settings, scored on ``data``'s test
    photos (a test photo of a class the model does not know counts as wrong), best first.

    Raises ``SettingsMismatchError`` when no feature set of the previous run has ``data``'s settings.
    """
    document = load_run(run_dir).document
    settings = data.train.settings
    parts = [part.settings for part in data.parts] if data.parts is not None else None
    keys = [
        key
        for key, fs in document.feature_sets.items()
        if _same(fs.settings, settings)
        and (parts is None) == (fs.parts is None)
        and (parts is None or [part.settings for part in fs.parts or []] == parts)
    ]
    if not keys:
        raise SettingsMismatchError(
            f"--previous {run_dir} has no features made with the settings of {data.train.file}; "
            "compare runs made from the same store."
        )
    scores = []
    for row in document.rows:
        if row.features not in keys:
            continue
        loaded = load_model(run_dir, row.model, features=row.features)
        predicted = np.asarray(loaded.classes)[loaded.model.predict_proba(data.test.features).argmax(axis=1)]
        right = int(np.sum(predicted == data.test.labels))
        scores.append(PreviousScore(str(run_dir), row.features, row.model, right, len(data.test), row.accuracy))
    return sorted(scores, key=lambda s: -s.right)


def _same(a: dict, b: dict) -> bool:
    return all(str(a.get(key)) == str(b.get(key)) for key in set(a) | set(b))
