"""``furnitype extract``: rows equal Keras' own output; the cache; resumption after kill -9; bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from furnitype.cli import cli
from furnitype.errors import SettingsMismatchError, StoreError
from furnitype.extract.pipeline import ExtractSpec
from furnitype.extraction import extract
from furnitype.features import load
from tests.images import make_photo_folder, photo
from tests.processes import pause_env, signal_stopped, wait_stopped

SMALL = {"backbone": "vgg16", "weights": "none", "image_size": 32, "progress": False}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_photo_folder(tmp_path_factory.mktemp("photos") / "photos", per_class=3)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "backbone, size, pooling",
    [
        ("vgg16", 32, "avg"),
        ("vgg16", 32, "max"),
        ("vgg16", 32, "flatten"),
        ("inception", 75, "avg"),
        ("inception", 75, "flatten"),
    ],
)
def test_rows_equal_keras_own_output(photos, tmp_path, backbone, size, pooling):
    import keras

    module, builder = {"vgg16": ("vgg16", "VGG16"), "inception": ("inception_v3", "InceptionV3")}[backbone]
    app = getattr(keras.applications, module)
    keras.utils.set_random_seed(123)
    base = getattr(app, builder)(include_top=False, weights=None, input_shape=(size, size, 3))
    weights = tmp_path / f"{backbone}.weights.h5"
    base.save_weights(weights)

    out = tmp_path / "f.h5"
    result = extract(
        [photos],
        backbone=backbone,
        weights=str(weights),
        image_size=size,
        pooling=pooling,
        batch_size=4,
        out=out,
        progress=False,
    )
    rows = load(out)
    assert result.extracted == len(rows) == 6
    assert rows.meta["weights"].startswith("sha256:") and rows.meta["pooling"] == pooling

    # Keras' own output: the network that wrote the weights file, pooled by Keras' own layer (what
    # ``pooling=`` of keras.applications appends), fed by Keras' own image loading and preprocessing.
    pooled = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}
    reference = keras.Model(base.input, pooled[pooling]()(base.output)) if pooling in pooled else base
    images = [
        keras.utils.img_to_array(keras.utils.load_img(path, target_size=(size, size), interpolation="bilinear"))
        for path in (rows.paths[0], rows.paths[5])
    ]
    expected = reference.predict(app.preprocess_input(np.stack(images)), verbose=0).reshape(2, -1)
    for i, want in zip((0, 5), expected, strict=True):
        assert rows.features[i].shape == want.shape
        assert np.abs(rows.features[i] - want).max() <= 0.02 * np.abs(want).max() + 1e-6
        assert np.abs(want).max() > 0


def test_random_weights_are_seeded_and_reproducible(photos, tmp_path):
    a = extract([photos], **SMALL, out=tmp_path / "a.h5")
    args = ["extract", str(photos), "--weights", "none", "--image-size", "32", "--out", str(tmp_path / "b.h5")]
    subprocess.run([sys.executable, "-m", "furnitype.cli", *args, "--quiet"], check=True, capture_output=True)
    assert a.extracted == len(load(tmp_path / "b.h5")) == 6  # the second network is built in another process
    np.testing.assert_allclose(load(tmp_path / "a.h5").features, load(tmp_path / "b.h5").features, rtol=1e-5)
    assert load(tmp_path / "a.h5").meta["weights"] == "none(seed=0)"


def test_store_layout_and_labels(photos, tmp_path):
    out = tmp_path / "f.h5"
    extract([photos], **SMALL, out=out, store_dtype="float16")
    with h5py.File(out, "r") as h5:
        assert h5["features"].dtype == np.float16 and h5["features"].shape == (6, 512)
        assert h5["sha256"].dtype == np.dtype("S64")
        assert list(h5["classes"].asstr()[...]) == ["bed", "chair"]
        assert h5.attrs["backbone"] == "vgg16" and h5.attrs["image_size"] == 32
    rows = load(out)
    assert rows.features.dtype == np.float32
    assert list(rows.labels) == ["bed"] * 3 + ["chair"] * 3
    assert all(os.path.isabs(p) for p in rows.paths)
    assert rows.classes == ["bed", "chair"]


def test_cache_rerun_new_rename_copy_and_change(photos, tmp_path):
    folder = _copy(photos, tmp_path / "photos")
    out = tmp_path / "f.h5"
    assert extract([folder], **SMALL, out=out).extracted == 6
    before = load(out)

    again = extract([folder], **SMALL, out=out)
    assert (again.extracted, again.reused, again.rows) == (0, 6, 6)

    photo(100).save(folder / "bed" / "new.jpg")
    assert extract([folder], **SMALL, out=out).extracted == 1

    (folder / "bed" / "bed_0.jpg").rename(folder / "chair" / "moved.jpg")
    shutil.copy(folder / "chair" / "chair_0.jpg", folder / "bed" / "copy.jpg")
    moved = extract([folder], **SMALL, out=out)
    assert (moved.extracted, moved.removed, moved.relabelled, moved.rows) == (0, 0, 1, 8)  # moved: relabelled
    after = load(out)
    old = before.features[list(before.paths).index(str(folder / "bed" / "bed_0.jpg"))]
    np.testing.assert_array_equal(after.features[list(after.paths).index(str(folder / "chair" / "moved.jpg"))], old)
    assert after.labels[list(after.paths).index(str(folder / "chair" / "moved.jpg"))] == "chair"

    photo(200).save(folder / "chair" / "chair_1.jpg")  # same name, new content
    assert extract([folder], **SMALL, out=out).extracted == 1


def test_a_second_folder_adds_rows_and_keeps_the_first(photos, tmp_path):
    out = tmp_path / "f.h5"
    extract([photos], **SMALL, out=out)
    other = tmp_path / "more"
    other.mkdir()
    photo(300).save(other / "x.png")
    result = extract([other], **SMALL, out=out)
    assert (result.extracted, result.rows) == (1, 7)


def test_rerun_with_nothing_new_does_not_build_the_network(photos, tmp_path):
    out = tmp_path / "f.h5"
    extract([photos], **SMALL, out=out)
    code = (
        "import sys; from furnitype.extraction import extract; "
        f"r = extract([{str(photos)!r}], backbone='vgg16', weights='none', image_size=32, progress=False, "
        f"out={str(out)!r}); print(r.extracted, 'keras' in sys.modules, 'tensorflow' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", "False", "False"]


def test_bad_files_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    folder = make_photo_folder(tmp_path / "photos", per_class=2)
    (folder / "bed" / "empty.jpg").write_bytes(b"")
    (folder / "bed" / "text.png").write_text("not an image")
    big = tmp_path / "big.jpg"
    photo(7, size=(300, 300)).save(big)
    (folder / "chair" / "truncated.jpg").write_bytes(big.read_bytes()[:2000])
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(folder / "chair" / "grey16.png")
    photo(8).convert("CMYK").save(folder / "chair" / "cmyk.jpg")
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(folder / "chair" / "rgba.png")
    photo(9).convert("L").save(folder / "chair" / "grey.webp")
    out = tmp_path / "f.h5"

    result = extract([folder], **SMALL, out=out)
    rows = load(out)
    reasons = {Path(p).name: r for p, r in rows.skipped}
    assert reasons.keys() == {"empty.jpg", "text.png", "truncated.jpg"}
    assert reasons["empty.jpg"] == "empty file" and "not an image" in reasons["text.png"]
    assert "truncated" in reasons["truncated.jpg"]
    assert (result.extracted, result.skipped, result.rows) == (8, 3, 8)
    assert result.summary().startswith("8 extracted, 3 skipped, 11 hashed (see: furnitype info")

    tried = []
    real_load = ExtractSpec.load
    monkeypatch.setattr(ExtractSpec, "load", lambda spec, path: (tried.append(path), real_load(spec, path))[1])
    photo(10).save(folder / "bed" / "new.jpg")
    again = extract([folder], **SMALL, out=out)
    assert (again.extracted, again.skipped) == (1, 3)
    assert tried == [str(folder / "bed" / "new.jpg")]  # the same bad bytes are not tried again


def test_settings_mismatch_is_refused_unless_overwrite(photos, tmp_path):
    out = tmp_path / "f.h5"
    extract([photos], **SMALL, out=out)
    with pytest.raises(SettingsMismatchError, match=r"--pooling avg.*--pooling max"):
        extract([photos], **SMALL, pooling="max", out=out)
    with pytest.raises(SettingsMismatchError, match="--backbone vgg16"):
        extract([photos], **{**SMALL, "backbone": "inception", "image_size": 75}, out=out)
    assert extract([photos], **SMALL, pooling="max", out=out, overwrite=True).extracted == 6
    assert load(out).meta["pooling"] == "max"
    assert extract([photos], **SMALL, pooling="max", out=out, overwrite=True).extracted == 0  # same settings: kept


def test_damaged_store_is_a_clear_error(photos, tmp_path):
    out = tmp_path / "f.h5"
    extract([photos], **SMALL, out=out)
    out.write_bytes(out.read_bytes()[:3000])  # a half-copied file
    with pytest.raises(StoreError, match=r"f.h5 is damaged \(truncated file: eof = 3000.*\); --overwrite rebuilds it"):
        extract([photos], **SMALL, out=out)
    assert extract([photos], **SMALL, out=out, overwrite=True).rows == 6


def test_killed_run_resumes_and_equals_an_uninterrupted_run(tmp_path):
    """kill -9 in the middle of a batch's in-place append (written, its undo file not removed yet), then rerun."""
    folder = make_photo_folder(tmp_path / "photos", per_class=4, classes=("bed", "chair", "sofa"))
    args = ["extract", str(folder), "--weights", "none", "--image-size", "32", "--batch-size", "2", "--quiet"]
    out = tmp_path / "killed.h5"
    undo = Path(f"{out}.undo")
    proc = subprocess.Popen(
        [sys.executable, "-m", "furnitype.cli", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=pause_env("store-commit", 4),  # several batches committed, the next one written in place
    )
    assert wait_stopped(proc), "the run ended before it got to its 4th in-place commit"
    signal_stopped(proc, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert undo.exists() and not (tmp_path / "whole.h5").exists()

    resumed = extract([folder], backbone="vgg16", weights="none", image_size=32, batch_size=2, out=out, progress=False)
    assert (resumed.extracted, resumed.reused) == (4, 8)  # 4 batches committed; the 5th, rolled back, is redone
    assert not undo.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["killed.h5", "photos"]
    reference = extract(
        [folder],
        backbone="vgg16",
        weights="none",
        image_size=32,
        batch_size=2,
        out=tmp_path / "whole.h5",
        progress=False,
    )
    assert reference.extracted == 12
    a, b = load(out), load(tmp_path / "whole.h5")
    assert list(a.paths) == list(b.paths) and list(a.labels) == list(b.labels)
    assert list(a.sha256) == list(b.sha256) and a.skipped == b.skipped
    np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-6)


def test_cli_json_summary_and_info(photos, tmp_path):
    out = tmp_path / "f.h5"
    runner = CliRunner()
    result = runner.invoke(
        cli,
        ["extract", str(photos), "--weights", "none", "--image-size", "32", "--out", str(out), "--json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["extracted"], summary["rows"], summary["out"]) == (6, 6, str(out))
    info = runner.invoke(cli, ["info", str(out), "--json"], catch_exceptions=False)
    assert info.exit_code == 0, info.output
    described = json.loads(info.stdout)
    assert described["classes"] == {"bed": 3, "chair": 3} and described["meta"]["backbone"] == "vgg16"


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["extract", "{tmp}/nope"], 2, "Error: input not found: {tmp}/nope"),
        (["extract", "{photos}", "--out", "{tmp}"], 2, "Error: cannot write {tmp}: it is a folder."),
        (["extract", "{photos}", "--weights", "{tmp}/missing.h5"], 2, "Error: weights must be imagenet, none or"),
        (
            ["extract", "{photos}", "--backbone", "inception", "--image-size", "40", "--weights", "none"],
            2,
            "Error: inception needs an input of at least 75 px. Received: image_size=40",
        ),
        (["extract"], 2, "give at least one folder or image file"),
        (["info", "{tmp}/none.h5"], 2, "Error: feature file not found"),
    ],
)
def test_cli_errors_are_one_line(photos, tmp_path, args, code, message):
    args = [a.format(tmp=tmp_path, photos=photos) for a in args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, result.output
    assert message.format(tmp=tmp_path) in result.output
    assert "Traceback" not in result.output
