"""The command line's conventions (docs/cli.md): one spelling per option, choices from the API, commands in
pipeline order, exit codes, Ctrl-C, outputs checked before any work, missing folders made, JSON shapes."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import h5py
import pytest
from click.testing import CliRunner

import furnitype.extraction
import furnitype.features
import furnitype.predict
import furnitype.similar
import furnitype.suggest
import furnitype.training
from furnitype import features as store
from furnitype.classify.models import CLASS_WEIGHTS, MODEL_NAMES, model_class
from furnitype.classify.synthetic import make_features
from furnitype.cli import cli
from furnitype.engines import ENGINES
from furnitype.errors import FurnitypeError, InputError
from furnitype.extract.backbones import (
    _COPY_BYTES_PER_PIXEL,
    POOLINGS,
    PRECISIONS,
    available_memory,
    check_memory,
    get_backbone,
    list_backbones,
)
from furnitype.extract.images import DECODE_MODES, INTERPOLATIONS
from furnitype.extract.settings import STORE_DTYPES
from furnitype.extraction import extract
from furnitype.keras_loader import import_keras
from furnitype.training import classify
from tests.conftest import run_cli as invoke
from tests.images import COLOURS, make_photo_folder, photo
from tests.processes import signal_stopped, wait_stopped
from tests.test_run_output import STOP_WHILE_TRAINING

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ["extract", "info", "compact", "classify", "report", "predict", "suggest", "similar", "duplicates", "serve"]
SETTINGS = {"backbone": "vgg16", "image_size": 32, "batch_size": 8, "progress": False}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A VGG16 weights file (random, seeded), a store of 12 photos made with it, and a logreg run on it."""
    base = tmp_path_factory.mktemp("cli")
    keras = import_keras()
    keras.utils.set_random_seed(11)
    weights = base / "vgg16.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(weights)
    photos = make_photo_folder(base / "photos", per_class=4, classes=("bed", "chair", "sofa"))
    feats = extract([photos], weights=str(weights), out=base / "vgg.h5", **SETTINGS).out
    run = classify([feats], models=["logreg"], cv=3, out=base / "run").path
    return {"base": base, "weights": weights, "photos": photos, "feats": feats, "run": run}


def _one_line_error(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output and "Warning" not in result.output
    return lines[0]


# -- one command line ---------------------------------------------------------------------------------------


def test_help_lists_the_commands_in_pipeline_order_with_whole_summaries():
    result = invoke("--help")
    assert result.exit_code == 0
    listed = result.output.split("Commands:")[1]
    names = [line.split()[0] for line in listed.splitlines() if line.startswith("  ") and line[2] != " "]
    assert names == list(cli.commands)
    assert names == [name for name in PIPELINE if name in names] and {"extract", "predict", "similar"} <= set(names)
    flat = " ".join(listed.split())
    for name, command in cli.commands.items():
        summary = command.help.split("\n\n")[0]
        assert f"{name} {' '.join(summary.split())}" in flat  # the whole first sentence, not cut with "..."


def test_shared_options_have_one_spelling_on_every_command():
    spellings = {
        "out": ["--out", "-o"],
        "quiet": ["--quiet", "-q"],
        "as_json": ["--json"],
        "top_k": ["--top-k", "-k", "--k"],
        "weights": ["--weights"],
        "batch_size": ["--batch-size"],
        "workers": ["--workers"],
        "engine": ["--engine"],
        "address": ["--address"],
    }
    found = {name: set() for name in spellings}
    for command_name, command in cli.commands.items():
        for param in command.params:
            if param.name in spellings:
                assert param.opts == spellings[param.name], (command_name, param.opts)
                found[param.name].add(command_name)
    assert {"extract", "classify", "report", "predict"} <= found["out"]
    assert found["quiet"] == set(cli.commands)  # every command has -q, and --json but serve (it prints no result)
    assert found["as_json"] == set(cli.commands) - {"serve"}
    assert found["top_k"] >= {"predict", "similar"}


def test_compact_json_and_quiet_reads_as_the_other_commands(made, tmp_path):
    store = tmp_path / "vgg.h5"
    shutil.copy(made["feats"], store)
    result = invoke("compact", store, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"file": str(store), "rows": 12, "dropped": 0,
                                         "bytes_before": ANY, "bytes_after": store.stat().st_size}
    for command in (["info", store], ["report", made["run"]]):
        quiet = invoke(*command, "-q")
        assert quiet.exit_code == 0 and quiet.output == invoke(*command).output


def test_choices_are_the_apis_own():
    def choices(command: str, option: str) -> list:
        param = next(p for p in cli.commands[command].params if p.name == option)
        return list(param.type.choices)

    assert choices("extract", "backbone") == list_backbones() and "inceptionv3" in list_backbones()
    assert choices("extract", "pooling") == list(POOLINGS)
    assert choices("extract", "precision") == list(PRECISIONS)
    assert choices("extract", "store_dtype") == list(STORE_DTYPES)
    assert choices("extract", "interpolation") == list(INTERPOLATIONS)
    assert choices("extract", "decode") == list(DECODE_MODES)
    assert choices("extract", "engine") == choices("classify", "engine") == list(ENGINES)
    assert choices("predict", "model") == ["best", *MODEL_NAMES]
    assert choices("classify", "class_weight") == [str(w).lower() for w in CLASS_WEIGHTS]
    assert all(model_class(name).name == name for name in MODEL_NAMES)


def test_the_inceptionv3_alias_is_accepted(photo_folder, tmp_path):
    out = tmp_path / "inc.h5"
    result = invoke("extract", photo_folder, "--backbone", "inceptionv3", "--weights", "none",
                    "--image-size", "75", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert store.read_meta(out)["backbone"] == "inception"


def test_top_k_and_k_are_one_option(made):
    outputs = [
        invoke("similar", made["feats"], made["photos"] / "bed" / "bed_0.jpg", flag, "2", "--json").stdout
        for flag in ("--top-k", "-k", "--k")
    ]
    assert outputs[0] == outputs[1] == outputs[2] and len(json.loads(outputs[0])[0]["neighbours"]) == 2
    result = invoke("predict", made["run"], made["photos"] / "bed", "--k", "1", "--json", "-q")
    assert result.exit_code == 0, result.output
    assert {len(row["top_k"]) for row in json.loads(result.stdout)} == {1}


# -- exit codes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"pooling": "median"}, "pooling must be one of avg, max, flatten. Received: pooling='median'"),
        ({"precision": "int4"}, "precision must be one of"),
        ({"backbone": "resnet"}, "unknown backbone 'resnet'"),
        ({"image_size": 8}, "vgg16 needs an input of at least 32 px. Received: image_size=8"),
        ({"weights": "no-such-file.h5"}, "weights must be imagenet, none or an existing file"),
        ({"batch_size": 0}, "batch size must be at least 1"),
    ],
)
def test_a_bad_option_is_an_input_error_through_the_api_as_on_the_command_line(photo_folder, tmp_path, options,
                                                                               message):
    settings = {"backbone": "vgg16", "weights": "none", "image_size": 32, "progress": False, **options}
    with pytest.raises(InputError, match=re.escape(message)) as raised:
        extract([photo_folder], out=tmp_path / "f.h5", **settings)
    assert raised.value.exit_code == 2
    assert not list(tmp_path.iterdir())


def test_bad_choices_and_bad_values_exit_2_on_the_command_line(photo_folder, tmp_path):
    assert invoke("extract", photo_folder, "--pooling", "median").exit_code == 2
    line = _one_line_error(invoke("extract", photo_folder, "--weights", tmp_path / "none.h5"), 2)
    assert "weights must be imagenet, none or an existing file" in line
    line = _one_line_error(invoke("extract", photo_folder, "--weights", "none", "--image-size", "8"), 2)
    assert line == "Error: vgg16 needs an input of at least 32 px. Received: image_size=8"


def test_an_image_size_that_cannot_fit_is_refused_with_the_reason(photo_folder, tmp_path):
    line = _one_line_error(
        invoke("extract", photo_folder, "--weights", "none", "--image-size", "100000", "--out", tmp_path / "f.h5"), 2
    )
    assert line == (
        "Error: image size must be at most 1024 px (a network's memory grows with its square). "
        "Received: image_size=100000"
    )
    line = _one_line_error(
        invoke("extract", photo_folder, "--weights", "none", "--image-size", "1024", "--batch-size", "100000",
               "--out", tmp_path / "f.h5"),
        2,
    )
    assert re.fullmatch(
        r"Error: a batch of 100000 photos of 1024 px does not fit: vgg16 needs about [0-9.,]+ TB of memory for "
        r"it, and this machine has [0-9.,]+ [KMGT]B available; use a batch size of at most [0-9]+, or a smaller "
        r"image size\.",
        line,
    ), line
    assert not list(tmp_path.iterdir())
    vgg16 = get_backbone("vgg16")
    with pytest.raises(InputError, match=r"image_size=100000 does not fit: vgg16 needs about [0-9.,]+ TB .* the "
                                         r"largest that fits is about [0-9]+ px\."):
        check_memory(vgg16, 100000)
    per_photo = 500 * 500 * (vgg16.bytes_per_pixel + _COPY_BYTES_PER_PIXEL)
    too_many = available_memory() // per_photo + 1
    with pytest.raises(InputError, match=f"a batch of {too_many} photos of 500 px does not fit.*at most"):
        check_memory(vgg16, 500, too_many)
    check_memory(vgg16, 224, 32)


def _weights_file_like(source: Path, path: Path, transform) -> Path:
    """A copy of a weights file with every array passed through ``transform(name, array)``."""

    def copy(name: str, item) -> None:
        if isinstance(item, h5py.Dataset):
            dst.create_dataset(name, data=transform(name, item[...]))

    with h5py.File(source, "r") as src, h5py.File(path, "w") as dst:
        src.visititems(copy)
    return path


def test_a_wrong_weights_file_is_one_line_naming_what_it_holds(made, photo_folder, tmp_path):
    line = _one_line_error(
        invoke("extract", photo_folder, "--backbone", "inception", "--weights", made["weights"], "--out",
               tmp_path / "f.h5"),
        2,
    )
    assert line == (
        f"Error: {made['weights']} does not hold inception conv-base weights (376 arrays of 21,802,784 numbers): "
        "it holds vgg16 conv-base weights."
    )
    half = _weights_file_like(made["weights"], tmp_path / "half.weights.h5",
                              lambda name, a: a if "conv2d_1" not in name else a[..., :1])
    assert "it holds 26 arrays of" in _one_line_error(invoke("extract", photo_folder, "--weights", half), 2)
    (tmp_path / "text.h5").write_text("not HDF5")
    line = _one_line_error(invoke("extract", photo_folder, "--weights", tmp_path / "text.h5"), 2)
    assert line.startswith(f"Error: {tmp_path / 'text.h5'} is not a Keras weights file (HDF5)")
    assert not (tmp_path / "f.h5").exists()


def test_weights_that_keras_cannot_load_are_one_line_without_its_warnings(made, photo_folder, tmp_path):
    swapped = _weights_file_like(made["weights"], tmp_path / "swapped.weights.h5",
                                 lambda name, a: a.reshape(3, 3, 64, 3) if a.shape == (3, 3, 3, 64) else a)
    runner = CliRunner()
    result = runner.invoke(cli, ["extract", str(photo_folder), "--weights", str(swapped), "--image-size", "33",
                                 "--out", str(tmp_path / "f.h5"), "-q"])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "Skipping" not in result.stderr
    assert result.stderr.startswith(f"Error: could not load vgg16 weights from {swapped} (A total of 1 objects")
    assert "variable.shape=(3, 3, 3, 64), Received: value.shape=(3, 3, 64, 3)" in result.stderr


# -- a store is the source of its settings ------------------------------------------------------------------


def test_extract_into_a_store_takes_every_setting_not_given_from_it(made, tmp_path):
    weights = Path(shutil.copy(made["weights"], tmp_path / "mine.weights.h5"))
    same = tmp_path / "same.h5"
    extract([made["photos"]], weights=str(weights), out=same, **SETTINGS)  # 12 rows, image size 32
    new = make_photo_folder(tmp_path / "new", per_class=2, classes=("bed", "sofa"), size=(52, 44))
    sofas = make_photo_folder(tmp_path / "sofas", per_class=2, classes=("sofa",), size=(60, 50))
    manifest = tmp_path / "labels.csv"
    photo(900, COLOURS["chair"], (44, 52)).save(tmp_path / "odd.jpg")
    manifest.write_text("path,label\nodd.jpg,chair\n")

    for args, rows in (([new], 16), (["--manifest", manifest], 17), ([sofas, "--label", "sofa"], 19)):
        result = invoke("extract", *args, "--out", same, "--quiet")
        assert result.exit_code == 0, result.output
        assert store.summary(same)["rows"] == rows
    settings = store.load(same).settings
    assert (settings["image_size"], settings["weights"]) == (32, store.read_meta(made["feats"])["weights"])

    refused = _one_line_error(invoke("extract", new, "--weights", "none", "--out", same), 1)
    assert refused == (
        f"Error: {same} was made with --weights {weights} ({settings['weights'][:19]}…), but this run asks for "
        "--weights none: pass that option (or leave it out) to add to it, use another --out for a new store, or "
        "--overwrite to replace it (its 19 rows are thrown away)."
    )
    other = _one_line_error(invoke("extract", new, "--backbone", "inception", "--out", same), 1)
    assert f"this run asks for --backbone {get_backbone('inception').name}, --weights imagenet, --image-size 299:" \
        in other  # another backbone takes neither the store's image size nor its weights file
    weights.write_bytes(weights.read_bytes() + b"\0")  # the recorded path now holds another file
    replaced = _one_line_error(invoke("extract", new, "--out", same), 1)
    assert replaced.startswith(f"Error: the rows of {same} were made with the weights file {weights} when it was "
                               f"{settings['weights'][:19]}…, but it is now sha256:")
    assert replaced.endswith("; pass --weights PATH to a copy of the one they were made with.")
    weights.unlink()
    gone = _one_line_error(invoke("extract", new, "--out", same), 2)
    assert gone == (
        f"Error: the rows of {same} were made with the weights file {weights} ({settings['weights'][:19]}…), "
        "which is not there any more; pass --weights PATH to a copy of it."
    )
    assert invoke("extract", new, "--weights", made["weights"], "--out", same, "-q").exit_code == 0


def test_like_makes_a_store_with_another_stores_settings(made, tmp_path):
    new = make_photo_folder(tmp_path / "new", per_class=2, classes=("bed", "sofa"), size=(52, 44))
    like = tmp_path / "like.h5"
    result = invoke("extract", new, "--like", made["feats"], "--out", like, "--quiet", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["extracted"] == 4
    made_meta, like_meta = store.read_meta(made["feats"]), store.read_meta(like)
    assert {k: like_meta[k] for k in store.SETTING_KEYS if k in like_meta} == {
        k: made_meta[k] for k in store.SETTING_KEYS if k in made_meta
    }
    assert like_meta["weights_source"] == made_meta["weights_source"]
    pooled = invoke("extract", new, "--like", made["feats"], "--pooling", "max", "--out", tmp_path / "max.h5", "-q")
    assert pooled.exit_code == 0 and store.read_meta(tmp_path / "max.h5")["pooling"] == "max"  # given wins
    missing = _one_line_error(invoke("extract", new, "--like", tmp_path / "nothing.h5", "--out", tmp_path / "x.h5"), 2)
    assert missing == f"Error: feature file not found: {tmp_path / 'nothing.h5'}"
    (tmp_path / "junk.h5").write_text("not a feature file")
    junk = _one_line_error(invoke("extract", new, "--like", tmp_path / "junk.h5", "--out", tmp_path / "x.h5"), 2)
    assert junk == f"Error: --like: {tmp_path / 'junk.h5'} is not a readable HDF5 feature file (file signature not " \
                   "found)."
    assert not (tmp_path / "x.h5").exists()


def test_address_auto_without_a_cluster_says_to_start_one_or_leave_it_out(photo_folder, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import ray._private.services as services

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_gcs_addresses", functools.cache(list))  # this machine runs no Ray cluster
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    result = invoke("extract", photo_folder, "--engine", "ray", "--address", "auto", "--weights", "none",
                    "--image-size", "32", "--quiet", "--out", tmp_path / "f.h5")
    assert _one_line_error(result, 1) == (
        "Error: cannot start or reach Ray at auto: no Ray cluster runs on this machine; start one with "
        "ray start --head, or leave --address out"
    )


# -- Ctrl-C --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, function, args",
    [
        (furnitype.extraction, "extract", ["extract", "{photos}", "--weights", "none"]),
        (furnitype.features, "summary", ["info", "x.h5"]),
        (furnitype.training, "classify", ["classify", "x.h5"]),
        (furnitype.training, "report_runs", ["report", "run"]),
        (furnitype.predict, "predict", ["predict", "run", "a.jpg"]),
        (furnitype.similar, "similar", ["similar", "x.h5", "a.jpg"]),
        (furnitype.suggest, "suggest", ["suggest", "run", "x.h5"]),
    ],
)
def test_ctrl_c_exits_130_on_every_command(monkeypatch, photo_folder, module, function, args):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, function, interrupted)
    result = CliRunner().invoke(cli, [a.format(photos=photo_folder) for a in args])
    assert result.exit_code == 130 and result.stderr == "interrupted\n" and result.stdout == ""


def test_ctrl_c_says_what_was_kept(monkeypatch, photo_folder):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt("interrupted: 30 rows kept; rerun to go on")

    monkeypatch.setattr(furnitype.extraction, "extract", interrupted)
    result = CliRunner().invoke(cli, ["extract", str(photo_folder)])
    assert (result.exit_code, result.stderr) == (130, "interrupted: 30 rows kept; rerun to go on\n")


#: The command line, stopping itself (SIGSTOP) while click parses the options: when it first reads a choice that
#: the API holds (which imports its module).
STOP_WHILE_PARSING = """
import os, signal, sys
from furnitype import cli
read_choices = cli.APIChoice.__getattr__
def stopped(self, name):
    os.kill(os.getpid(), signal.SIGSTOP)
    return read_choices(self, name)
cli.APIChoice.__getattr__ = stopped
sys.argv[0] = "furnitype"
cli.main()
"""


@pytest.mark.parametrize(
    "program, env",
    [
        (["-m", "furnitype"], {"FURNITYPE_TEST_PAUSE_AT": "cli-start"}),  # before the command line is imported
        (["-c", STOP_WHILE_PARSING], {}),
    ],
    ids=["while importing", "while parsing"],
)
def test_a_real_ctrl_c_in_the_first_moments_exits_130_with_one_line(photo_folder, tmp_path, program, env):
    proc = subprocess.Popen(
        [sys.executable, *program, "extract", str(photo_folder), "--weights", "none", "--pooling", "avg",  # a choice
         "--out", str(tmp_path / "f.h5")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )
    assert wait_stopped(proc), proc.communicate()
    signal_stopped(proc, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stderr, stdout) == (130, "interrupted\n", "")
    assert list(tmp_path.iterdir()) == []


def test_a_real_ctrl_c_during_classify(tmp_path):
    X, labels, sha = make_features([40, 40, 40], 64, seed=3)
    feats = tmp_path / "f.h5"
    store.save(feats, features=X, paths=[f"/p/{i}.jpg" for i in range(len(labels))], labels=list(labels),
               sha256=list(sha), meta={"backbone": "vgg16", "weights": "none(seed=0)"})
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(  # it stops itself when it starts fitting a model
        [sys.executable, "-c", STOP_WHILE_TRAINING, "classify", str(feats), "--models", "dense,svm", "--out",
         str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )
    assert wait_stopped(proc), proc.communicate()
    signal_stopped(proc, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert stderr.startswith("f: ") and proc.returncode == 130, stderr
    assert stderr.splitlines()[-1] == "interrupted" and "Traceback" not in stderr and stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]  # nothing half-written


# -- outputs ---------------------------------------------------------------------------------------------------


def test_every_output_is_checked_before_any_work(tmp_path):
    folder, file = tmp_path / "folder", tmp_path / "file.txt"
    folder.mkdir()
    file.write_text("mine")
    nothing = tmp_path / "no-such"  # every input is missing: the output is refused before they are looked at
    cases = [
        (["extract", nothing, "--out", folder], f"cannot write {folder}: it is a folder."),
        (["classify", nothing, "--out", file], f"cannot write {file}: it is a file, not a folder."),
        (["report", nothing, "--out", file], f"cannot write {file}: it is a file, not a folder."),
        (["predict", nothing, "a.jpg", "--out", folder], f"cannot write {folder}: it is a folder."),
        (["predict", nothing, "a.jpg", "--out", file / "p.csv"], f"cannot write {file / 'p.csv'}: {file} is not a"),
        (["similar", nothing, "a.jpg", "--sheet", folder], f"cannot write {folder}: it is a folder."),
    ]
    for args, message in cases:
        assert _one_line_error(invoke(*args), 2).startswith(f"Error: {message}"), args
    assert file.read_text() == "mine" and not list(folder.iterdir())


def test_an_output_name_too_long_for_the_files_beside_it_is_refused_before_any_work(made, tmp_path):
    """A 250-byte name is valid, but ``.NAME.tmp-PID`` beside it is not: refused at once, not after the work."""
    nothing = tmp_path / "no-such"
    long = tmp_path / ("n" * 246)
    cases = [
        ["extract", nothing, "--out", f"{long}.h5"],
        ["classify", nothing, "--out", long],
        ["report", nothing, "--out", long],
        ["predict", nothing, "a.jpg", "--out", f"{long}.csv"],
        ["similar", nothing, "a.jpg", "--sheet", f"{long}.png"],
        ["suggest", nothing, nothing, "--out", f"{long}.csv"],
        ["extract", nothing, "--out", tmp_path / ("d" * 256) / "f.h5"],  # a missing folder above it, too long
    ]
    for args in cases:
        line = _one_line_error(invoke(*args), 2)
        assert line.startswith(f"Error: cannot write {args[-1]}: the name ") and "bytes long" in line, args
    assert not list(tmp_path.iterdir())
    longest = tmp_path / ("n" * 238 + ".csv")  # 242 bytes: its temporary file still fits
    photo = made["photos"] / "bed" / "bed_0.jpg"
    assert invoke("predict", made["run"], photo, "--out", longest, "-q").exit_code == 0 and longest.is_file()


def test_an_output_never_replaces_an_input_or_another_output(made, tmp_path):
    """A typo in --out or --sheet must not turn the feature file, a query photo or a run's files into a CSV/PNG."""
    feats = tmp_path / "vgg.h5"
    feats.write_bytes(Path(made["feats"]).read_bytes())
    query = tmp_path / "query.jpg"
    query.write_bytes((made["photos"] / "bed" / "bed_0.jpg").read_bytes())
    link = tmp_path / "link.h5"
    link.symlink_to(feats)
    run, metrics = made["run"], made["run"] / "metrics.json"
    weights = tmp_path / "vgg16.weights.h5"
    weights.write_bytes(made["weights"].read_bytes())
    before = {path: path.read_bytes() for path in (feats, query, metrics, weights, made["weights"])}
    csv_out = tmp_path / "to-label.csv"
    hard = tmp_path / "hard.h5"
    os.link(feats, hard)
    holding_run = tmp_path / "run-holding"  # a run folder a store was put in, and a folder holding a run
    shutil.copytree(run, holding_run)
    inner = holding_run / "inner.h5"
    inner.write_bytes(feats.read_bytes())
    holding_report = tmp_path / "report-holding"
    shutil.copytree(run, holding_report / "their-run")
    cases = [
        (["similar", feats, query, "--sheet", hard, "--overwrite"], f"--sheet {hard} is one of the inputs"),
        (["predict", run, query, "--features", feats, "--out", feats, "--overwrite"], f"--out {feats} is one of the"),
        (["predict", run, query, "--features", link, "--out", feats, "--overwrite"], f"--out {feats} is one of the"),
        (["classify", inner, "--models", "logreg", "--out", holding_run, "--overwrite"],
         f"--out {holding_run} holds {inner}, which this command reads"),
        (["report", holding_report / "their-run", "--out", holding_report, "--overwrite"],
         f"--out {holding_report} holds {holding_report / 'their-run'}, which this command reads"),
        (["similar", feats, query, "--sheet", feats], f"--sheet {feats} is one of the inputs"),
        (["similar", feats, query, "--sheet", link], f"--sheet {link} is one of the inputs"),
        (["similar", feats, query, "--sheet", query], f"--sheet {query} is one of the inputs"),
        (["predict", run, query, "--out", query], f"--out {query} is one of the inputs"),
        (["predict", run, query, "--out", metrics], f"--out {metrics} would replace a file of {run}"),
        (["suggest", run, feats, "--out", feats, "--overwrite"], f"--out {feats} is one of the inputs"),
        (["suggest", run, feats, "--out", csv_out, "--sheet", csv_out], f"--sheet {csv_out} is also --out"),
        (["report", run, "--mistakes", metrics], f"--mistakes {metrics} would replace a file of {run}"),
        (["extract", query, "--weights", "none", "--out", query, "--overwrite"], f"--out {query} is one of the inputs"),
        # the weights file is read too: given, or the one the run or store records
        (["extract", query, "--weights", weights, "--image-size", "32", "--out", weights, "--overwrite"],
         f"--out {weights} is one of the inputs"),
        (["predict", run, query, "--weights", weights, "--out", weights, "--overwrite"],
         f"--out {weights} is one of the inputs"),
        (["predict", run, query, "--out", made["weights"], "--overwrite"], f"--out {made['weights']} is one of the"),
        (["similar", feats, query, "--sheet", made["weights"], "--overwrite"], f"--sheet {made['weights']} is one"),
    ]
    for args, message in cases:
        assert _one_line_error(invoke(*args), 2).startswith(f"Error: {message}"), args
    assert {path: path.read_bytes() for path in before} == before and not csv_out.exists()
    assert inner.read_bytes() == feats.read_bytes() and (holding_report / "their-run" / "metrics.json").exists()
    new_file = run / "predictions.csv"  # a new file inside a run's folder replaces nothing
    result = invoke("predict", run, query, "--out", new_file, "-q")
    new_file.unlink()
    assert result.exit_code == 0, result.output


def _mistakes_naming(run: Path, photo: Path) -> None:
    """Make ``run``'s mistakes.csv list ``photo`` (a copy of a run)."""
    with open(run / "mistakes.csv", "a", encoding="utf-8") as fh:
        fh.write(f"vgg,logreg,misclassified,{photo},bed,chair,0.9,0.1,{'0' * 64}\n")


def test_an_output_never_replaces_a_photo_the_command_lists_reads_or_draws(made, tmp_path):
    """Every photo a command lists (a folder's), reads or draws (a neighbour, a suggestion, a listed mistake) is an
    input: refused before the work, with or without --overwrite, and the error never suggests --overwrite."""
    photos = shutil.copytree(made["photos"], tmp_path / "p")
    listed, link = photos / "bed" / "bed_0.jpg", tmp_path / "link.jpg"
    link.symlink_to(photos / "chair" / "chair_1.jpg")
    stored = made["photos"] / "sofa" / "sofa_2.jpg"  # a row of made["feats"]: drawn as a neighbour, suggested
    run = shutil.copytree(made["run"], tmp_path / "run")
    _mistakes_naming(run, listed)
    weights = ["--weights", made["weights"], "--image-size", "32", "-q"]
    every = [*photos.rglob("*.jpg"), *made["photos"].rglob("*.jpg")]
    before = {path: path.read_bytes() for path in every}
    manifest = tmp_path / "labels.csv"
    manifest.write_text(f"path,label\n{listed},bed\n")
    cases = [
        (["extract", photos, *weights, "--out", listed], listed, listed),
        (["extract", "--manifest", manifest, *weights, "--out", listed], listed, listed),
        (["extract", photos, *weights, "--out", link], link, photos / "chair" / "chair_1.jpg"),
        (["predict", made["run"], photos, "--out", listed], listed, listed),
        (["similar", made["feats"], photos, "--sheet", listed], listed, listed),
        (["similar", made["feats"], listed, "--sheet", stored], stored, stored),
        (["suggest", made["run"], made["feats"], "--sheet", stored], stored, stored),
        (["suggest", made["run"], made["feats"], "--out", stored], stored, stored),
        (["report", run, "--mistakes", listed], listed, listed),
    ]
    for args, output, read in cases:
        option = args[-2]
        for overwrite in ([], ["--overwrite"]):
            line = _one_line_error(invoke(*args, *overwrite), 2)
            assert line == f"Error: {option} {output} is one of the photos this command reads ({read}); choose " \
                           "another path.", (args, overwrite)
    assert {path: path.read_bytes() for path in every} == before


def test_an_existing_file_is_replaced_only_with_overwrite(made, tmp_path):
    """One rule for every file output: an existing file (a feature store named by a typo too) is kept, and the
    error says how to replace it; with --overwrite it is replaced. A new file needs nothing."""
    photo = made["photos"] / "bed" / "bed_0.jpg"
    new = tmp_path / "new.jpg"  # a photo the run never saw, in a store suggest can draw from
    new.write_bytes((made["photos"] / "chair" / "chair_0.jpg").read_bytes()[:-1] + b"\x00")
    fs = store.load(made["feats"])
    feats = tmp_path / "new.h5"
    store.save(feats, features=fs.features[:1], paths=[str(new)], labels=[""], meta=fs.meta,
               sha256=[hashlib.sha256(new.read_bytes()).hexdigest()])
    cases = [
        (["predict", made["run"], photo, "-q", "--out"], "--out"),
        (["similar", made["feats"], photo, "-q", "--sheet"], "--sheet"),
        (["suggest", made["run"], feats, "--out", tmp_path / "s.csv", "--sheet"], "--sheet"),
        (["report", made["run"], "--mistakes"], "--mistakes"),
    ]
    for args, option in cases:
        mine = tmp_path / f"mine{option}"
        mine.write_text("mine")
        line = _one_line_error(invoke(*args, mine), 2)
        assert line == f"Error: {mine} already exists; choose another {option}, or --overwrite to replace it.", args
        assert mine.read_text() == "mine" and not (tmp_path / "s.csv").exists()
        result = invoke(*args, mine, "--overwrite")
        assert result.exit_code == 0, (args, result.output)
        assert mine.read_bytes() != b"mine"
        (tmp_path / "s.csv").unlink(missing_ok=True)
    kept = tmp_path / "vgg.h5"
    kept.write_bytes(Path(made["feats"]).read_bytes())
    line = _one_line_error(invoke("report", made["run"], "--mistakes", kept), 2)
    assert line == f"Error: {kept} already exists; choose another --mistakes, or --overwrite to replace it."
    assert kept.read_bytes() == Path(made["feats"]).read_bytes()


def test_only_extract_suggests_overwrite_for_a_damaged_or_foreign_store(made, tmp_path):
    """``--overwrite rebuilds it`` is said by the one command that has the option."""
    junk, torn = tmp_path / "junk.h5", tmp_path / "torn.h5"
    junk.write_bytes(b"not a feature file")
    torn.write_bytes(Path(made["feats"]).read_bytes()[:3000])
    photo = made["photos"] / "bed" / "bed_0.jpg"
    for file, problem in ((junk, "is not a readable HDF5 feature file (file signature not found)"),
                          (torn, "is damaged (")):
        for args in (["info", file], ["compact", file], ["classify", file, "--out", tmp_path / "run"],
                     ["similar", file, photo], ["suggest", made["run"], file, "--out", tmp_path / "s.csv"]):
            line = _one_line_error(invoke(*args), 1)
            assert line.startswith(f"Error: {file} {problem}") and "overwrite" not in line, (args, line)
        line = _one_line_error(invoke("extract", photo, "--weights", made["weights"], "--image-size", "32", "-q",
                                      "--out", file), 1)
        assert line.startswith(f"Error: {file} {problem}") and line.endswith("; --overwrite rebuilds it."), line
        assert invoke("extract", photo, "--weights", made["weights"], "--image-size", "32", "-q", "--out", file,
                      "--overwrite").exit_code == 0


def test_a_killed_writers_leftover_with_this_process_id_does_not_block_an_output(made, tmp_path):
    """A restarted container gives its processes the ids they had before: the ``.NAME.tmp-PID`` a killed writer
    left has this process's name. It is replaced (a link as a link), not a ``File exists`` for ever."""
    photo = made["photos"] / "bed" / "bed_0.jpg"
    out = tmp_path / "p.csv"
    leftover = tmp_path / f".p.csv.tmp-{os.getpid()}"  # invoke runs in this process: its id
    leftover.write_text("half a file")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")

    result = invoke("predict", made["run"], photo, "--out", out, "-q")

    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("path,label") and not leftover.exists()
    leftover.symlink_to(victim)
    result = invoke("predict", made["run"], photo, "--out", out, "-q", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not os.path.lexists(leftover) and victim.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "victim.txt"]


def test_every_command_makes_missing_parent_folders(made, tmp_path):
    new = tmp_path / "new"
    photo = made["photos"] / "chair" / "chair_1.jpg"
    commands = [
        ["extract", photo, "--weights", made["weights"], "--image-size", "32", "--out", new / "a" / "f.h5", "-q"],
        ["classify", made["feats"], "--models", "logreg", "--cv", "3", "--out", new / "b" / "run", "-q"],
        ["report", made["run"], "--out", new / "c" / "merged"],
        ["predict", made["run"], photo, "--out", new / "d" / "p.csv", "-q"],
        ["similar", made["feats"], photo, "--sheet", new / "e" / "s.png", "-q"],
    ]
    for args in commands:
        result = invoke(*args)
        assert result.exit_code == 0, (args, result.output)
    assert (new / "a" / "f.h5").is_file() and (new / "b" / "run" / "report.html").is_file()
    assert (new / "c" / "merged" / "report.html").is_file() and (new / "d" / "p.csv").is_file()
    assert (new / "e" / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_an_unwritable_output_is_refused_before_any_work(made, tmp_path):
    """As root, but without the capability to override file permissions: a read-only folder is read-only."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    done = subprocess.run(
        [*drop, sys.executable, "-m", "furnitype.cli", "predict", str(made["run"]), str(made["photos"]),
         "--out", str(locked / "sub" / "p.csv")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"Error: cannot write {locked / 'sub' / 'p.csv'}: permission denied in {locked}.\n"
    assert "loading" not in done.stderr and not list(locked.iterdir())


def test_unreadable_inputs_are_the_api_s_one_line_or_row_not_a_usage_error(made, tmp_path):
    """Without the capability to override file permissions: an unreadable photo is a row with its reason (as a
    broken one is), an unreadable feature file or run file one line naming it."""
    photo_file, feats, run = tmp_path / "locked.jpg", tmp_path / "locked.h5", tmp_path / "run"
    photo_file.write_bytes((made["photos"] / "bed" / "bed_0.jpg").read_bytes())
    feats.write_bytes(Path(made["feats"]).read_bytes())
    shutil.copytree(made["run"], run)
    for path in (photo_file, feats, run / "metrics.json"):
        path.chmod(0)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]

    def furnitype(*args) -> subprocess.CompletedProcess:
        command = [*drop, sys.executable, "-m", "furnitype.cli", *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    done = furnitype("predict", made["run"], photo_file, "--json", "-q")
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)
    assert row["error"] == "unreadable: Permission denied" and row["label"] is None
    done = furnitype("info", feats)
    assert (done.returncode, done.stderr) == (2, f"Error: cannot read {feats}: Permission denied\n")
    done = furnitype("report", run)
    assert (done.returncode, done.stderr) == (1, f"Error: cannot read {run / 'metrics.json'}: Permission denied\n")


# -- what the commands print ---------------------------------------------------------------------------------


def _significant(value: float) -> bool:
    return value == float(f"{value:.6g}")


def test_json_shows_names_that_are_not_utf8_with_x_escapes_that_strict_parsers_accept(made, tmp_path):
    """A lone surrogate (``\\udce9``) is not valid JSON text for strict parsers; the bytes are shown as ``\\xe9``."""
    folder = os.fsencode(tmp_path / "odd")
    os.mkdir(folder)
    with open(folder + b"/caf\xe9.jpg", "wb") as fh:
        fh.write((made["photos"] / "bed" / "bed_0.jpg").read_bytes())
    shown = f"{tmp_path / 'odd'}/caf\\xe9.jpg"

    def strict(output: str):
        output.encode("utf-8")  # a lone surrogate in the text fails here
        return json.loads(output)

    similar = invoke("similar", made["feats"], os.fsdecode(folder), "--json", "-q")
    assert similar.exit_code == 0 and strict(similar.output)[0]["query"] == shown
    predict = invoke("predict", made["run"], os.fsdecode(folder), "--json", "-q")
    assert predict.exit_code == 0 and strict(predict.output)[0]["path"] == shown
    extract_ = invoke("extract", os.fsdecode(folder), "--weights", made["weights"], "--image-size", "32", "--json",
                      "-q", "--out", tmp_path / "odd.h5")
    assert extract_.exit_code == 0 and strict(extract_.stdout)["skipped_files"][0]["path"] == shown


def test_json_shapes_null_for_missing_and_six_significant_digits(made, tmp_path):
    loose = tmp_path / "loose.jpg"
    photo(77, COLOURS["sofa"]).save(loose)
    result = invoke("predict", made["run"], loose, tmp_path / "gone.jpg", "--json", "-q")
    assert result.exit_code == 0, result.output
    found, gone = json.loads(result.stdout)
    assert found["given_label"] is None and re.fullmatch("[0-9a-f]{64}", found["sha256"]) and found["error"] is None
    assert _significant(found["probability"]) and all(_significant(t["probability"]) for t in found["top_k"])
    assert gone == {"path": str(tmp_path / "gone.jpg"), "label": None, "probability": None, "top_k": [],
                    "given_label": None, "sha256": None, "error": "file not found", "in_training": False}

    [match] = json.loads(invoke("similar", made["feats"], loose, "--json", "-q").stdout)
    assert match["label"] is None and match["error"] is None and not match["in_store"]
    assert all(_significant(n["distance"]) and n["label"] for n in match["neighbours"])

    rows = json.loads(invoke("report", made["run"], "--json").stdout)["rows"]
    digest = store.read_meta(made["feats"])["weights"]
    assert re.fullmatch("sha256:[0-9a-f]{64}", digest)
    assert rows[0]["weights"] == f"file {digest[7:15]}" and rows[0]["weights_identity"] == digest
    floats = [v for row in rows for v in row.values() if isinstance(v, float)]
    assert floats and all(_significant(v) and not math.isnan(v) for v in floats)


def test_predict_rows_come_in_the_order_given(made):
    photos = made["photos"]
    given = [photos / "sofa" / "sofa_2.jpg", photos / "bed", photos / "chair" / "chair_0.jpg"]
    result = invoke("predict", made["run"], *given, "--json", "-q")
    paths = [Path(row["path"]) for row in json.loads(result.stdout)]
    assert paths == [given[0], *sorted((photos / "bed").glob("*.jpg")), given[2]]
    invoke("predict", made["run"], *given, "--out", made["base"] / "order.csv", "-q")
    lines = (made["base"] / "order.csv").read_text().splitlines()[1:]
    assert [Path(line.split(",")[0]) for line in lines] == paths


def test_json_keeps_the_progress_on_stderr_with_a_loading_line(photo_folder, tmp_path):
    runner = CliRunner()
    args = ["extract", str(photo_folder), "--weights", "none", "--image-size", "41", "--out", str(tmp_path / "f.h5")]
    result = runner.invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["extracted"] == 6
    pieces = re.split(r"[\r\n]", result.stderr)
    assert "loading vgg16 (random weights) on CPU ..." in pieces  # a line of its own, not glued to the bar
    assert "\r" not in result.stderr and "img/s" not in result.stderr  # no bar off a terminal (test_progress.py)
    quiet = runner.invoke(cli, [*args[:-1], str(tmp_path / "g.h5"), "--json", "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_progress_lines_are_printed_once_where_the_root_logger_has_a_handler(photo_folder, tmp_path):
    """absl (TensorFlow's logging, as int8's conversion calls it) gives the root logger a handler on its first call."""
    code = ("from absl import logging; logging.info('absl starts'); from furnitype.__main__ import main; main()")
    done = subprocess.run([sys.executable, "-c", code, "extract", str(photo_folder), "--weights", "none",
                           "--image-size", "32", "--out", str(tmp_path / "f.h5")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[0] == "loading vgg16 (random weights) on CPU ..."
    assert "furnitype:" not in done.stderr and done.stderr.count("loading vgg16") == 1


def test_scores_in_report_csv_have_six_significant_digits(made):
    import csv

    with open(made["run"] / "report.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row["weights_identity"].startswith("sha256:")
    for key in ("accuracy", "log_loss", "fit_seconds", "predict_ms_per_image"):
        assert _significant(float(row[key])), (key, row[key])


def test_keras_download_lines_stand_apart_from_the_bar(photo_folder, tmp_path, monkeypatch):
    """ImageNet weights through a proxy that refuses: Keras announces the download, then fails at once."""
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    result = CliRunner().invoke(cli, ["extract", str(photo_folder), "--image-size", "42", "--out",
                                      str(tmp_path / "f.h5")])
    assert result.exit_code == 1, result.output
    pieces = re.split(r"[\r\n]", result.stderr)
    assert "loading vgg16 (imagenet weights) on CPU ..." in pieces
    assert any(re.fullmatch(r"Downloading data from https://\S+notop\.h5", piece) for piece in pieces)
    error = result.stderr.splitlines()[-1]
    assert error.startswith("Error: could not get the ImageNet weights for vgg16 (")
    assert "what works offline: --weights PATH" in error and error.endswith("or --weights none (random weights).")


def test_extract_json_lists_the_skipped_files_with_their_reasons(photo_folder, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(photo_folder, folder)
    (folder / "bed" / "empty.jpg").write_bytes(b"")
    (folder / "chair" / "notes.jpg").write_text("not a photo")
    args = ["extract", folder, "--weights", "none", "--image-size", "32", "--out", tmp_path / "f.h5", "--json", "-q"]
    for _ in range(2):  # the second time the files are unchanged: skipped again, by their recorded reasons
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["skipped"] == 2 and sorted(summary["skipped_files"], key=lambda s: s["path"]) == [
            {"path": str(folder / "bed" / "empty.jpg"), "reason": "empty file"},
            {"path": str(folder / "chair" / "notes.jpg"), "reason": "not an image (unrecognised format)"},
        ]
        assert summary["warnings"] == []
        rounded = summary["seconds"]  # rounding, not speed: 6 significant digits
        assert _significant(rounded)


def test_the_command_line_starts_without_the_heavy_libraries():
    """``furnitype --help`` (and any command before it needs them) imports neither numpy, Pillow, h5py,
    scikit-learn nor TensorFlow: the choices are read from the API when an option is parsed or shown."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = ("import sys; from click.testing import CliRunner; from furnitype.cli import cli; "
            "assert CliRunner().invoke(cli, ['--help']).exit_code == 0; "
            "print(sorted(m for m in ('numpy', 'PIL', 'h5py', 'sklearn', 'tensorflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_messages_show_a_sha256_by_its_first_12_digits(made, tmp_path):
    store_file = tmp_path / "vgg.h5"
    shutil.copy(made["feats"], store_file)
    identity = store.read_meta(store_file)["weights"]
    line = _one_line_error(invoke("extract", made["photos"], "--weights", "none", "--image-size", "32",
                                  "--out", store_file), 1)
    assert f"{identity[:19]}…" in line and not re.search("[0-9a-f]{13}", line), line
    assert FurnitypeError(f"see /p/{'ab' * 32}.jpg").args[0] == f"see /p/{'ab' * 32}.jpg"  # file names are kept
