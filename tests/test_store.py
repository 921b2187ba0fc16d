"""The HDF5 store and the journal on their own: round trip, refusals, a torn journal tail."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from furnitype.errors import SettingsMismatchError, StoreError
from furnitype.features import load, read_meta, save
from furnitype.features.journal import Journal, Row, Skip

META = {"backbone": "vgg16", "weights": "none(seed=0)", "pooling": "avg", "image_size": 32}


def test_round_trip(tmp_path):
    features = np.arange(12, dtype=np.float32).reshape(3, 4)
    save(
        tmp_path / "f.h5",
        features=features,
        paths=["/a", "/b", "/c"],
        labels=["x", "", "y"],
        sha256=["a" * 64, "b" * 64, "c" * 64],
        skipped=[("/d", "", "empty file")],
        meta=META,
    )
    rows = load(tmp_path / "f.h5")
    np.testing.assert_array_equal(rows.features, features)
    assert list(rows.paths) == ["/a", "/b", "/c"] and list(rows.labels) == ["x", "", "y"]
    assert list(rows.sha256) == ["a" * 64, "b" * 64, "c" * 64]
    assert rows.classes == ["x", "y"] and rows.skipped == [("/d", "empty file")]
    assert rows.settings["backbone"] == "vgg16" and read_meta(tmp_path / "f.h5")["n_rows"] == 3
    assert not list(tmp_path.glob(".*tmp*"))  # written beside, then renamed


def test_foreign_and_newer_files_are_refused(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["x"] = [1, 2]
    with pytest.raises(StoreError, match="not a furnitype feature file"):
        load(tmp_path / "other.h5")
    save(tmp_path / "f.h5", features=np.zeros((1, 2)), paths=["/a"], labels=[""], sha256=["a" * 64], meta=META)
    with h5py.File(tmp_path / "f.h5", "a") as h5:
        h5.attrs["furnitype_format"] = 99
    with pytest.raises(StoreError, match="newer furnitype"):
        load(tmp_path / "f.h5")


def test_journal_survives_a_torn_tail_and_refuses_other_settings(tmp_path):
    store = tmp_path / "f.h5"
    with Journal(store, META) as journal:
        journal.append([Row("/a", "x", "a" * 64, np.ones(4))], [Skip("/b", "", "b" * 64, "empty file")])
    with open(f"{store}.journal", "ab") as fh:
        fh.write(b"R\x10\x00\x00")  # a record cut short by kill -9
    with Journal(store, META) as journal:
        assert [r.path for r in journal.rows] == ["/a"] and journal.skips[0].reason == "empty file"
        assert journal.dropped_bytes == 4
        np.testing.assert_array_equal(journal.rows[0].features, np.ones(4))
    with pytest.raises(SettingsMismatchError, match="pooling=avg"):
        Journal(store, {**META, "pooling": "max"}).__enter__()
    with Journal(store, {**META, "pooling": "max"}, overwrite=True) as journal:
        assert journal.rows == []


def test_a_second_writer_is_refused(tmp_path):
    with Journal(tmp_path / "f.h5", META):
        with pytest.raises(StoreError, match="another furnitype process is writing"):
            Journal(tmp_path / "f.h5", META).__enter__()
