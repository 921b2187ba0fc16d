"""``--precision int8``: OpenVINO + NNCF quantization calibrated on the photos, its cache and its record."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from furnitype.errors import FurnitypeError, InputError, SettingsMismatchError
from furnitype.extract import int8, pipeline
from furnitype.extract.backbones import weights_identity
from furnitype.extract.pipeline import ExtractSpec, feature_batches
from furnitype.extract.settings import spec_for
from furnitype.extraction import extract
from furnitype.features import load
from furnitype.training import classify
from tests.conftest import run_cli
from tests.images import COLOURS, make_photo_folder, photo

SMALL = {"backbone": "vgg16", "weights": "none", "image_size": 32, "progress": False}
CLASSES = ("bed", "chair", "sofa")


@pytest.fixture(scope="module")
def openvino_installed() -> None:
    """Skips a test that quantizes where the int8 extra (OpenVINO, NNCF) is not installed; CI installs it."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")


needs_openvino = pytest.mark.usefixtures("openvino_installed")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """36 photos: enough to calibrate (at least ``MIN_CALIBRATION_PHOTOS``)."""
    return make_photo_folder(tmp_path_factory.mktemp("photos") / "photos", per_class=12, classes=CLASSES)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Each test its own empty cache of quantized networks."""
    monkeypatch.setenv("FURNITYPE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "int8"


@pytest.fixture(scope="module")
def made(openvino_installed, photos, tmp_path_factory) -> Path:
    """The cache file of the quantized network of ``photos`` (``SMALL`` settings), made once for the module."""
    folder = tmp_path_factory.mktemp("made")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FURNITYPE_CACHE_DIR", str(folder / "cache"))
        extract([photos], **SMALL, precision="int8", out=folder / "f.h5")
    _new_process()
    [network] = _cache_files(folder / "cache" / "int8")
    return network


@pytest.fixture
def warm_cache(made, cache) -> None:
    """``cache`` holding the network of ``photos`` already, as an earlier run made it: for the tests whose point
    is not the making (copied from ``made``, since each quantization takes seconds)."""
    cache.mkdir(parents=True)
    shutil.copy(made, cache / made.name)


with_made_network = pytest.mark.usefixtures("warm_cache")


def _cache_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.zip"))


def _relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


@needs_openvino
@pytest.mark.parametrize("backbone, size", [("vgg16", 32), ("inception", 75)])
def test_int8_features_are_close_to_float32_and_record_their_network(photos, tmp_path, cache, backbone, size):
    settings = {**SMALL, "backbone": backbone, "image_size": size}
    f32 = load(extract([photos], **settings, out=tmp_path / "f32.h5").out)
    result = extract([photos], **settings, precision="int8", out=tmp_path / "int8.h5")
    quantized = load(result.out)

    assert result.extracted == 36 and list(quantized.sha256) == list(f32.sha256)
    difference = _relative(quantized.features, f32.features)
    assert 0 < np.median(difference) < 0.05 and difference.max() < 0.15  # int8 indeed, and close
    meta = quantized.meta
    assert meta["precision"] == "int8"
    recorded = int8.Quantization.parse(meta["quantization"], meta["calibration_photos"])
    assert len(recorded.photos) == 36 and {sha for _, sha in recorded.photos} == set(quantized.sha256)
    [cached] = _cache_files(cache)
    with zipfile.ZipFile(cached) as archive:
        manifest = json.loads(archive.read("manifest.json"))
    assert manifest["network"] == recorded.network and manifest["made_from"]["backbone"] == backbone


@needs_openvino
def test_the_quantized_network_is_made_once_and_reused(photos, tmp_path, cache):
    first = load(extract([photos], **SMALL, precision="int8", out=tmp_path / "a.h5").out)
    [cached] = _cache_files(cache)
    made = cached.stat()
    second = load(extract([photos], **SMALL, precision="int8", out=tmp_path / "b.h5").out)
    assert _cache_files(cache) == [cached] and cached.stat().st_ino == made.st_ino
    assert first.meta["quantization"] == second.meta["quantization"]
    np.testing.assert_array_equal(first.features, second.features)


def _with_zip_headers(data: bytes, offsets: dict[bytes, int], change) -> bytes:
    """``data`` with the field at ``offsets[signature]`` of every local and central zip header changed."""
    changed = bytearray(data)
    for signature, offset in offsets.items():
        at = changed.find(signature)
        while at >= 0:
            changed[at + offset] = change(changed[at + offset])
            at = changed.find(signature, at + 4)
    return bytes(changed)


LOCAL, CENTRAL = b"PK\x03\x04", b"PK\x01\x02"


@needs_openvino
@with_made_network
@pytest.mark.parametrize("damage", ["truncate", "flip", "symlink", "manifest-list", "encrypted", "unknown-method",
                                    "fifo"])
def test_a_damaged_cache_file_is_rebuilt_never_trusted(photos, tmp_path, cache, damage):
    reference = load(extract([photos], **SMALL, precision="int8", out=tmp_path / "a.h5").out)
    [cached] = _cache_files(cache)
    data = cached.read_bytes()
    elsewhere = tmp_path / "elsewhere.zip"
    if damage == "truncate":
        cached.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # a flipped byte inside the weights: the zip's CRC or the network's hash catches it
        middle = len(data) // 2
        cached.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    elif damage == "manifest-list":  # a whole zip, but its manifest is JSON of another shape
        with zipfile.ZipFile(cached) as archive:
            members = {name: archive.read(name) for name in archive.namelist()}
        with zipfile.ZipFile(cached, "w") as archive:
            for name, member in {**members, "manifest.json": b"[]"}.items():
                archive.writestr(name, member)
    elif damage == "fifo":  # not a regular file: never waited on, nor read
        cached.unlink()
        os.mkfifo(cached)
    elif damage == "encrypted":  # zipfile refuses to read it (RuntimeError)
        cached.write_bytes(_with_zip_headers(data, {LOCAL: 6, CENTRAL: 8}, lambda flags: flags | 1))
    elif damage == "unknown-method":  # zipfile cannot read it (NotImplementedError)
        cached.write_bytes(_with_zip_headers(data, {LOCAL: 8, CENTRAL: 10}, lambda _method: 99))
    else:  # a link to a copy: not a file furnitype made, never read nor written through
        elsewhere.write_bytes(data)
        cached.unlink()
        cached.symlink_to(elsewhere)

    _new_process()
    again = load(extract([photos], **SMALL, precision="int8", out=tmp_path / "b.h5").out)
    assert again.meta["quantization"] == reference.meta["quantization"]
    np.testing.assert_array_equal(again.features, reference.features)
    assert not cached.is_symlink() and zipfile.ZipFile(cached).testzip() is None
    assert cached.read_bytes() == data  # rebuilt to the same bytes: the network is deterministic
    if damage == "symlink":
        assert elsewhere.read_bytes() == data and not elsewhere.is_symlink()
    assert [p.name for p in cache.iterdir()] == [cached.name]  # no temporary file left


@needs_openvino
@with_made_network
def test_a_cached_int8_network_runs_on_jax_without_tensorflow(photos, tmp_path):
    pytest.importorskip("jax")
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    out = tmp_path / "f.h5"
    extract([folder], **SMALL, precision="int8", out=out)
    photo(600, COLOURS["sofa"]).save(folder / "sofa" / "new.jpg", quality=90)
    code = "import sys; sys.modules['tensorflow'] = None; from furnitype.__main__ import main; main()"
    done = subprocess.run([sys.executable, "-c", code, "extract", str(folder), "--out", str(out), "--json"],
                          env={**os.environ, "KERAS_BACKEND": "jax"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["extracted"] == 1
    grown = load(out)
    alone = load(extract([folder / "sofa" / "new.jpg"], like=out, out=tmp_path / "one.h5", progress=False).out)
    np.testing.assert_array_equal(grown.features[list(grown.paths).index(str(folder / "sofa" / "new.jpg"))],
                                  alone.features[0])


@with_made_network
def test_rows_of_other_calibrations_are_never_mixed(photos, tmp_path):
    out = tmp_path / "f.h5"
    extract([photos], **SMALL, precision="int8", out=out)
    other = make_photo_folder(tmp_path / "other", per_class=12, classes=CLASSES, size=(60, 52))
    calibrations = (
        r"made with the int8 calibration sha256:[0-9a-f]{12}… \(36 photos\), but this run asks for the int8 "
        r"calibration sha256:[0-9a-f]{12}… \(36 photos\): leave --calibrate out to add to it, .* or --overwrite "
        r"to replace it \(its 36 rows are thrown away\)"
    )
    with pytest.raises(SettingsMismatchError, match=calibrations):
        extract([photos], **SMALL, precision="int8", calibrate=other, out=out)
    with pytest.raises(SettingsMismatchError, match="--precision int8, but this run asks for --precision float32"):
        extract([photos], **SMALL, precision="float32", out=out)
    replaced = extract([photos], **SMALL, precision="int8", calibrate=other, out=out, overwrite=True)
    assert replaced.extracted == 36
    recorded = json.loads(load(out).meta["calibration_photos"])
    assert {Path(path).parent.parent for path, _ in recorded} == {other}


@needs_openvino
@with_made_network
def test_a_growing_store_keeps_its_quantized_network(photos, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    out = tmp_path / "f.h5"
    before = load(extract([folder], **SMALL, precision="int8", out=out).out)
    for i in range(5):  # more photos: a new sample of the listing would be another calibration set
        photo(500 + i, COLOURS["bed"]).save(folder / "bed" / f"more_{i}.jpg", quality=90)
    result = extract([folder], **SMALL, precision="int8", out=out)
    after = load(out)
    assert (result.extracted, result.reused) == (5, 36)
    assert after.meta["quantization"] == before.meta["quantization"]
    assert after.meta["calibration_photos"] == before.meta["calibration_photos"]
    rows = {p: f for p, f in zip(after.paths, after.features, strict=True)}
    fresh = load(extract([folder], **SMALL, precision="int8", out=tmp_path / "fresh.h5").out)
    assert fresh.meta["quantization"] != before.meta["quantization"]  # what reusing the record avoided
    for path, features in zip(before.paths, before.features, strict=True):
        np.testing.assert_array_equal(rows[path], features)


def test_like_makes_a_test_store_that_classify_pairs_with_its_training_store(photos, tmp_path):
    train, own, test = tmp_path / "train.h5", tmp_path / "own.h5", tmp_path / "test.h5"
    extract([photos], **SMALL, precision="int8", out=train)
    other = make_photo_folder(tmp_path / "other", per_class=12, classes=CLASSES, size=(60, 52))
    extract([other], **SMALL, precision="int8", out=own)  # quantized on its own photos: another network
    refused = run_cli("classify", train, "--test", own, "--models", "logreg", "--cv", "3", "--out", tmp_path / "r")
    line = refused.output.strip()
    assert refused.exit_code == 1 and len(line.splitlines()) == 1, refused.output
    assert line.endswith(f"features made with its own settings: extract the test photos with --like {train}.")
    assert "sha256:" in line and not re.search("[0-9a-f]{13}", line)
    assert len(line.replace(str(tmp_path), "")) < 330  # was 600 characters with the full hashes

    few = make_photo_folder(tmp_path / "few", per_class=3, classes=CLASSES, size=(56, 60))  # too few to calibrate
    result = run_cli("extract", few, "--like", train, "--out", test, "--quiet")

    assert result.exit_code == 0, result.output
    assert load(test).meta["quantization"] == load(train).meta["quantization"]
    assert load(test).meta["calibration_photos"] == load(train).meta["calibration_photos"]
    run = classify([train], test_files=[test], models=["logreg"], cv=3, out=tmp_path / "run")
    assert run.rows[0].n_test == 9


def _new_process() -> None:
    """Forget the networks this process built or read, as a new process would not have them."""
    pipeline._network.cache_clear()
    int8._last_network.cache_clear()


def _stored_spec(store: Path) -> ExtractSpec:
    """The spec of a store's rows, as another process would get it."""
    _new_process()
    feature_set = load(store)
    return spec_for(
        feature_set.settings,
        source=feature_set.meta["weights_source"],
        calibration_photos=feature_set.meta["calibration_photos"],
    )


@needs_openvino
@with_made_network
def test_spec_for_rebuilds_exactly_the_recorded_network(photos, tmp_path, cache):
    store = Path(extract([photos], **SMALL, precision="int8", out=tmp_path / "f.h5").out)
    stored = load(store)
    shutil.rmtree(cache)  # the cache is gone: made again from the recorded calibration photos
    spec = _stored_spec(store)
    assert spec.quantization.network in stored.meta["quantization"]
    paths = list(stored.paths)
    rows = {o.path: o.features for batch in feature_batches(spec, paths, batch_size=32) for o in batch}
    np.testing.assert_array_equal(np.stack([rows[p] for p in paths]), stored.features)
    assert len(_cache_files(cache)) == 1


@needs_openvino
@with_made_network
def test_a_network_other_than_the_recorded_one_is_refused(photos, tmp_path):
    stored = load(extract([photos], **SMALL, precision="int8", out=tmp_path / "f.h5").out)
    recorded = int8.Quantization.parse(stored.meta["quantization"], stored.meta["calibration_photos"])
    other = "sha256:" + "0" * 64  # as if another OpenVINO/NNCF version had made the recorded rows
    settings = {**stored.settings, "quantization": stored.meta["quantization"].replace(recorded.network, other)}
    _new_process()
    spec = spec_for(settings, calibration_photos=stored.meta["calibration_photos"])
    with pytest.raises(FurnitypeError, match=r"^the int8 network made from the calibration photos is sha256:.*, not "
                       r"the recorded sha256:000000000000… .*--overwrite\.$"):
        spec.build()


@needs_openvino
@with_made_network
def test_a_changed_calibration_photo_cannot_make_the_network_again(tmp_path, cache):
    folder = make_photo_folder(tmp_path / "photos", per_class=12, classes=CLASSES)
    store = Path(extract([folder], **SMALL, precision="int8", out=tmp_path / "f.h5").out)
    shutil.rmtree(cache)
    changed = folder / "bed" / "bed_0.jpg"
    photo(999, COLOURS["bed"]).save(changed, quality=90)
    spec = _stored_spec(store)
    with pytest.raises(InputError, match=rf"^int8 calibration photo {changed} is changed: .*--overwrite\.$"):
        spec.build()
    changed.unlink()
    with pytest.raises(InputError, match=rf"^int8 calibration photo {changed} is unusable \(file not found\)"):
        _stored_spec(store).build()


@needs_openvino
@with_made_network
def test_predict_labels_new_photos_with_the_recorded_network(photos, tmp_path, cache):
    from furnitype.classify import load_model
    from furnitype.predict import predict
    from furnitype.training import classify

    feats = tmp_path / "train.h5"
    extract([photos], **SMALL, precision="int8", out=feats)
    classify([feats], models=["logreg"], cv=3, out=tmp_path / "run")
    new = tmp_path / "new"
    for c, name in enumerate(CLASSES):
        (new / name).mkdir(parents=True)
        photo(700 + c, COLOURS[name]).save(new / name / "new.jpg", quality=90)
    reference = load(extract([new], **SMALL, precision="int8", calibrate=photos, out=tmp_path / "new.h5").out)
    shutil.rmtree(cache)
    _new_process()
    result = predict(tmp_path / "run", [new])
    assert [p.error for p in result.predictions] == ["", "", ""]
    model = load_model(tmp_path / "run").model
    expected = model.predict_proba(reference.features)
    got = np.array([[dict(p.top)[c] for c in CLASSES] for p in result.predictions])
    np.testing.assert_allclose(got, expected[:, [list(model.classes_).index(c) for c in CLASSES]], rtol=1e-6)


@needs_openvino
def test_too_few_calibration_photos_is_one_line(tmp_path):
    few = make_photo_folder(tmp_path / "few", per_class=5, classes=CLASSES)
    (few / "bed" / "broken.jpg").write_bytes(b"not a photo")
    message = r"^int8 calibration needs at least 32 usable photos, found 15 in the listed photos; give --calibrate"
    with pytest.raises(InputError, match=message):
        extract([few], **SMALL, precision="int8", out=tmp_path / "f.h5")
    result = run_cli("extract", few, "--weights", "none", "--image-size", 32, "--precision", "int8", "--calibrate",
                     few / "bed", "--out", tmp_path / "f.h5")
    assert result.exit_code == 2
    expected = f"Error: int8 calibration needs at least 32 usable photos, found 5 in --calibrate {few}"
    assert result.output.startswith(expected)
    assert result.output.count("\n") == 1 and not (tmp_path / "f.h5").exists()


def test_calibrate_is_for_int8_only(photos, tmp_path):
    with pytest.raises(InputError, match=r"^--calibrate is for --precision int8 only"):
        extract([photos], **SMALL, calibrate=photos, out=tmp_path / "f.h5")


def test_a_cpu_without_vnni_is_refused_with_the_reason(photos, tmp_path, monkeypatch):
    int8.check_cpu({"avx2", "avx512f", "avx512_vnni"})
    int8.check_cpu({"avx2", "avx_vnni"})
    int8.check_cpu(None)  # the system does not say: OpenVINO runs it anyway
    monkeypatch.setattr(int8, "cpu_flags", lambda: {"sse4_2", "avx2", "avx512f", "avx512bw"})
    result = run_cli("extract", photos, "--weights", "none", "--image-size", 32, "--precision", "int8",
                     "--out", tmp_path / "f.h5")
    assert result.exit_code == 1
    assert result.output == (
        "Error: --precision int8 needs a CPU with VNNI (avx512_vnni, avx_vnni or amx_int8), which this one lacks: "
        "without it int8 takes 2x (AVX-512) to 4x (AVX2) the time per photo, no faster than bfloat16 or float32; "
        "use --precision bfloat16 or float32.\n"
    )
    assert not (tmp_path / "f.h5").exists()


def test_the_cpu_flags_of_this_machine_are_read():
    flags = int8.cpu_flags()
    assert flags is None or "fpu" in flags or "fp" in flags  # x86 or ARM Linux: the flags line was found


def test_missing_openvino_is_one_line(photos, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails as if it were not installed
    result = run_cli("extract", photos, "--weights", "none", "--precision", "int8", "--out", tmp_path / "f.h5")
    assert result.exit_code == 1
    assert result.output == "Error: --precision int8 needs OpenVINO and NNCF: pip install 'furnitype[int8]'\n"


def test_an_openvino_that_cannot_load_is_one_line(photos, tmp_path):
    broken = tmp_path / "site" / "openvino"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        "raise OSError('libopenvino.so.2600: cannot open shared object file: No such file or directory')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    cli = [sys.executable, "-m", "furnitype.cli", "extract", str(photos), "--weights", "none", "--precision", "int8",
           "--out", str(tmp_path / "f.h5")]
    done = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert done.stderr == (
        "Error: OpenVINO cannot load (libopenvino.so.2600: cannot open shared object file: No such file or "
        "directory); reinstall it: pip install 'furnitype[int8]'\n"
    )


@needs_openvino
def test_json_output_stays_clean_while_quantizing(photos, tmp_path):
    result = run_cli("extract", photos, "--weights", "none", "--image-size", 32, "--precision", "int8",
                     "--out", tmp_path / "f.h5", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["extracted"] == 36
    # what is happening is said first, on a line of its own; NNCF's bars stay off a stderr that is no terminal
    said = "quantizing vgg16 to int8 on 36 calibration photos (NNCF; once, then cached) ..."
    assert said in result.stderr.splitlines()
    assert "\r" not in result.stderr and "━" not in result.stderr


@needs_openvino
def test_quiet_leaves_out_the_progress_bars_of_quantizing(photos, tmp_path, monkeypatch):
    command = ["extract", photos, "--weights", "none", "--image-size", 32, "--precision", "int8"]
    shown = run_cli(*command, "--out", tmp_path / "shown.h5")
    assert shown.exit_code == 0, shown.output
    assert "quantizing vgg16 to int8 on" in shown.stderr  # furnitype's line: what -q must leave out
    assert "Statistics collection" not in shown.stderr  # NNCF's bars: drawn on a terminal only
    monkeypatch.setenv("FURNITYPE_CACHE_DIR", str(tmp_path / "another-cache"))  # quantized again

    quiet = run_cli(*command, "--out", tmp_path / "quiet.h5", "-q")

    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "" and quiet.stdout.startswith("36 extracted")
    assert len(list((tmp_path / "another-cache" / "int8").glob("*.zip"))) == 1


@needs_openvino
def test_a_full_cache_folder_is_one_line(photos, tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(int8.os, "fsync", full)  # the cache file's write hits a full disk
    with pytest.raises(FurnitypeError, match=r"^cannot write the int8 network cache .*No space left on device"):
        extract([photos], **SMALL, precision="int8", out=tmp_path / "f.h5")
    assert list((tmp_path / "cache" / "int8").iterdir()) == [] and not (tmp_path / "f.h5").exists()


@needs_openvino
@pytest.mark.parametrize("under", ["", "sub"])
def test_a_cache_folder_that_is_a_file_is_one_line_before_any_work(tmp_path, monkeypatch, under):
    """Found when the network is written, it cost the whole quantization and said "free space there"."""
    file = tmp_path / "file"
    file.write_text("mine")
    monkeypatch.setenv("FURNITYPE_CACHE_DIR", str(file / under))
    nothing = tmp_path / "no-such"  # the inputs are missing: the cache is refused before they are looked at
    result = run_cli("extract", nothing, "--weights", "none", "--image-size", 32, "--precision", "int8",
                     "--out", tmp_path / "f.h5")
    assert result.exit_code == 2
    assert result.output == (f"Error: the int8 network cache {file / under / 'int8'} cannot be made: {file} is not a "
                             "folder; set FURNITYPE_CACHE_DIR to a folder.\n")
    assert file.read_text() == "mine"


@needs_openvino
def test_int8_features_of_a_run_or_store_with_a_cache_folder_that_is_a_file_are_refused_first(tmp_path, monkeypatch):
    """``predict`` and ``similar`` check the cache folder when they read the settings, before any work."""
    file = tmp_path / "file"
    file.write_text("mine")
    monkeypatch.setenv("FURNITYPE_CACHE_DIR", str(file))
    settings = {"backbone": "vgg16", "weights": weights_identity("none"), "pooling": "avg", "image_size": 32,
                "interpolation": "bilinear", "precision": "int8", "decode": "exact", "store_dtype": "float32",
                "quantization": "unused"}
    with pytest.raises(InputError, match=rf"^the int8 network cache {file / 'int8'} cannot be made: {file} is not"):
        spec_for(settings, weights="none", calibration_photos="[]")


@needs_openvino
def test_the_out_is_never_a_calibration_photo(photos, tmp_path):
    """A calibration photo is read too: an --out that is one is refused before the work, --overwrite or not."""
    calibrate = shutil.copytree(photos, tmp_path / "calibrate")
    photo_file = calibrate / "bed" / "bed_0.jpg"
    before = photo_file.read_bytes()
    result = run_cli("extract", photos / "chair", "--weights", "none", "--image-size", 32, "--precision", "int8",
                     "--calibrate", calibrate, "--out", photo_file, "--overwrite")
    assert result.exit_code == 2
    assert result.output == (f"Error: --out {photo_file} is one of the photos this command reads ({photo_file}); "
                             "choose another path.\n")
    assert photo_file.read_bytes() == before


@needs_openvino
@with_made_network
def test_the_ray_engine_runs_the_same_int8_network(photos, tmp_path, cache):
    ray = pytest.importorskip("ray")  # installed by `make test` (furnitype[ray]); see tests/test_ray_engine.py
    local = load(extract([photos], **SMALL, precision="int8", out=tmp_path / "local.h5").out)
    made = _cache_files(cache)[0].stat().st_ino
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")  # workers inherit FURNITYPE_CACHE_DIR
    try:
        remote = load(
            extract([photos], **SMALL, precision="int8", out=tmp_path / "ray.h5", engine="ray", ray_workers=2).out
        )
    finally:
        ray.shutdown()
    assert remote.meta["quantization"] == local.meta["quantization"]
    assert list(remote.paths) == list(local.paths)
    np.testing.assert_array_equal(remote.features, local.features)
    assert _cache_files(cache)[0].stat().st_ino == made  # the workers read the driver's network, made once


@needs_openvino
def test_int8_on_a_gpu_is_refused_before_any_work(photos, tmp_path):
    with pytest.raises(InputError, match=r"^int8 networks run on the CPU \(OpenVINO\); --device is for the Keras "
                       r"precisions. Received: device='gpu:0'$"):
        extract([photos], **SMALL, precision="int8", device="gpu:0", out=tmp_path / "f.h5")
    assert not (tmp_path / "f.h5").exists()
