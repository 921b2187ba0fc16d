"""``to_frame()``: the tables a notebook user wants (a store's rows, a run's table, predictions, suggestions) as
pandas DataFrames; without pandas, one ImportError saying what to install."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pandas as pd
import pytest

from furnitype import features as store
from furnitype.classify.metadata import ROW_SCALARS
from furnitype.classify.synthetic import make_features
from furnitype.predict import Prediction, PredictResult
from furnitype.suggest import CSV_COLUMNS, Suggestion, SuggestResult
from furnitype.training import classify
from tests.conftest import STORE_META


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    base = tmp_path_factory.mktemp("frames")
    X, labels, sha = make_features([10, 10], 6, seed=2, separation=2.0)
    path = base / "vgg.h5"
    store.save(path, features=X, paths=[f"/p/{i}.jpg" for i in range(len(X))], labels=list(labels),
               sha256=list(sha), skipped=[("/p/bad.jpg", "", "empty file")], meta=STORE_META)
    run = classify([path], models=["logreg"], cv=3, out=base / "run", model_params={"logreg": {"Cs": (1.0,)}})
    return {"path": path, "run": run}


def test_a_stores_rows_and_settings(made):
    fs = store.load(made["path"])
    frame = fs.to_frame()
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == ["path", "label", "sha256"]
    assert frame["path"].tolist() == list(fs.paths) and frame["label"].tolist() == list(fs.labels)
    assert frame.attrs["settings"] == fs.settings and frame.attrs["skipped"] == [("/p/bad.jpg", "empty file")]
    wide = fs.to_frame(features=True)
    assert list(wide.columns[3:]) == [f"f{j}" for j in range(6)]
    np.testing.assert_array_equal(wide[[f"f{j}" for j in range(6)]].to_numpy(), fs.features)


def test_a_runs_table_is_report_csv(made):
    frame = made["run"].to_frame()
    assert list(frame.columns) == list(ROW_SCALARS) and len(frame) == 1
    with open(made["run"].path / "report.csv", newline="") as fh:
        saved = next(csv.DictReader(fh))
    assert frame.loc[0, "model"] == saved["model"] and frame.loc[0, "accuracy"] == pytest.approx(
        float(saved["accuracy"])
    )
    assert frame.attrs["notes"] == made["run"].notes


def test_predictions_and_suggestions():
    predictions = [
        Prediction("/n/a.jpg", "bed", 0.9, [("bed", 0.9), ("chair", 0.1)], "bed", "a" * 64, in_training=True),
        Prediction("/n/b.jpg", None, None, given_label="", error="file not found"),
    ]
    result = PredictResult(predictions, "runs/x", "logreg", "vgg", "none", ["bed", "chair"], 2, 0.5)
    frame = result.to_frame()
    assert list(frame.columns) == result.csv_columns()
    assert frame.loc[0, "label_2"] == "chair" and bool(frame.loc[0, "in_training"]) is True
    assert frame.loc[1, "error"] == "file not found" and pd.isna(frame.loc[1, "probability"])

    suggestions = [Suggestion("/n/c.jpg", "sofa", 0.4, "bed", 0.35, "c" * 64)]
    frame = SuggestResult(suggestions, "runs/x", "new.h5", "logreg", "vgg", rows=10, in_training=0).to_frame()
    assert list(frame.columns) == list(CSV_COLUMNS) and frame.loc[0, "label_2"] == "bed"


def test_without_pandas_one_clear_import_error(made, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # what an environment without pandas gives
    with pytest.raises(ImportError, match=r"^to_frame\(\) needs pandas: pip install 'furnitype\[pandas\]'"):
        store.load(made["path"]).to_frame()
