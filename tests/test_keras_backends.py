"""furnitype on Keras' JAX backend (the test extra installs ``jax[cpu]``), with TensorFlow hidden: the rows
TensorFlow makes, the backend recorded where rows depend on it, mixing refused; devices and out-of-memory.

``FURNITYPE_TEST_BACKEND=torch`` runs the same tests on PyTorch (by hand: its wheels are too large for CI)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from furnitype.errors import FurnitypeError, SettingsMismatchError
from furnitype.extract.backbones import build_model, get_backbone
from furnitype.extract.keras_backend import FLOAT32_TOLERANCE, configured_backend, is_out_of_memory
from furnitype.extraction import extract
from furnitype.features import load
from furnitype.features.store import read_meta
from furnitype.keras_loader import import_keras
from tests.images import make_photo_folder, photo

BACKEND = os.environ.get("FURNITYPE_TEST_BACKEND", "jax")
pytest.importorskip(BACKEND)

SMALL = {"backbone": "vgg16", "image_size": 32, "batch_size": 4, "progress": False}
#: Runs furnitype as a machine without TensorFlow would: ``import tensorflow`` fails (Keras then works without).
WITHOUT_TENSORFLOW = "import sys; sys.modules['tensorflow'] = None; "


def furnitype(backend: str, *args, tensorflow: bool = False) -> subprocess.CompletedProcess:
    """``furnitype ARGS...`` in a new process on Keras' ``backend``; ``tensorflow=False`` hides TensorFlow."""
    code = ("" if tensorflow else WITHOUT_TENSORFLOW) + "from furnitype.__main__ import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        env={**os.environ, "KERAS_BACKEND": backend}, capture_output=True, text=True, timeout=900,
    )


def one_line(done: subprocess.CompletedProcess, code: int) -> str:
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    return lines[0]


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """The largest relative L2 difference of a row of ``a`` from its row of ``b``."""
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A VGG16 conv-base weights file (random, seeded): the same network on every backend."""
    keras = import_keras()
    keras.utils.set_random_seed(5)
    path = tmp_path_factory.mktemp("weights") / "vgg16.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_photo_folder(tmp_path_factory.mktemp("photos") / "photos", per_class=3)


def test_without_tensorflow_another_backend_makes_the_rows_tensorflow_makes(weights, photos, tmp_path):
    on_tensorflow = extract([photos], weights=str(weights), out=tmp_path / "tf.h5", **SMALL)
    done = furnitype(BACKEND, "extract", photos, "--weights", weights, "--image-size", 32,
                     "--out", tmp_path / "other.h5")
    assert done.returncode == 0, done.stderr
    assert f"loading vgg16 (vgg16.weights.h5 weights) on CPU with {BACKEND} ..." in done.stderr.splitlines()

    tf_rows, other_rows = load(on_tensorflow.out), load(tmp_path / "other.h5")
    assert sorted(tf_rows.sha256) == sorted(other_rows.sha256) and len(tf_rows) == 6
    order = np.argsort(other_rows.sha256)[np.argsort(np.argsort(tf_rows.sha256))]
    assert relative_difference(other_rows.features[order], tf_rows.features) <= FLOAT32_TOLERANCE
    meta = read_meta(tmp_path / "other.h5")
    assert (meta["keras_backend"], "backend" in meta) == (BACKEND, False)  # float32 rows of given weights: any backend
    assert f"{BACKEND}_version" in meta and "tensorflow_version" not in meta


def test_another_backend_adds_float32_rows_to_a_tensorflow_store(weights, photos, tmp_path):
    store = extract([photos], weights=str(weights), out=tmp_path / "f.h5", **SMALL).out
    more = tmp_path / "more"
    more.mkdir()
    photo(41).save(more / "new.png")
    done = furnitype(BACKEND, "extract", more, "--out", store, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["extracted"] == 1 and len(load(store)) == 7


def test_rows_that_depend_on_the_backend_record_it_and_are_not_mixed(weights, photos, tmp_path):
    # bfloat16 rows, and random weights (each backend draws its own from the same seed), differ between backends.
    bf16 = tmp_path / "bf16.h5"
    done = furnitype(BACKEND, "extract", photos, "--weights", weights, "--image-size", 32, "--precision", "bfloat16",
                     "--out", bf16)
    assert done.returncode == 0, done.stderr
    assert read_meta(bf16)["backend"] == BACKEND
    with pytest.raises(SettingsMismatchError, match=f"made with Keras' {BACKEND} backend, but this run asks for "
                       f"Keras' tensorflow backend: run with KERAS_BACKEND={BACKEND} to add to it"):
        extract([photos], out=bf16, **SMALL)

    random = extract([photos], weights="none", out=tmp_path / "random.h5", **SMALL).out
    assert "backend" not in read_meta(random)  # TensorFlow: the default, as every earlier store has it
    error = one_line(furnitype(BACKEND, "extract", photos, "--out", random), 1)
    assert f"made with Keras' tensorflow backend, but this run asks for Keras' {BACKEND} backend" in error
    assert "KERAS_BACKEND=tensorflow" in error


def test_similar_on_another_backend_refuses_to_extract_a_query(weights, photos, tmp_path):
    bf16 = extract([photos], weights=str(weights), precision="bfloat16", out=tmp_path / "bf16.h5", **SMALL).out
    query = tmp_path / "query.png"
    photo(77).save(query)
    error = one_line(furnitype(BACKEND, "similar", bf16, query), 1)  # as adding to the store is refused
    assert "made with Keras' tensorflow backend" in error and "run with KERAS_BACKEND=tensorflow" in error


def test_int8_on_another_backend_says_how_to_make_its_network(weights, photos, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setenv("FURNITYPE_CACHE_DIR", str(tmp_path / "cache"))  # empty: the network must be made
    many = make_photo_folder(tmp_path / "many", per_class=16)  # int8 calibrates on 32 photos
    error = one_line(furnitype(BACKEND, "extract", many, "--weights", weights, "--image-size", 32,
                               "--precision", "int8", "--out", tmp_path / "int8.h5"), 2)
    assert "run this extract once with KERAS_BACKEND=tensorflow" in error
    assert not (tmp_path / "int8.h5").exists()


def test_the_backend_is_known_before_keras_is_imported(tmp_path):
    code = ("from furnitype.extract.keras_backend import configured_backend; before = configured_backend(); "
            "import keras; print(before, keras.config.backend())")
    home = tmp_path / "keras-home"
    home.mkdir()
    (home / "keras.json").write_text(json.dumps({"backend": "jax"}))
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    tilde = {"HOME": str(tmp_path), "KERAS_HOME": "~/keras-home"}  # Keras expands the ~ itself
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for extra, expected in (({"KERAS_BACKEND": "jax"}, "jax"), ({"KERAS_HOME": str(home)}, "jax"), (tilde, "jax"),
                            ({"KERAS_HOME": str(a_file)}, None), ({}, None)):  # a file: no settings, as for Keras
        done = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                              check=True, timeout=600)
        before, after = done.stdout.split()
        assert before == after and before == (expected or after)


def test_a_device_that_is_not_there_is_one_line(photos, tmp_path, invoke):
    result = invoke("extract", photos, "--weights", "none", "--image-size", 32, "--device", "gpu",
                    "--out", tmp_path / "f.h5")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: Keras' tensorflow backend sees no GPU here; use --device cpu. Received: device='gpu'"
    ]
    result = invoke("extract", photos, "--device", "tpu", "--out", tmp_path / "f.h5")
    assert (result.exit_code, result.output.strip()) == (
        2, "Error: device must be auto, cpu, gpu or gpu:N. Received: device='tpu'")
    assert not (tmp_path / "f.h5").exists()
    result = invoke("extract", photos, "--weights", "none", "--image-size", 32, "--device", "cpu", "--quiet",
                    "--out", tmp_path / "f.h5")
    assert result.exit_code == 0 and len(load(tmp_path / "f.h5")) == 6


def _out_of_memory_error() -> BaseException:
    """What TensorFlow raises when a device has no memory for a tensor (made for real: 64 TB asked for)."""
    import tensorflow as tf

    try:
        tf.zeros((1 << 44,), tf.float32)
    except tf.errors.ResourceExhaustedError as err:
        return err
    raise AssertionError("64 TB were allocated")


def test_out_of_memory_halves_the_batch_and_says_so(caplog, monkeypatch):
    assert configured_backend() == "tensorflow"
    error = _out_of_memory_error()
    assert is_out_of_memory(error) and not is_out_of_memory(ValueError("RESOURCE_EXHAUSTED"))
    infer = build_model(get_backbone("vgg16"), weights="none", pooling="avg", image_size=32)
    batch = np.random.default_rng(0).uniform(-100, 100, (8, 32, 32, 3)).astype(np.float32)
    whole = infer(batch)

    fits = infer.model.predict_on_batch  # type: ignore[attr-defined]
    sizes = []

    def small_batches_only(part):
        sizes.append(len(part))
        if len(part) > 3:
            raise error
        return fits(part)

    monkeypatch.setattr(infer.model, "predict_on_batch", small_batches_only)  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="furnitype"):
        halved = infer(batch)
        again = infer(batch)
    np.testing.assert_allclose(halved, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again, whole, rtol=1e-5, atol=1e-6)
    assert sizes == [8, 4, 2, 2, 2, 2] + [2, 2, 2, 2]
    assert [r.getMessage() for r in caplog.records] == [
        "CPU ran out of memory at a batch of 8 photos; going on with batches of 4",
        "CPU ran out of memory at a batch of 4 photos; going on with batches of 2",
    ]

    monkeypatch.setattr(infer.model, "predict_on_batch", lambda part: (_ for _ in ()).throw(error))
    with pytest.raises(FurnitypeError, match="^CPU ran out of memory for vgg16 at 32 px on one photo; free memory"):
        infer(batch[:1])


#: What asks ``BACKEND`` for 64 TB: its allocator's own out-of-memory error (PyTorch's on the CPU: a RuntimeError).
HUGE = {"jax": "import jax.numpy as jnp; jnp.zeros((1 << 44,), jnp.float32).block_until_ready()",
        "torch": "import torch; torch.empty((1 << 44,), dtype=torch.float32)"}


def test_the_backends_out_of_memory_is_recognised():
    code = (WITHOUT_TENSORFLOW + "from furnitype.extract.keras_backend import is_out_of_memory\n"
            f"try:\n    {HUGE[BACKEND]}\nexcept Exception as err:\n"
            "    print(is_out_of_memory(err), is_out_of_memory(RuntimeError('other')))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "KERAS_BACKEND": BACKEND},
                          capture_output=True, text=True, timeout=600)
    assert done.stdout.split() == ["True", "False"], done.stderr


@pytest.mark.parametrize("backend, says", [
    ("foo", "Error: Keras cannot start its foo backend (Unable to import backend : foo); set KERAS_BACKEND to "
            "tensorflow, jax or torch (docs/backends.md)."),
    ("jax", "Error: Keras cannot start its jax backend (import of jax halted; None in sys.modules); pip install "
            "'furnitype[jax]', or set KERAS_BACKEND to tensorflow, jax or torch (docs/backends.md)."),
])
def test_a_backend_keras_cannot_start_is_one_line(backend, says, photos, tmp_path):
    code = "import sys; sys.modules['jax'] = None; from furnitype.__main__ import main; main()"  # jax not installed
    done = subprocess.run([sys.executable, "-c", code, "extract", str(photos), "--weights", "none", "--image-size",
                           "32", "--out", str(tmp_path / "f.h5")], env={**os.environ, "KERAS_BACKEND": backend},
                          capture_output=True, text=True, timeout=600)
    assert (done.returncode, done.stderr.strip()) == (1, says)
    assert not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("kind, why", [("folder", "not a regular file"), ("fifo", "not a regular file"),
                                       ("list", "not a JSON object")])
def test_a_keras_settings_file_keras_cannot_read_is_one_line(kind, why, weights, photos, tmp_path):
    """Keras would wait forever on a FIFO, and fail with a traceback on a folder or a JSON list."""
    home = tmp_path / "keras-home"
    home.mkdir()
    settings = home / "keras.json"
    if kind == "folder":
        settings.mkdir()
    elif kind == "fifo":
        os.mkfifo(settings)
    else:
        settings.write_text("[1]")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    for given in ("none", str(weights)):  # random weights: the backend is read before Keras; a file: Keras reads it
        done = subprocess.run(
            [sys.executable, "-m", "furnitype", "extract", str(photos), "--weights", given, "--image-size", "32",
             "--out", str(tmp_path / "f.h5")], env={**env, "KERAS_HOME": str(home)},
            capture_output=True, text=True, timeout=600)
        says = f"Error: Keras cannot read its settings file {settings} ({why}); remove it, or set KERAS_HOME to another"
        assert (done.returncode, done.stderr.strip()) == (1, says + " folder.")
        assert not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("backend", ["numpy", "openvino"])
def test_a_keras_backend_furnitype_does_not_run_on_is_one_line(backend, photos, tmp_path):
    """Keras' inference-only backends would make rows whose recorded backend furnitype then refuses to read."""
    pytest.importorskip(backend)
    done = subprocess.run([sys.executable, "-m", "furnitype", "extract", str(photos), "--weights", "none",
                           "--image-size", "32", "--out", str(tmp_path / "f.h5")],
                          env={**os.environ, "KERAS_BACKEND": backend}, capture_output=True, text=True, timeout=600)
    assert (done.returncode, done.stderr.strip()) == (1, (
        f"Error: furnitype runs on Keras' tensorflow, jax or torch backend, not {backend}; set KERAS_BACKEND to one "
        "of them (docs/backends.md)."))
    assert not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("device", ["gpu:", "gpu:-1", "GPU", "cpu:0", "gpu:\u00b2", "gpu:\u0663", "gpu:0x1"])
def test_a_device_not_named_as_furnitype_names_them_is_one_line(device, photos, tmp_path, invoke):
    result = invoke("extract", photos, "--weights", "none", "--device", device, "--out", tmp_path / "f.h5")
    assert (result.exit_code, result.output.strip()) == (
        2, f"Error: device must be auto, cpu, gpu or gpu:N. Received: device={device!r}")


def test_a_test_file_of_another_backend_is_refused_naming_both(photos, tmp_path, invoke):
    """Random weights: each backend draws its own, so a model of one backend's rows cannot be tested on another's."""
    other = tmp_path / "other.h5"
    done = furnitype(BACKEND, "extract", photos, "--weights", "none", "--image-size", 32, "--out", other)
    assert done.returncode == 0, done.stderr
    tensorflow = extract([photos], weights="none", out=tmp_path / "tf.h5", **SMALL).out
    result = invoke("classify", other, "--test", tensorflow, "--models", "logreg", "--out", tmp_path / "run")
    assert (result.exit_code, result.output.strip()) == (1, (
        f"Error: test file {tensorflow} was made with backend=tensorflow, but {other} with backend={BACKEND}; a "
        f"model can only be tested on features made with its own settings: extract the test photos with --like "
        f"{other}."))
    assert not (tmp_path / "run").exists()


def test_a_weights_file_named_none_makes_rows_of_any_backend(weights, photos, tmp_path):
    """float32 rows of a weights file are backend-independent, whatever the file is called."""
    (tmp_path / "none.weights.h5").write_bytes(weights.read_bytes())
    code = WITHOUT_TENSORFLOW + "from furnitype.__main__ import main; main()"
    done = subprocess.run([sys.executable, "-c", code, "extract", str(photos), "--weights", "none.weights.h5",
                           "--image-size", "32", "--out", "f.h5"], cwd=tmp_path,
                          env={**os.environ, "KERAS_BACKEND": BACKEND}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "backend" not in read_meta(tmp_path / "f.h5")
    more = tmp_path / "more"
    more.mkdir()
    photo(41).save(more / "new.png")
    assert extract([more], out=tmp_path / "f.h5", **SMALL).extracted == 1


@pytest.mark.parametrize("setting", [{"floatx": "float16"}, {"image_data_format": "channels_first"}])
def test_keras_settings_do_not_change_float32_rows(setting, weights, photos, tmp_path):
    """keras.json's floatx float16 made every layer float16 while the store said float32 (8e-4 off); its
    channels_first read a photo's rows as channels (the network failed to build, blamed on the weights)."""
    home = tmp_path / "keras-home"
    home.mkdir()
    (home / "keras.json").write_text(json.dumps(setting))
    env = {**{k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}, "KERAS_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "furnitype", "extract", str(photos), "--weights", str(weights),
                           "--image-size", "32", "--out", str(tmp_path / "floatx.h5")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    float32 = load(extract([photos], weights=str(weights), out=tmp_path / "f.h5", **SMALL).out)
    floatx = load(tmp_path / "floatx.h5")
    order = np.argsort(floatx.sha256)[np.argsort(np.argsort(float32.sha256))]
    assert relative_difference(floatx.features[order], float32.features) <= FLOAT32_TOLERANCE
