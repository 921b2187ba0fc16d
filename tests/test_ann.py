"""The approximate index beside a store (``furnitype.features.ann``): recall, kept in step, rebuilt when it cannot
be trusted, never half written; ``similar`` through it answers as ``--exact`` does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from furnitype.features import ann, compact, load, save
from furnitype.features.locking import WriterLock
from furnitype.features.view import open_store
from furnitype.similar import SimilarIndex, similar
from tests import store_writer
from tests.conftest import run_cli
from tests.processes import pause_env, signal_stopped, wait_stopped

META = {**store_writer.SETTINGS}
ROOT = Path(__file__).resolve().parent.parent


def _clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """ReLU-like rows around 40 centres (neighbours that matter, as photos of one product line have)."""
    rng = np.random.default_rng(seed)
    centres = rng.random((40, dim), dtype=np.float32)
    X = centres[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, dim), np.float32)
    return np.maximum(X, 0) + 1e-3


def _save(path: Path, X: np.ndarray, prefix: str = "/photos/p") -> list[str]:
    paths = [f"{prefix}{i:06d}.jpg" for i in range(len(X))]
    save(path, features=X, paths=paths, labels=["ab"[i % 2] for i in range(len(X))],
         sha256=[store_writer.digest(p) for p in paths], meta=META)
    return paths


def _update(store: Path) -> ann.AnnIndex:
    with WriterLock(store), open_store(store) as view:
        return ann.update(view, store)


def _answers(store: Path, queries: list[str], *, exact: bool, k: int = 10) -> list[list[tuple[str, float]]]:
    matches = SimilarIndex.open(store, exact=exact).search(queries, k=k)
    return [[(n.path, round(n.distance, 5)) for n in m.neighbours] for m in matches]


def test_recall_at_10_of_the_index_against_exact_search(tmp_path):
    store = tmp_path / "s.h5"
    X = _clustered(6000, 24, seed=0)
    _save(store, X)
    index = _update(store)
    assert len(index) == 6000 and index.covered.rows == 6000
    with open_store(store) as view:
        queries = X[np.linspace(0, 5999, 300).round().astype(int)]
        d_found, found = ann.kneighbors(view, index, queries, 10)
        d_exact, exact = ann.kneighbors(view, None, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact, strict=True)])
    assert recall >= 0.95, recall
    # The distances are exact (re-ranked from the stored rows), whichever rows were found.
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    expected = 1 - np.einsum("qd,qkd->qk", q, unit[found])
    np.testing.assert_allclose(d_found, expected, atol=1e-5)
    np.testing.assert_allclose(d_exact[:, 0], 0, atol=1e-5)


def test_incremental_additions_and_removals_equal_a_rebuild(tmp_path, monkeypatch):
    store = tmp_path / "s.h5"
    monkeypatch.setattr(ann, "TAIL_ROWS", 0)  # every change rewrites the index, as past 10,000 rows
    store_writer.append(str(store), 0, 400, 100)
    _update(store)
    store_writer.append(str(store), 400, 200, 100)  # extract's end brings the index up to date
    kept = [f"/photos/a/{i:06d}.jpg" for i in range(600) if i % 10 != 3]  # 60 rows removed (no compaction)
    listing = store_writer.FakeListing(kept, ["a"] * len(kept), folders=["/photos/a"])
    with store_writer.FeatureCache(str(store), META, meta=META) as cache:
        cache.compare(listing)
        cache.hashed({})
        cache.finish()
    with open_store(store) as view:
        live = view.live("rows")
        assert len(live) == 540 and view.n["rows"] == 600
        assert ann.read_covered(ann.index_path(store))[0].rows == 600
    incremental = ann.open_index(ann.index_path(store))
    np.testing.assert_array_equal(incremental.rows(), live)  # added and removed, not only filtered
    queries = kept[::7]
    before = _answers(store, queries, exact=False)
    ann.index_path(store).unlink()
    rebuilt = _update(store)
    np.testing.assert_array_equal(rebuilt.rows(), live)
    assert _answers(store, queries, exact=False) == before == _answers(store, queries, exact=True)


def test_rows_the_index_lacks_are_searched_and_removed_rows_never_answer(tmp_path):
    store = tmp_path / "s.h5"
    store_writer.append(str(store), 0, 300, 100)
    _update(store)
    store_writer.append(str(store), 300, 100, 100)  # fewer than TAIL_ROWS: the index is left as it was
    kept = [f"/photos/a/{i:06d}.jpg" for i in range(400) if i % 9]
    listing = store_writer.FakeListing(kept, ["a"] * len(kept), folders=["/photos/a"])
    with store_writer.FeatureCache(str(store), META, meta=META) as cache:
        cache.compare(listing)
        cache.hashed({})
        cache.finish()
    assert ann.read_covered(ann.index_path(store))[0].rows == 300
    answers = _answers(store, kept[::5], exact=False, k=20)
    assert answers == _answers(store, kept[::5], exact=True, k=20)
    assert any(int(p[-10:-4]) >= 300 for a in answers for p, _ in a)
    assert all(int(p[-10:-4]) % 9 for a in answers for p, _ in a)


def _foreign(store: Path, index: Path) -> None:
    other = store.with_name("other.h5")
    _save(other, _clustered(300, 24, seed=5))
    _update(other)
    shutil.copy(ann.index_path(other), index)


def _cut(index: Path) -> None:
    data = index.read_bytes()
    index.write_bytes(data[: len(data) // 2])


def _flip(offset: int):
    def damage(store: Path, index: Path) -> None:
        data = bytearray(index.read_bytes())
        data[offset] ^= 0xFF
        index.write_bytes(bytes(data))

    return damage


DAMAGE = {
    "cut in half": lambda store, index: _cut(index),
    "not an index": lambda store, index: index.write_bytes(os.urandom(5000)),
    "empty": lambda store, index: index.write_bytes(b""),
    "header byte": _flip(40),
    "trailer byte": _flip(-30),
    "another store's": _foreign,
    "store compacted": lambda store, index: (store_writer.remove_half(str(store)), compact(store)),
    "store rewritten": lambda store, index: _save(store, _clustered(500, 24, seed=9)),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_foreign_or_stale_index_is_rebuilt_with_one_warning_line(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(ann, "THRESHOLD", 10)
    store = tmp_path / "s.h5"
    paths = _save(store, _clustered(500, 24, seed=1))
    assert run_cli("similar", store, paths[0], "--json").stderr == ""  # made at the first search
    index = ann.index_path(store)
    assert index.exists()
    DAMAGE[kind](store, index)
    query = str(load(store).paths[3])
    result = run_cli("similar", store, query, "--top-k", "10", "--json")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {index.name} ") and "rebuilding it" in lines[0], lines
    assert json.loads(result.stdout) == json.loads(run_cli("similar", store, query, "--top-k", "10", "--json",
                                                           "--exact").stdout)
    with open_store(store) as view:
        covered, _ = ann.read_covered(index)
        assert not ann.problem(covered, view, ann.store_identity(view)) and ann.lag(covered, view) == 0
    assert run_cli("similar", store, query, "--json").stderr == ""  # trusted from now on


def test_kill_9_while_the_index_is_written_leaves_the_old_index(tmp_path, monkeypatch):
    store = tmp_path / "s.h5"
    store_writer.append(str(store), 0, 300, 100)
    _update(store)
    index = ann.index_path(store)
    old = index.read_bytes()
    code = ("import sys; from furnitype.features import ann; ann.TAIL_ROWS = 0; from tests import store_writer; "
            "store_writer.append(sys.argv[1], 300, 200, 100)")
    env = {**pause_env("index-write"), "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", code, str(store)], env=env, stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    assert wait_stopped(writer), writer.communicate()
    leftover = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{index.name}.tmp-")]
    assert leftover and index.read_bytes() == old  # the new index is being written beside
    signal_stopped(writer, 9)
    writer.wait()
    assert index.read_bytes() == old and ann.open_index(index).covered.rows == 300
    queries = [f"/photos/a/{i:06d}.jpg" for i in range(0, 500, 37)]
    assert _answers(store, queries, exact=False) == _answers(store, queries, exact=True)
    monkeypatch.setattr(ann, "TAIL_ROWS", 0)
    store_writer.append(str(store), 500, 8, 8)  # the next writer removes what the killed one left, and updates
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{index.name}.tmp-")]
    assert ann.open_index(index).covered.rows == 508


def test_similar_exact_equals_the_default_on_small_stores(tmp_path):
    store = tmp_path / "s.h5"
    paths = _save(store, _clustered(400, 24, seed=3))
    default = run_cli("similar", store, *paths[:5], "--top-k", "7", "--json")
    exact = run_cli("similar", store, *paths[:5], "--top-k", "7", "--json", "--exact")
    assert default.exit_code == exact.exit_code == 0 and default.stdout == exact.stdout
    assert not ann.index_path(store).exists()  # below the threshold: no index is made
    approximate = [m.as_dict() for m in similar(store, paths[:5], k=7, exact=False)]
    assert approximate == json.loads(default.stdout)


def test_all_neighbours_through_the_index_equal_exact(tmp_path):
    store = tmp_path / "s.h5"
    X = _clustered(700, 24, seed=4)
    X[5] = X[6]  # same direction twice
    paths = _save(store, X)
    exact = ann.all_neighbours(store, 5, exact=True)
    found = ann.all_neighbours(store, 5, exact=False)
    assert list(exact.paths) == paths and exact.neighbours.shape == (700, 5)
    assert exact.neighbours[5, 0] == 6 and exact.neighbours[6, 0] == 5 and exact.distances[5, 0] < 1e-6
    assert not (exact.neighbours == np.arange(700)[:, None]).any()  # never a row's own
    agree = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found.neighbours, exact.neighbours, strict=True)])
    assert agree >= 0.98
    np.testing.assert_allclose(np.sort(found.distances, axis=1)[:, 0], exact.distances[:, 0], atol=1e-5)


def test_extract_makes_the_index_from_the_threshold_and_keeps_it(tmp_path, monkeypatch):
    store = tmp_path / "s.h5"
    monkeypatch.setattr(ann, "THRESHOLD", 100)
    store_writer.append(str(store), 0, 96, 32)
    assert not ann.index_path(store).exists()  # below the threshold: none
    store_writer.append(str(store), 96, 8, 8)
    assert ann.open_index(ann.index_path(store)).covered.rows == 104


def test_a_search_while_another_process_writes_the_store_answers_exactly(tmp_path, caplog):
    store = tmp_path / "s.h5"
    writer = store_writer.start(store, 40, 8, compact=True, env={**pause_env("compacted"), "PYTHONPATH": str(ROOT)},
                                cwd=ROOT)
    try:
        assert wait_stopped(writer), writer.communicate()  # it holds the writer lock
        queries = load(store).paths.tolist()[::9]
        with caplog.at_level("WARNING", logger="furnitype"):
            answers = _answers(store, queries, exact=False)
        assert [r.getMessage() for r in caplog.records] == [
            f"warning: the index of {store} cannot be made now (another furnitype process is writing {store}; "
            "wait for it to finish); searching every row."
        ]
        assert answers == _answers(store, queries, exact=True) and not ann.index_path(store).exists()
    finally:
        writer.kill()
        writer.wait()


def test_new_photos_and_folders_through_the_index_answer_as_exact(tmp_path):
    from furnitype.extraction import extract
    from tests.images import COLOURS, make_photo_folder, photo

    photos = make_photo_folder(tmp_path / "photos", per_class=4, classes=("bed", "chair", "sofa"))
    out = extract([photos], out=tmp_path / "feats.h5", backbone="vgg16", weights="none", image_size=32,
                  batch_size=8, progress=False).out
    new = tmp_path / "new"
    new.mkdir()
    photo(321, COLOURS["sofa"], (60, 50)).save(new / "new-sofa.png")
    queries = [new / "new-sofa.png", photos / "chair", tmp_path / "gone.jpg"]
    approximate = [m.as_dict() for m in similar(out, queries, k=5, exact=False)]
    assert approximate == [m.as_dict() for m in similar(out, queries, k=5, exact=True)]
    assert not approximate[0]["in_store"] and approximate[1]["in_store"] and approximate[-1]["error"]
    assert ann.index_path(out).exists()


def test_a_full_disk_while_the_index_is_written_keeps_the_old_one_and_answers(tmp_path, monkeypatch, caplog):
    import errno

    store = tmp_path / "s.h5"
    store_writer.append(str(store), 0, 300, 100)
    _update(store)
    old = ann.index_path(store).read_bytes()
    monkeypatch.setattr(ann, "TAIL_ROWS", 0)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ann, "write_all", full)
    with store_writer.FeatureCache(str(store), META, meta=META) as cache:  # extract's end: a warning, rows kept
        paths = [f"/photos/b/{i:06d}.jpg" for i in range(50)]
        cache.compare(store_writer.FakeListing(paths, ["b"] * 50))
        cache.hashed({i: store_writer.Hashed(store_writer.digest(p), (1, 1, 1, 1)) for i, p in enumerate(paths)})
        cache.add([store_writer.Outcome(p, store_writer.digest(p), store_writer.features_of(p)) for p in cache.todo()])
        counts = cache.finish()
    assert counts.rows == 350 and counts.warnings == [
        f"cannot write the index of {store} (No space left on device). (the similarity index; the next similar "
        "tries again)"
    ]
    queries = [f"/photos/a/{i:06d}.jpg" for i in range(0, 300, 29)]
    with caplog.at_level("WARNING", logger="furnitype"):
        answers = _answers(store, queries, exact=False)
    assert answers == _answers(store, queries, exact=True) and not caplog.records  # the old index, and the rest
    assert ann.index_path(store).read_bytes() == old
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
