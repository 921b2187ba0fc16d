"""``furnitype suggest``: the ranking it writes, training photos left out, the CSV and sheet, every bad input."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil

import h5py
import numpy as np
import pytest
from PIL import Image

from furnitype import features as store
from furnitype.classify import load_model
from furnitype.classify.selection import labelling_order
from furnitype.classify.synthetic import make_features
from furnitype.errors import InputError, SettingsMismatchError, StoreError
from furnitype.extract.images import read_manifest
from furnitype.suggest import CSV_COLUMNS, suggest
from furnitype.training import classify
from tests.conftest import STORE_META as META
from tests.conftest import run_cli as invoke
from tests.images import COLOURS, photo

CLASSES = ["bed", "chair", "sofa"]


def write(path, X, sha256, labels=None, paths=None, **meta):
    """A feature file of ``X`` (labels "" unless given), with the test settings overridden by ``meta``."""
    n = len(X)
    store.save(
        path,
        features=X,
        paths=paths if paths is not None else [f"/new/{i:03d}.jpg" for i in range(n)],
        labels=list(labels) if labels is not None else [""] * n,
        sha256=list(sha256),
        meta={**META, **meta},
    )
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run (logreg) trained on 48 rows, and a file of 30 new rows plus 4 of the run's own photos."""
    base = tmp_path_factory.mktemp("suggest")
    X, labels, sha = make_features([16, 16, 16], 24, seed=1, separation=1.5, classes=CLASSES)
    train = write(base / "train.h5", X, sha, labels, paths=[f"/train/{i}.jpg" for i in range(len(X))])
    run = classify([train], models=["logreg"], cv=3, out=base / "run", model_params={"logreg": {"Cs": (0.1, 1.0)}})
    parts = {}
    with open(run.path / "split.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            parts.setdefault(row["part"], []).append(row["sha256"])
    # New photos: the same classes seen from another "source" (a shifted generator seed), half of them labelled.
    new_X, new_labels, _ = make_features([10, 10, 10], 24, seed=1, separation=0.8, classes=CLASSES)
    new_sha = [f"{i:064x}" for i in range(len(new_X))]
    trained, tested = parts["train"][:2], parts["test"][:2]
    by_sha = {s: i for i, s in enumerate(sha)}
    rows = np.vstack([new_X, X[[by_sha[s] for s in trained + tested]]])
    all_sha = new_sha + trained + tested
    given = [lab if i % 2 else "" for i, lab in enumerate(new_labels)] + ["bed"] * 4
    new = write(base / "new.h5", rows, all_sha, given)
    return {"base": base, "run": run.path, "new": new, "trained": trained, "tested": tested, "new_sha": new_sha}


def test_suggestions_follow_the_ranking_of_the_models_probabilities(setup):
    fs = store.load(setup["new"])
    loaded = load_model(setup["run"])
    usable = np.flatnonzero(~np.isin(fs.sha256, setup["trained"]))
    proba = loaded.model.predict_proba(fs.features[usable])
    expected = usable[labelling_order(proba, 12)]

    result = suggest(setup["run"], setup["new"], n=12)

    assert [s.path for s in result.suggestions] == fs.paths[expected].tolist()
    assert [s.sha256 for s in result.suggestions] == fs.sha256[expected].tolist()
    classes = np.array(loaded.classes)
    for s, p in zip(result.suggestions, loaded.model.predict_proba(fs.features[expected]), strict=True):
        order = np.argsort(-p)
        assert (s.label, s.label_2) == (classes[order[0]], classes[order[1]])
        assert s.probability == pytest.approx(p[order[0]]) and s.probability_2 == pytest.approx(p[order[1]])
    assert (result.model, result.rows, result.in_training, result.notes) == ("logreg", 34, 2, [])


def test_training_photos_are_never_suggested_but_test_photos_may_be(setup):
    result = suggest(setup["run"], setup["new"], n=32)

    suggested = {s.sha256 for s in result.suggestions}
    assert suggested.isdisjoint(setup["trained"])
    assert suggested == set(setup["new_sha"]) | set(setup["tested"])


def test_n_above_the_photos_that_can_be_suggested_is_capped_with_a_note(setup):
    result = suggest(setup["run"], setup["new"], n=500)

    assert len(result.suggestions) == 32
    assert result.notes == ["only 32 photos can be suggested (asked for 500); suggesting all of them."]


def test_a_photo_stored_twice_is_suggested_once(setup, tmp_path):
    fs = store.load(setup["new"])
    twice = write(tmp_path / "twice.h5", np.vstack([fs.features, fs.features[:3]]),
                  [*fs.sha256, *fs.sha256[:3]], paths=[*fs.paths, "/copy/0.jpg", "/copy/1.jpg", "/copy/2.jpg"])

    result = suggest(setup["run"], twice, n=100)

    assert len(result.suggestions) == 32 and len({s.sha256 for s in result.suggestions}) == 32
    assert "3 rows repeat another row's photo; each photo is suggested once." in result.notes


def test_a_store_with_nan_rows_is_damaged_not_suggested_from(setup, tmp_path):
    """furnitype never stores a row that is not finite (extract skips it, save refuses it): one is damage."""
    fs = store.load(setup["new"])
    broken = write(tmp_path / "nan.h5", fs.features, fs.sha256, paths=fs.paths)
    with h5py.File(broken, "a") as h5:  # what another tool could write
        h5["features"][5] = np.nan

    with pytest.raises(StoreError, match=r"nan.h5 is damaged \(/features row 5 holds numbers that are not finite"):
        suggest(setup["run"], broken, n=100)


def test_cli_writes_the_csv_in_priority_order_and_extract_reads_it_back(setup, tmp_path):
    out = tmp_path / "to-label.csv"
    expected = suggest(setup["run"], setup["new"], n=7).suggestions

    result = invoke("suggest", setup["run"], setup["new"], "--n", 7, "--out", out)

    assert result.exit_code == 0, result.output
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS == ("path", "label", "probability", "label_2", "probability_2", "sha256")
    assert [r[0] for r in rows[1:]] == [s.path for s in expected]
    near = lambda value: pytest.approx(value, abs=1e-6)  # noqa: E731 - the CSV keeps 6 decimals
    assert [(r[1], float(r[2]), r[3], float(r[4]), r[5]) for r in rows[1:]] == [
        (s.label, near(s.probability), s.label_2, near(s.probability_2), s.sha256) for s in expected
    ]
    # The corrected list goes back through extract --manifest: path and (corrected) label per row.
    assert [(f.path, f.label) for f in read_manifest(out)] == [(s.path, s.label) for s in expected]
    lines = result.output.splitlines()
    assert lines[0].split() == ["#", "guess", "prob", "or", "prob", "path"] and len(lines) == 9
    assert lines[-1].startswith(f"7 of 34 photos of {setup['new']} suggested for labelling by logreg")
    assert lines[-1].endswith(f"wrote {out}")


def test_cli_json(setup, tmp_path):
    result = invoke("suggest", setup["run"], setup["new"], "--n", 3, "--out", tmp_path / "s.csv", "--json")

    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["in_training"] == 2 and document["rows"] == 34 and document["model"] == "logreg"
    assert [list(s) for s in document["suggestions"]] == [list(CSV_COLUMNS)] * 3
    assert document["out"] == str(tmp_path / "s.csv") and document["sheet"] is None


def test_an_existing_list_is_kept_unless_overwrite(setup, tmp_path):
    out = tmp_path / "to-label.csv"
    out.write_text("path,label\n/new/000.jpg,sofa\n", encoding="utf-8")

    refused = invoke("suggest", setup["run"], setup["new"], "--out", out)
    assert refused.exit_code == 2
    assert refused.output == (
        f"Error: {out} already exists (a list being labelled?); choose another --out, or --overwrite to replace it.\n"
    )
    assert out.read_text(encoding="utf-8") == "path,label\n/new/000.jpg,sofa\n"

    replaced = invoke("suggest", setup["run"], setup["new"], "--out", out, "--overwrite", "--n", 2)
    assert replaced.exit_code == 0, replaced.output
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3


def test_a_full_disk_leaves_the_previous_list_whole(setup, tmp_path, monkeypatch):
    out = tmp_path / "to-label.csv"
    out.write_text("previous list\n", encoding="utf-8")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    result = invoke("suggest", setup["run"], setup["new"], "--out", out, "--overwrite")

    assert result.exit_code == 2
    assert result.output == f"Error: cannot write {out}: the disk is full\n"
    assert out.read_text(encoding="utf-8") == "previous list\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["to-label.csv"]


def test_an_out_folder_that_does_not_exist_is_made(setup, tmp_path):
    out = tmp_path / "missing" / "to-label.csv"
    result = invoke("suggest", setup["run"], setup["new"], "--out", out)

    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("path,label,probability,label_2,probability_2,sha256\n")


def test_the_outputs_are_checked_before_any_work(setup, tmp_path):
    taken = tmp_path / "to-label.csv"
    taken.write_text("being labelled")
    missing = tmp_path / "no-such-run"  # not looked at: the outputs are refused first
    result = invoke("suggest", missing, setup["new"], "--out", taken)
    assert result.exit_code == 2 and result.output.startswith(f"Error: {taken} already exists")
    result = invoke("suggest", missing, setup["new"], "--out", tmp_path / "x.csv", "--sheet", tmp_path)
    assert result.exit_code == 2 and result.output == f"Error: cannot write {tmp_path}: it is a folder.\n"
    assert taken.read_text() == "being labelled" and not (tmp_path / "x.csv").exists()


def test_a_feature_file_with_other_settings_is_refused_naming_the_differences(setup, tmp_path):
    fs = store.load(setup["new"])
    other = write(tmp_path / "other.h5", fs.features, fs.sha256, image_size=160, pooling="max")

    with pytest.raises(SettingsMismatchError):
        suggest(setup["run"], other)
    result = invoke("suggest", setup["run"], other, "--out", tmp_path / "x.csv")

    assert result.exit_code == 1
    assert result.output == (
        f"Error: {other} was made with pooling=max, image_size=160, but run {setup['run']}'s train features with "
        "pooling=avg, image_size=224; extract the photos with the run's settings.\n"
    )
    assert not (tmp_path / "x.csv").exists()


def test_the_right_feature_set_of_a_run_with_two_is_used(setup, tmp_path):
    X, labels, sha = make_features([12, 12, 12], 8, seed=5, separation=2.0, classes=CLASSES)
    small = write(tmp_path / "small.h5", X, sha, labels, backbone="inception", image_size=299)
    vgg = tmp_path / "vgg.h5"
    shutil.copy(setup["base"] / "train.h5", vgg)
    run = classify([vgg, small], models=["logreg"], cv=3, out=tmp_path / "run2",
                   model_params={"logreg": {"Cs": (0.1,)}})
    new_X, _, _ = make_features([3, 3, 3], 8, seed=6, classes=CLASSES)
    new = write(tmp_path / "new-inception.h5", new_X, [f"{i:064x}" for i in range(9)],
                backbone="inception", image_size=299)

    result = suggest(run.path, new, n=4)

    assert result.features == "small" and len(result.suggestions) == 4


def test_an_empty_feature_file_is_one_line(setup, tmp_path):
    empty = write(tmp_path / "empty.h5", np.zeros((0, 24), np.float32), [])

    result = invoke("suggest", setup["run"], empty, "--out", tmp_path / "x.csv")

    assert result.exit_code == 2 and result.output == f"Error: {empty} is empty: it holds no photos.\n"


def test_a_feature_file_that_is_not_there_is_one_line(setup, tmp_path):
    result = invoke("suggest", setup["run"], tmp_path / "nope.h5", "--out", tmp_path / "x.csv")

    assert result.exit_code == 2 and result.output == f"Error: feature file not found: {tmp_path / 'nope.h5'}\n"


def test_only_training_photos_leaves_nothing_to_suggest(setup, tmp_path):
    fs = store.load(setup["new"])
    trained = np.isin(fs.sha256, setup["trained"])
    only = write(tmp_path / "only.h5", fs.features[trained], fs.sha256[trained])

    with pytest.raises(InputError, match=r"every photo of .*only\.h5 is already a training photo of run"):
        suggest(setup["run"], only)


def test_a_run_whose_models_are_gone_is_one_line(setup, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    shutil.rmtree(run / "models" / "train" / "logreg")

    result = invoke("suggest", run, setup["new"], "--out", tmp_path / "x.csv")

    assert result.exit_code == 1
    assert result.output.startswith(f"Error: run {run} is damaged: models/train/logreg")
    assert result.output.count("\n") == 1
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("runs", [1, 2])
def test_a_report_folder_has_no_models_to_suggest_with(setup, tmp_path, runs):
    merged = tmp_path / "merged"
    shutil.copytree(setup["run"], tmp_path / "other")
    assert invoke("report", setup["run"], *[tmp_path / "other"][: runs - 1], "--out", merged).exit_code == 0

    result = invoke("suggest", merged, setup["new"], "--out", tmp_path / "x.csv")

    assert result.exit_code == 2 and result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert f"{merged} is a report of" in result.output and "it holds no models" in result.output


def test_a_run_without_its_split_is_one_line(setup, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    (run / "split.csv").unlink()

    with pytest.raises(StoreError, match=r"^run .*run is damaged: split\.csv: missing$"):
        suggest(run, setup["new"])


def _first_test_line_names_a_training_photo(rows: list[list[str]]) -> list[list[str]]:
    """The counts of each part still agree."""
    trained = next(row[1] for row in rows if row[3] == "train")
    i = next(i for i, row in enumerate(rows) if row[3] == "test")
    return [*rows[:i], [rows[i][0], trained, *rows[i][2:]], *rows[i + 1 :]]


SPLIT_DAMAGES = {
    "header only": lambda rows: [],
    "trian": lambda rows: [[*row[:3], "trian" if row[3] == "train" else row[3]] for row in rows],
    "a line lost": lambda rows: rows[1:],
    "a line added": lambda rows: [*rows, [rows[0][0], "f" * 64, rows[0][2], "train"]],
    "unknown features": lambda rows: [["other", *rows[0][1:]], *rows[1:]],
    "unknown label": lambda rows: [[*rows[0][:2], "stool", rows[0][3]], *rows[1:]],
    "short sha256": lambda rows: [[rows[0][0], "abc", *rows[0][2:]], *rows[1:]],
    "a field missing": lambda rows: [rows[0][:3], *rows[1:]],
    "a training photo also tested": lambda rows: _first_test_line_names_a_training_photo(rows),
}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("header only", r"split\.csv: 0 train lines for 'train'; metrics\.json records n_train = \d+"),
        ("trian", r"split\.csv line 2: part 'trian' is not train or test"),
        ("a line lost", r"split\.csv: \d+ (train|test) lines for 'train'; metrics\.json records n_(train|test) = \d+"),
        ("a line added", r"split\.csv: \d+ train lines for 'train'; metrics\.json records n_train = \d+"),
        ("unknown features", r"split\.csv line 2: features 'other' is not a feature set of the run"),
        ("unknown label", r"split\.csv line 2: label 'stool' is not a class of feature set 'train'"),
        ("short sha256", r"split\.csv line 2: sha256 is not 64 hex digits"),
        ("a field missing", r"split\.csv line 2: not 4 fields"),
        ("a training photo also tested", r"split\.csv: a photo of 'train' is both a training and a test photo"),
    ],
    ids=list(SPLIT_DAMAGES),
)
def test_a_damaged_split_is_one_line(setup, tmp_path, change, problem):
    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    split = run / "split.csv"
    with open(split, newline="", encoding="utf-8") as fh:
        header, *rows = csv.reader(fh)
    keep = [i for i, column in enumerate(header) if column != "path"]  # damaged as an older run's split.csv
    header, rows = [header[i] for i in keep], [[row[i] for i in keep] for row in rows]
    with open(split, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header, *SPLIT_DAMAGES[change](rows)])

    result = invoke("suggest", run, setup["new"], "--out", tmp_path / "x.csv")

    assert result.exit_code == 1, result.output
    assert re.fullmatch(rf"Error: run {re.escape(str(run))} is damaged: {problem}\n", result.output), result.output
    assert not (tmp_path / "x.csv").exists()


def test_a_split_without_paths_made_by_an_older_furnitype_is_read(setup, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    with open(run / "split.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with open(run / "split.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["features", "sha256", "label", "part"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    old, new = suggest(run, setup["new"]), suggest(setup["run"], setup["new"])
    assert old.in_training == new.in_training > 0
    assert [s.as_dict() for s in old.suggestions] == [s.as_dict() for s in new.suggestions]


def test_n_below_one(setup, tmp_path):
    with pytest.raises(InputError, match="n must be at least 1"):
        suggest(setup["run"], setup["new"], n=0)
    result = invoke("suggest", setup["run"], setup["new"], "--n", 0, "--out", tmp_path / "x.csv")
    assert result.exit_code == 2 and result.output == "Error: n must be at least 1. Received: n=0\n"


def test_the_sheet_shows_the_photos_with_the_guesses(setup, tmp_path):
    photos = []
    for i in range(5):
        path = tmp_path / f"p{i}.jpg"
        photo(200 + i, COLOURS[CLASSES[i % 3]], (60, 40)).save(path)
        photos.append(str(path))
    fs = store.load(setup["new"])
    five = write(tmp_path / "five.h5", fs.features[:5], fs.sha256[:5], paths=photos)
    sheet = tmp_path / "to-label.png"

    result = invoke("suggest", setup["run"], five, "--n", 5, "--out", tmp_path / "x.csv", "--sheet", sheet)

    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].endswith(f"and {sheet}")
    with Image.open(sheet) as img:
        drawn = np.asarray(img.convert("RGB"))
    # Five tiles in one row; each photo's coloured box shows inside its tile (the photos were found).
    assert drawn.shape[1] > drawn.shape[0] > 160
    for colour in {COLOURS[c] for c in CLASSES}:
        assert np.any(np.all(np.abs(drawn.astype(int) - colour) < 30, axis=2))


def test_a_store_of_nan_rows_is_one_line(setup, tmp_path):
    fs = store.load(setup["new"])
    broken = write(tmp_path / "all-nan.h5", fs.features[:3], fs.sha256[:3])
    with h5py.File(broken, "a") as h5:
        h5["features"][:] = np.nan

    result = invoke("suggest", setup["run"], broken, "--out", tmp_path / "x.csv")

    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith(f"Error: {broken} is damaged (/features row 0 holds numbers that are not finite")


def test_an_output_over_the_feature_files_journal_or_lock_is_refused(setup, tmp_path):
    for beside in (".undo", ".lock"):
        target = f"{setup['new']}{beside}"
        result = invoke("suggest", setup["run"], setup["new"], "--out", target)
        assert result.exit_code == 2 and result.output.startswith(f"Error: --out {target} is one of the inputs")
        assert not os.path.exists(target)
