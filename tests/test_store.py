"""The feature store on its own (no network): format, transactions, locks, crashes, damage, full disks.

Races and kills run real processes (``tests.store_writer`` drives the same append path as ``extract``).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from furnitype.errors import SettingsMismatchError, StoreError
from furnitype.features import load, read_meta, save
from furnitype.features import undo as undo_module
from furnitype.features.cache import FeatureCache
from furnitype.features.locking import WAIT_SECONDS
from furnitype.features.store import compact, summary
from tests import store_writer
from tests.processes import kill_when, pause_env, signal_stopped, wait_stopped
from tests.store_writer import SETTINGS, FakeListing, append, features_of, remove_half

#: Root without the powers that ignore file permissions: a permission test that drops them for real.
WITHOUT_ROOT_POWERS = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
]
META = {"backbone": "vgg16", "weights": "none(seed=0)", "pooling": "avg", "image_size": 32}


def _save_three(path: Path) -> np.ndarray:
    features = np.arange(12, dtype=np.float32).reshape(3, 4)
    save(
        path,
        features=features,
        paths=["/b/2.jpg", "/a/1.jpg", "/c/3.jpg"],
        labels=["x", "", "y"],
        sha256=["b" * 64, "a" * 64, "c" * 64],
        skipped=[("/d/4.jpg", "", "empty file")],
        meta=META,
    )
    return features


def _consistent(store: Path) -> int:
    """Rows of a store written by ``tests.store_writer``: every row's features are its path's."""
    rows = load(store)
    assert len(set(rows.paths)) == len(rows)
    for path, features in zip(rows.paths, rows.features, strict=True):
        np.testing.assert_array_equal(features, features_of(path))
    return len(rows)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".undo", ".journal")) or ".tmp-" in p.name)


def test_round_trip_sorted_by_path(tmp_path):
    features = _save_three(tmp_path / "f.h5")
    rows = load(tmp_path / "f.h5")
    assert list(rows.paths) == ["/a/1.jpg", "/b/2.jpg", "/c/3.jpg"]
    np.testing.assert_array_equal(rows.features, features[[1, 0, 2]])
    assert list(rows.labels) == ["", "x", "y"] and list(rows.sha256) == ["a" * 64, "b" * 64, "c" * 64]
    assert rows.classes == ["x", "y"] and rows.skipped == [("/d/4.jpg", "empty file")]
    assert rows.settings["backbone"] == "vgg16" and read_meta(tmp_path / "f.h5")["n_rows"] == 3
    assert rows.meta["furnitype_format"] == 2 and "label_counts" not in rows.meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]  # written beside, renamed, lock removed


def test_plain_h5py_reads_the_live_rows(tmp_path):
    """The recipe of docs/formats.md: keep the rows whose /live is 1."""
    store = tmp_path / "s.h5"
    append(str(store), 0, 10, 5)
    remove_half(str(store))  # compacts (half of the rows are dead)
    append(str(store), 100, 2, 2)
    with FeatureCache(store, SETTINGS, meta=SETTINGS) as cache:  # remove one row, no compaction
        listing = FakeListing([p for p in load(store).paths.tolist() if not p.endswith("000100.jpg")], [])
        listing.labels = ["a"] * len(listing.paths)
        listing.folders = ["/photos/a"]
        cache.compare(listing)
        cache.hashed({})
        cache.finish()
    with h5py.File(store, "r") as h5:
        live = h5["live"][:] == 1
        features = h5["features"][:][live]
        paths = h5["path"].asstr()[:][live]
        assert h5.attrs["dead_rows"] == 1 and len(live) == 7
    assert sorted(paths) == sorted(load(store).paths) and len(paths) == 6
    np.testing.assert_array_equal(features[np.argsort(paths)], load(store).features)


def test_format_1_is_read_and_upgraded_on_its_first_write(tmp_path):
    store = tmp_path / "old.h5"
    paths = [f"/photos/a/{i:06d}.jpg" for i in range(4)]
    with h5py.File(store, "w") as h5:  # what furnitype 0.1 wrote
        h5.create_dataset("features", data=np.stack([features_of(p) for p in paths]), compression="gzip")
        h5.create_dataset("sha256", data=np.array([store_writer.digest(p) for p in paths], dtype="S64"))
        h5.create_dataset("path", data=paths, dtype=h5py.string_dtype())
        h5.create_dataset("label", data=["a"] * 4, dtype=h5py.string_dtype())
        h5.create_dataset("classes", data=["a"], dtype=h5py.string_dtype())
        for name, values in (("path", ["/photos/a/bad.jpg"]), ("sha256", ["f" * 64]), ("reason", ["empty file"])):
            h5.create_dataset(f"skipped/{name}", data=values, dtype=h5py.string_dtype())
        for key, value in SETTINGS.items():
            h5.attrs[key] = value
        h5.attrs["furnitype_format"] = 1
        h5.attrs["feature_dim"] = store_writer.DIM
    before = load(store)
    assert before.meta["furnitype_format"] == 1 and len(before) == 4 and before.skipped == [
        ("/photos/a/bad.jpg", "empty file")
    ]
    append(str(store), 0, 6, 3)  # rows 0-3 are there already: only 4 and 5 are new
    after = load(store)
    assert after.meta["furnitype_format"] == 2 and _consistent(store) == 6
    assert after.skipped == before.skipped and after.classes == ["a"]


def test_foreign_newer_and_damaged_files_are_one_line_errors(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["x"] = [1, 2]
    with pytest.raises(StoreError, match="not a furnitype feature file"):
        load(tmp_path / "other.h5")
    _save_three(tmp_path / "f.h5")
    with h5py.File(tmp_path / "f.h5", "a") as h5:
        h5.attrs["furnitype_format"] = 99
    with pytest.raises(StoreError, match="newer furnitype"):
        load(tmp_path / "f.h5")
    _save_three(tmp_path / "f.h5")
    with h5py.File(tmp_path / "f.h5", "a") as h5:
        h5["live"].resize((2,))  # a column cut short
    with pytest.raises(StoreError, match=r"f.h5 is damaged \(/live is missing or has the wrong length\)\.$"):
        load(tmp_path / "f.h5")
    (tmp_path / "dir.h5").mkdir()
    with pytest.raises(StoreError, match="not a furnitype feature file"):
        load(tmp_path / "dir.h5")


DAMAGE_SCRIPT = textwrap.dedent(
    """
    import shutil, sys
    from furnitype.errors import FurnitypeError
    from furnitype.features import load
    from furnitype.features.cache import FeatureCache
    from tests.store_writer import SETTINGS, FakeListing
    source, work = sys.argv[1], sys.argv[2]
    size = len(open(source, "rb").read())
    for n, offset in enumerate(range(0, size - 16, max(1, size // 60))):
        shutil.copy(source, work)
        with open(work, "r+b") as fh:
            fh.seek(offset)
            fh.write(bytes(range(0xF0, 0x100)))
        for what in ("load", "write"):
            try:
                if what == "load":
                    load(work)
                else:
                    with FeatureCache(work, SETTINGS, meta=SETTINGS) as cache:
                        cache.compare(FakeListing(["/photos/a/000001.jpg"], ["a"], folders=["/photos/a"]))
            except FurnitypeError as err:
                assert "\\n" not in str(err), str(err)
                print(what, offset, "error", str(err).split("(")[0])
            else:
                print(what, offset, "ok")
    print("done")
    """
)


def test_damaged_bytes_anywhere_give_one_line_never_a_crash(tmp_path):
    store = tmp_path / "s.h5"
    append(str(store), 0, 40, 8)
    remove_half(str(store))
    append(str(store), 100, 8, 4)
    done = subprocess.run(
        [sys.executable, "-c", DAMAGE_SCRIPT, str(store), str(tmp_path / "work.h5")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]  # no traceback, no segmentation fault
    lines = done.stdout.splitlines()
    assert lines[-1] == "done" and len(lines) > 100
    errors = [line for line in lines if " error " in line]
    expected = ("is damaged", "not a furnitype feature file", "not a readable HDF5 feature file")
    assert errors and all(any(e in line for e in expected) for line in errors), errors[:5]


def test_overwrite_rebuilds_a_damaged_store_and_undo_file(tmp_path):
    store = tmp_path / "s.h5"
    append(str(store), 0, 8, 8)
    store.write_bytes(store.read_bytes()[:3000])
    with pytest.raises(StoreError, match=r"s.h5 is damaged \(truncated file"):
        append(str(store), 0, 8, 8)
    with FeatureCache(store, SETTINGS, meta=SETTINGS, overwrite=True) as cache:
        cache.compare(FakeListing([], []))
        cache.hashed({})
        assert cache.fresh  # rebuilt at the first commit; the damaged file stays until then
    assert store.stat().st_size == 3000
    for bad in ("directory", "garbage", "outside", "link"):
        store.unlink(missing_ok=True)
        append(str(store), 0, 8, 8)
        undo = Path(f"{store}.undo")
        if bad == "directory":
            undo.mkdir()
        elif bad == "garbage":
            undo.write_bytes(b"not an undo log at all, but long enough to have a header")
        elif bad == "link":
            undo.symlink_to(tmp_path / "victim")
            (tmp_path / "victim").write_bytes(b"keep me")
        else:  # a valid header and a record with a valid CRC for a page outside the file
            header = b"FTUNDO2\n" + (100).to_bytes(8, "little")
            slot = (1).to_bytes(8, "little") + (1).to_bytes(8, "little")  # sequence 1 counts one record
            page = (5).to_bytes(8, "little")
            crc = zlib.crc32(b"abcd", zlib.crc32(page)).to_bytes(4, "little")
            record = page + (4).to_bytes(4, "little") + crc + b"abcd"
            undo.write_bytes(header + zlib.crc32(header).to_bytes(4, "little") + bytes(20)
                             + slot + zlib.crc32(slot).to_bytes(4, "little") + record)
        with pytest.raises(StoreError, match=r"s.h5 is damaged \(s.h5.undo is .*\)\.$"):
            load(store)
        with pytest.raises(StoreError, match="s.h5.undo is"):
            append(str(store), 0, 8, 8)
        with FeatureCache(store, SETTINGS, meta=SETTINGS, overwrite=True) as cache:
            assert cache.fresh
        assert not os.path.lexists(undo) and (bad != "link" or (tmp_path / "victim").read_bytes() == b"keep me")


def _hot_undo(store: Path, saves: list[list[int]], changed: int) -> bytes:
    """A hot undo file of ``store`` (one ``save`` per list of pages), the first ``changed`` pages zeroed as the
    transaction's uncommitted writes; the store's bytes before."""
    append(str(store), 0, 40, 8)
    before = store.read_bytes()
    fd = os.open(store, os.O_RDWR)
    log = undo_module.UndoLog.create(undo_module.undo_path(store), fd)  # saves page 0 and marks the store
    for pages in saves:
        log.save(fd, pages)
    os.pwrite(fd, log.mark + bytes(changed * undo_module.PAGE - len(log.mark)), 0)  # under the mark, as a writer
    log.close()
    os.close(fd)
    return before


# Offsets in an undo file saving pages 0-2: header 0-35 (magic, old size, inode, mark, crc), slots 36-55 (sequence
# 2: pages 1-2) and 56-75 (sequence 1: page 0, saved with the header), records.
RECORD_START = 76


@pytest.mark.parametrize(("field", "offset"), [
    ("magic", 0), ("old size", 8), ("inode", 16), ("mark", 24), ("header crc", 32),
    ("page number", RECORD_START), ("length", RECORD_START + 8), ("record crc", RECORD_START + 12),
    ("page bytes", RECORD_START + 16 + 100), ("second record bytes", RECORD_START + 16 + 4096 + 16 + 7),
])
def test_an_undo_file_damaged_in_any_field_is_refused_never_half_rolled_back(tmp_path, field, offset):
    """A hot undo file whose counted records saved pages 0-2, whose new bytes reached the store: any flipped
    byte makes it damaged (store and undo left as they are); skipping a bad record would leave its page and the
    pages after it with uncommitted bytes."""
    store = tmp_path / "s.h5"
    _hot_undo(store, [[0, 1, 2]], changed=3)
    undo = Path(f"{store}.undo")
    damaged = bytearray(undo.read_bytes())
    damaged[offset] ^= 0x5A
    undo.write_bytes(damaged)
    written = store.read_bytes()
    with pytest.raises(StoreError, match=r"s.h5 is damaged \(s.h5.undo is .*\)\.$"):
        load(store)
    assert store.read_bytes() == written and undo.read_bytes() == damaged


@pytest.mark.parametrize("length", [0, 1, 8, 36, 75, 76])
def test_an_undo_file_cut_into_its_header_beside_a_changed_store_is_damage(tmp_path, length):
    """The header is written before the undo file has its name: one cut short of it (or with a wrong header
    checksum) was damaged, and the pages it saved may have changed; never deleted as "nothing to undo"."""
    store = tmp_path / "s.h5"
    _hot_undo(store, [[0, 1, 2]], changed=3)
    undo = Path(f"{store}.undo")
    cut = undo.read_bytes()[:length]
    if length == RECORD_START:  # whole, its header's checksum wrong
        cut = cut[:9] + bytes([cut[9] ^ 1]) + cut[10:]
    undo.write_bytes(cut)
    written = store.read_bytes()
    why = "its header checksum is wrong" if length == RECORD_START else rf"cut short \({length} bytes"
    with pytest.raises(StoreError, match=rf"s.h5 is damaged \(s.h5.undo is {why}"):
        load(store)
    with pytest.raises(StoreError, match="s.h5.undo is"):
        append(str(store), 0, 8, 8)
    assert store.read_bytes() == written and undo.read_bytes() == cut
    with FeatureCache(store, SETTINGS, meta=SETTINGS, overwrite=True) as cache:
        assert cache.fresh and not undo.exists()


KILLED_NAMING_THE_UNDO_FILE = textwrap.dedent(
    """
    import os, signal, sys
    from furnitype.features import undo
    from tests.store_writer import append
    undo._link = lambda tmp, path: os.kill(os.getpid(), signal.SIGKILL)  # killed before the undo file has its name
    append(sys.argv[1], 100, 4, 4)
    """
)


def test_a_writer_killed_before_its_undo_file_has_its_name_left_the_store_as_committed(tmp_path):
    store = tmp_path / "s.h5"
    append(str(store), 0, 8, 8)
    before = store.read_bytes()
    killed = subprocess.run([sys.executable, "-c", KILLED_NAMING_THE_UNDO_FILE, str(store)], timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert not Path(f"{store}.undo").exists() and len(_leftovers(tmp_path)) == 1  # its header, under a tmp name
    assert store.read_bytes() == before and _consistent(store) == 8
    append(str(store), 100, 4, 4)
    assert _leftovers(tmp_path) == [] and _consistent(store) == 12


def test_an_undo_file_whose_count_is_damaged_still_puts_back_every_valid_record(tmp_path):
    store = tmp_path / "s.h5"
    before = _hot_undo(store, [[0, 1, 2]], changed=3)
    undo = Path(f"{store}.undo")
    damaged = bytearray(undo.read_bytes())
    damaged[40] ^= 0x5A  # the newest slot: the other counts only page 0, yet the three whole records are still used
    undo.write_bytes(damaged)
    assert len(load(store)) == 40 and store.read_bytes() == before and not undo.exists()


@pytest.mark.parametrize("tail", ["cut", "zeros", "garbage"])
def test_an_append_cut_by_a_kill_or_a_power_loss_ends_the_rollback(tmp_path, tail):
    """Pages 0 and 1 were saved, counted and changed; the append saving page 2 never finished: cut short by a
    kill, or, after a power loss, zeros or other bytes where the file system had not written it yet."""
    store = tmp_path / "s.h5"
    before = _hot_undo(store, [[0, 1]], changed=2)
    undo = Path(f"{store}.undo")
    record = (2).to_bytes(8, "little") + undo_module.PAGE.to_bytes(4, "little") + bytes(4) + before[8192:12288]
    torn = {"cut": record[:-100], "zeros": bytes(len(record)), "garbage": bytes(range(256)) * 16}[tail]
    undo.write_bytes(undo.read_bytes() + torn)
    assert len(load(store)) == 40 and store.read_bytes() == before and not undo.exists()


def test_a_second_writer_is_refused_at_once_also_through_another_name(tmp_path):
    store = tmp_path / "s.h5"
    (tmp_path / "link.h5").symlink_to(store)
    writer = store_writer.start(store, 20, 8, env=pause_env("store-commit", 2))  # stopped holding the lock
    try:
        assert wait_stopped(writer), writer.communicate()
        for name in (store, tmp_path / "link.h5"):
            started = time.monotonic()
            with pytest.raises(StoreError, match=f"another furnitype process is writing {name}"):
                FeatureCache(name, SETTINGS, meta=SETTINGS).__enter__()
            assert time.monotonic() - started < WAIT_SECONDS / 2  # refused, not waited for
    finally:
        writer.kill()
        writer.wait()
    assert (tmp_path / "link.h5").is_symlink()
    _consistent(store)


def _stopped_at(writer: subprocess.Popen, line: str) -> list[str]:
    """Read the writer's lines until one starts with ``line``, then stop it there (SIGSTOP); the lines read."""
    seen = []
    while not seen or not seen[-1].startswith(line):
        seen.append(writer.stdout.readline())
        assert seen[-1], f"the writer ended before printing {line!r}: {seen}"
    os.kill(writer.pid, signal.SIGSTOP)
    return seen


def test_a_second_writer_through_a_hard_link_is_refused_also_after_a_compaction(tmp_path):
    """A hard link is another name (another NAME.lock) for the same file: the file itself is locked."""
    store, other = tmp_path / "s.h5", tmp_path / "other.h5"
    append(str(store), 0, 8, 8)
    os.link(store, other)
    writer = store_writer.start(other, 2000, 8)
    try:
        _stopped_at(writer, "committed")
        with pytest.raises(StoreError, match=f"another furnitype process is writing {store}; wait"):
            FeatureCache(store, SETTINGS, meta=SETTINGS).__enter__()
    finally:
        writer.kill()
        writer.wait()
    # renames a new file over the store, and stops itself at the end of the compaction, the store still held
    compacting = store_writer.start(store, 4, 8, compact=True, env=pause_env("compacted"))
    try:
        assert wait_stopped(compacting)
        third = tmp_path / "third.h5"
        os.link(store, third)  # the file the writer renamed in
        with pytest.raises(StoreError, match=f"another furnitype process is writing {third}; wait"):
            FeatureCache(third, SETTINGS, meta=SETTINGS).__enter__()
        with FeatureCache(other, SETTINGS, meta=SETTINGS):  # the file the writer let go: another store now
            pass
    finally:
        compacting.kill()
        compacting.wait()
    assert not os.path.samefile(store, other)
    _consistent(store)


def test_info_counts_classes_from_the_rows_not_from_an_attribute(tmp_path):
    store = tmp_path / "s.h5"
    _save_three(store)
    with h5py.File(store, "a") as h5:  # what a second writer through another name could leave
        h5.attrs["label_counts"] = json.dumps({"x": 1000, "z": 3})
        h5.attrs["dead_rows"] = 2
    described = summary(store)
    assert described["classes"] == {"": 1, "x": 1, "y": 1} and described["rows"] == 3
    assert described["dead_rows"] == 0 and read_meta(store)["n_rows"] == 3


def test_lock_undo_and_temporary_files_are_never_written_through_links(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    store = tmp_path / "s.h5"
    Path(f"{store}.lock").symlink_to(victim)
    with pytest.raises(StoreError, match=r"s.h5.lock is a symbolic link, not furnitype's lock file; remove it"):
        append(str(store), 0, 8, 8)
    Path(f"{store}.lock").unlink()
    (tmp_path / f".s.h5.tmp-{os.getpid()}").symlink_to(victim)  # what a killed run would have left, as a link
    append(str(store), 0, 8, 8)
    assert victim.read_bytes() == b"keep me" and _leftovers(tmp_path) == [] and _consistent(store) == 8


def test_kill_9_during_in_place_appends_rolls_back_to_the_last_commit(tmp_path):
    store = tmp_path / "s.h5"
    append(str(store), 0, 8, 8)
    undo = Path(f"{store}.undo")
    hot = 0
    for _ in range(6):
        writer = store_writer.start(store, 300, 4)
        assert kill_when(writer, undo.exists), "the writer ended before it could be killed"
        committed = [int(line.split()[1]) for line in writer.stdout.read().splitlines()]
        hot += undo.exists()
        rows = _consistent(store)  # the reader rolls the unfinished transaction back
        assert not undo.exists() and rows in (committed[-1] if committed else 8, (committed or [8])[-1] + 4)
    assert hot == 6


def test_kill_9_during_compaction_keeps_the_store(tmp_path):
    store = tmp_path / "s.h5"
    temporary = tmp_path / f".{store.name}.tmp-"
    append(str(store), 0, 8, 8)
    killed = 0
    for _ in range(4):
        writer = store_writer.start(store, 6, 8, compact=True)
        killed += kill_when(
            writer, lambda: any(p.name.startswith(temporary.name) for p in tmp_path.iterdir())
        )
        rows = _consistent(store)
        assert rows in (24, 48) or rows % 4 == 0
    assert killed == 4
    append(str(store), 0, 48, 8)  # the next writer removes what the killed compactions left
    assert _leftovers(tmp_path) == [] and _consistent(store) == 48


#: Reads the store at argv[1] until it holds argv[2] rows, checking every row, and prints each count it saw.
READER_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from furnitype.features import load
    from tests.store_writer import features_of
    rows = []
    while len(rows) != int(sys.argv[2]):
        rows = load(sys.argv[1])
        for path, features in zip(rows.paths, rows.features):
            assert np.array_equal(features, features_of(path)), path
        print(len(rows), flush=True)
    """
)


def test_a_reader_sees_only_committed_rows_while_a_writer_appends(tmp_path):
    store = tmp_path / "s.h5"
    append(str(store), 0, 8, 8)
    reader = subprocess.Popen([sys.executable, "-c", READER_SCRIPT, str(store), "600"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline() == "8\n", reader.communicate()  # it reads: the writer starts
        writer = store_writer.start(store, 150, 4)
        assert writer.wait(timeout=300) == 0
        stdout, stderr = reader.communicate(timeout=300)
    finally:
        reader.kill()
    assert reader.returncode == 0, stderr[-2000:]
    seen = [8, *map(int, stdout.split())]
    assert seen == sorted(seen) and all(n % 4 == 0 for n in seen) and seen[-1] == 600
    assert _consistent(store) == 600


def _full_after(monkeypatch, calls: int, *, overwrites_too: bool = False) -> list:
    """``write_all`` raises ENOSPC from its ``calls``-th call on for writes that need new space (past the end of
    the file), as a full disk does; ``overwrites_too``: for every write (a copy-on-write file system)."""
    real = undo_module.write_all
    count = [0]

    def write_all(fd, data, offset):
        grows = offset + len(memoryview(data).cast("B")) > os.fstat(fd).st_size
        count[0] += grows or overwrites_too
        if count[0] >= calls and (grows or overwrites_too):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(undo_module, "write_all", write_all)
    return count


@pytest.mark.parametrize("calls", [1, 2, 3, 4])
def test_a_full_disk_during_a_transaction_leaves_the_store_as_it_was(tmp_path, monkeypatch, calls):
    store = tmp_path / "s.h5"
    append(str(store), 0, 16, 8)
    before = store.read_bytes()
    _full_after(monkeypatch, calls)
    with pytest.raises(StoreError) as caught:
        append(str(store), 100, 64, 64)  # enough rows that the store grows
    monkeypatch.undo()
    message = str(caught.value)
    assert message.startswith(f"disk full while writing {store}: the last change was not written")
    assert "the store is intact (16 rows)" in message
    assert store.read_bytes() == before and _leftovers(tmp_path) == []
    append(str(store), 100, 64, 64)
    assert _consistent(store) == 80


def test_a_rollback_that_cannot_write_either_is_finished_by_the_next_run(tmp_path, monkeypatch):
    store = tmp_path / "s.h5"
    append(str(store), 0, 16, 8)
    before = load(store)
    _full_after(monkeypatch, 8, overwrites_too=True)
    with pytest.raises(StoreError, match="could not be rolled back yet .*the next furnitype run on it finishes"):
        append(str(store), 100, 4, 4)
    monkeypatch.undo()
    assert Path(f"{store}.undo").exists()
    after = load(store)  # the reader finishes the rollback
    assert list(after.paths) == list(before.paths) and _leftovers(tmp_path) == []


@pytest.mark.parametrize("calls", [1, 3, 6])
def test_a_full_disk_while_writing_a_new_file_removes_it(tmp_path, monkeypatch, calls):
    store = tmp_path / "s.h5"
    _save_three(store)
    before = store.read_bytes()
    _full_after(monkeypatch, calls)
    intact = r"disk full while writing .*s.h5: the last change was not written and the store is intact \(3 rows\)"
    with pytest.raises(StoreError, match=intact):
        save(store, features=np.ones((50, 8)), paths=[f"/p/{i}" for i in range(50)], labels=[""] * 50,
             sha256=["a" * 64] * 50, meta=META)
    with pytest.raises(StoreError, match="disk full"):
        compact(store)
    monkeypatch.undo()
    assert store.read_bytes() == before and _leftovers(tmp_path) == []
    assert len(load(store)) == 3


def test_ctrl_c_during_a_transaction_waits_for_the_commit(tmp_path, monkeypatch):
    store = tmp_path / "s.h5"
    append(str(store), 0, 8, 8)
    real_add = FeatureCache.add

    def add_then_interrupt(self, outcomes):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the batch is being written below
        real_add(self, outcomes)

    monkeypatch.setattr(FeatureCache, "add", add_then_interrupt)
    real_write = undo_module.PagedFile.write

    def slow_write(self, data):
        time.sleep(0.001)
        return real_write(self, data)

    monkeypatch.setattr(undo_module.PagedFile, "write", slow_write)
    with pytest.raises(KeyboardInterrupt):
        append(str(store), 100, 4, 4)
    assert _leftovers(tmp_path) == []
    assert _consistent(store) in (8, 12)


def test_a_hot_undo_left_by_a_dead_writer_is_rolled_back_by_the_next_reader(tmp_path):
    store = tmp_path / "s.h5"
    append(str(store), 0, 8, 8)
    writer = store_writer.start(store, 20, 4, env=pause_env("store-commit", 3))
    assert wait_stopped(writer), writer.communicate()
    signal_stopped(writer, signal.SIGKILL)
    assert writer.wait() == -signal.SIGKILL and Path(f"{store}.undo").exists()
    info = subprocess.run(
        [sys.executable, "-m", "furnitype.cli", "info", str(store), "--json"], capture_output=True, text=True
    )
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["rows"] == _consistent(store) and not Path(f"{store}.undo").exists()


def test_a_reader_that_cannot_write_gets_one_line_about_the_unfinished_write(tmp_path):
    store = tmp_path / "s.h5"
    append(str(store), 0, 8, 8)
    writer = store_writer.start(store, 20, 4, env=pause_env("store-commit", 3))
    assert wait_stopped(writer), writer.communicate()
    signal_stopped(writer, signal.SIGKILL)
    assert writer.wait() == -signal.SIGKILL and Path(f"{store}.undo").exists()
    os.chmod(tmp_path, 0o555)  # the folder cannot be written, the store can be read
    try:
        info = subprocess.run([*WITHOUT_ROOT_POWERS, sys.executable, "-m", "furnitype.cli", "info", str(store)],
                              capture_output=True, text=True)
    finally:
        os.chmod(tmp_path, 0o755)
    assert info.returncode == 1 and "Traceback" not in info.stderr
    assert info.stderr.strip() == (
        f"Error: {store} has an unfinished write (s.h5.undo) that only a user who can write its folder "
        f"can roll back: run furnitype info {store} as that user."
    )
    assert Path(f"{store}.undo").exists() and _consistent(store) > 0  # as that user (root here)


def _killed_in_a_transaction(store: Path, point: str, link: Path | None = None) -> int:
    """Rows committed by a writer of ``store`` (made with 8 rows if it has none, then hard-linked as ``link``)
    killed -9 at ``point`` of its third transaction (of 4 rows)."""
    append(str(store), 0, 8, 8)
    if link is not None:
        os.link(store, link)
    rows = _consistent(store)
    writer = store_writer.start(store, 20, 4, env=pause_env(point, 3))
    assert wait_stopped(writer), writer.communicate()
    signal_stopped(writer, signal.SIGKILL)
    assert writer.wait() == -signal.SIGKILL and Path(f"{store}.undo").exists()
    return rows + 4 * (3 if point == "store-committed" else 2)


def test_an_unfinished_write_is_rolled_back_through_a_hard_link_never_read_or_written_over(tmp_path):
    """The undo file is found by name (shop.h5.undo), but the store itself carries the transaction's mark: through
    link.h5 the torn transaction is rolled back with shop.h5.undo, never read as committed or committed on top of
    (and then undone over the link's rows by a stale shop.h5.undo)."""
    store, link = tmp_path / "shop.h5", tmp_path / "link.h5"
    committed = _killed_in_a_transaction(store, "store-commit", link)
    assert _consistent(link) == committed and _leftovers(tmp_path) == []
    append(str(link), 1000, 8, 8)
    assert _consistent(store) == committed + 8 and os.path.samefile(store, link)


def test_an_unfinished_write_beside_a_hard_link_in_another_folder_is_refused_through_the_link(tmp_path):
    """The undo file of another folder cannot be found: the link refuses to read or write (one line) until the
    name beside the undo file rolls it back; --overwrite rebuilds the link's store as a new file."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    store, link = tmp_path / "a" / "shop.h5", tmp_path / "b" / "link.h5"
    committed = _killed_in_a_transaction(store, "store-commit", link)
    info = subprocess.run([sys.executable, "-m", "furnitype.cli", "info", str(link)], capture_output=True, text=True)
    assert info.returncode == 1 and info.stderr.strip() == (
        f"Error: {link} has an unfinished write whose undo file is beside another name of this file, in another "
        f"folder (a hard link; find -samefile {link} lists its names): run furnitype info on that name to roll it "
        "back."
    )
    with pytest.raises(StoreError, match="unfinished write whose undo file is beside another name"):
        append(str(link), 1000, 8, 8)
    assert _consistent(store) == committed and _leftovers(tmp_path / "a") == []
    append(str(link), 1000, 8, 8)
    assert _consistent(link) == committed + 8

    committed = _killed_in_a_transaction(store, "store-commit")
    append(str(link), 2000, 4, 4, overwrite=True)  # a new file renamed over link.h5; shop.h5 keeps the old one
    assert _consistent(link) == 4 and not os.path.samefile(store, link)
    assert _consistent(store) == committed and _leftovers(tmp_path / "a") == []


def test_an_undo_file_left_after_the_commit_point_is_never_replayed_over_later_commits(tmp_path):
    """Killed after the mark came off (committed) but before its undo file was removed: writers through another
    name commit on top, and the stale undo file is then removed unused, never replayed over their rows."""
    store, link = tmp_path / "shop.h5", tmp_path / "link.h5"
    committed = _killed_in_a_transaction(store, "store-committed", link)
    append(str(link), 1000, 8, 8)
    assert _consistent(store) == committed + 8 and _leftovers(tmp_path) == []


def test_an_undo_file_of_the_previous_version_is_still_rolled_back(tmp_path):
    """``FTUNDO2`` (no mark, no inode), left hot by furnitype before this version: its pages are put back."""
    store = tmp_path / "s.h5"
    append(str(store), 0, 40, 8)
    before = store.read_bytes()
    head = b"FTUNDO2\n" + len(before).to_bytes(8, "little")
    counted = (1).to_bytes(8, "little") + (3).to_bytes(8, "little")
    records = b""
    for page in range(3):
        old = before[page * undo_module.PAGE : (page + 1) * undo_module.PAGE]
        crc = zlib.crc32(old, zlib.crc32(page.to_bytes(8, "little")))
        records += page.to_bytes(8, "little") + len(old).to_bytes(4, "little") + crc.to_bytes(4, "little") + old
    Path(f"{store}.undo").write_bytes(head + zlib.crc32(head).to_bytes(4, "little") + bytes(20) + counted
                                      + zlib.crc32(counted).to_bytes(4, "little") + records)
    with open(store, "r+b") as torn:
        torn.write(bytes(3 * undo_module.PAGE))
        torn.truncate(len(before) + 5000)
    assert len(load(store)) == 40 and store.read_bytes() == before and _leftovers(tmp_path) == []


def test_settings_mismatch_and_the_summary(tmp_path):
    store = tmp_path / "s.h5"
    append(str(store), 0, 8, 8)
    with pytest.raises(SettingsMismatchError, match="--pooling avg, but this run asks for --pooling max"):
        FeatureCache(store, {**SETTINGS, "pooling": "max"}, meta=SETTINGS).__enter__()
    described = summary(store)
    assert (described["rows"], described["dead_rows"], described["format"]) == (8, 0, 2)
    assert described["classes"] == {"a": 8} and described["feature_dim"] == store_writer.DIM


def _save_labelled(path: Path, n: int = 40) -> None:
    """``n`` rows of two classes under two folders, two skips; labels and paths that can be found in the file."""
    paths = [f"/photos/{'bed' if i % 2 else 'chair'}/photo-{i:04d}.jpg" for i in range(n)]
    save(path, features=np.random.default_rng(0).random((n, 8), dtype=np.float32), paths=paths,
         labels=["bedroom-bed" if i % 2 else "kitchen-chair" for i in range(n)], sha256=[f"{i:064x}" for i in range(n)],
         skipped=[("/photos/bed/empty.jpg", "", "an empty file"), ("/photos/x.jpg", "f" * 64, "cannot be decoded")],
         meta=META)


def _strings(path: Path) -> tuple:
    rows = load(path)
    return rows.paths.tolist(), rows.labels.tolist(), rows.skipped


@pytest.mark.parametrize(("text", "column"), [
    (b"kitchen-chair", "/label"), (b"photo-0007", "/path"), (b"cannot be decoded", "/skipped/reason"),
    (b"/photos/bed\x00", "/folders"),
])
def test_a_changed_byte_in_a_stored_string_is_damage_not_a_new_value(tmp_path, text, column):
    """Strings live in HDF5's global heap, which has no checksum of its own."""
    store = tmp_path / "s.h5"
    _save_labelled(store)
    data = bytearray(store.read_bytes())
    at = data.find(text) if column != "/folders" else data.rfind(text)  # /folders is written last
    assert at > 0
    data[at + 3] ^= 0x01  # "kitchen-chair" becomes "kitcien-chair": still UTF-8, still a name
    store.write_bytes(data)
    with pytest.raises(StoreError, match=rf"s.h5 is damaged \({column} entries 0-\d+ are not the bytes written"):
        load(store) if column != "/folders" else compact(store)
    info = subprocess.run([sys.executable, "-m", "furnitype.cli", "info", str(store)], capture_output=True, text=True)
    if column in ("/label", "/skipped/reason"):  # what info reads
        assert info.returncode == 1 and info.stderr.startswith(f"Error: {store} is damaged (")
        assert info.stderr.count("\n") == 1


def test_random_bit_flips_in_the_strings_never_change_what_is_read(tmp_path):
    """Every flipped bit in HDF5's global heap collections (where the strings are) is an error or harmless."""
    store = tmp_path / "s.h5"
    _save_labelled(store, 300)
    good = store.read_bytes()
    expected = _strings(store)
    heaps = []
    at = good.find(b"GCOL")
    while at >= 0:
        heaps.append((at + 16, at + int.from_bytes(good[at + 8 : at + 16], "little")))  # after the header
        at = good.find(b"GCOL", at + 4)
    assert heaps
    rng = np.random.default_rng(18)
    changed, errors = [], 0
    for _ in range(300):
        start, end = heaps[rng.integers(len(heaps))]
        offset = int(rng.integers(start, min(end, len(good))))
        data = bytearray(good)
        data[offset] ^= 1 << int(rng.integers(8))
        store.write_bytes(data)
        try:
            read = _strings(store)
        except StoreError as err:
            assert "\n" not in str(err)
            errors += 1
            continue
        if read != expected:
            changed.append(offset)
    assert not changed, f"flips at {changed} changed what was read without an error"
    assert errors > 100  # many flips hit the strings' bytes (others the collections' free space)


def test_a_store_without_string_checksums_is_read_and_gets_them_at_its_next_write(tmp_path):
    store = tmp_path / "s.h5"
    append(str(store), 0, 8, 8)
    with h5py.File(store, "a") as h5:  # a format-2 store written before furnitype kept string checksums
        del h5.attrs["string_crc"]
        for name in ("path_crc", "label_crc", "folders_crc", "skipped/path_crc", "skipped/label_crc",
                     "skipped/reason_crc"):
            del h5[name]
    assert _consistent(store) == 8
    append(str(store), 8, 4, 4)  # in place: the transaction adds them
    with h5py.File(store, "r") as h5:
        assert h5.attrs["string_crc"] == 1024 and len(h5["label_crc"]) == 1
    data = bytearray(store.read_bytes())
    data[data.find(b"/photos/a/000003.jpg") + 12] ^= 0x01
    store.write_bytes(data)
    with pytest.raises(StoreError, match=r"/path entries 0-11 are not the bytes written"):
        load(store)


def test_relabelling_keeps_the_checksums_and_never_seals_damage(tmp_path):
    store = tmp_path / "s.h5"
    append(str(store), 0, 8, 8)
    paths = [f"/photos/a/{i:06d}.jpg" for i in range(8)]
    with FeatureCache(store, SETTINGS, meta=SETTINGS) as cache:
        cache.compare(FakeListing(paths[:4], ["b"] * 4, folders=[]))
        cache.hashed({})
        cache.finish()
    assert load(store).labels.tolist() == ["b"] * 4 + ["a"] * 4
    data = bytearray(store.read_bytes())
    data[data.find(b"/photos/a/000006.jpg") + 12] ^= 0x01
    store.write_bytes(data)
    with pytest.raises(StoreError, match=r"/path entries 0-7 are not the bytes written"), \
            FeatureCache(store, SETTINGS, meta=SETTINGS) as cache:
        cache.compare(FakeListing(paths[:1], ["c"], folders=[]))  # relabels a row of the damaged block
        cache.hashed({})
        cache.finish()
    with pytest.raises(StoreError, match=r"/path entries 0-7 are not the bytes written"):
        load(store)


def test_save_refuses_rows_that_are_not_finite_and_a_store_holding_them_is_damaged(tmp_path):
    store = tmp_path / "s.h5"
    features = np.ones((3, 4), np.float32)
    features[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"features must be finite numbers: row 1 \(/a/1.jpg\) holds NaN"):
        save(store, features=features, paths=["/a/0.jpg", "/a/1.jpg", "/a/2.jpg"], labels=["x"] * 3,
             sha256=["a" * 64, "b" * 64, "c" * 64], meta=META)
    with pytest.raises(ValueError, match=r"finite numbers as float16: row 0"):
        save(store, features=np.full((1, 4), 1e6), paths=["/a/0.jpg"], labels=["x"], sha256=["a" * 64],
             meta={**META, "store_dtype": "float16"})
    assert _leftovers(tmp_path) == [] and not store.exists()
    _save_three(store)
    with h5py.File(store, "a") as h5:  # what another tool could write
        h5["features"][2] = np.inf
    similar = subprocess.run([sys.executable, "-m", "furnitype.cli", "similar", str(store), "/b/2.jpg"],
                             capture_output=True, text=True)
    assert similar.returncode == 1, similar.stderr
    assert similar.stderr == (f"Error: {store} is damaged (/features row 2 holds numbers that are not finite (NaN "
                              "or infinity)).\n")  # similar has no --overwrite to suggest


def _odd(path: Path, shape: str) -> None:
    """A store changed with plain h5py into a shape furnitype never writes."""
    _save_labelled(path)
    with h5py.File(path, "a") as h5:
        if shape == "no columns":
            del h5["features"]
            h5.create_dataset("features", shape=(40, 0), dtype="f4")
        elif shape == "huge":
            for name in ("features", "sha256", "path", "label", "live", "stat", "folder"):
                h5[name].resize(10**12, axis=0)
        elif shape == "folder index":
            h5["folder"][3] = 99
        elif shape == "not utf-8":  # and no checksums, so that decoding finds it
            del h5.attrs["string_crc"]
            del h5["path"]
            h5.create_dataset("path", data=[b"/p/\xff%d.jpg" % i for i in range(40)], dtype=h5py.string_dtype("ascii"))
        elif shape == "live of 2":
            h5["live"][0] = 2
        elif shape == "stat of 3":
            del h5["stat"]
            h5.create_dataset("stat", data=np.zeros((40, 3), np.int64))
        elif shape == "image_size text":
            h5.attrs["image_size"] = "abc"
        elif shape == "image_size array":
            h5.attrs["image_size"] = np.array([32, 32])
        elif shape == "feature_dim":
            h5.attrs["feature_dim"] = 7


@pytest.mark.parametrize("shape", ["no columns", "huge", "folder index", "not utf-8", "live of 2", "stat of 3",
                                   "image_size text", "image_size array", "feature_dim"])
def test_stores_of_other_shapes_are_one_line_in_every_command(tmp_path, shape):
    store = tmp_path / "odd.h5"
    _odd(store, shape)
    for command in (["info"], ["compact"], ["similar", "/photos/bed/photo-0001.jpg"], ["classify", "--out", "run"]):
        done = subprocess.run([sys.executable, "-m", "furnitype.cli", command[0], str(store), *command[1:]],
                              capture_output=True, text=True, cwd=tmp_path, timeout=600)
        if command == ["info"] and shape == "not utf-8":  # info does not read the paths
            assert done.returncode == 0, done.stderr
            continue
        assert done.returncode == 1 and done.stderr.startswith(f"Error: {store} is damaged ("), (command, done.stderr)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_compact_of_a_missing_store_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "furnitype.cli", "compact", str(tmp_path / "no" / "missing.h5")],
                          capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (2, f"Error: feature file not found: {tmp_path / 'no' / 'missing.h5'}\n")
    assert list(tmp_path.iterdir()) == []  # no folder made, no lock file left


def test_furnitypes_own_bugs_while_reading_are_not_called_damage(tmp_path, monkeypatch):
    """Only errors that the file's bytes cause (raised by h5py, or stored bytes that do not decode) are damage."""
    from furnitype.features import view as view_module

    store = tmp_path / "s.h5"
    _save_three(store)
    for bug in (ValueError("a bug"), IndexError("a bug"), TypeError("a bug"), KeyError("a bug")):
        def read_at(dataset, index, bug=bug):
            raise bug

        monkeypatch.setattr(view_module, "read_at", read_at)
        with pytest.raises(type(bug), match="a bug"):
            load(store)
    monkeypatch.undo()
    store.write_bytes(store.read_bytes()[:3000])
    with pytest.raises(StoreError, match="is damaged") as caught:
        load(store)
    assert isinstance(caught.value.__cause__, OSError)  # h5py's own error is kept as the cause


def test_furnitype_debug_shows_the_traceback_with_its_cause(tmp_path):
    store = tmp_path / "s.h5"
    _save_three(store)
    store.write_bytes(store.read_bytes()[:3000])
    command = [sys.executable, "-m", "furnitype.cli", "info", str(store)]
    quiet = subprocess.run(command, capture_output=True, text=True)
    debug = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "FURNITYPE_DEBUG": "1"})
    assert quiet.returncode == debug.returncode == 1 and quiet.stderr.count("\n") == 1
    assert "Traceback" in debug.stderr and "OSError" in debug.stderr and "direct cause" in debug.stderr
    assert debug.stderr.endswith(quiet.stderr)


def test_without_hard_links_the_undo_file_is_renamed_in_whole(tmp_path, monkeypatch):
    """File systems without hard links (FAT, some network mounts) refuse link(): the header is renamed in."""
    store = tmp_path / "s.h5"
    append(str(store), 0, 8, 8)
    seen = []

    def no_link(source, target, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    real_rename = os.rename

    def rename(source, target):
        if str(target).endswith(".undo"):
            seen.append(Path(target).read_bytes() if Path(target).exists() else len(Path(source).read_bytes()))
        real_rename(source, target)

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os, "rename", rename)
    append(str(store), 100, 4, 4)
    assert seen == [RECORD_START + 16 + undo_module.PAGE]  # the whole header and page 0, never a shorter file
    assert _leftovers(tmp_path) == [] and _consistent(store) == 12
