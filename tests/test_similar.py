"""``furnitype similar``: a stored photo finds itself first, new photos are extracted alike, JSON and the sheet."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from furnitype.errors import SettingsMismatchError
from furnitype.extraction import extract
from furnitype.features import load
from furnitype.features.index import CosineIndex
from furnitype.reports.sheet import contact_sheet
from furnitype.similar import SimilarIndex, similar
from tests.conftest import run_cli as invoke
from tests.images import COLOURS, make_photo_folder, photo

SETTINGS = {"backbone": "vgg16", "weights": "none", "image_size": 32, "batch_size": 8, "progress": False}


def cosine_distances(X: np.ndarray, q: np.ndarray) -> np.ndarray:
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    return 1.0 - X @ (q / np.linalg.norm(q))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """15 photos of 3 classes and their feature file (VGG16, random seeded weights, 32 px)."""
    base = tmp_path_factory.mktemp("similar")
    photos = make_photo_folder(base / "photos", per_class=5, classes=("bed", "chair", "sofa"))
    out = extract([photos], out=base / "feats.h5", **SETTINGS).out
    return {"base": base, "photos": photos, "file": out, "rows": load(out)}


def test_a_stored_photo_finds_itself_first(store):
    query = store["photos"] / "chair" / "chair_2.jpg"
    [match] = similar(store["file"], [query], k=4)
    assert match.query == str(query) and match.in_store and match.label == "chair" and match.error == ""
    assert [n.path for n in match.neighbours][0] == str(query) and match.neighbours[0].distance == 0.0
    distances = [n.distance for n in match.neighbours]
    assert len(distances) == 4 and distances == sorted(distances)
    rows = store["rows"]
    expected = cosine_distances(rows.features, rows.features[list(rows.paths).index(str(query))])
    order = np.argsort(expected)[:4]
    assert [n.path for n in match.neighbours] == list(rows.paths[order])
    np.testing.assert_allclose(distances[1:], expected[order][1:], atol=1e-5)

    [without] = similar(store["file"], [query], k=4, exclude_self=True)
    assert str(query) not in [n.path for n in without.neighbours] and len(without.neighbours) == 4
    assert without.neighbours[:3] == match.neighbours[1:]


def test_the_index_agrees_with_scikit_learn(store):
    from sklearn.neighbors import NearestNeighbors

    X = store["rows"].features
    X = np.concatenate([X, np.zeros((1, X.shape[1]), np.float32)])  # an all-zero row: distance 1 to all
    index = CosineIndex(X)
    distances, rows = index.kneighbors(X[:-1], 6)
    expected_d, expected_rows = NearestNeighbors(metric="cosine", algorithm="brute").fit(X).kneighbors(X[:-1], 6)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(distances, expected_d, atol=1e-5)
    all_d, all_rows = index.kneighbors(X[-1:], 99)
    assert all_d.shape == (1, len(X)) and np.allclose(all_d, 1.0) and list(all_rows[0]) == list(range(len(X)))


def test_same_content_elsewhere_or_gone_uses_the_stored_row(store, tmp_path):
    original = store["photos"] / "bed" / "bed_1.jpg"
    copy = tmp_path / "copy-of-bed.jpg"
    shutil.copyfile(original, copy)
    gone = store["photos"] / "sofa" / "sofa_0.jpg"
    kept = tmp_path / "sofa_0.jpg"
    shutil.move(gone, kept)
    try:
        by_copy, by_gone_path = similar(store["file"], [copy, gone], k=2)
    finally:
        shutil.move(kept, gone)
    assert by_copy.in_store and by_copy.label == "bed"
    assert by_copy.neighbours[0].path == str(original) and by_copy.neighbours[0].distance == 0.0
    assert by_gone_path.in_store and by_gone_path.neighbours[0].path == str(gone)


def test_a_new_photo_is_extracted_with_the_stores_settings(store, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    photo(321, COLOURS["sofa"], (60, 50)).save(folder / "new-sofa.png")
    reference = load(extract([folder], out=tmp_path / "ref.h5", **SETTINGS).out)

    match, again = similar(store["file"], [folder / "new-sofa.png", folder / "new-sofa.png"], k=15)
    assert again == match

    assert not match.in_store and match.label == "" and len(match.neighbours) == 15
    expected = cosine_distances(store["rows"].features, reference.features[0])
    by_path = dict(zip(store["rows"].paths, expected, strict=True))
    np.testing.assert_allclose([n.distance for n in match.neighbours], [by_path[n.path] for n in match.neighbours],
                               atol=1e-5)
    assert [n.distance for n in match.neighbours] == sorted(n.distance for n in match.neighbours)


def test_bad_queries_get_an_error_and_the_others_go_on(store, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    good = store["photos"] / "bed" / "bed_0.jpg"
    matches = similar(store["file"], [tmp_path / "empty.jpg", tmp_path / "nowhere.jpg", good], k=3)
    assert [m.error for m in matches] == ["empty file", "file not found", ""]
    assert [len(m.neighbours) for m in matches] == [0, 0, 3]


def test_weights_other_than_the_stores_are_refused_for_new_photos(store, tmp_path):
    other = tmp_path / "other.weights.h5"
    other.write_bytes(b"other weights")
    photo(99, COLOURS["bed"]).save(tmp_path / "new.jpg")
    with pytest.raises(SettingsMismatchError, match="but the rows of .*feats.h5 were made with none"):
        similar(store["file"], [tmp_path / "new.jpg"], weights=str(other))
    # a stored query needs no network, so no weights are checked or built
    assert similar(store["file"], [store["photos"] / "bed" / "bed_0.jpg"], weights=str(other))[0].in_store


def test_cli_json_shape_and_folder_queries(store):
    result = invoke("similar", store["file"], store["photos"] / "sofa", "--k", "3", "--json")
    assert result.exit_code == 0, result.output
    matches = json.loads(result.stdout)
    assert [Path(m["query"]).name for m in matches] == [f"sofa_{i}.jpg" for i in range(5)]
    for m in matches:
        assert set(m) == {"query", "label", "in_store", "error", "neighbours"} and m["error"] is None
        assert m["neighbours"][0] == {"path": m["query"], "label": "sofa", "distance": 0.0}
        assert len(m["neighbours"]) == 3
        assert all(set(n) == {"path", "label", "distance"} for n in m["neighbours"])

    result = invoke("similar", store["file"], store["photos"] / "bed" / "bed_0.jpg", "-k", "99", "--exclude-self")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{store['photos'] / 'bed' / 'bed_0.jpg'} (bed, in the store)" and len(lines) == 1 + 14


def test_contact_sheet_is_a_valid_png(store, tmp_path):
    sheet = tmp_path / "sheet.png"
    (tmp_path / "broken.jpg").write_bytes(b"broken")
    photos = store["photos"]
    queries = [photos / "chair" / "chair_0.jpg", photos / "bed" / "bed_3.jpg", tmp_path / "broken.jpg"]
    result = invoke("similar", store["file"], *queries, "--k", "4", "--sheet", sheet)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"contact sheet: {sheet}"
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(sheet) as img:
        img.verify()
    with Image.open(sheet) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        wide, tall = img.size
    assert wide > 5 * 160 and tall > 3 * 160
    index = SimilarIndex.open(store["file"])
    fewer = contact_sheet(index.search(queries[:1], k=2), tmp_path / "small.png", thumb=80)
    with Image.open(fewer) as img:
        assert img.size[0] < wide / 2 and img.size[1] < tall / 2


def test_a_sheet_over_the_feature_files_journal_or_lock_is_refused(store):
    query = store["photos"] / "chair" / "chair_2.jpg"
    for beside in (".undo", ".lock"):
        target = f"{store['file']}{beside}"
        result = invoke("similar", store["file"], query, "--sheet", target)
        assert result.exit_code == 2 and result.output.startswith(f"Error: --sheet {target} is one of the inputs")
        assert not os.path.exists(target)
