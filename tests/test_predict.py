"""``furnitype predict``: equal to extract + model, the weights check, broken files, CSV and JSON output."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import furnitype.predict
from furnitype.classify import load_model
from furnitype.classify.run import training_photos
from furnitype.errors import InputError, SettingsMismatchError
from furnitype.extract.pipeline import feature_batches
from furnitype.extraction import extract
from furnitype.features import load
from furnitype.keras_loader import import_keras
from furnitype.predict import predict
from furnitype.training import classify
from tests.conftest import run_cli as invoke
from tests.images import COLOURS, make_photo_folder, photo

SETTINGS = {"backbone": "vgg16", "image_size": 32, "batch_size": 8, "progress": False}
CLASSES = ("bed", "chair", "sofa")


def new_photos(root: Path, per_class: int = 2) -> Path:
    """Photos the run never saw (other seeds than ``make_photo_folder``'s), in class folders."""
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            photo(1000 + 10 * c + i, COLOURS[name], (56, 44)).save(root / name / f"new_{i}.jpg", quality=85)
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A VGG16 weights file (random, seeded), features of 18 photos made with it, and runs trained on them."""
    base = tmp_path_factory.mktemp("predict")
    keras = import_keras()
    keras.utils.set_random_seed(7)
    weights = base / "vgg16.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(weights)
    photos = make_photo_folder(base / "photos", per_class=6, classes=CLASSES)
    runs = {}
    for dtype in ("float32", "float16"):
        feats = base / f"train-{dtype}.h5"
        extract([photos], weights=str(weights), store_dtype=dtype, out=feats, **SETTINGS)
        runs[dtype] = base / f"run-{dtype}"
        models = ["logreg", "svm"] if dtype == "float32" else ["logreg"]
        classify([feats], models=models, cv=3, out=runs[dtype])
    return {"base": base, "weights": weights, "runs": runs, "new": new_photos(base / "new")}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_predict_equals_extract_plus_model(setup, tmp_path, dtype):
    run = setup["runs"][dtype]
    reference = load(
        extract([setup["new"]], weights=str(setup["weights"]), store_dtype=dtype, out=tmp_path / "new.h5", **SETTINGS)
        .out
    )
    loaded = load_model(run)
    expected = loaded.model.predict_proba(reference.features)

    result = predict(run, [setup["new"]], top_k=3, batch_size=4)

    assert [p.path for p in result.predictions] == list(reference.paths)
    assert result.model == loaded.name and result.weights == str(setup["weights"])
    for p, proba, label, sha in zip(result.predictions, expected, reference.labels, reference.sha256, strict=True):
        got = dict(p.top)
        assert p.error == "" and p.sha256 == sha and p.given_label == label
        assert len(p.top) == 3 and [prob for _, prob in p.top] == sorted(got.values(), reverse=True)
        np.testing.assert_allclose([got[c] for c in loaded.classes], proba, rtol=1e-5, atol=1e-7)
        assert p.label == loaded.classes[int(np.argmax(proba))] and p.probability == max(got.values())


def test_a_weights_file_with_another_sha256_is_refused(setup, tmp_path):
    other = tmp_path / "other.weights.h5"
    other.write_bytes(b"not the weights the run's features were made with")
    with pytest.raises(SettingsMismatchError, match=r"weights .*other\.weights\.h5 are sha256:[0-9a-f]{12}…, but run"):
        predict(setup["runs"]["float32"], [setup["new"]], weights=str(other))

    result = invoke("predict", setup["runs"]["float32"], setup["new"], "--weights", "none")
    assert result.exit_code == 1
    assert result.output.startswith("Error: weights none are none(seed=0), but run ")
    assert "were made with sha256:" in result.output and len(result.output.strip().splitlines()) == 1


def test_moved_weights_need_weights_option(setup, tmp_path):
    weights, moved = setup["weights"], tmp_path / "moved.weights.h5"
    run = setup["runs"]["float32"]
    before = predict(run, [setup["new"]])
    weights.rename(moved)
    try:
        with pytest.raises(InputError, match="which is not there any more; pass --weights PATH"):
            predict(run, [setup["new"]])
        after = predict(run, [setup["new"]], weights=str(moved))
    finally:
        moved.rename(weights)
    assert [p.label for p in after.predictions] == [p.label for p in before.predictions]
    np.testing.assert_allclose([p.probability for p in after.predictions], [p.probability for p in before.predictions])


def test_broken_files_get_a_row_with_the_reason(setup, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    photo(5, COLOURS["sofa"]).save(folder / "good.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a photo")
    good = (folder / "good.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(good[: len(good) // 2])
    missing = tmp_path / "gone.jpg"

    result = predict(setup["runs"]["float32"], [folder, missing])

    by_name = {Path(p.path).name: p for p in result.predictions}
    assert sorted(by_name) == ["cut.jpg", "empty.jpg", "gone.jpg", "good.jpg", "notes.jpg"]
    assert by_name["good.jpg"].label in CLASSES and by_name["good.jpg"].error == ""
    assert by_name["empty.jpg"].error == "empty file"
    assert by_name["notes.jpg"].error.startswith("not an image")
    assert by_name["cut.jpg"].error.startswith("truncated or corrupt")
    assert by_name["gone.jpg"].error == "file not found"
    assert all(by_name[n].label is None and by_name[n].top == [] for n in by_name if n != "good.jpg")
    assert "1 of 5 photos labelled" in result.summary() and "4 could not be used" in result.summary()


def test_cli_csv_columns_and_rows(setup, tmp_path):
    out, broken = tmp_path / "preds.csv", tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 broken")
    result = invoke("predict", setup["runs"]["float32"], setup["new"], broken, "--top-k", "2", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert result.output == ""
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == [
        "path", "label", "probability", "label_1", "probability_1", "label_2", "probability_2",
        "given_label", "sha256", "error", "in_training",
    ]
    assert len(rows) == 7
    broken = [r for r in rows if r["path"].endswith("broken.jpg")]
    assert broken[0]["label"] == "" and broken[0]["error"] == "not an image (unrecognised format)"
    for row in rows:
        if not row["error"]:
            assert row["label"] == row["label_1"] and row["probability"] == row["probability_1"]
            assert float(row["probability_1"]) >= float(row["probability_2"]) and row["given_label"] in CLASSES


def test_cli_json_list_and_model_choice(setup):
    result = invoke("predict", setup["runs"]["float32"], setup["new"], "--model", "svm", "--top-k", "5", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 6
    for row in rows:
        assert set(row) == {"path", "label", "probability", "top_k", "given_label", "sha256", "error", "in_training"}
        assert row["in_training"] is False
        assert len(row["top_k"]) == 3  # only 3 classes
        assert row["label"] == row["top_k"][0]["label"] and row["probability"] == row["top_k"][0]["probability"]
        assert sum(t["probability"] for t in row["top_k"]) == pytest.approx(1.0)
    assert predict(setup["runs"]["float32"], [setup["new"]], model="svm").model == "svm"


def test_cli_table_and_errors(setup, tmp_path):
    result = invoke("predict", setup["runs"]["float32"], setup["new"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # the progress bar went to stderr
    assert lines[0].split() == ["path", "given", "label", "prob", "next"] and len(lines) == 8
    assert [line.split()[1] for line in lines[1:7]] == [c for c in CLASSES for _ in range(2)]  # the folder's label
    assert "6 of 6 photos labelled by" in lines[-1] and "agree with their folder's label" in lines[-1]

    result = invoke("predict", setup["runs"]["float16"], setup["new"], "--model", "svm")
    assert result.exit_code == 2
    assert result.output.startswith("Error: ") and "has no model svm" in result.output
    result = invoke("predict", tmp_path / "no-run", setup["new"])
    assert result.exit_code == 2 and result.output == f"Error: run folder not found: {tmp_path / 'no-run'}\n"


def test_cli_csv_of_a_file_whose_name_is_not_utf8(setup, tmp_path):
    """Such a name is written as the bytes the file system has, so the row still names the file."""
    folder = tmp_path / "latin1"
    folder.mkdir()
    name = b"lat\xe9.jpg"
    photo(3, COLOURS["bed"]).save(str(folder).encode() + b"/" + name)
    out = tmp_path / "preds.csv"
    result = invoke("predict", setup["runs"]["float32"], folder, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(out.read_bytes().decode("utf-8", errors="surrogateescape").splitlines()))
    assert Path(rows[1][0]).is_file() and Path(rows[1][0]).name.encode("utf-8", errors="surrogateescape") == name
    assert rows[1][1] in CLASSES


def test_the_runs_own_training_photos_are_counted_apart(setup):
    """Agreement on a run's own training photos flatters: they are named, and the figure is on the others."""
    run = setup["runs"]["float32"]
    trained = training_photos(run, load_model(run).features)
    result = predict(run, [setup["base"] / "photos", setup["new"]])
    marked = [p for p in result.predictions if p.in_training]
    assert {p.sha256 for p in marked} == trained and 0 < len(marked) < 18
    others = [p for p in result.predictions if not p.in_training]
    agree = sum(p.label == p.given_label for p in others)
    summary = result.summary()
    assert f"; {len(marked)} are training photos of the run; {agree} of {len(others)} others agree" in summary
    table = result.format_table().splitlines()
    assert sum(line.endswith("(training photo)") for line in table) == len(marked)
    assert [r["in_training"] for r in (p.as_dict() for p in result.predictions)] == [
        p.in_training for p in result.predictions
    ]


def test_a_relative_weights_path_is_recorded_absolute_for_predict_elsewhere(setup, tmp_path, monkeypatch):
    monkeypatch.chdir(setup["base"])
    feats = tmp_path / "relative.h5"
    extract(["photos"], weights="vgg16.weights.h5", out=feats, **SETTINGS)
    assert load(feats).meta["weights_source"] == str(setup["weights"])
    run = classify([feats], models=["logreg"], cv=3, out=tmp_path / "run").path
    monkeypatch.chdir(tmp_path)  # another folder: the recorded path still names the weights file

    result = predict(run, [setup["new"]])

    assert result.weights == str(setup["weights"]) and all(p.error == "" for p in result.predictions)


def test_a_feature_store_given_as_a_photo_is_named_as_such(setup):
    feature_store = setup["base"] / "train-float32.h5"
    result = invoke("predict", setup["runs"]["float32"], feature_store)
    assert result.exit_code == 0, result.output
    assert "error: an HDF5 file (a feature store?), not a photo" in result.output
    assert "truncated" not in result.output and "0 of 1 photos labelled" in result.output


def test_a_feature_file_gives_its_rows_and_only_the_other_photos_are_extracted(setup, tmp_path, monkeypatch):
    run, train = setup["runs"]["float32"], setup["base"] / "train-float32.h5"
    folder = Path(shutil.copytree(setup["new"], tmp_path / "mixed"))
    for name in CLASSES:  # a photo of each class that the training store holds, under another name
        shutil.copy(setup["base"] / "photos" / name / f"{name}_0.jpg", folder / name / "stored.jpg")
    expected = predict(run, [folder])
    sent: list[str] = []

    def counted(spec, paths, **kwargs):
        sent.extend(paths)
        return feature_batches(spec, paths, **kwargs)

    monkeypatch.setattr(furnitype.predict, "feature_batches", counted)
    result = predict(run, [folder], store=train)

    assert result.stored == 3 and sorted(sent) == sorted(str(p) for p in folder.rglob("new_*.jpg"))
    assert [(p.path, p.label, p.sha256) for p in result.predictions] == [
        (p.path, p.label, p.sha256) for p in expected.predictions
    ]
    np.testing.assert_allclose([p.probability for p in result.predictions],
                               [p.probability for p in expected.predictions], rtol=1e-5)
    cli = invoke("predict", run, folder / "bed" / "stored.jpg", "--features", train, "--weights", "imagenet")
    assert cli.exit_code == 1 and "weights imagenet are imagenet, but run" in cli.output  # given: still checked
    sent.clear()
    cli = invoke("predict", run, folder / "bed" / "stored.jpg", "--features", train)
    assert cli.exit_code == 0 and sent == [] and "1 taken from the feature file" in cli.output
    with pytest.raises(SettingsMismatchError, match=r"was made with store_dtype=float16, but run .* with "
                       r"store_dtype=float32; give a feature file of the run's settings, or leave --features out"):
        predict(run, [folder], store=setup["base"] / "train-float16.h5")
