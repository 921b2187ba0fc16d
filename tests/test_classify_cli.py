"""``furnitype classify`` end to end on generated feature files: the run folder, the split, and bad input."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from furnitype import features as store
from furnitype.classify import load_model, load_run
from furnitype.classify.synthetic import make_features
from furnitype.cli import cli
from furnitype.training import classify
from tests.conftest import STORE_META as META
from tests.conftest import run_cli as invoke

FAST = ["--models", "logreg,svm", "--cv", "3", "--quiet"]


def write(path, X, labels, sha256, **meta):
    store.save(
        path,
        features=X,
        paths=[f"/photos/{label}/{i}.jpg" for i, label in enumerate(labels)],
        labels=list(labels),
        sha256=list(sha256),
        meta={**META, **meta},
    )
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two feature files of the same 60 photos (as VGG16 and random-weight Inception would give)."""
    base = tmp_path_factory.mktemp("feats")
    X, labels, sha = make_features([16, 16, 16, 12], 24, seed=1, separation=2.0)
    X2, _, _ = make_features([16, 16, 16, 12], 20, seed=2, separation=1.0)
    vgg = write(base / "vgg.h5", X, labels, sha)
    inception = write(base / "inception.h5", X2, labels, sha, backbone="inception", weights="none(seed=0)")
    return {"vgg": vgg, "inception": inception, "X": X, "labels": labels, "sha": sha, "dir": base}


@pytest.fixture(scope="module")
def full_run(files, tmp_path_factory):
    """All three models on both files."""
    out = tmp_path_factory.mktemp("runs") / "both"
    result = invoke("classify", files["vgg"], files["inception"], "--cv", "3", "--out", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_a_row_per_backbone_and_model_best_first(full_run):
    out, summary = full_run
    rows = summary["rows"]
    assert sorted((r["backbone"], r["model"]) for r in rows) == [
        ("inception", m) for m in ("dense", "logreg", "svm")
    ] + [("vgg16", m) for m in ("dense", "logreg", "svm")]
    assert [r["rank"] for r in rows] == list(range(1, 7))
    assert [r["accuracy"] for r in rows] == sorted((r["accuracy"] for r in rows), reverse=True)
    assert {r["weights"] for r in rows} == {"imagenet", "random"}
    assert summary["report_html"] == str(out / "report.html")
    for row in rows:
        assert 0 <= row["balanced_accuracy"] <= 1 and row["log_loss"] > 0
        assert row["predict_ms_per_image"] > 0 and isinstance(row["vs_baseline_points"], float)


def test_the_run_folder(full_run):
    out, _ = full_run
    for name in ("report.csv", "report.md", "report.html", "metrics.json", "split.csv", "scores.png"):
        assert (out / name).is_file(), name
    assert len(list(out.glob("confusion-*.png"))) == 6
    with open(out / "report.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    required = [
        "backbone",
        "model",
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "top3_accuracy",
        "log_loss",
        "fit_seconds",
        "predict_ms_per_image",
    ]
    assert set(required) <= set(table[0])
    assert {r["model"] for r in table} == {"dense", "logreg", "svm"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 7 and "Per class" in html
    document = json.loads((out / "metrics.json").read_text())
    assert document["feature_sets"]["inception"]["settings"]["weights"] == "none(seed=0)"
    assert len(document["rows"][0]["confusion"]) == 4
    for key in ("vgg", "inception"):
        settings = json.loads((out / "models" / key / "settings.json").read_text())
        assert settings["settings"]["backbone"] == ("vgg16" if key == "vgg" else "inception")


def test_the_split_is_saved_by_content_and_shared_by_both_files(full_run, files):
    out, summary = full_run
    with open(out / "split.csv", newline="") as fh:
        split = list(csv.DictReader(fh))
    parts = {(r["features"], r["sha256"]): r["part"] for r in split}
    assert len(parts) == 120
    assert list(split[0]) == ["features", "sha256", "path", "label", "part"]  # the photos by path too
    assert {(r["path"], r["label"]) for r in split} == {
        (f"/photos/{label}/{i}.jpg", label) for i, label in enumerate(files["labels"])
    }
    assert all(parts[("vgg", sha)] == parts[("inception", sha)] for sha in files["sha"])
    assert sum(p == "test" for p in parts.values()) == 2 * (3 + 3 + 3 + 2)  # round(20% of 16, 16, 16, 12)
    assert len({r["test_set"] for r in summary["rows"]}) == 1


def test_a_reloaded_model_gives_the_reported_scores(full_run, files):
    out, summary = full_run
    loaded = load_model(out, "svm", features="vgg")
    assert loaded.settings == {**META, "store_dtype": "float32"}
    assert loaded.meta["feature_dim"] == 24
    with open(out / "split.csv", newline="") as fh:
        test = {r["sha256"] for r in csv.DictReader(fh) if r["part"] == "test" and r["features"] == "vgg"}
    rows = np.isin(files["sha"], list(test))
    accuracy = np.mean(loaded.model.predict(files["X"][rows]) == files["labels"][rows])
    row = next(r for r in summary["rows"] if r["features"] == "vgg" and r["model"] == "svm")
    assert accuracy == pytest.approx(row["accuracy"])
    best = load_model(out)
    assert (best.features, best.name) == (summary["rows"][0]["features"], summary["rows"][0]["model"])
    assert load_run(out).rows[0].rank == 1


def test_the_terminal_table(files, tmp_path):
    result = invoke("classify", files["vgg"], *FAST, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:5] == ["#", "features", "backbone", "weights", "model"]
    assert lines[2].split()[:3] == ["1", "vgg", "vgg16"] and lines[3].split()[:3] == ["2", "vgg", "vgg16"]
    assert lines[-1] == f"HTML report: {tmp_path / 'run' / 'report.html'}"
    assert len({len(line.rstrip()) >= len(lines[0].split("chosen")[0]) for line in lines[:4]}) == 1


def test_progress_goes_to_stderr(files, tmp_path):
    runner = CliRunner()
    args = [
        "classify",
        files["vgg"],
        "--models",
        "logreg",
        "--cv",
        "3",
        "--out",
        str(tmp_path / "r"),
        "--json",
    ]
    result = runner.invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "fitting logreg" in result.stderr
    assert json.loads(result.stdout)["rows"][0]["model"] == "logreg"


def test_a_separate_test_file(files, tmp_path):
    X, labels, sha = make_features([10, 10, 10, 10], 24, seed=1, separation=2.0)
    test = write(tmp_path / "test.h5", X[::2], labels[::2], [f"t{i}" for i in range(20)])
    result = invoke("classify", files["vgg"], "--test", test, *FAST, "--out", tmp_path / "r", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {r["n_test"] for r in summary["rows"]} == {20}
    assert {r["n_train"] for r in summary["rows"]} == {60}


def test_test_photos_seen_in_training_are_not_scored(files, tmp_path):
    new_X, new_labels, _ = make_features([2, 2, 2, 2], 24, seed=1, separation=2.0)
    X = np.vstack([files["X"][:10], new_X])
    labels = np.append(files["labels"][:10], new_labels)
    sha = np.append(files["sha"][:10], [f"new{i}" for i in range(8)])
    test = write(tmp_path / "test.h5", X, labels, sha)
    result = invoke("classify", files["vgg"], "--test", test, *FAST, "--out", tmp_path / "r", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["warnings"] == [f"{test}: 10 test photos are also training photos; they are not scored."]
    assert summary["rows"][0]["n_test"] == 8
    only_seen = write(tmp_path / "seen.h5", files["X"][:10], files["labels"][:10], files["sha"][:10])
    _fails(
        invoke("classify", files["vgg"], "--test", only_seen, *FAST),
        2,
        f"every photo of test file {only_seen} is also a training photo; nothing to test.",
    )


def test_duplicates_in_training_stay_on_one_side(tmp_path):
    X, labels, sha = make_features([12, 12, 12], 16, seed=4, separation=2.0)
    sha = np.array([sha[i // 2 * 2] for i in range(len(sha))])  # photos come in identical pairs
    labels = labels[np.arange(len(labels)) // 2 * 2]
    path = write(tmp_path / "dups.h5", X, labels, sha)
    result = invoke("classify", path, *FAST, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    with open(tmp_path / "r" / "split.csv", newline="") as fh:
        split = list(csv.DictReader(fh))
    side = {}
    for row in split:
        assert side.setdefault(row["sha256"], row["part"]) == row["part"]


def test_unlabelled_rows_are_ignored_with_a_warning(files, tmp_path):
    labels = files["labels"].copy()
    labels[:3] = ""
    path = write(tmp_path / "some.h5", files["X"], labels, files["sha"])
    result = invoke(
        "classify", path, "--models", "logreg", "--cv", "3", "--out", tmp_path / "r", "--json", "-q"
    )
    assert result.exit_code == 0, result.output
    assert f"warning: {path}: 3 unlabelled rows ignored." in result.stderr
    assert json.loads(result.stdout)["warnings"] == [f"{path}: 3 unlabelled rows ignored."]


def test_a_class_with_one_photo_is_dropped_with_a_warning(files, tmp_path):
    X = np.vstack([files["X"], files["X"][:1]])
    labels = np.append(files["labels"], "lamp")
    sha = np.append(files["sha"], "lamp-photo")
    path = write(tmp_path / "lamp.h5", X, labels, sha)
    result = invoke("classify", path, *FAST, "--out", tmp_path / "r", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["warnings"] == [
        f"{path}: class 'lamp' has 1 photo; a class needs at least 2 to be trained and tested, "
        "so it is left out."
    ]
    assert "lamp" not in load_run(tmp_path / "r").rows[0].classes
    assert load_run(tmp_path / "r").document.feature_sets["lamp"].dropped_classes == ["lamp"]


# -- bad input: one line, no traceback ---------------------------------------------------------------


def _fails(result, code, message):
    assert result.exit_code == code, result.output
    assert result.output.strip().splitlines()[-1] == f"Error: {message}"
    assert "Traceback" not in result.output


def test_features_without_labels(files, tmp_path):
    path = write(tmp_path / "nolabels.h5", files["X"], [""] * 60, files["sha"])
    _fails(
        invoke("classify", path, *FAST),
        2,
        f"{path} has no labels; classify needs labelled photos (class folders or a manifest with labels).",
    )


@pytest.mark.parametrize("odd", ["so\nfa", "tab\there", "bell\x07"])
def test_a_class_a_run_cannot_record_is_refused_before_training(files, tmp_path, odd):
    labels = np.where(files["labels"] == files["labels"][0], odd, files["labels"])
    path = write(tmp_path / "odd.h5", files["X"], labels, files["sha"])  # by an older furnitype, or plain h5py
    result = invoke("classify", path, *FAST, "--out", tmp_path / "r")
    _fails(result, 2, f"{path} has the class {odd!r}, which a run cannot record: a class name is one line without "
           "control characters; rename its folder (or fix the manifest) and extract again.")
    assert result.output.count("\n") == 1 and not (tmp_path / "r").exists()


def test_too_few_classes_left(tmp_path):
    X, _, sha = make_features([3], 8)
    path = write(tmp_path / "tiny.h5", X, ["bed", "bed", "chair"], sha)
    result = invoke("classify", path, *FAST)
    _fails(result, 2, f"{path}: fewer than 2 classes have 2 or more photos; nothing to learn.")


def test_test_file_of_other_settings(files, tmp_path):
    test = write(tmp_path / "maxpool.h5", files["X"][:8], files["labels"][:8], ["x"] * 8, pooling="max")
    _fails(
        invoke("classify", files["vgg"], "--test", test, *FAST),
        1,
        f"test file {test} was made with pooling=max, but {files['vgg']} with pooling=avg; "
        f"a model can only be tested on features made with its own settings: extract the test photos with "
        f"--like {files['vgg']}.",
    )


def test_every_feature_file_needs_its_test_file(files, tmp_path):
    test = write(tmp_path / "t.h5", files["X"][:8], files["labels"][:8], [f"t{i}" for i in range(8)])
    _fails(
        invoke("classify", files["vgg"], files["inception"], "--test", test, *FAST),
        2,
        f"no test file has the settings of {files['inception']}; give one per feature file.",
    )


def test_empty_feature_file(tmp_path):
    path = write(tmp_path / "empty.h5", np.zeros((0, 8), np.float32), [], [])
    _fails(invoke("classify", path, *FAST), 2, f"{path} is empty: it holds no photos.")


def test_test_class_unknown_to_training(files, tmp_path):
    labels = files["labels"][:8].copy()
    labels[0] = "lamp"
    test = write(tmp_path / "t.h5", files["X"][:8], labels, [f"t{i}" for i in range(8)])
    _fails(
        invoke("classify", files["vgg"], "--test", test, *FAST),
        2,
        f"test file {test} has class 'lamp' unknown to training ({files['vgg']}).",
    )


def test_test_class_dropped_from_training_is_named(files, tmp_path):
    X = np.vstack([files["X"], files["X"][:1]])
    train = write(tmp_path / "lamp.h5", X, np.append(files["labels"], "lamp"), np.append(files["sha"], "L"))
    test = write(tmp_path / "t.h5", files["X"][:2], ["lamp", "bed"], ["t1", "t2"])
    _fails(
        invoke("classify", train, "--test", test, *FAST),
        2,
        f"test file {test} has class 'lamp' (left out of training: too few photos) "
        f"unknown to training ({train}).",
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--models", "dense,knn"], 2, "unknown model knn; choose from dense, logreg, svm."),
        (["--test-size", "1.5"], 2, "Invalid value for '--test-size': 1.5 is not in the range 0<x<1."),
        (["--cv", "1"], 2, "Invalid value for '--cv': 1 is not in the range x>=2."),
        (["--seed", "-1"], 2, "Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295."),
        (["--val-size", "1"], 2, "Invalid value for '--val-size': 1.0 is not in the range 0<=x<1."),
        (["--test", "x.h5", "--test-size", "0.3"], 2, "give test files or a test size, not both."),
    ],
)
def test_bad_options(files, args, code, message):
    _fails(invoke("classify", files["vgg"], *args), code, message)


def test_missing_and_foreign_files(tmp_path):
    _fails(invoke("classify", tmp_path / "nope.h5"), 2, f"feature file not found: {tmp_path / 'nope.h5'}")
    (tmp_path / "text.h5").write_text("hello")
    result = invoke("classify", tmp_path / "text.h5")
    assert result.exit_code == 1 and "is not a readable HDF5 feature file" in result.output


def test_an_existing_run_is_kept_unless_overwrite(files, tmp_path):
    out = tmp_path / "run"
    assert invoke("classify", files["vgg"], *FAST, "--out", out).exit_code == 0
    _fails(
        invoke("classify", files["vgg"], *FAST, "--out", out),
        2,
        f"{out} already holds a run; use another --out, or --overwrite to replace it.",
    )
    assert invoke("classify", files["vgg"], *FAST, "--out", out, "--overwrite").exit_code == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    _fails(
        invoke("classify", files["vgg"], *FAST, "--out", tmp_path / "other", "--overwrite"),
        2,
        f"{tmp_path / 'other'} exists and is not a furnitype run; choose another --out.",
    )
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_row_trailing_the_baseline_says_why(files, tmp_path):
    untrained = {"dense": {"hidden_units": 2, "max_epochs": 1, "learning_rate": 1e-7}}
    run = classify([files["vgg"]], models=["dense"], out=tmp_path / "r", model_params=untrained)
    row = run.rows[0]
    assert row.vs_baseline_points < -2
    gap = 100 * (row.accuracy - row.baseline_accuracy)
    assert row.vs_baseline_points == pytest.approx(gap, abs=0.01)
    (note,) = [n for n in run.notes if "trails the baseline" in n]
    assert note.startswith("dense on vgg (vgg16, imagenet) trails the baseline (StandardScaler + Logistic")
    assert "McNemar p = " in note and "not tuned beyond early stopping" in note
    assert note in (tmp_path / "r" / "report.md").read_text()


def test_a_run_that_does_not_beat_the_baseline_says_so(files, tmp_path):
    run = classify(
        [files["vgg"]], models=["logreg"], cv=3, out=tmp_path / "r", model_params={"logreg": {"Cs": (0.1,)}}
    )
    assert run.rows[0].vs_baseline_points == 0.0
    assert run.notes == [
        "vgg: no model beats the baseline (StandardScaler + LogisticRegression(C=0.1), accuracy "
        f"{run.rows[0].baseline_accuracy:.3f}); the best, logreg, ties it (its cross-validation chose the "
        f"baseline's own C=0.1: the same model); McNemar p = 1.000 over {run.rows[0].n_test} test photos."
    ]


def test_previous_run_is_scored_on_the_same_test_photos(tmp_path):
    """After labelling test photos and training again, the labelled photos leave the test set: the note scores
    the previous run's model on the photos that remain, so before and after are measured alike."""
    X, labels, sha = make_features([16, 16, 16], 8, seed=4, separation=0.6)
    order = np.random.default_rng(0).permutation(len(labels))
    train, new, labelled = order[:27], order[27:], order[27:33]
    new_file = write(tmp_path / "new.h5", X[new], labels[new], sha[new])
    before = classify([write(tmp_path / "shop.h5", X[train], labels[train], sha[train])], test_files=[new_file],
                      models=["logreg"], cv=3, out=tmp_path / "runs" / "shop").path
    grown = np.concatenate([train, labelled])
    shop = write(tmp_path / "shop-2.h5", X[grown], labels[grown], sha[grown])

    result = invoke("classify", shop, "--test", new_file, "--previous", before, "--models", "logreg", "--cv", "3",
                    "--out", tmp_path / "runs" / "shop-2", "--json", "-q")

    assert result.exit_code == 0, result.output
    remaining = order[33:]
    old = load_model(before, "logreg")
    predicted = np.asarray(old.classes)[old.model.predict_proba(X[remaining]).argmax(axis=1)]
    right = int(np.sum(predicted == labels[remaining]))
    note = next(n for n in json.loads(result.stdout)["notes"] if "previous run" in n)
    assert note.startswith(f"shop-2: on the same {len(remaining)} test photos, the previous run {before}'s logreg "
                           f"scores {right / len(remaining):.3f} (")
    assert f"; {old.row.accuracy:.3f} on its own test photos) and this run's logreg" in note


def test_previous_must_be_a_run_with_matching_features(tmp_path):
    X, labels, sha = make_features([10, 10], 8, seed=5)
    shop = write(tmp_path / "shop.h5", X, labels, sha)
    other = write(tmp_path / "other.h5", X, labels, sha, pooling="max")
    before = classify([other], models=["logreg"], cv=3, out=tmp_path / "before").path
    result = invoke("classify", shop, "--previous", before, *FAST, "--out", tmp_path / "after")
    assert result.exit_code == 1 and "has no features made with the settings of" in result.output
    result = invoke("classify", shop, "--previous", tmp_path / "missing", *FAST)
    assert result.exit_code == 2 and result.output.startswith("Error: ")
