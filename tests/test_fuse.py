"""``classify --fuse``: one feature set of several stores' rows of the same photos, and predict rebuilding it."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from furnitype.classify import load_model
from furnitype.classify.fused import joined
from furnitype.classify.run import load_run
from furnitype.errors import InputError
from furnitype.extraction import extract
from furnitype.features import load
from furnitype.keras_loader import import_keras
from furnitype.predict import Predictor, predict
from furnitype.reports.table import format_table
from furnitype.suggest import suggest
from furnitype.training import classify
from tests.conftest import run_cli as invoke
from tests.images import COLOURS, make_photo_folder, photo

CLASSES = ("bed", "chair", "sofa")
#: Two parts that differ (pooling, image size, so feature values and the spec of new photos), cheap to make.
PART_A = {"backbone": "vgg16", "weights": "none", "image_size": 32, "pooling": "avg"}
PART_B = {"backbone": "vgg16", "weights": "none", "image_size": 40, "pooling": "max"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Photos of 3 classes, a store of each part, and a fused logreg run of the two."""
    base = tmp_path_factory.mktemp("fuse")
    photos = make_photo_folder(base / "photos", per_class=6, classes=CLASSES)
    a, b = base / "a.h5", base / "b.h5"
    extract([photos], out=a, batch_size=8, **PART_A)
    extract([photos], out=b, batch_size=8, **PART_B)
    run = base / "run"
    classify([a, b], fuse=True, models=["logreg"], cv=3, out=run)
    new = base / "new"
    for c, name in enumerate(CLASSES):
        (new / name).mkdir(parents=True)
        for i in range(2):
            photo(1000 + 10 * c + i, COLOURS[name], (56, 44)).save(new / name / f"new_{i}.jpg", quality=85)
    return {"base": base, "photos": photos, "a": a, "b": b, "run": run, "new": new}


def test_a_fused_run_names_the_set_and_records_each_part(setup):
    run = load_run(setup["run"])
    (row,) = run.rows
    fs = run.document.feature_sets["a+b"]
    assert row.features == "a+b" and row.backbone == "vgg16" and row.weights == "random"
    assert row.weights_identity is None and run.document.options.fuse is True
    assert fs.feature_dim == 512 + 512 and fs.n_train + fs.n_test == 18
    assert [part.file for part in fs.parts] == [str(setup["a"]), str(setup["b"])]
    assert [part.settings["pooling"] for part in fs.parts] == ["avg", "max"]
    assert [part.settings["image_size"] for part in fs.parts] == [32, 40]
    assert fs.settings["pooling"] == "avg+max" and fs.settings["image_size"] == "32+40"
    assert fs.settings["interpolation"] == "bilinear"  # the same in both parts: one value
    table = format_table(run.rows, run.document.feature_sets)
    assert table.splitlines()[2].split()[1] == "a+b"
    report = (setup["run"] / "report.md").read_text()
    assert "| a+b | " in report and "avg+max" in report and "32+40" in report  # the feature sets' table
    assert not run.warnings  # every photo is in both parts
    assert not (setup["run"] / "models" / "a+b" / "missing.csv").exists()


def test_the_model_standardises_each_part_on_the_training_photos_only(setup):
    loaded = load_model(setup["run"])
    a, b = load(setup["a"]), load(setup["b"])
    train = {r["sha256"] for r in csv.DictReader((setup["run"] / "split.csv").open()) if r["part"] == "train"}
    rows_b = {sha: i for i, sha in enumerate(b.sha256)}
    seen = [i for i, sha in enumerate(a.sha256) if sha in train]
    X = np.hstack([a.features[seen], b.features[[rows_b[a.sha256[i]] for i in seen]]])
    scaler = loaded.model.pipeline_[0]
    np.testing.assert_allclose(scaler.mean_, X.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert len(seen) < len(a)  # the test photos are left out of the scaling


def test_predict_equals_the_model_on_the_parts_rows_side_by_side(setup, tmp_path):
    ref_a = load(extract([setup["new"]], like=setup["a"], out=tmp_path / "new-a.h5", batch_size=8).out)
    ref_b = load(extract([setup["new"]], like=setup["b"], out=tmp_path / "new-b.h5", batch_size=8).out)
    assert list(ref_a.paths) == list(ref_b.paths)
    loaded = load_model(setup["run"])
    expected = loaded.model.predict_proba(np.hstack([ref_a.features, ref_b.features]))

    result = predict(setup["run"], [setup["new"], tmp_path / "gone.jpg"], top_k=3, batch_size=4)

    assert [p.path for p in result.predictions] == [*ref_a.paths, str(tmp_path / "gone.jpg")]
    assert result.predictions[-1].error == "file not found"
    assert result.features == "a+b" and result.weights == "none+none"
    for p, proba, sha in zip(result.predictions, expected, ref_a.sha256, strict=False):
        got = dict(p.top)
        assert p.error == "" and p.sha256 == sha
        np.testing.assert_allclose([got[c] for c in loaded.classes], proba, rtol=0, atol=1e-6)


def test_photos_missing_from_a_part_are_listed_not_silently_dropped(setup, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(setup["photos"], partial)
    gone = [partial / "bed" / "bed_0.jpg", partial / "sofa" / "sofa_5.jpg"]
    for path in gone:
        path.unlink()
    b = tmp_path / "b-partial.h5"
    extract([partial], like=setup["b"], out=b, batch_size=8)

    result = invoke("classify", setup["a"], b, "--fuse", "--models", "logreg", "--cv", "3", "--out", tmp_path / "run",
                    "--json")

    assert result.exit_code == 0, result.output
    (warning,) = json.loads(result.stdout)["warnings"]
    assert warning == (
        f"a+b-partial: 2 photos that not every fused feature file holds (2 not in {b}) are left out; listed in "
        "models/a+b-partial/missing.csv of the run."
    )
    listed = list(csv.DictReader((tmp_path / "run" / "models" / "a+b-partial" / "missing.csv").open()))
    names = sorted(str(setup["photos"] / p.parent.name / p.name) for p in gone)
    assert sorted(r["path"] for r in listed) == names
    assert {r["missing_from"] for r in listed} == {str(b)} and {r["file"] for r in listed} == {str(setup["a"])}
    assert load_run(tmp_path / "run").document.feature_sets["a+b-partial"].n_train == 16 - 3


def test_a_photo_labelled_differently_by_two_parts_is_refused(setup, tmp_path):
    b = tmp_path / "relabelled.h5"
    shutil.copy(setup["b"], b)
    extract([setup["photos"] / "bed"], label="sofa", out=b, batch_size=8)  # rows reused: relabelled, not extracted

    with pytest.raises(InputError, match=r"bed_0\.jpg is labelled bed in .*a\.h5 but sofa in .*relabelled\.h5 "
                                         r"\(and 5 more photos\); fused feature files must agree"):
        classify([setup["a"], b], fuse=True, models=["logreg"], cv=3, out=tmp_path / "run")
    result = invoke("classify", setup["a"], b, "--fuse", "--out", tmp_path / "run")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("Error: ") and not (tmp_path / "run").exists()


def test_predict_takes_one_store_per_part_and_extracts_only_what_not_every_store_holds(setup, tmp_path):
    new_a = extract([setup["new"]], like=setup["a"], out=tmp_path / "new-a.h5", batch_size=8).out
    new_b = tmp_path / "new-b.h5"
    extract([setup["new"] / "bed"], like=setup["b"], out=new_b, batch_size=8)
    extracted = predict(setup["run"], [setup["new"]])

    result = invoke("predict", setup["run"], setup["new"], "--features", new_a, "--features", new_b, "--json")

    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert [p["path"] for p in got] == [p.path for p in extracted.predictions]
    for p, q in zip(got, extracted.predictions, strict=True):  # JSON has 6 significant digits
        assert p["label"] == q.label and abs(p["probability"] - q.probability) < 1e-5
    api = predict(setup["run"], [setup["new"]], store=[new_a, new_b])
    assert api.stored == 2 and api.features == "a+b"  # the two beds are in both stores
    for p, q in zip(api.predictions, extracted.predictions, strict=True):
        np.testing.assert_allclose([x for _, x in p.top], [x for _, x in q.top], rtol=0, atol=1e-6)


def test_options_that_name_one_feature_file_are_refused_for_a_fused_run(setup, tmp_path):
    result = invoke("predict", setup["run"], setup["new"], "--features", setup["a"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"Error: run {setup['run']}'s a+b features are fused from 2 feature files; give "
                                    "one feature file (--features FILE.h5) per part, in the parts' order, not 1")
    assert len(result.output.strip().splitlines()) == 1
    swapped = invoke("predict", setup["run"], setup["new"], "--features", setup["b"], "--features", setup["a"])
    assert swapped.exit_code == 1 and len(swapped.output.strip().splitlines()) == 1
    assert swapped.output.startswith(f"Error: {setup['b']} was made with pooling=max, image_size=40, but run "
                                     f"{setup['run']}'s a+b features (part 1) with pooling=avg, image_size=32; ")
    names = invoke("predict", setup["run"], setup["new"], "--features", "a+b", "--features", setup["a"])
    assert names.exit_code == 2 and "--features is given more than once only with feature files" in names.output
    other = tmp_path / "other.weights.h5"
    other.write_bytes(b"weights no part was made with")
    result = invoke("predict", setup["run"], setup["new"], "--weights", other)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(f"Error: weights {other} are sha256:")
    assert f"but no part of run {setup['run']}'s a+b features was made with them" in result.output
    one = invoke("classify", setup["a"], "--fuse", "--out", setup["base"] / "one")
    assert one.exit_code == 2 and one.output.startswith("Error: fusing needs at least 2 feature files")
    twice = invoke("classify", setup["a"], setup["a"], "--fuse", "--out", setup["base"] / "twice")
    assert twice.exit_code == 2 and "is given twice; fuse each feature file once" in twice.output


def test_a_run_written_before_fusing_still_loads_and_predicts(setup, tmp_path):
    run = tmp_path / "old"
    classify([setup["a"]], models=["logreg"], cv=3, out=run)
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["options"]["fuse"]  # what a furnitype before --fuse wrote
    (run / "metrics.json").write_text(json.dumps(metrics))
    settings = json.loads((run / "models" / "a" / "settings.json").read_text())
    assert "parts" not in settings and "parts" not in metrics["feature_sets"]["a"]

    loaded = load_model(run)
    assert loaded.parts is None and load_run(run).document.options.fuse is False
    result = predict(run, [setup["new"]])
    assert all(p.error == "" for p in result.predictions) and result.features == "a"


def test_a_fused_test_file_pair_is_matched_part_by_part(setup, tmp_path):
    test_a = extract([setup["new"]], like=setup["a"], out=tmp_path / "test-a.h5", batch_size=8).out
    test_b = extract([setup["new"]], like=setup["b"], out=tmp_path / "test-b.h5", batch_size=8).out

    run = classify([setup["a"], setup["b"]], fuse=True, test_files=[test_b, test_a], models=["logreg"], cv=3,
                   out=tmp_path / "run")

    fs = run.document.feature_sets["a+b"]
    assert fs.n_test == 6 and fs.n_train == 18 and fs.test_file == f"{test_a}+{test_b}"
    assert [part.test_file for part in fs.parts] == [str(test_a), str(test_b)]
    assert Path(fs.parts[0].test_file).name == "test-a.h5"


@pytest.mark.parametrize("change, message", [
    (lambda fs: fs.pop("parts"), r"feature_sets\.a\+b\.parts: missing, but options\.fuse is true"),
    (lambda fs: fs["parts"][1].update(feature_dim=100), r"feature_sets\.a\+b\.parts: their feature_dim do not add "
                                                         r"up to 1024"),
    (lambda fs: fs.update(parts=fs["parts"][:1]), r"feature_sets\.a\+b\.parts: 1 parts; a fused feature set has"),
])
def test_a_fused_record_that_does_not_add_up_is_damage(setup, tmp_path, change, message):
    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    for file in (run / "metrics.json", run / "models" / "a+b" / "settings.json"):
        data = json.loads(file.read_text())
        change(data["feature_sets"]["a+b"] if "feature_sets" in data else data)
        file.write_text(json.dumps(data))

    result = invoke("predict", run, setup["new"])

    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(f"Error: run {run} is damaged: metrics.json ")
    assert re.search(message, result.output), result.output


def test_suggest_takes_one_store_per_part_and_scores_their_rows_side_by_side(setup, tmp_path):
    new_a = extract([setup["new"]], like=setup["a"], out=tmp_path / "new-a.h5", batch_size=8).out
    new_b = tmp_path / "new-b.h5"
    extract([setup["new"] / "bed", setup["new"] / "chair"], like=setup["b"], out=new_b, batch_size=8)
    loaded = load_model(setup["run"])
    a, b = load(new_a), load(new_b)
    rows_b = {sha: i for i, sha in enumerate(b.sha256)}
    both = [i for i, sha in enumerate(a.sha256) if sha in rows_b]
    X = np.hstack([a.features[both], b.features[[rows_b[a.sha256[i]] for i in both]]])
    expected = loaded.model.predict_proba(X)
    by_path = {a.paths[i]: p for i, p in zip(both, expected, strict=True)}

    result = suggest(setup["run"], [new_a, new_b], n=10, out=tmp_path / "to-label.csv")

    assert sorted(s.path for s in result.suggestions) == sorted(by_path)  # the sofas are not in new-b.h5
    assert result.notes[0] == f"a+b: 2 photos that not every fused feature file holds (2 not in {new_b}) are left out."
    for s in result.suggestions:
        proba = by_path[s.path]
        assert s.label == loaded.classes[int(np.argmax(proba))] and abs(s.probability - proba.max()) < 1e-6
    wrong = invoke("suggest", setup["run"], new_a, "--out", tmp_path / "x.csv")
    assert wrong.exit_code == 2 and len(wrong.output.strip().splitlines()) == 1
    assert "give one feature file of the new photos per part, in that order, not 1." in wrong.output
    swapped = invoke("suggest", setup["run"], new_b, new_a, "--out", tmp_path / "y.csv")
    assert swapped.exit_code == 1 and swapped.output.startswith(f"Error: {new_b} was made with ")


def test_a_setting_the_parts_agree_on_keeps_its_value():
    assert joined([224, 224]) == 224 and joined([224, 299]) == "224+299"
    assert joined(["vgg16", "inception"]) == "vgg16+inception" and joined(["avg", "avg"]) == "avg"


def test_a_moved_weights_file_of_one_part_is_given_with_weights(setup, tmp_path):
    keras = import_keras()
    keras.utils.set_random_seed(3)
    weights = tmp_path / "vgg16.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(weights)
    c = extract([setup["photos"]], out=tmp_path / "c.h5", batch_size=8, **{**PART_A, "weights": str(weights)})
    run = classify([c.out, setup["b"]], fuse=True, models=["logreg"], cv=3, out=tmp_path / "run")
    before = predict(run.path, [setup["new"]])
    assert before.weights == f"{weights}+none"
    moved = tmp_path / "moved.weights.h5"
    weights.rename(moved)

    with pytest.raises(InputError, match=r"which is not there any more; pass --weights PATH to a copy of it"):
        predict(run.path, [setup["new"]])
    after = predict(run.path, [setup["new"]], weights=str(moved))  # for part c only: b keeps its random weights

    assert after.weights == f"{moved}+none"
    assert [p.top for p in after.predictions] == [p.top for p in before.predictions]


def test_the_server_refuses_a_fused_run_in_one_line(setup):
    with pytest.raises(InputError, match=r"trained on a fused feature set \(a\+b\), which furnitype serve does not"):
        Predictor(setup["run"], store=setup["a"])
