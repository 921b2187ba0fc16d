"""``extract --layers`` and ``--mirror``: rows equal to a plain Keras computation, recorded settings that never mix,
new photos extracted the same way by ``predict`` and ``similar``; the extraction's CPU per photo in the store and in
``classify``'s table."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from furnitype.classify import load_model
from furnitype.errors import InputError, SettingsMismatchError
from furnitype.extract.settings import spec_for
from furnitype.extraction import extract
from furnitype.features import load, read_meta, save
from furnitype.keras_loader import import_keras
from furnitype.predict import predict
from furnitype.similar import similar
from furnitype.training import classify
from tests.conftest import STORE_META
from tests.conftest import run_cli as invoke
from tests.images import make_photo_folder

SIZE = 32
CLASSES = ("bed", "chair", "sofa")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A VGG16 weights file (random, seeded; 32 px) and the network that wrote it, and 12 photos."""
    base = tmp_path_factory.mktemp("layers")
    keras = import_keras()
    keras.utils.set_random_seed(11)
    network = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    weights = base / "vgg16.weights.h5"
    network.save_weights(weights)
    photos = make_photo_folder(base / "photos", per_class=4, classes=CLASSES)
    return {"base": base, "weights": str(weights), "network": network, "photos": photos}


def _keras_rows(network, paths, layers: tuple[str, ...] | None, mirror: bool) -> np.ndarray:
    """The rows by hand: Keras' own image loading, preprocessing and block outputs, pooled, normalised in numpy."""
    keras = import_keras()
    names = [f"{b}_pool" for b in layers] if layers else ["block5_pool"]
    model = keras.Model(network.input, [network.get_layer(name).output for name in names])
    images = np.stack(
        [
            keras.utils.img_to_array(keras.utils.load_img(p, target_size=(SIZE, SIZE), interpolation="bilinear"))
            for p in paths
        ]
    )

    def rows(batch: np.ndarray) -> np.ndarray:
        outputs = model.predict(keras.applications.vgg16.preprocess_input(batch.copy()), verbose=0)
        pooled = [o.mean(axis=(1, 2)) for o in (outputs if isinstance(outputs, list) else [outputs])]
        if not layers:
            return pooled[0]
        return np.concatenate([p / np.linalg.norm(p, axis=1, keepdims=True) for p in pooled], axis=1)

    return (rows(images) + rows(images[:, :, ::-1])) / 2 if mirror else rows(images)


@pytest.mark.parametrize(
    "layers, mirror",
    [(("block4", "block5"), False), (("block4", "block5"), True), (None, True), (("block3",), False)],
)
def test_rows_equal_a_plain_keras_computation(setup, tmp_path, layers, mirror):
    out = tmp_path / "f.h5"
    extract(
        [setup["photos"]], weights=setup["weights"], image_size=SIZE, layers=",".join(layers) if layers else None,
        mirror=mirror, batch_size=5, out=out, progress=False,
    )
    rows = load(out)
    want = _keras_rows(setup["network"], rows.paths, layers, mirror)
    channels = {"block3": 256, "block4": 512, "block5": 512}
    assert rows.features.shape == want.shape == (12, sum(channels[b] for b in layers or ("block5",)))
    np.testing.assert_allclose(rows.features, want, rtol=0, atol=0.02 * np.abs(want).max())
    assert np.abs(want).max() > 0
    if layers and not mirror:  # each block's part has unit length
        parts = np.split(rows.features, np.cumsum([channels[b] for b in layers])[:-1], axis=1)
        np.testing.assert_allclose([np.linalg.norm(p, axis=1) for p in parts], 1, rtol=1e-5)
    # Recorded only when not the default: a store made without them is what stores made before them are.
    with h5py.File(out, "r") as h5:
        assert h5.attrs.get("layers") == (",".join(layers) if layers else None)
        assert h5.attrs.get("mirror") == ("yes" if mirror else None)


def test_layers_and_mirror_are_settings_never_mixed(setup, tmp_path):
    photos, weights = setup["photos"], setup["weights"]
    common = {"weights": weights, "image_size": SIZE, "progress": False}
    plain, layered = tmp_path / "plain.h5", tmp_path / "layered.h5"
    extract([photos / "bed"], out=plain, **common)
    with pytest.raises(SettingsMismatchError, match="made with no --layers, but this run asks for --layers block4,b"):
        extract([photos / "chair"], out=plain, layers="block5,block4", **common)
    with pytest.raises(SettingsMismatchError, match="made with no --mirror, but this run asks for --mirror"):
        extract([photos / "chair"], out=plain, mirror=True, **common)

    # Names in any order are the same feature set; a later run without the options adds rows of the same kind.
    extract([photos / "bed"], out=layered, layers="block5,block4", mirror=True, **common)
    added = extract([photos / "chair"], out=layered, **common)
    assert added.extracted == 4
    meta = read_meta(layered)
    assert (meta["layers"], meta["mirror"], meta["feature_dim"]) == ("block4,block5", "yes", 1024)
    with pytest.raises(SettingsMismatchError, match="made with --layers block4,block5, but this run asks for no --la"):
        extract([photos / "sofa"], out=layered, layers="last", **common)
    with pytest.raises(SettingsMismatchError, match="made with --mirror, but this run asks for no --mirror"):
        extract([photos / "sofa"], out=layered, mirror=False, **common)
    # --like takes them too: a test store of the same feature set.
    like = extract([photos / "sofa"], like=layered, out=tmp_path / "test.h5", progress=False)
    assert read_meta(like.out)["layers"] == "block4,block5" and read_meta(like.out)["mirror"] == "yes"


def test_recorded_layers_this_furnitype_cannot_make_are_refused(setup):
    settings = {**STORE_META, "weights": "none(seed=0)", "image_size": SIZE}
    assert spec_for({**settings, "layers": "block4,block5", "mirror": "yes"}).layers == ("block4", "block5")
    for bad in ({"layers": "block9"}, {"layers": "block5,block4"}, {"layers": ""}, {"mirror": "no"}):
        with pytest.raises(SettingsMismatchError, match="settings this furnitype cannot reproduce"):
            spec_for({**settings, **bad})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "block6"], "Error: vgg16 has no layer 'block6'; choose from block1, block2, block3, block4, "
         "block5 (comma-separated), or last (its output, the default). Received: layers='block6'"),
        (["--backbone", "inception", "--layers", "block4"], "Error: inception has no layer 'block4'; choose from "
         "mixed0, mixed1, mixed2, mixed3, mixed4, mixed5, mixed6, mixed7, mixed8, mixed9, mixed10 (comma-separated)"),
        (["--precision", "int8", "--layers", "block5"], "Error: --layers and --mirror are for the Keras precisions"),
        (["--precision", "int8", "--mirror"], "Error: --layers and --mirror are for the Keras precisions"),
    ],
)
def test_bad_layers_are_one_line(setup, tmp_path, args, message):
    result = invoke("extract", setup["photos"], "--weights", "none", "--out", tmp_path / "f.h5", *args)
    assert result.exit_code == 2
    assert result.output.startswith(message) and result.output.count("\n") == 1
    assert not (tmp_path / "f.h5").exists()


def test_predict_and_similar_extract_new_photos_the_same_way(setup, tmp_path):
    store, run = tmp_path / "train.h5", tmp_path / "run"
    extract(
        [setup["photos"]], weights=setup["weights"], image_size=SIZE, layers="block4,block5", mirror=True,
        batch_size=4, out=store, progress=False,
    )
    rows = load(store)
    classify([store], models=["logreg"], cv=3, out=run)
    loaded = load_model(run)

    # predict extracts the photos again (no --features): the run's settings give the stored rows.
    result = predict(run, [setup["photos"]], top_k=3, batch_size=3)
    assert [p.path for p in result.predictions] == list(rows.paths)
    expected = loaded.model.predict_proba(rows.features)
    for p, proba in zip(result.predictions, expected, strict=True):
        got = dict(p.top)
        np.testing.assert_allclose([got[c] for c in loaded.classes], proba, rtol=1e-4, atol=1e-6)

    # similar: a photo the store does not hold (other bytes, the same image) is extracted like its stored twin.
    query = tmp_path / "query.jpg"
    query.write_bytes(Path(rows.paths[5]).read_bytes() + b"\0")
    match = similar(store, [query], k=1)[0]
    assert match.error == "" and not match.in_store and match.neighbours[0].path == rows.paths[5]
    assert match.neighbours[0].distance < 1e-5


def test_cpu_per_photo_is_recorded_and_shown_by_classify(setup, tmp_path, capsys):
    store = tmp_path / "f.h5"
    common = {"weights": setup["weights"], "image_size": SIZE, "batch_size": 2, "out": store, "progress": False}
    extract([setup["photos"] / "bed", setup["photos"] / "chair"], **common)
    meta = read_meta(store)
    assert meta["extract_cpu_rows"] == 6  # the first batch (the network's start-up) is left out
    first = meta["extract_cpu_seconds"]
    assert first > 0
    extract([setup["photos"]], **common)  # a run adding the sofas adds to the totals
    meta = read_meta(store)
    cpu = meta["extract_cpu_seconds"]
    assert meta["extract_cpu_rows"] == 8 and cpu > first

    # A store that records no figure (written before, or by save) shows "-".
    features = load(store)
    other = tmp_path / "other.h5"
    save(other, features=features.features, paths=features.paths, labels=features.labels, sha256=features.sha256,
         meta={**STORE_META, "weights": "none(seed=0)", "image_size": SIZE})
    result = invoke("classify", store, other, "--models", "logreg", "--cv", "3", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if "CPU ms/photo" in line)
    at = header.index("CPU ms/photo")
    ranked = [line for line in lines if line.split()[:1] in (["1"], ["2"])]
    cells = {line.split()[1]: line[at - 4 : at + 12].split()[-1] for line in ranked}
    figure = 1000 * meta["extract_cpu_seconds"] / meta["extract_cpu_rows"]
    assert cells == {"f": f"{figure:.1f}", "other": "-"}


def test_a_store_copied_by_compaction_keeps_its_settings_and_cpu_figure(setup, tmp_path):
    photos = shutil.copytree(setup["photos"], tmp_path / "photos")
    store = tmp_path / "f.h5"
    common = {"weights": setup["weights"], "image_size": SIZE, "layers": "block5", "batch_size": 2,
              "progress": False, "out": store}
    extract([photos], **common)
    before = read_meta(store)
    shutil.rmtree(photos / "bed")
    shutil.rmtree(photos / "chair")
    assert extract([photos], **common).removed == 8  # more than a quarter dead: compacted
    after = read_meta(store)
    assert after["n_rows"] == 4
    for key in ("layers", "extract_cpu_seconds", "extract_cpu_rows"):
        assert after[key] == before[key]


def test_layers_of_the_api_are_checked_before_any_work(tmp_path):
    with pytest.raises(InputError, match="vgg16 has no layer 'mixed3'"):
        extract([tmp_path], weights="none", layers=["mixed3"], out=tmp_path / "f.h5", progress=False)
