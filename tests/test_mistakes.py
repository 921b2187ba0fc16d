"""A run's mistakes: misclassified test photos, possible label errors (confident learning), the report section,
``furnitype report --mistakes``, thumbnails and bad input."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from furnitype import features as store
from furnitype.classify import load_model
from furnitype.classify.mistakes import COLUMNS, MISTAKES_FILE, label_issues, misclassified, read_mistakes
from furnitype.classify.synthetic import make_features
from furnitype.errors import StoreError
from furnitype.reports.mistakes import SHOWN, shown, write_thumbnails
from furnitype.training import classify
from tests.conftest import STORE_META as META
from tests.conftest import run_cli as invoke
from tests.images import COLOURS, photo

CLASSES = ["bed", "chair", "sofa"]
FLIPPED = {0: "chair", 1: "sofa", 3: "sofa", 30: "bed", 31: "sofa", 46: "bed", 60: "bed", 61: "chair"}


def test_misclassified_rows_come_most_confident_first():
    y = np.array([0, 1, 2, 0, 1])
    proba = np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])

    assert misclassified(y, proba).tolist() == [2, 4, 0]


def test_label_issues_follow_confident_learning():
    # Class thresholds are the mean probability of each class over the rows given it:
    # bed (0.9 + 0.8 + 0.1) / 3 = 0.6, chair (0.8 + 0.7 + 0.2) / 3 = 0.567, sofa (0.9 + 0.6) / 2 = 0.75.
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 0])
    proba = np.array([
        [0.9, 0.05, 0.05],
        [0.8, 0.1, 0.1],
        [0.1, 0.85, 0.05],  # bed given, chair confident (0.85 >= 0.567): an issue
        [0.1, 0.8, 0.1],
        [0.2, 0.7, 0.1],
        [0.7, 0.2, 0.1],  # chair given, bed confident (0.7 >= 0.6): an issue
        [0.05, 0.05, 0.9],
        [0.3, 0.1, 0.6],  # sofa given; sofa itself below its threshold, bed (0.3) and chair below theirs: none
        [np.nan, np.nan, np.nan],  # never held out: never an issue
    ])

    assert label_issues(y, proba).tolist() == [2, 5]


def test_a_row_confident_in_its_own_class_and_another_is_judged_by_the_larger():
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.55, 0.45], [0.45, 0.55], [0.3, 0.7], [0.4, 0.6]])
    # thresholds: class 0 (0.55 + 0.45) / 2 = 0.5, class 1 (0.7 + 0.6) / 2 = 0.65; row 1: only 0.55 >= ... no,
    # class 1 at 0.55 is below 0.65 and class 0 at 0.45 below 0.5: not confident, not an issue.
    assert label_issues(y, proba).tolist() == []


def test_shown_keeps_the_first_of_each_list():
    from furnitype.classify.mistakes import Mistake

    def make(features, kind, i):
        return Mistake(features, "logreg", kind, f"/p/{i}.jpg", "bed", "sofa", 0.9, 0.1, f"{i:064x}")

    many = [make("a", "misclassified", i) for i in range(SHOWN + 5)] + [make("a", "label_issue", i) for i in range(3)]
    many += [make("b", "misclassified", i) for i in range(2)]

    kept = shown(many)

    assert [m.path for m in kept if m.features == "a" and m.kind == "misclassified"] == [
        f"/p/{i}.jpg" for i in range(SHOWN)
    ]
    assert len(kept) == SHOWN + 3 + 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Photos on disk for 90 feature rows (8 of them given a wrong label) and a run trained on them."""
    base = tmp_path_factory.mktemp("mistakes")
    X, labels, sha = make_features([30, 30, 30], 16, seed=3, separation=3.0, classes=CLASSES)
    given = np.array([FLIPPED.get(i, label) for i, label in enumerate(labels)])
    paths = []
    for i, label in enumerate(labels):
        path = base / "photos" / given[i] / f"{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(500 + i, COLOURS[label], (60, 40)).save(path)
        paths.append(str(path))
    # One photo turned on its side, upright only through its EXIF orientation tag.
    exif = Image.Exif()
    exif[0x0112] = 6
    photo(500, COLOURS[labels[0]], (60, 40)).transpose(Image.Transpose.ROTATE_90).save(paths[0], exif=exif)
    sha = np.array([hashlib.sha256(open(path, "rb").read()).hexdigest() for path in paths])
    feats = base / "train.h5"
    store.save(feats, features=X, paths=paths, labels=list(given), sha256=list(sha), meta=META)
    run = classify([feats], models=["logreg"], cv=3, out=base / "run", model_params={"logreg": {"Cs": (0.1, 1.0)}})
    split = {}
    with open(run.path / "split.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            split[row["sha256"]] = row["part"]
    return {"base": base, "run": run.path, "feats": feats, "sha": sha, "paths": paths, "truth": labels,
            "given": given, "split": split}


def test_possible_label_errors_are_the_flipped_training_photos(setup):
    issues = [m for m in read_mistakes(setup["run"]) if m.kind == "label_issue"]
    flipped_in_training = {setup["paths"][i] for i in FLIPPED if setup["split"][setup["sha"][i]] == "train"}

    assert flipped_in_training, "the split must keep some flipped photos in training"
    assert set(m.path for m in issues[: len(flipped_in_training)]) == flipped_in_training
    for m in issues:
        i = setup["paths"].index(m.path)
        assert (m.label, m.model, m.features) == (setup["given"][i], "reference", "train")
        if m.path in flipped_in_training:
            assert m.predicted == setup["truth"][i] and m.probability > m.label_probability
    assert [m.label_probability for m in issues] == sorted(m.label_probability for m in issues)


def test_misclassified_are_the_best_models_wrong_test_photos(setup):
    fs = store.load(setup["feats"])
    test = np.array([setup["split"][s] == "test" for s in fs.sha256])
    loaded = load_model(setup["run"])
    proba = loaded.model.predict_proba(fs.features[test])
    predicted = np.array(loaded.classes)[proba.argmax(axis=1)]
    wrong = np.flatnonzero(predicted != fs.labels[test])
    expected = [fs.paths[test][i] for i in wrong[np.argsort(-proba[wrong].max(axis=1), kind="stable")]]

    found = [m for m in read_mistakes(setup["run"]) if m.kind == "misclassified"]

    assert expected, "the flipped test photos must be misclassified"
    assert [m.path for m in found] == expected
    assert all(m.model == loaded.name for m in found)


def test_the_report_shows_the_mistakes_with_thumbnails_and_paths(setup):
    mistakes = read_mistakes(setup["run"])
    page = (setup["run"] / "report.html").read_text(encoding="utf-8")
    markdown = (setup["run"] / "report.md").read_text(encoding="utf-8")

    assert "<h2>Mistakes</h2>" in page and "## Mistakes" in markdown
    assert page.count("<figure>") == len(mistakes) == page.count('src="data:image/jpeg;base64,')
    for m in mistakes:
        assert f"<code>{m.path}</code>" in page and f"`{m.path}`" in markdown
        thumb = setup["run"] / "mistakes" / f"{m.sha256[:16]}.jpg"
        assert f"]({thumb.relative_to(setup['run'])})" in markdown
        with Image.open(thumb) as img:
            # Aspect kept (60 x 40), also for the photo stored on its side (40 x 60 pixels): EXIF applied.
            assert img.size == (60, 40)
    assert setup["paths"][0] in {m.path for m in mistakes}


def test_report_writes_the_lists_as_csv(setup, tmp_path):
    out = tmp_path / "mistakes.csv"

    result = invoke("report", setup["run"], "--mistakes", out)

    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"mistakes: {out}"
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == COLUMNS == (
        "features", "model", "kind", "path", "label", "predicted", "probability", "label_probability", "sha256"
    )
    recorded = read_mistakes(setup["run"])
    assert [r[3] for r in rows[1:]] == [m.path for m in recorded]
    assert {r[2] for r in rows[1:]} == {"misclassified", "label_issue"}


def test_merged_reports_keep_each_runs_mistakes(setup, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(setup["run"], other)
    merged = tmp_path / "merged"

    result = invoke("report", setup["run"], other, "--out", merged, "--mistakes", tmp_path / "m.csv")

    assert result.exit_code == 0, result.output
    page = (merged / "report.html").read_text(encoding="utf-8")
    assert f"<h3>{setup['run'].name}/train: test photos" in page and "<h3>other/train: training photos" in page
    with open(tmp_path / "m.csv", newline="", encoding="utf-8") as fh:
        features = [row["features"] for row in csv.DictReader(fh)]
    n = len(read_mistakes(setup["run"]))
    assert features == [f"{setup['run'].name}/train"] * n + ["other/train"] * n
    assert [m.features for m in read_mistakes(merged)] == features  # the report keeps them too


def test_a_refused_out_leaves_no_mistakes_file(setup, tmp_path):
    report = tmp_path / "report"
    assert invoke("report", setup["run"], "--out", report).exit_code == 0

    result = invoke("report", setup["run"], "--out", report, "--mistakes", tmp_path / "m.csv")

    assert result.exit_code == 2 and "--overwrite to replace it" in result.output
    assert not (tmp_path / "m.csv").exists()  # every output is checked before any is written


def test_a_report_copies_the_thumbnails_its_runs_keep_and_lists_a_photo_without_one(setup, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    gone, *_ = read_mistakes(run)
    (run / "mistakes" / f"{gone.sha256[:16]}.jpg").unlink()

    result = invoke("report", run, "--out", tmp_path / "again")

    assert result.exit_code == 0, result.output
    page = (tmp_path / "again" / "report.html").read_text(encoding="utf-8")
    assert page.count('<div class="missing">no preview</div>') == 1
    assert page.count('src="data:image/jpeg;base64,') == len(read_mistakes(run)) - 1
    assert f"<code>{gone.path}</code>" in page


def _received(setup, tmp_path, change) -> Path:
    """A copy of the run as someone could send it: ``change(mistakes)`` gives its mistakes.csv."""
    run = tmp_path / "theirs"
    shutil.copytree(setup["run"], run)
    mistakes = change(read_mistakes(run))
    with open(run / MISTAKES_FILE, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([COLUMNS, *(dataclasses.astuple(m) for m in mistakes)])
    return run


@pytest.mark.parametrize("sha256", ["valid-looking", "the file's own"])
def test_a_received_run_cannot_make_report_read_a_photo_it_names(setup, tmp_path, sha256):
    """A run naming a private photo, with its thumbnails deleted: the report never reads the path, even with the
    photo's own sha256 (its author knew the content); only the run's own thumbnails are shown."""
    private = tmp_path / "private.png"
    photo(7, (250, 250, 0), (60, 40)).save(private)
    digest = hashlib.sha256(private.read_bytes()).hexdigest() if sha256 == "the file's own" else "ab" * 32
    run = _received(setup, tmp_path, lambda found: [
        dataclasses.replace(found[0], path=str(private), sha256=digest), *found[1:]
    ])
    shutil.rmtree(run / "mistakes")

    result = invoke("report", run, "--out", tmp_path / "shared")

    assert result.exit_code == 0, result.output
    page = (tmp_path / "shared" / "report.html").read_text(encoding="utf-8")
    assert "data:image/jpeg" not in page and not (tmp_path / "shared" / "mistakes").exists()
    assert page.count("no preview") == len(read_mistakes(run)) and f"<code>{private}</code>" in page


@pytest.mark.parametrize("kind", ["symlink", "too large", "not a picture"])
def test_a_received_runs_thumbnail_is_read_from_inside_it_and_only_if_it_is_one(setup, tmp_path, kind):
    private = tmp_path / "private.jpg"
    photo(7, (250, 250, 0), (60, 40)).save(private)
    run = _received(setup, tmp_path, list)
    first = read_mistakes(run)[0]
    kept = run / "mistakes" / f"{first.sha256[:16]}.jpg"
    kept.unlink()
    if kind == "symlink":
        kept.symlink_to(private)
    elif kind == "too large":
        photo(8, (250, 250, 0), (2000, 40)).save(kept)
    else:
        kept.write_bytes(b"<script>alert(1)</script>")

    result = invoke("report", run, "--out", tmp_path / "shared")

    assert result.exit_code == 0, result.output
    page = (tmp_path / "shared" / "report.html").read_text(encoding="utf-8")
    assert page.count("no preview") == 1 and "alert" not in page
    assert not (tmp_path / "shared" / "mistakes" / kept.name).exists()


def test_classify_draws_a_photo_only_while_it_is_the_one_recorded(setup, tmp_path):
    """A photo changed since it was extracted (or any file now at its path) is not shown as it."""
    first = read_mistakes(setup["run"])[0]
    same = tmp_path / "same.jpg"
    shutil.copyfile(first.path, same)
    changed = tmp_path / "changed.jpg"
    photo(9, (250, 250, 0), (60, 40)).save(changed)
    mistakes = [dataclasses.replace(first, path=str(same)),
                dataclasses.replace(first, path=str(changed), sha256="cd" * 32)]
    changed_too = dataclasses.replace(first, path=str(changed), sha256="ef" * 32)
    (tmp_path / "out").mkdir()

    assert write_thumbnails([*mistakes, changed_too], tmp_path / "out") == {
        first.sha256: f"mistakes/{first.sha256[:16]}.jpg"
    }


def test_a_run_that_records_no_mistakes_is_one_line(setup, tmp_path):
    run = tmp_path / "old-run"
    shutil.copytree(setup["run"], run)
    (run / MISTAKES_FILE).unlink()

    result = invoke("report", run, "--mistakes", tmp_path / "m.csv")

    assert result.exit_code == 2
    assert result.output == (
        f"Error: run {run} records no mistakes (made by an earlier furnitype); train it again with furnitype "
        "classify.\n"
    )
    assert invoke("report", run, "--out", tmp_path / "plain").exit_code == 0
    assert "Mistakes" not in (tmp_path / "plain" / "report.html").read_text(encoding="utf-8")


DAMAGED = {
    "columns": ("features,model\nx,y\n", "its columns are not features, model, kind"),
    "not text": ("\xff\xfe not text", "not UTF-8 text"),
    "probability": (f"{','.join(COLUMNS)}\nf,m,misclassified,/p.jpg,a,b,x,0.1,{'0' * 64}\n", "not a number"),
    "kind": (f"{','.join(COLUMNS)}\nf,m,other,/p.jpg,a,b,0.9,0.1,{'0' * 64}\n", "kind 'other' is not one of"),
    "sha256 as a path": (f"{','.join(COLUMNS)}\nf,m,misclassified,/p.jpg,a,b,0.9,0.1,../../../x\n", "not 64 hex"),
    "short line": (f"{','.join(COLUMNS)}\nf,m,misclassified\n", "not 9 fields"),
}


@pytest.mark.parametrize("name", DAMAGED)
def test_a_damaged_mistakes_file_is_one_line(setup, tmp_path, name):
    content, problem = DAMAGED[name]
    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    (run / MISTAKES_FILE).write_bytes(content.encode("latin-1"))

    with pytest.raises(StoreError, match=rf"^run {run} is damaged: mistakes\.csv.*{problem}"):
        read_mistakes(run)
    result = invoke("report", run, "--mistakes", tmp_path / "m.csv")
    assert result.exit_code == 1 and result.output.startswith(f"Error: run {run} is damaged: mistakes.csv")
    assert result.output.count("\n") == 1 and not (tmp_path / "m.csv").exists()


def test_a_mistakes_file_that_is_a_symlink_out_of_the_run_is_refused(setup, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    outside = tmp_path / "elsewhere.csv"
    (run / MISTAKES_FILE).rename(outside)
    (run / MISTAKES_FILE).symlink_to(outside)

    with pytest.raises(StoreError, match=r"mistakes\.csv: is a symbolic link"):
        read_mistakes(run)


def test_a_photo_path_that_is_a_fifo_gets_no_thumbnail_and_no_wait(setup, tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    first = read_mistakes(setup["run"])[0]
    run = _received(setup, tmp_path, lambda found: [dataclasses.replace(found[0], path=str(fifo)), *found[1:]])
    shutil.rmtree(run / "mistakes")

    assert write_thumbnails([dataclasses.replace(first, path=str(fifo))], tmp_path) == {}
    result = invoke("report", run, "--out", tmp_path / "again")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "again" / "report.html").read_text(encoding="utf-8")
    assert page.count("no preview") == len(read_mistakes(run))
