"""The extraction pipeline's settings and machinery: bfloat16 and float16 storage, one traced graph for every batch
size, the network reused until its weights file changes, a bounded read-ahead window."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest

from furnitype.errors import SettingsMismatchError
from furnitype.extract.pipeline import ExtractSpec, feature_batches
from furnitype.extraction import extract
from furnitype.features import load
from tests.images import make_photo_folder

SMALL = {"backbone": "vgg16", "weights": "none", "image_size": 32, "progress": False}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_photo_folder(tmp_path_factory.mktemp("photos") / "photos", per_class=3)


def _relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("backbone, size", [("vgg16", 32), ("inception", 75)])
def test_bfloat16_features_are_close_to_float32(photos, tmp_path, backbone, size):
    settings = {**SMALL, "backbone": backbone, "image_size": size}
    extract([photos], **settings, out=tmp_path / "f32.h5")
    extract([photos], **settings, precision="bfloat16", out=tmp_path / "bf16.h5")
    f32, bf16 = load(tmp_path / "f32.h5"), load(tmp_path / "bf16.h5")
    assert bf16.meta["precision"] == "bfloat16" and bf16.features.dtype == np.float32
    assert list(bf16.sha256) == list(f32.sha256)
    difference = _relative(bf16.features, f32.features)
    assert 0 < difference.max() < 0.02  # computed in bfloat16 indeed, and close


def test_precision_and_store_dtype_are_settings_that_must_match(photos, tmp_path):
    out = tmp_path / "f.h5"
    extract([photos], **SMALL, out=out)
    with pytest.raises(SettingsMismatchError, match="--precision float32, but this run asks for --precision bfloat16"):
        extract([photos], **SMALL, precision="bfloat16", out=out)
    with pytest.raises(SettingsMismatchError, match="dtype float32, but this run asks for --store-dtype float16"):
        extract([photos], **SMALL, store_dtype="float16", out=out)


def test_float16_store_holds_the_float32_features_rounded(photos, tmp_path):
    extract([photos], **SMALL, out=tmp_path / "f32.h5")
    extract([photos], **SMALL, store_dtype="float16", out=tmp_path / "f16.h5")
    with h5py.File(tmp_path / "f16.h5", "r") as h5:
        assert h5["features"].dtype == np.float16
    full = load(tmp_path / "f32.h5").features
    np.testing.assert_allclose(load(tmp_path / "f16.h5").features, full, rtol=1e-3, atol=1e-3 * np.abs(full).max())


def test_one_graph_serves_every_batch_size():
    infer = ExtractSpec("vgg16", "none", image_size=32).build()
    batch = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    whole = infer(batch)
    assert whole.dtype == np.float32 and whole.shape == (5, 512)
    parts = np.concatenate([infer(batch[:3]), infer(batch[3:4]), infer(batch[4:])])
    np.testing.assert_allclose(parts, whole, rtol=1e-4, atol=1e-6 * np.abs(whole).max())


def test_network_is_reused_until_the_weights_file_changes(tmp_path):
    import keras

    weights = tmp_path / "vgg16.weights.h5"

    def save_weights(seed: int) -> None:
        keras.utils.set_random_seed(seed)
        keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(weights)

    batch = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    save_weights(1)
    spec = ExtractSpec("vgg16", str(weights), image_size=32)
    first = spec.build()
    assert ExtractSpec("vgg16", str(weights), image_size=32).build() is first
    before = first(batch)

    save_weights(2)  # same path, new content: a new network with the new weights
    second = spec.build()
    assert second is not first
    assert not np.allclose(second(batch), before)
    assert ExtractSpec("vgg16", str(weights), image_size=32, precision="bfloat16").build() is not second


@dataclass(frozen=True)
class CountingSpec(ExtractSpec):
    """The real spec, counting the files it has been asked to load (in a list shared with the test)."""

    loaded: list = field(default_factory=list)

    def load(self, path: str):
        self.loaded.append(path)
        return super().load(path)


@pytest.mark.parametrize("prefetch", [0, 3, None])
def test_prefetch_window_is_bounded(photos, prefetch):
    paths = sorted(str(p) for p in photos.rglob("*.jpg")) * 4  # 24 files
    spec = CountingSpec("vgg16", "none", image_size=32)
    infer = ExtractSpec("vgg16", "none", image_size=32).build()
    batches = feature_batches(spec, paths, batch_size=2, workers=2, infer=infer, prefetch=prefetch)
    window = 2 * 2 if prefetch is None else prefetch
    seen = 0
    for batch in batches:
        seen += len(batch)
        assert all(o.features is not None and o.features.shape == (512,) for o in batch)
        assert len(spec.loaded) <= seen + window  # never more than the window read ahead of the consumer
    assert seen == len(spec.loaded) == len(paths)
