"""``furnitype duplicates``: planted exact and near copies are grouped, a label conflict comes first, the CSV,
JSON and sheet outputs, and bad inputs as one line."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shlex
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from furnitype.duplicates import CSV_COLUMNS, conflict_note, duplicates, find_groups
from furnitype.errors import InputError
from furnitype.extraction import extract
from furnitype.features import load
from furnitype.features.index import CosineIndex
from furnitype.features.store import save
from tests.conftest import STORE_META
from tests.conftest import run_cli as invoke
from tests.images import COLOURS, make_photo_folder, photo

SETTINGS = {"backbone": "vgg16", "weights": "none", "image_size": 32, "batch_size": 8, "progress": False}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """12 generated photos of 3 classes, plus two planted copies, extracted (VGG16, random seeded weights, 32 px):
    ``bed/bed_1.jpg`` again as ``bed/bed_1-again.jpg`` (the same bytes), and ``bed/bed_0.jpg`` encoded again at
    another quality and a slightly smaller size, filed under ``sofa`` (a near copy with another label)."""
    base = tmp_path_factory.mktemp("duplicates")
    photos = make_photo_folder(base / "photos", per_class=4, classes=("bed", "chair", "sofa"))
    shutil.copyfile(photos / "bed" / "bed_1.jpg", photos / "bed" / "bed_1-again.jpg")
    photo(0, COLOURS["bed"]).resize((46, 38)).save(photos / "sofa" / "bed_0-resaved.jpg", quality=95)
    out = extract([photos], out=base / "feats.h5", **SETTINGS).out
    fs = load(out)
    planted = {str(photos / "bed" / "bed_1-again.jpg"), str(photos / "sofa" / "bed_0-resaved.jpg")}
    originals = [i for i, path in enumerate(fs.paths) if path not in planted]
    distances, _ = CosineIndex(fs.features[originals]).kneighbors(fs.features[originals], 2)
    apart = float(distances[:, 1].min())  # the closest two different generated photos
    return {"base": base, "photos": photos, "file": out, "rows": fs, "apart": apart}


def _paths(group) -> set[str]:
    return {p.path for p in group.photos}


def test_planted_copies_are_grouped_with_the_label_conflict_first(store):
    photos = store["photos"]
    near = _distance(store["rows"], photos / "bed" / "bed_0.jpg", photos / "sofa" / "bed_0-resaved.jpg")
    assert 0 < near < store["apart"] / 4, "the planted near copy must be far nearer than any two different photos"
    result = duplicates(store["file"], max_distance=store["apart"] / 2)
    assert [g.kind for g in result.groups] == ["near", "exact"]
    conflict, exact = result.groups
    assert _paths(conflict) == {str(photos / "bed" / "bed_0.jpg"), str(photos / "sofa" / "bed_0-resaved.jpg")}
    assert conflict.conflict and conflict.labels in (["bed", "sofa"], ["sofa", "bed"])
    assert conflict.photos[0].distance == 0 and conflict.photos[1].distance == pytest.approx(near, abs=1e-6)
    assert _paths(exact) == {str(photos / "bed" / "bed_1.jpg"), str(photos / "bed" / "bed_1-again.jpg")}
    assert not exact.conflict and exact.labels == ["bed"] and [p.distance for p in exact.photos] == [0, 0]
    assert len({p.sha256 for p in exact.photos}) == 1
    assert (result.rows, result.contents, result.conflicts) == (14, 13, 1)
    assert result.count("exact") == result.count("near") == 1

    identical_only = duplicates(store["file"], max_distance=0)
    assert [_paths(g) for g in identical_only.groups] == [_paths(exact)]
    everything = duplicates(store["file"], max_distance=2)
    assert len(everything.groups) == 1 and len(everything.groups[0].photos) == 14


def _distance(fs, a, b) -> float:
    rows = [list(fs.paths).index(str(a)), list(fs.paths).index(str(b))]
    u = fs.features[rows] / np.linalg.norm(fs.features[rows], axis=1, keepdims=True)
    return float(1 - u[0] @ u[1])


def test_the_command_prints_writes_the_csv_json_and_sheet(store, tmp_path):
    d = str(store["apart"] / 2)
    out, sheet = tmp_path / "out" / "groups.csv", tmp_path / "groups.png"
    result = invoke("duplicates", store["file"], "--max-distance", d, "--out", out, "--sheet", sheet)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("  1  near, 2 photos, labels differ: ")
    assert lines[-1].startswith(f"2 groups of duplicate photos in {store['file']} (1 exact, 1 near within ")
    assert "1 with different labels; 4 of 14 photos in groups" in lines[-1] and lines[-1].endswith(f"{sheet}")

    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS and [r["group"] for r in rows] == ["1", "1", "2", "2"]
    assert [r["kind"] for r in rows] == ["near", "near", "exact", "exact"]
    assert [r["conflict"] for r in rows] == ["true", "true", "false", "false"]
    assert rows[0]["distance"] == "0.0" and 0 < float(rows[1]["distance"]) <= float(d)
    assert {r["path"] for r in rows[2:]} == {str(store["photos"] / "bed" / n) for n in ("bed_1.jpg", "bed_1-again.jpg")}
    assert rows[2]["sha256"] == hashlib.sha256((store["photos"] / "bed" / "bed_1.jpg").read_bytes()).hexdigest()

    with Image.open(sheet) as png:
        assert png.format == "PNG" and png.width > 200 and png.height > 200
        png.load()

    again = invoke("duplicates", store["file"], "--max-distance", d, "--out", out)
    assert again.exit_code == 2 and again.output == (
        f"Error: {out} already exists; choose another --out, or --overwrite to replace it.\n"
    )
    as_json = invoke("duplicates", store["file"], "--max-distance", d, "--out", out, "--overwrite", "--json")
    assert as_json.exit_code == 0, as_json.output
    document = json.loads(as_json.output)
    assert (document["exact_groups"], document["near_groups"], document["conflicting_groups"]) == (1, 1, 1)
    assert document["rows"] == 14 and document["contents"] == 13 and document["out"] == str(out)
    first = document["groups"][0]
    assert first["group"] == 1 and first["kind"] == "near" and first["conflict"] is True
    assert sorted(first["labels"]) == ["bed", "sofa"] and len(first["photos"]) == 2
    assert set(first["photos"][0]) == {"path", "label", "sha256", "distance"}


def test_groups_are_components_ordered_by_conflict_then_size(tmp_path):
    """Written with ``save``: a chain a-b-c whose ends are farther apart than the distance is one group; an
    unlabelled photo beside a labelled one is no conflict; identical content under two labels is."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(64, 64)))[0][:8]  # orthonormal: distance 1 between different ones

    def near(v, angle):  # a unit vector at cosine distance 1 - cos(angle) from v
        other = basis[7]
        return np.cos(angle) * v + np.sin(angle) * other

    rows = [
        ("big/a.jpg", "sofa", "1", basis[0]),
        ("big/b.jpg", "sofa", "2", near(basis[0], 0.2)),  # distance 0.020 from a
        ("big/c.jpg", "sofa", "3", near(basis[0], 0.4)),  # 0.079 from a, 0.020 from b
        ("big/d.jpg", "", "4", near(basis[0], 0.3)),
        ("pair/x.jpg", "bed", "5", basis[1]),
        ("pair/y.jpg", "chair", "5", basis[1]),  # the same content under another label
        ("trio/p.jpg", "tv", "6", basis[2]),
        ("trio/q.jpg", "tv", "7", near(basis[2], 0.1)),
        ("trio/r.jpg", "table", "8", near(basis[2], 0.15)),
        ("alone/s.jpg", "bed", "9", basis[3]),
        ("alone/t.jpg", "", "a", basis[4]),
    ]
    file = tmp_path / "made.h5"
    save(file, features=np.array([r[3] for r in rows], np.float32), paths=[f"/p/{r[0]}" for r in rows],
         labels=[r[1] for r in rows], sha256=[r[2] * 64 for r in rows], meta=STORE_META)
    result = find_groups(load(file), max_distance=0.03)
    assert [(g.kind, g.conflict, len(g.photos)) for g in result.groups] == [
        ("near", True, 3), ("exact", True, 2), ("near", False, 4)
    ]
    trio, pair, big = result.groups
    assert [p.path for p in trio.photos] == ["/p/trio/p.jpg", "/p/trio/q.jpg", "/p/trio/r.jpg"]  # most common first
    assert trio.labels == ["tv", "table"] and pair.labels == ["bed", "chair"] and big.labels == ["sofa"]
    assert [p.path for p in big.photos][-1] == "/p/big/d.jpg"  # unlabelled last
    assert big.photos[2].distance == pytest.approx(1 - np.cos(0.4), abs=1e-5)  # c, through b: beyond 0.03
    assert (result.rows, result.contents) == (11, 10)
    assert find_groups(load(file), max_distance=0.001).groups == [pair]  # q-r: 0.00125
    frame = result.to_frame()
    assert list(frame.columns) == list(CSV_COLUMNS) and len(frame) == 9 and frame.group.tolist()[:3] == [1, 1, 1]


def test_an_empty_or_single_row_store_has_no_groups(tmp_path):
    file = tmp_path / "one.h5"
    save(file, features=np.ones((1, 4), np.float32), paths=["/p/a.jpg"], labels=["bed"], sha256=["1" * 64],
         meta=STORE_META)
    assert duplicates(file).groups == []
    result = invoke("duplicates", file)
    assert result.exit_code == 0 and result.output.startswith("0 groups of duplicate photos in ")


def test_max_distance_0_groups_contents_with_identical_features(tmp_path):
    """Two files with the same pixels (a JPEG saved again as PNG) have other bytes but identical features: float32
    rounding puts them a little above 0 apart, and 0 must still group them."""
    X = np.random.default_rng(3).normal(size=(40, 512)).astype(np.float32)
    distances, _ = CosineIndex(X).kneighbors(X, 1)
    assert (distances[:, 0] > 0).any(), "some rows must be found a little above 0 from themselves"
    file = tmp_path / "same.h5"
    paths = [f"/p/{i:03}.{ext}" for i in range(40) for ext in ("jpg", "png")]
    save(file, features=np.repeat(X, 2, axis=0), paths=paths, labels=["sofa"] * 80,
         sha256=[f"{i:064x}" for i in range(80)], meta=STORE_META)
    result = duplicates(file, max_distance=0)
    assert len(result.groups) == 40 and {g.kind for g in result.groups} == {"near"}
    assert [[p.distance for p in g.photos] for g in result.groups] == [[0.0, 0.0]] * 40
    one = invoke("duplicates", file, "--max-distance", "0")
    assert one.exit_code == 0 and "40 groups of duplicate photos" in one.output.splitlines()[-1]


def test_max_distance_is_any_real_number_but_a_bool(tmp_path):
    """A distance computed with numpy's float32 (as CosineIndex gives them) is a distance; True is not."""
    file = tmp_path / "pair.h5"
    save(file, features=np.array([[1, 0, 0], [1, 0.01, 0]], np.float32), paths=["/p/a.jpg", "/p/b.jpg"],
         labels=["bed", "bed"], sha256=["1" * 64, "2" * 64], meta=STORE_META)
    result = duplicates(file, max_distance=np.float32(0.01))
    assert len(result.groups) == 1 and result.summary().startswith("1 group of duplicate photos in ")
    with pytest.raises(InputError, match="max_distance must be a cosine distance from 0 to 2"):
        duplicates(file, max_distance=True)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["missing.h5"], 2, "Error: feature file not found: missing.h5"),
        (["truncated.h5"], 1, "Error: truncated.h5 is damaged (truncated file: eof = 3000"),
        (["flipped.h5"], 1, "Error: flipped.h5 is damaged ("),
        (["feats.h5", "--max-distance", "-0.1"], 2, "Error: max_distance must be a cosine distance from 0 to 2. "
         "Received: max_distance=-0.1"),
        (["feats.h5", "--max-distance", "nan"], 2, "Error: max_distance must be a cosine distance from 0 to 2."),
        (["feats.h5", "--max-distance", "3"], 2, "Error: max_distance must be a cosine distance from 0 to 2."),
        (["feats.h5", "--out", "feats.h5", "--overwrite"], 2, "Error: --out feats.h5 is one of the inputs"),
        (["feats.h5", "--sheet", "photo.jpg", "--overwrite"], 2, "Error: --sheet photo.jpg is one of the photos"),
        (["feats.h5", "--out", "g.csv", "--sheet", "g.csv"], 2, "Error: --sheet g.csv is also --out"),
        (["feats.h5", "--out", "folder"], 2, "Error: cannot write folder: it is a folder."),
        # the store's journal and lock file, beside its real path: a CSV over the journal made it unreadable
        (["link.h5", "--out", "feats.h5.undo"], 2, "Error: --out feats.h5.undo is one of the inputs"),
        (["feats.h5", "--sheet", "feats.h5.lock"], 2, "Error: --sheet feats.h5.lock is one of the inputs"),
    ],
)
def test_bad_inputs_are_one_line(store, tmp_path, monkeypatch, args, code, message):
    shutil.copyfile(store["file"], tmp_path / "feats.h5")
    (tmp_path / "truncated.h5").write_bytes(Path(store["file"]).read_bytes()[:3000])  # a half-copied file
    _flip_a_features_byte(shutil.copyfile(store["file"], tmp_path / "flipped.h5"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "link.h5").symlink_to("feats.h5")
    photo_path = tmp_path / "photo.jpg"
    photo_path.hardlink_to(store["photos"] / "chair" / "chair_0.jpg")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke("duplicates", *args)
    assert result.exit_code == code and result.output.startswith(message), result.output
    assert len(result.output.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _flip_a_features_byte(store: Path) -> None:
    """Damage found only by reading the rows: a byte inside the first chunk of /features."""
    import h5py

    with h5py.File(store, "r") as h5:
        chunk = h5["features"].id.get_chunk_info(0)
    with open(store, "r+b") as fh:
        fh.seek(chunk.byte_offset + chunk.size // 2)
        byte = fh.read(1)[0]
        fh.seek(-1, 1)
        fh.write(bytes([byte ^ 0xFF]))


def test_classify_notes_the_groups_whose_labels_differ(tmp_path):
    """A near copy of a bed photo filed under chair: the run's report counts the group and names the command."""
    rng = np.random.default_rng(1)
    labels = [name for name in ("bed", "chair", "sofa") for _ in range(6)]
    X = rng.normal(size=(len(labels), 64)).astype(np.float32) + 3 * np.repeat(np.eye(3, 64), 6, axis=0)
    paths = [f"/p/{label}/{i}.jpg" for i, label in enumerate(labels)]
    sha = [f"{i:064x}" for i in range(len(labels))]
    clean, conflicting = tmp_path / "clean.h5", tmp_path / "conflicting.h5"
    save(clean, features=X, paths=paths, labels=labels, sha256=sha, meta=STORE_META)
    copy = X[:1] + 0.01 * rng.normal(size=(1, 64)).astype(np.float32)  # cosine distance about 1e-5
    save(conflicting, features=np.concatenate([X, copy]), paths=[*paths, "/p/chair/copy.jpg"],
         labels=[*labels, "chair"], sha256=[*sha, "f" * 64], meta=STORE_META)

    result = invoke("classify", conflicting, "--models", "logreg", "--cv", "2", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    note = (f"conflicting: 1 group of identical or near-identical photos (cosine distance up to 0.05) carries "
            f"different labels, one product filed under two classes? `furnitype duplicates {conflicting}` lists "
            "them first.")
    assert f"note: {note}" in result.output.splitlines()
    assert note in (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert [g.labels for g in duplicates(conflicting).groups] == [["bed", "chair"]]

    plain = invoke("classify", clean, "--models", "logreg", "--cv", "2", "--out", tmp_path / "run-clean")
    assert plain.exit_code == 0 and "near-identical" not in plain.output


def test_many_copies_of_one_photo_do_not_hide_its_near_copy(tmp_path):
    """More copies of one content than neighbours searched (10): the search is over contents, so the near copy
    still joins them."""
    rng = np.random.default_rng(2)
    X = rng.normal(size=(3, 32)).astype(np.float32)
    near = X[0] + 0.01 * rng.normal(size=32).astype(np.float32)
    n = 12
    file = tmp_path / "copies.h5"
    save(file, features=np.concatenate([np.repeat(X[:1], n, axis=0), [near], X[1:]]),
         paths=[f"/p/copy-{i:02}.jpg" for i in range(n)] + ["/p/near.jpg", "/p/other-1.jpg", "/p/other-2.jpg"],
         labels=["sofa"] * (n + 1) + ["bed", "bed"], sha256=["a" * 64] * n + ["b" * 64, "c" * 64, "d" * 64],
         meta=STORE_META)
    [group] = duplicates(file).groups
    assert group.kind == "near" and len(group.photos) == n + 1 and group.photos[-1].path == "/p/near.jpg"
    assert [p.distance for p in group.photos[:n]] == [0.0] * n and 0 < group.photos[-1].distance < 0.01


def test_ctrl_c_while_the_sheet_is_drawn_writes_no_csv(store, tmp_path, monkeypatch):
    """Ctrl-C comes while the sheet reads the photos (the slow part): exit 130, the CSV is not replaced."""
    import furnitype.reports.sheet

    out = tmp_path / "groups.csv"
    out.write_text("a list being checked\n", encoding="utf-8")

    def interrupted(path, size):
        raise KeyboardInterrupt

    monkeypatch.setattr(furnitype.reports.sheet, "thumbnail", interrupted)
    result = invoke("duplicates", store["file"], "--max-distance", str(store["apart"] / 2), "--out", out,
                    "--sheet", tmp_path / "groups.png", "--overwrite")
    assert result.exit_code == 130 and result.stdout == ""
    assert out.read_text(encoding="utf-8") == "a list being checked\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["groups.csv"]


def test_the_note_quotes_the_command_for_a_shell(tmp_path):
    """A feature file named with spaces and brackets: the note's command pastes into a shell as it is."""
    file = tmp_path / "my feats (v2).h5"
    save(file, features=np.array([[1, 0, 0], [1, 0.001, 0]], np.float32), paths=["/p/a.jpg", "/p/b.jpg"],
         labels=["bed", "sofa"], sha256=["1" * 64, "2" * 64], meta=STORE_META)
    [note] = conflict_note("my feats (v2)", load(file))
    command = note.split("`")[1]
    assert shlex.split(command) == ["furnitype", "duplicates", str(file)]


def test_the_note_counts_only_identical_photos_for_random_weights(tmp_path):
    """Random weights put nearly all photos within 0.05 of each other (every classify of such a store noted one
    conflicting group): for them the note counts identical photos only, and its command asks for 0."""
    rng = np.random.default_rng(4)
    X = 1 + 0.1 * rng.random((8, 16)).astype(np.float32)  # all within 0.05, as random weights give
    labels = ["bed", "chair"] * 4
    meta = {**STORE_META, "weights": "none(seed=0)"}
    apart, same = tmp_path / "apart.h5", tmp_path / "same.h5"
    save(apart, features=X, paths=[f"/p/{i}.jpg" for i in range(8)], labels=labels,
         sha256=[f"{i:064x}" for i in range(8)], meta=meta)
    assert find_groups(load(apart)).conflicts == 1 and conflict_note("apart", load(apart)) == []
    save(same, features=np.concatenate([X, X[:1]]), paths=[f"/p/{i}.jpg" for i in range(9)], labels=[*labels, "sofa"],
         sha256=[f"{i:064x}" for i in range(8)] + [f"{0:064x}"], meta=meta)
    assert conflict_note("same", load(same)) == [
        f"same: 1 group of identical photos carries different labels, one product filed under two classes? "
        f"`furnitype duplicates {same} --max-distance 0` lists them first."
    ]


@pytest.mark.parametrize("option", ["--out", "--sheet"])
def test_an_output_that_is_a_fifo_is_refused_not_replaced(store, tmp_path, option):
    """``--out /dev/null --overwrite`` renamed a file over the device; a FIFO stands in for it (no root needed)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = invoke("duplicates", store["file"], option, fifo, "--overwrite")
    assert result.exit_code == 2 and result.output == (
        f"Error: cannot write {fifo}: it is a device, FIFO or socket, not a file.\n"
    )
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and sorted(tmp_path.iterdir()) == [fifo]


def test_above_the_threshold_the_index_finds_the_exact_groups_reading_only_the_grouped_rows(tmp_path, monkeypatch):
    """Threshold lowered to 10 rows: a store of 200 rows of 8 features with planted near copies (pairs and a
    chain of three) and exact copies is searched through its index; the groups equal exact search's, and only
    the rows in groups have their features read."""
    from furnitype.features import ann
    from furnitype.features.view import StoreView

    rng = np.random.default_rng(5)
    X = rng.normal(size=(200, 8)).astype(np.float32)
    for i in range(0, 40, 4):  # near copies: 1 of 0, 5 of 4, ...
        X[i + 1] = X[i] + 0.01 * rng.normal(size=8).astype(np.float32)
    X[42], X[43] = X[41] + 0.02, X[41] + 0.04  # a chain of three
    sha = [f"{i:064x}" for i in range(200)]
    sha[61], X[61] = sha[60], X[60]  # one content under two paths
    sha[62], X[62] = sha[60], X[60]
    file = tmp_path / "s.h5"
    save(file, features=X, paths=[f"/p/{i:03}.jpg" for i in range(200)],
         labels=["bed" if i % 3 else "sofa" for i in range(200)], sha256=sha, meta=STORE_META)
    exact = duplicates(file)
    monkeypatch.setattr(ann, "THRESHOLD", 10)
    read = []
    column = StoreView.column

    def counted(self, table, name, index=None):
        if name == "features":
            read.append(len(self.live(table)) if index is None else len(index))
        return column(self, table, name, index)

    monkeypatch.setattr(StoreView, "column", counted)
    found = duplicates(file)
    assert ann.index_path(file).exists()  # the index path ran
    assert [g.as_dict() for g in found.groups] == [g.as_dict() for g in exact.groups]
    assert (exact.count("exact"), exact.count("near")) == (1, 11) and found.contents == exact.contents == 198
    grouped = sum(len(g.photos) for g in found.groups)
    assert read[-1] == grouped == 26  # the last read: the grouped rows' features only
    untimed = {"seconds": 0}
    assert duplicates(file, exact=True).as_dict() | untimed == exact.as_dict() | untimed
