"""The run folder's records: reading needs no scikit-learn, damaged metadata is one line, the layout is kept."""

import json
import shutil
import subprocess
import sys
from datetime import datetime

import pytest

from furnitype import features as store
from furnitype.classify import load_model, load_run
from furnitype.classify.metadata import RunDocument
from furnitype.classify.synthetic import make_features
from furnitype.errors import StoreError
from furnitype.training import classify, default_run_folder
from tests.conftest import run_cli as invoke


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A small run: logreg and svm on 3 classes."""
    base = tmp_path_factory.mktemp("run")
    X, labels, sha = make_features([10, 10, 10], 8, seed=5, separation=2.0)
    path = base / "feats.h5"
    store.save(
        path,
        features=X,
        paths=[f"/p/{i}.jpg" for i in range(len(labels))],
        labels=list(labels),
        sha256=list(sha),
        meta={"backbone": "vgg16", "weights": "imagenet", "pooling": "avg", "image_size": 224},
    )
    return classify([path], models=["logreg", "svm"], cv=3, out=base / "run").path


@pytest.fixture
def copy(run_dir, tmp_path):
    """A copy of the run to damage."""
    return shutil.copytree(run_dir, tmp_path / "run")


def test_reading_a_run_and_its_records_imports_neither_scikit_learn_nor_keras(run_dir):
    code = (
        "import sys; from furnitype.classify import load_run; import furnitype.predict; "
        f"run = load_run({str(run_dir)!r}); assert run.rows[0].rank == 1; "
        "print(sorted(m for m in ('sklearn', 'keras', 'tensorflow', 'matplotlib') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_metrics_json_keeps_its_layout(run_dir):
    data = json.loads((run_dir / "metrics.json").read_text())
    assert list(data) == [
        "format", "kind", "run", "created", "versions", "options", "baseline", "feature_sets", "rows", "notes",
        "warnings",
    ]
    assert data["format"] == 1 and data["kind"] == "furnitype classify run"
    assert list(data["rows"][0])[:4] == ["features", "backbone", "weights", "model"] and data["rows"][0]["rank"] == 1
    assert RunDocument.from_dict(data).as_dict() == data
    settings = json.loads((run_dir / "models" / "feats" / "settings.json").read_text())
    assert settings == data["feature_sets"]["feats"]


def _damage(run, edit):
    data = json.loads((run / "metrics.json").read_text())
    edit(data)
    (run / "metrics.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda d: d["rows"][1].update(colour="red"), "rows[1].colour: unknown key"),
        (lambda d: d["rows"][0].pop("accuracy"), "rows[0].accuracy: missing"),
        (lambda d: d.update(rows={"a": 1}), "rows: an object, not a list"),
        (lambda d: d["feature_sets"].update(feats=[]), "feature_sets.feats: a list, not an object"),
        (lambda d: d["options"].pop("cv"), "options.cv: missing"),
        (lambda d: d.update(format="1"), 'format: a string ("1"), not an integer'),
    ],
)
def test_damaged_metrics_json_is_one_line(copy, edit, problem):
    _damage(copy, edit)
    with pytest.raises(StoreError) as raised:
        load_run(copy)
    assert str(raised.value) == f"run {copy} is damaged: metrics.json {problem}"
    result = invoke("report", copy)
    assert result.exit_code == 1 and result.output.count("\n") == 1 and problem in result.output


def test_a_newer_run_or_model_format_is_refused(copy):
    _damage(copy, lambda d: d.update(format=2))
    with pytest.raises(StoreError, match=r"was written by a newer furnitype \(run format 2\)\.$"):
        load_run(copy)
    _damage(copy, lambda d: d.update(format=1))
    model_json = copy / "models" / "feats" / "logreg" / "model.json"
    model_json.write_text(json.dumps({**json.loads(model_json.read_text()), "format": 2}))
    with pytest.raises(StoreError, match=r"logreg was saved by a newer furnitype \(model format 2\)\.$"):
        load_model(copy, "logreg")


def test_a_damaged_model_json_is_one_line(copy):
    model_json = copy / "models" / "feats" / "svm" / "model.json"
    record = json.loads(model_json.read_text())
    model_json.write_text(json.dumps({**record, "weights": "extra"}))
    with pytest.raises(StoreError, match=r" is damaged: models/feats/svm/model\.json weights: unknown key$"):
        load_model(copy, "svm")
    model_json.write_text("[1, 2")
    with pytest.raises(StoreError, match=r" is damaged: models/feats/svm/model\.json: not JSON \("):
        load_model(copy, "svm")


def test_default_run_folder_never_meets_a_run_of_the_same_second(tmp_path):
    now = datetime(2026, 12, 4, 18, 33, 8)
    assert default_run_folder(tmp_path, now) == tmp_path / "20261204-183308"
    (tmp_path / "20261204-183308").mkdir()
    (tmp_path / "20261204-183308-2").symlink_to(tmp_path / "gone")  # a name taken, even by a dangling link
    assert default_run_folder(tmp_path, now) == tmp_path / "20261204-183308-3"
