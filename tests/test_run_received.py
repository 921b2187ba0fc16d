"""A received run is data: every metadata file is checked, nothing outside the run is read, payloads are what
was saved. Each case ends in one line (``Error: run X is damaged: <field>: <problem>``) and an exit code, or in
the same predictions as the untouched run: never a traceback, never a model from elsewhere."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import skops.io

from furnitype.classify import load_model, load_run
from furnitype.errors import InputError, StoreError
from furnitype.extraction import extract
from furnitype.training import classify, report_runs
from tests.conftest import run_cli as invoke
from tests.images import COLOURS, make_photo_folder, photo

CLASSES = ("bed", "chair", "sofa")
SMALL = {"backbone": "vgg16", "weights": "none", "image_size": 32, "batch_size": 8, "progress": False}
GRIDS = {"logreg": {"Cs": (0.1, 1.0)}, "svm": {"linear_Cs": (0.1,), "rbf_Cs": (1.0,), "rbf_gammas": (1.0,)}}
LOGREG, SVM = "models/feats/logreg", "models/feats/svm"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A run of logreg and svm on features of 18 photos (VGG16, random weights, 32 px), an "outside" run whose
    classes are other names (so its models would show if used), and a new photo."""
    root = tmp_path_factory.mktemp("received")
    photos = make_photo_folder(root / "photos", per_class=6, classes=CLASSES)
    feats = extract([photos], out=root / "feats.h5", **SMALL).out
    run = classify([feats], models=["logreg", "svm"], cv=3, out=root / "run", model_params=GRIDS).path
    for name in CLASSES:
        shutil.copytree(photos / name, root / "other" / f"outside-{name}")
    other = extract([root / "other"], out=root / "other" / "feats.h5", **SMALL).out
    outside = classify([other], models=["logreg", "svm"], cv=3, out=root / "outside", model_params=GRIDS).path
    new = root / "new.jpg"
    photo(999, COLOURS["chair"]).save(new)
    return {"root": root, "run": run, "outside": outside, "new": new}


@pytest.fixture
def run(base, tmp_path) -> Path:
    """A copy of the run to damage, with the outside run beside it (``../outside``)."""
    shutil.copytree(base["outside"], tmp_path / "outside")
    return shutil.copytree(base["run"], tmp_path / "run")


class OpenedFiles:
    """Records the paths opened through Python (``open``, ``os.open``: skops', Keras' and furnitype's reads)."""

    def __init__(self):
        self.paths: list[str] = []
        self.active = False
        sys.addaudithook(self._hook)  # audit hooks cannot be removed: this one records only while active

    def _hook(self, event, args):
        if self.active and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            self.paths.append(os.fsdecode(args[0]))

    def under(self, folder: Path) -> list[str]:
        real = os.path.realpath(folder)
        return [p for p in self.paths if os.path.realpath(p).startswith(real + os.sep)]


OPENED = OpenedFiles()


def predict_json(run: Path, new: Path, model: str):
    OPENED.paths.clear()
    OPENED.active = threading.current_thread() is threading.main_thread()
    try:
        return invoke("predict", run, new, "--model", model, "--json", "-q")
    finally:
        OPENED.active = False


# -- the fuzz: every field of every metadata file ----------------------------------------------------------------

MISSING = object()


def nodes(value, path=()):
    """Every node of a JSON value; a list's items all when they are objects, else its first item only."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from nodes(item, (*path, key))
    elif isinstance(value, list) and value:
        for i, item in enumerate(value if isinstance(value[0], dict) else value[:1]):
            yield from nodes(item, (*path, i))


def mutations(value, escapes):
    """(kind, new value) pairs: missing, another JSON type, null, out of range, a path leaving the run."""
    yield "missing", MISSING
    other = {str: 12345, bool: 1, int: "12", float: "0.5", type(None): "x", list: {"a": 1}, dict: ["a"]}
    yield "type", other[type(value)]
    if value is not None:
        yield "null", None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield "range", -1
        yield "range", 10**12 if isinstance(value, int) else 1e12
    if isinstance(value, str):
        yield "range", ""
        for escape in escapes:
            yield "escape", escape
    if isinstance(value, list):
        yield "range", []


def mutated(document, path, new):
    changed = copy.deepcopy(document)
    if not path:
        return new
    parent = changed
    for key in path[:-1]:
        parent = parent[key]
    if new is MISSING:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return changed


def shown(path) -> str:
    return ".".join(map(str, path))


#: Mutations a run may accept: then its predictions must be the same as the untouched run's.
ACCEPTABLE = [
    # text and provenance: shown or recorded, never used to find or compute anything
    (r"missing|escape|range", r"(.*\.)?(notes|warnings)\.0|(.*\.)?meta\.\w+|(.*\.)?versions\.[\w-]+"),
    (r"type|null", r"(.*\.)?meta\.(?!feature_dim$|weights_source$)\w+"),
    (r"escape|range", r"(.*\.)?(file|test_file|backbone|chosen|baseline)|(.*\.)?(feature|test)_files\.0"),
    (r"null", r"baseline|(.*\.)?backbone|options\.class_weight|(.*\.)?meta\.weights_source"),
    # empty where empty is valid
    (r"range", r"(.*\.)?(notes|warnings|meta|versions|dropped_classes)|options\.test_files"),
    # numbers without an upper bound
    (r"range", r"options\.(cv|min_photos_per_class)|(.*\.)?(fit_seconds|fit_cpu_seconds|predict_ms_per_image)"),
    (r"range", r"(.*\.)?log_loss"),
    (r"missing", r"versions"),  # model.json's versions are optional
    (r"missing|null", r"rows\.\d+\.weights_identity"),  # shown only, and absent from runs made before it
    (r"missing", r"options\.fuse"),  # absent from runs made before --fuse: false
]


def acceptable(kind: str, where: str) -> bool:
    return any(re.fullmatch(kinds, kind) and re.fullmatch(paths, where) for kinds, paths in ACCEPTABLE)


#: The files mutated, and the model predicted with; "both" mutates the feature set in metrics.json and in
#: settings.json alike (so that they agree and the record's own checks are reached).
TARGETS = {
    "metrics.json": "metrics.json",
    "settings.json": "models/feats/settings.json",
    "both": "models/feats/settings.json",
    "logreg/model.json": f"{LOGREG}/model.json",
    "svm/model.json": f"{SVM}/model.json",
}


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_field_of_every_metadata_file(base, run, target):
    outside = run.parent / "outside"
    in_model = target.endswith("model.json")
    escapes = (
        ("../../../../outside/models/feats/logreg/model.skops", str(outside / LOGREG / "model.skops"))
        if in_model
        else (f"../outside/{LOGREG}", str(outside / LOGREG))
    )
    expected = {m: json.loads(predict_json(run, base["new"], m).output) for m in ("logreg", "svm")}
    file = run / TARGETS[target]
    original = file.read_bytes()
    metrics = json.loads((run / "metrics.json").read_text())
    document = json.loads(original)
    problems, refused = [], 0
    for path, value in nodes(document):
        for kind, new in mutations(value, escapes):
            if not path and kind == "missing":
                continue
            file.write_text(json.dumps(mutated(document, path, new)))
            if target == "both":
                (run / "metrics.json").write_text(json.dumps(mutated(metrics, ("feature_sets", "feats", *path), new)))
            model = "svm" if target.startswith("svm") or _svm_row(metrics, path) else "logreg"
            result = predict_json(run, base["new"], model)
            where = shown(path)
            problem = _judge(result, expected[model], kind, where, outside)
            if problem:
                problems.append(f"{target} {where} {kind} {new!r}: {problem}")
            refused += result.exit_code != 0
            file.write_bytes(original)
            if target == "both":
                (run / "metrics.json").write_text(json.dumps(metrics))
    assert not problems, "\n".join(problems)
    assert refused > 20


def _svm_row(metrics, path) -> bool:
    """Whether ``path`` is in the svm row of metrics.json (predicted with the svm, so that it is read)."""
    return path[:1] == ("rows",) and len(path) > 1 and metrics["rows"][path[1]]["model"] == "svm"


def _judge(result, expected, kind, where, outside) -> str:
    if OPENED.under(outside):
        return f"opened {OPENED.under(outside)}"
    if result.exit_code == 0:
        if json.loads(result.output) != expected:
            return "accepted, with other predictions"
        return "" if acceptable(kind, where) else "accepted"
    lines = result.output.splitlines()
    if result.exit_code not in (1, 2) or len(lines) != 1 or not lines[0].startswith("Error: "):
        return f"exit {result.exit_code}: {result.output!r}"
    return ""


# -- the damages the issue lists, one by one -------------------------------------------------------------------


def edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def refused(run: Path, new: Path, code: int, message: str, model: str = "logreg") -> None:
    result = invoke("predict", run, new, "--model", model, "--quiet")
    assert result.exit_code == code, result.output
    assert result.output == f"Error: {message}\n"


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        ("metrics.json", lambda d: d["rows"][0].update(classes=[]), "metrics.json rows[0].classes: 0 classes; a model "
         "has at least 2"),
        (f"{LOGREG}/model.json", lambda d: d.update(classes="bed"), f"{LOGREG}/model.json classes: a string "
         '("bed"), not a list'),
        (f"{LOGREG}/model.json", lambda d: d.update(format=7.5), f"{LOGREG}/model.json format: a number (7.5), not "
         "an integer"),
        ("metrics.json", lambda d: d["rows"][0].update(accuracy="high"), 'metrics.json rows[0].accuracy: a string '
         '("high"), not a number'),
        ("metrics.json", lambda d: d.update(kind="furnitype run"), "metrics.json kind: 'furnitype run' is not one of "
         "'furnitype classify run', 'furnitype merged report'"),
        (f"{LOGREG}/model.json", lambda d: d.update(model="svm"), f"{LOGREG}/model.json params.Cs: not a parameter "
         "of the svm model"),
        ("metrics.json", lambda d: d.update(rows={"0": 1}), "metrics.json rows: an object, not a list"),
        (f"{LOGREG}/model.json", lambda d: d.update(n_features_in=513), f"{LOGREG}/model.skops: the StandardScaler's "
         "mean_ is (512,), not (513,)"),
        (f"{LOGREG}/model.json", lambda d: d["params"].update(colour="red"), f"{LOGREG}/model.json params.colour: not "
         "a parameter of the logreg model"),
        (f"{LOGREG}/model.json", lambda d: d["params"].update(cv=1), f"{LOGREG}/model.json params: The 'cv' "
         "parameter of LogRegModel must be an int in the range [2, inf). Got 1 instead."),
        ("metrics.json", lambda d: d.update(format=0), "metrics.json format: 0 is less than 1"),
    ],
    ids=["no classes", "classes a string", "format a float", "accuracy a string", "unknown kind", "kind mismatch",
         "rows a dict", "n_features_in wrong", "unknown param", "param out of range", "format 0"],
)
def test_damaged_metadata_is_named(base, run, file, change, message):
    edit(run / file, change)
    refused(run, base["new"], 1, f"run {run} is damaged: {message}")


def test_a_received_name_cannot_break_the_line_or_reach_the_terminal(base, run):
    edit(run / "metrics.json", lambda d: d["rows"][0].update({"\n\x1b[2Jowned": 1}))
    refused(run, base["new"], 1, f"run {run} is damaged: metrics.json rows[0].\\n\\x1b[2Jowned: unknown key")
    edit(run / "metrics.json", lambda d: (d["rows"][0].pop("\n\x1b[2Jowned"), d["notes"].append("\x1b]0;title\x07")))
    refused(run, base["new"], 1, f"run {run} is damaged: metrics.json notes: '\\x1b]0;title\\x07' holds control "
            "characters")


def test_a_model_of_another_kind_than_its_row(base, run):
    # logreg's model.json and payload where metrics.json says svm: each file is fine, they disagree
    shutil.rmtree(run / SVM)
    shutil.copytree(run / LOGREG, run / SVM)
    refused(run, base["new"], 1, f"run {run} is damaged: {SVM}/model.json model: differs from what metrics.json "
            "records for feats/svm", model="svm")


def settings_of(run: Path, change) -> None:
    """Change the feature set's settings alike in metrics.json and settings.json (so that they agree)."""
    edit(run / "metrics.json", lambda d: change(d["feature_sets"]["feats"]["settings"]))
    edit(run / "models/feats/settings.json", lambda d: change(d["settings"]))


def test_settings_that_make_other_features_than_the_model_takes(base, run):
    settings_of(run, lambda s: s.update(pooling="flatten", image_size=64))
    refused(run, base["new"], 1, f"run {run} is damaged: metrics.json feature_sets.feats.settings: vgg16 with "
            "flatten pooling at 64 px makes 2048 features, but the model takes 512")


def test_an_image_size_beyond_what_extract_makes(base, run):
    settings_of(run, lambda s: s.update(image_size=100000))
    refused(run, base["new"], 1, f"run {run}'s feats features were made with settings this furnitype cannot "
            "reproduce: image size must be at most 1024 px (a network's memory grows with its square). "
            "Received: image_size=100000")


# -- paths: inside the run only, regular files only ----------------------------------------------------------------


def test_a_model_folder_that_is_a_symlink_out_of_the_run(base, run):
    shutil.rmtree(run / LOGREG)
    (run / LOGREG).symlink_to(run.parent / "outside" / LOGREG)
    refused(run, base["new"], 1, f"run {run} is damaged: {LOGREG}: is a symbolic link (a run's files must be "
            "inside it)")
    os.unlink(run / LOGREG)
    shutil.copytree(run.parent / "outside" / LOGREG, run / LOGREG)
    (run / "models").rename(run / "inner")
    (run / "models").symlink_to(run / "inner")  # even a link that stays inside the run is refused
    refused(run, base["new"], 1, f"run {run} is damaged: models: is a symbolic link (a run's files must be inside "
            "it)")


@pytest.mark.parametrize("name", ["metrics.json", "models/feats/settings.json", f"{LOGREG}/model.json",
                                  f"{LOGREG}/model.skops"])
def test_a_metadata_or_model_file_that_is_a_symlink(base, run, name):
    target = run.parent / "outside" / name
    (run / name).unlink()
    (run / name).symlink_to(target)
    result = invoke("predict", run, base["new"], "--model", "logreg")
    assert result.exit_code != 0 and result.output.count("\n") == 1, result.output
    assert result.output.endswith(f"{name}: is a symbolic link (a run's files must be inside it)\n")


@pytest.mark.parametrize("name", ["metrics.json", f"{LOGREG}/model.json", f"{LOGREG}/model.skops"])
def test_a_fifo_is_not_read(base, run, name):
    (run / name).unlink()
    os.mkfifo(run / name)  # opening it for reading would wait for a writer forever
    result = invoke("predict", run, base["new"], "--model", "logreg")
    assert result.exit_code == 1, result.output
    assert result.output.endswith(f"{name}: is not a regular file\n")


@pytest.mark.parametrize(
    ("file", "key", "value"),
    [
        ("metrics.json", ("rows", 0, "model_dir"), "../outside/models/feats/logreg"),
        ("metrics.json", ("rows", 0, "model_dir"), "/outside/models/feats/logreg"),
        (f"{LOGREG}/model.json", ("payload",), "../../../../outside/models/feats/logreg/model.skops"),
        (f"{LOGREG}/model.json", ("payload",), "/outside/models/feats/logreg/model.skops"),
    ],
    ids=["model_dir ..", "model_dir absolute", "payload ..", "payload absolute"],
)
def test_paths_that_leave_the_run_are_refused_unread(base, run, file, key, value):
    outside = run.parent / "outside"
    value = value.replace("/outside", str(outside)) if value.startswith("/") else value
    data = json.loads((run / file).read_text())
    if key[0] == "rows":
        key = ("rows", next(i for i, r in enumerate(data["rows"]) if r["model"] == "logreg"), "model_dir")
    (run / file).write_text(json.dumps(mutated(data, key, value)))
    result = predict_json(run, base["new"], "logreg")
    assert OPENED.under(outside) == []
    assert result.exit_code == 1 and result.output.startswith(f"Error: run {run} is damaged: ")
    assert result.output.count("\n") == 1


# -- payloads that load but are not the fitted model ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1, 2], "holds a list, not a dict of pipeline"),
        ({"model": 1}, "holds ['model'], not a dict of pipeline"),
        ({"pipeline": np.add}, "the pipeline is numpy.ufunc, not a fitted StandardScaler + LogisticRegression"),
    ],
    ids=["a list", "no pipeline key", "numpy.add"],
)
def test_a_payload_of_trusted_types_in_the_wrong_shape(base, run, payload, message):
    skops.io.dump(payload, run / LOGREG / "model.skops")
    refused(run, base["new"], 1, f"run {run} is damaged: {LOGREG}/model.skops: {message}")


def test_an_unfitted_pipeline(base, run):
    from sklearn.base import clone

    loaded = load_model(run, "logreg")
    skops.io.dump({"pipeline": clone(loaded.model.pipeline_)}, run / LOGREG / "model.skops")
    refused(run, base["new"], 1, f"run {run} is damaged: {LOGREG}/model.skops: the StandardScaler is not fitted")


def test_an_svm_whose_support_vectors_disagree_with_their_counts(base, run):
    loaded = load_model(run, "svm")
    svc = loaded.model.pipeline_[-1]
    svc._n_support = svc._n_support * 2  # the compiled code would read past the support vectors
    skops.io.dump({"pipeline": loaded.model.pipeline_, "calibrator": loaded.model.calibrator_},
                  run / SVM / "model.skops")
    result = invoke("predict", run, base["new"], "--model", "svm")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: run {run} is damaged: {SVM}/model.skops: the SVC's ")


def test_the_svm_payload_in_the_logreg_folder(base, run):
    shutil.copy(run / SVM / "model.skops", run / LOGREG / "model.skops")
    refused(run, base["new"], 1, f"run {run} is damaged: {LOGREG}/model.skops: holds ['calibrator', 'pipeline'], "
            "not a dict of pipeline")


def test_a_report_folder_holds_no_models(base, run, tmp_path):
    report_runs([run], out=tmp_path / "report")
    (tmp_path / "report" / "models").mkdir()
    shutil.copytree(run / "models" / "feats", tmp_path / "report" / "models" / "feats")
    refused(tmp_path / "report", base["new"], 2, f"{tmp_path / 'report'} is a report of run; it holds no models: "
            "use one of those runs.")


def test_the_untouched_run_loads(base):
    loaded = load_model(base["run"], "svm")
    assert loaded.classes == list(CLASSES) and loaded.model.n_features_in_ == 512
    assert load_run(base["run"]).document.kind == "furnitype classify run"


# -- the recorded weights path is only a hint ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights_run(tmp_path_factory):
    """A run whose features were made with a weights file (random VGG16 weights saved to disk)."""
    from furnitype.keras_loader import import_keras

    root = tmp_path_factory.mktemp("weights")
    keras = import_keras()
    keras.utils.set_random_seed(3)
    weights = root / "vgg16.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(weights)
    photos = make_photo_folder(root / "photos", per_class=4, classes=CLASSES)
    feats = extract([photos], out=root / "feats.h5", **{**SMALL, "weights": str(weights)}).out
    run = classify([feats], models=["logreg"], cv=2, out=root / "run", model_params=GRIDS).path
    new = root / "new.jpg"
    photo(998, COLOURS["bed"]).save(new)
    return {"root": root, "run": run, "weights": weights, "new": new}


def _source(run: Path, value: str) -> None:
    edit(run / "metrics.json", lambda d: d["feature_sets"]["feats"]["meta"].update(weights_source=value))
    edit(run / "models/feats/settings.json", lambda d: d["meta"].update(weights_source=value))


def test_a_recorded_weights_path_is_a_hint_checked_by_its_sha256(weights_run, tmp_path):
    run = shutil.copytree(weights_run["run"], tmp_path / "run")
    elsewhere = tmp_path / "elsewhere.weights.h5"
    elsewhere.write_bytes(b"other bytes")
    _source(run, str(elsewhere))
    result = invoke("predict", run, weights_run["new"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith(f"Error: weights {elsewhere} are sha256:")
    # the user's own weights win over the hint
    result = invoke("predict", run, weights_run["new"], "--weights", weights_run["weights"], "--json")
    assert result.exit_code == 0, result.output


def test_a_recorded_weights_path_that_is_a_fifo_does_not_hang(weights_run, tmp_path):
    run = shutil.copytree(weights_run["run"], tmp_path / "run")
    fifo = tmp_path / "weights.fifo"
    os.mkfifo(fifo)
    _source(run, str(fifo))
    result = invoke("predict", run, weights_run["new"])
    assert result.exit_code == 2 and "which is not there any more; pass --weights PATH" in result.output
    result = invoke("predict", run, weights_run["new"], "--weights", fifo)
    assert result.exit_code == 2 and result.output == f"Error: weights {fifo} is not a regular file. Received: " \
        f"weights={str(fifo)!r}\n"


def test_a_recorded_weights_path_with_a_matching_sha256_is_used(weights_run, tmp_path):
    run = shutil.copytree(weights_run["run"], tmp_path / "run")
    copy_ = tmp_path / "copy.weights.h5"
    shutil.copy(weights_run["weights"], copy_)
    _source(run, str(copy_))
    result = invoke("predict", run, weights_run["new"], "--json")
    assert result.exit_code == 0, result.output
    digest = hashlib.sha256(copy_.read_bytes()).hexdigest()
    assert json.loads((run / "metrics.json").read_text())["feature_sets"]["feats"]["settings"]["weights"] == \
        f"sha256:{digest}"


def test_a_run_from_elsewhere_with_its_weights_gone(weights_run, tmp_path):
    run = shutil.copytree(weights_run["run"], tmp_path / "run")
    _source(run, "/nonexistent/vgg16.weights.h5")
    with pytest.raises(InputError, match="which is not there any more"):
        from furnitype.predict import predict

        predict(run, [weights_run["new"]])
    with pytest.raises(StoreError):
        edit(run / "metrics.json", lambda d: d["feature_sets"]["feats"]["meta"].update(weights_source=5))
        load_run(run)
