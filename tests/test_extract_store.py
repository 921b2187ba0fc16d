"""``extract`` against the store's promises: a run costs what changed, nothing is lost (races, unlistable folders,
odd files, full disks, Ctrl-C, failed starts), labels are kept. Real processes for races, signals and permissions."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from furnitype.errors import FurnitypeError, InputError, StoreError
from furnitype.extract import images
from furnitype.extract.pipeline import ExtractSpec, feature_batches
from furnitype.extraction import extract
from furnitype.features import load, summary
from furnitype.features import undo as undo_module
from tests.conftest import run_cli
from tests.images import make_photo_folder, photo
from tests.processes import pause_env, signal_stopped, wait_stopped
from tests.test_store import WITHOUT_ROOT_POWERS

SMALL = {"backbone": "vgg16", "weights": "none", "image_size": 32, "progress": False}
CLI_SMALL = ["--weights", "none", "--image-size", "32", "--quiet"]


def _cli(*args, timeout: float = 300, prefix: tuple = (), **kwargs) -> subprocess.CompletedProcess:
    """``furnitype ARGS`` in a process of its own (a hang fails the test instead of stopping the suite)."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "furnitype.cli", *map(str, args)], capture_output=True, text=True,
        timeout=timeout, **kwargs,
    )


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() or p.is_symlink())


@pytest.fixture
def folder(photo_folder, tmp_path) -> Path:
    return Path(shutil.copytree(photo_folder, tmp_path / "photos"))


def test_unchanged_files_are_not_read_again(folder, tmp_path, monkeypatch):
    out = tmp_path / "f.h5"
    os.utime(folder / "bed" / "bed_0.jpg", ns=(1, 1))  # older than the racy window: its stat can be trusted
    first = extract([folder], **SMALL, out=out)
    assert (first.extracted, first.hashed) == (6, 6)
    for path in folder.rglob("*.jpg"):
        os.utime(path, ns=(10**18, 10**18))  # a stat recorded now will be trusted next time
    extract([folder], **SMALL, out=out, rehash=True)

    read = []
    real = images.hash_file
    monkeypatch.setattr("furnitype.extraction.hash_file", lambda path: (read.append(path), real(path))[1])
    again = extract([folder], **SMALL, out=out)
    assert (again.extracted, again.reused, again.hashed, read) == (0, 6, 0, [])

    touched = folder / "chair" / "chair_1.jpg"
    os.utime(touched, ns=(10**18 + 5, 10**18 + 5))
    assert extract([folder], **SMALL, out=out).hashed == 1 and read == [str(touched)]
    result = run_cli("extract", folder, *CLI_SMALL, "--out", out, "--rehash", "--json")
    assert json.loads(result.stdout)["hashed"] == 6 and len(read) == 7


def test_rows_of_removed_files_are_masked_then_compacted(folder, tmp_path):
    out = tmp_path / "f.h5"
    for i in range(6):
        photo(40 + i).save(folder / "chair" / f"more_{i}.jpg")
    extract([folder], **SMALL, out=out)
    size = out.stat().st_size
    (folder / "chair" / "more_0.jpg").unlink()
    removed = extract([folder], **SMALL, out=out)
    assert (removed.removed, removed.rows) == (1, 11) and summary(out)["dead_rows"] == 1
    assert "removed (no longer on disk)" in removed.summary()
    assert out.stat().st_size >= size  # masked in place, not rewritten
    for i in range(1, 5):
        (folder / "chair" / f"more_{i}.jpg").unlink()
    assert extract([folder], **SMALL, out=out).rows == 7
    assert summary(out)["dead_rows"] == 0  # 5 dead of 12 passed a quarter: compacted
    result = run_cli("compact", out)
    assert result.exit_code == 0 and result.output.startswith(f"{out}: 7 rows kept, 0 removed entries dropped")
    assert len(load(out)) == 7


def test_a_folder_that_cannot_be_listed_keeps_its_rows(folder, tmp_path):
    out = tmp_path / "f.h5"
    extract([folder], **SMALL, out=out)
    os.chmod(folder / "chair", 0)
    try:
        done = _cli("extract", folder, *CLI_SMALL, "--out", out, "--json", prefix=WITHOUT_ROOT_POWERS)
    finally:
        os.chmod(folder / "chair", 0o755)
    assert done.returncode == 0, done.stderr
    summary_ = json.loads(done.stdout)
    assert (summary_["removed"], summary_["rows"], summary_["listed"]) == (0, 6, 3)
    assert f"warning: could not list {folder / 'chair'} (Permission denied); its rows are kept" in done.stderr
    assert sorted(load(out).labels) == ["bed"] * 3 + ["chair"] * 3


def test_a_class_folder_replaced_by_a_symlink_keeps_its_rows_with_a_warning(folder, tmp_path):
    out = tmp_path / "f.h5"
    extract([folder], **SMALL, out=out)
    moved = shutil.move(folder / "chair", tmp_path / "chair")
    (folder / "chair").symlink_to(moved, target_is_directory=True)

    result = extract([folder], **SMALL, out=out)

    assert (result.removed, result.rows, result.listed) == (0, 6, 3)
    assert result.warnings == [f"could not list {folder / 'chair'} (a symbolic link to a folder, not followed); "
                               "its rows are kept"]
    assert sorted(load(out).labels) == ["bed"] * 3 + ["chair"] * 3
    assert sorted(os.listdir(moved)) == [f"chair_{i}.jpg" for i in range(3)]  # nothing read or written there
    (folder / "chair").unlink()  # the folder is gone for good: so are its rows
    assert extract([folder], **SMALL, out=out).removed == 3


def test_fifos_devices_and_links_to_dev_zero_are_skipped_never_read(folder, tmp_path):
    out = tmp_path / "f.h5"
    extract([folder], **SMALL, out=out)
    os.mkfifo(folder / "bed" / "pipe.jpg")
    (folder / "chair" / "zero.jpg").symlink_to("/dev/zero")
    (folder / "chair" / "gone.jpg").symlink_to(tmp_path / "nothing-here")
    os.mkfifo(tmp_path / "listed.png")
    (tmp_path / "m.csv").write_text(f"path,label\n{tmp_path / 'listed.png'},sofa\n")
    done = _cli("extract", folder, "--manifest", tmp_path / "m.csv", *CLI_SMALL, "--out", out, "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["skipped"] == 4
    reasons = {Path(p).name: r for p, r in load(out).skipped}
    assert reasons == {
        "pipe.jpg": "not a regular file",
        "zero.jpg": "not a regular file",
        "listed.png": "not a regular file",
        "gone.jpg": "file not found",
    }
    similar = _cli("similar", out, folder / "bed" / "pipe.jpg", folder / "chair" / "zero.jpg", "--json", timeout=120)
    assert similar.returncode == 0, similar.stderr
    assert [m["error"] for m in json.loads(similar.stdout)] == ["not a regular file"] * 2

    outcomes = []  # predict's path: the per-batch reading code, in a thread that must not hang
    spec = ExtractSpec("vgg16", "none", image_size=32)
    worker = threading.Thread(
        target=lambda: outcomes.extend(o for b in feature_batches(spec, [str(tmp_path / "listed.png")]) for o in b)
    )
    worker.start()
    worker.join(30)
    assert not worker.is_alive() and [o.reason for o in outcomes] == ["not a regular file"]


def test_files_over_the_size_cap_are_skipped(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 20_000)
    photo(60, size=(200, 200)).save(folder / "bed" / "big.png")  # noise: about 100 kB
    result = extract([folder], **SMALL, out=tmp_path / "f.h5")
    reasons = dict(load(tmp_path / "f.h5").skipped)
    assert result.skipped == 1
    assert reasons[str(folder / "bed" / "big.png")].startswith("too large: 0.0 GiB (the limit is 1.86265e-05 GiB)")
    with pytest.raises(images.ImageDecodeError, match="too large"):
        images.read_file(str(folder / "bed" / "big.png"))


def test_labels_are_kept_changed_and_set(photo_folder, folder, tmp_path):
    out = tmp_path / "f.h5"
    extract([folder], **SMALL, out=out)
    bed = extract([folder / "bed"], **SMALL, out=out)  # listed without a label: the rows keep theirs
    assert (bed.relabelled, bed.removed, bed.rows) == (0, 0, 6)
    assert sorted(load(out).labels) == ["bed"] * 3 + ["chair"] * 3
    loose = tmp_path / "loose.jpg"
    shutil.copy(folder / "bed" / "bed_0.jpg", loose)  # a copy of a labelled photo, listed without a label
    assert extract([loose], **SMALL, out=out).extracted == 0
    rows = load(out)
    assert rows.labels[list(rows.paths).index(str(loose))] == "bed"

    result = run_cli("extract", folder / "chair", *CLI_SMALL, "--out", out, "--label", "sofa")
    assert result.exit_code == 0 and "3 relabelled" in result.output
    assert sorted(load(out).labels) == ["bed"] * 4 + ["sofa"] * 3 and load(out).classes == ["bed", "sofa"]
    moved = extract([folder], **SMALL, out=out)  # the folders' own labels again
    assert moved.relabelled == 3 and summary(out)["classes"] == {"bed": 4, "chair": 3}
    with pytest.raises(InputError, match="label must not be empty"):
        extract([folder], **SMALL, out=out, label=" ")
    for odd in ("two\nlines", "tab\there"):  # a class name is one printable line in every table and CSV
        refused = run_cli("extract", folder, *CLI_SMALL, "--out", out, "--label", odd)
        assert (refused.exit_code, refused.output) == (2, f"Error: a label must be printable text on one line. "
                                                           f"Received: label={odd!r}\n")
    assert extract([folder / "chair"], **SMALL, out=out, label=" sofa, new ").relabelled == 3
    assert summary(out)["classes"] == {"bed": 4, "sofa, new": 3}  # stripped as a manifest's labels are


def test_a_class_folder_whose_name_cannot_be_a_label_is_refused(folder, tmp_path):
    out = tmp_path / "f.h5"
    odd = folder / "so\nfa"
    shutil.copytree(folder / "chair", odd)

    refused = run_cli("extract", folder, *CLI_SMALL, "--out", out)

    assert (refused.exit_code, refused.output) == (2, f"Error: the name of class folder {str(odd)!r} cannot be a "
                                                      "label: a label must be printable text on one line; rename "
                                                      "the folder, or give --label.\n")
    assert not out.exists()
    assert extract([folder], **SMALL, out=out, label="sofa").rows == 9  # its name is no label: taken
    os.rename(odd, folder / os.fsdecode(b"caf\xe9"))  # not UTF-8: skipped with a warning, as every such name
    result = extract([folder], **SMALL, out=out)
    assert (result.skipped, result.rows) == (3, 6) and len(result.warnings) == 3


def test_a_failed_start_leaves_nothing_behind(folder, tmp_path):
    bad = tmp_path / "bad.weights.h5"
    bad.write_text("not weights")
    out = tmp_path / "f.h5"
    with pytest.raises(FurnitypeError, match="bad.weights.h5 is not a Keras weights file"):
        extract([folder], **{**SMALL, "weights": str(bad)}, out=out)
    assert _files(tmp_path) == ["bad.weights.h5"]
    assert extract([folder], **SMALL, out=out).extracted == 6  # the corrected command is not refused

    offline = {**os.environ, "KERAS_HOME": str(tmp_path / "keras"), "https_proxy": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    done = _cli("extract", folder, "--weights", "imagenet", "--image-size", "32", "--quiet", "--out",
                tmp_path / "g.h5", env=offline)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "what works offline: --weights PATH" in done.stderr and "--weights none (random weights)" in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("Error: ")] == [done.stderr.splitlines()[-1]]
    assert _files(tmp_path) == ["bad.weights.h5", "f.h5"]


def test_ctrl_c_exits_130_and_keeps_the_finished_batches(tmp_path):
    folder = make_photo_folder(tmp_path / "photos", per_class=4, classes=("bed", "chair", "sofa"))
    out = tmp_path / "f.h5"
    args = ["extract", folder, "--weights", "none", "--image-size", "32", "--batch-size", "2", "--out", out]
    proc = subprocess.Popen(
        [sys.executable, "-m", "furnitype.cli", *map(str, args)], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env=pause_env("store-commit", 3),  # Ctrl-C while the 4th batch is being committed
    )
    assert wait_stopped(proc), proc.communicate()
    signal_stopped(proc, signal.SIGINT)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130, stderr
    assert stderr.splitlines()[-1] == "interrupted: 8 rows kept; rerun to go on" and len(load(out)) == 8
    assert _files(tmp_path) == ["f.h5"]
    rerun = extract([folder], backbone="vgg16", weights="none", image_size=32, out=out, progress=False)
    assert rerun.extracted == 4 and rerun.rows == 12


def test_a_second_writer_is_refused_and_the_first_keeps_every_row(tmp_path):
    first = make_photo_folder(tmp_path / "first", per_class=4, classes=("bed", "chair", "sofa"))
    second = make_photo_folder(tmp_path / "second", per_class=1, classes=("sofa",))
    out = tmp_path / "f.h5"
    proc = subprocess.Popen(
        [sys.executable, "-m", "furnitype.cli", "extract", str(first), *CLI_SMALL, "--batch-size", "2", "--out",
         str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=pause_env("store-commit", 2),
    )
    try:
        assert wait_stopped(proc)  # in the middle of its run, holding the store's lock
        refused = run_cli("extract", second, *CLI_SMALL, "--out", out)
        link = tmp_path / "link.h5"
        link.symlink_to(out)
        through_link = run_cli("extract", second, *CLI_SMALL, "--out", link)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=300) == 0
    assert refused.exit_code == 1
    assert refused.output == f"Error: another furnitype process is writing {out}; wait for it to finish.\n"
    assert through_link.exit_code == 1 and "another furnitype process is writing" in through_link.output
    assert len(load(out)) == 12
    assert extract([second], **SMALL, out=link).rows == 13
    assert link.is_symlink() and len(load(out)) == 13


def test_a_full_disk_is_one_line_and_keeps_the_store(folder, tmp_path, monkeypatch):
    out = tmp_path / "f.h5"
    extract([folder / "bed"], **SMALL, out=out)
    before = out.read_bytes()
    real = undo_module.write_all

    def full(fd, data, offset):
        if offset + len(memoryview(data).cast("B")) > os.fstat(fd).st_size:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(undo_module, "write_all", full)
    result = run_cli("extract", folder, *CLI_SMALL, "--out", out)
    monkeypatch.undo()
    assert result.exit_code == 2  # an output that cannot be written, as for every command
    assert result.output == (
        f"Error: disk full while writing {out}: the last change was not written and the store is intact "
        "(3 rows); free space or fix the cause and rerun.\n"
    )
    assert out.read_bytes() == before and _files(tmp_path) == ["f.h5"]
    with pytest.raises(StoreError, match=r"disk full while writing .*\(0 rows\)"):
        monkeypatch.setattr(undo_module, "write_all", full)
        extract([folder], **SMALL, out=tmp_path / "new.h5")
    monkeypatch.undo()
    assert _files(tmp_path) == ["f.h5"]
    assert extract([folder], **SMALL, out=out).rows == 6


def test_leftovers_of_killed_runs_are_cleaned_by_the_next_run(folder, tmp_path):
    out = tmp_path / "f.h5"
    extract([folder], **SMALL, out=out)
    (tmp_path / ".f.h5.tmp-99999").write_bytes(b"half a store")
    (tmp_path / "f.h5.journal").write_bytes(b"FTJ1 an interrupted run of furnitype 0.1")
    Path(f"{out}.lock").write_bytes(b"")
    (tmp_path / ".other.h5.tmp-1").write_bytes(b"not ours")
    extract([folder], **SMALL, out=out)
    assert _files(tmp_path) == [".other.h5.tmp-1", "f.h5"]


def test_spec_and_engine_form_equals_the_keyword_form(photo_folder, tmp_path):
    keyword = extract([photo_folder], **SMALL, out=tmp_path / "a.h5")
    spec = ExtractSpec("vgg16", "none", image_size=32)
    explicit = extract([photo_folder], spec=spec, engine=feature_batches, out=tmp_path / "b.h5", progress=False)
    assert keyword.extracted == explicit.extracted == 6
    np.testing.assert_array_equal(load(tmp_path / "a.h5").features, load(tmp_path / "b.h5").features)
    with pytest.raises(InputError, match=r"give spec or its options \(pooling\), not both"):
        extract([photo_folder], spec=spec, pooling="max", out=tmp_path / "c.h5")
    with pytest.raises(TypeError, match="unexpected keyword argument 'poolin'"):
        extract([photo_folder], poolin="max", out=tmp_path / "c.h5")
    with pytest.raises(InputError, match="only apply to engine='ray'"):
        extract([photo_folder], spec=spec, engine=feature_batches, ray_workers=2, out=tmp_path / "c.h5")


def test_names_that_are_not_utf8_are_skipped_with_a_warning(folder, tmp_path):
    odd = folder / os.fsdecode(b"bed/caf\xe9.jpg")
    shutil.copy(folder / "bed" / "bed_0.jpg", odd)
    result = extract([folder], **SMALL, out=tmp_path / "f.h5")
    assert (result.extracted, result.skipped, result.rows) == (6, 1, 6)
    assert result.warnings == [f"skipped {folder}/bed/caf\\xe9.jpg: a feature file records only UTF-8 names; rename it"]
    # info cannot list a name the store does not record: the summary sends the user to the warnings
    ending = f"({result.out}, {result.seconds:.1f} s; the warnings name the skipped files)"
    assert result.summary().endswith(ending)
    (folder / "chair" / "empty.jpg").write_bytes(b"")
    both = extract([folder], **SMALL, out=tmp_path / "f.h5")
    assert both.summary().endswith(f"(see: furnitype info {both.out} and the warnings)")


def test_a_store_that_cannot_be_written_is_refused_before_any_work(folder, tmp_path):
    out = tmp_path / "f.h5"
    extract([folder], **SMALL, out=out)
    os.chmod(out, 0o444)
    done = _cli("extract", folder, *CLI_SMALL, "--out", out, prefix=WITHOUT_ROOT_POWERS)
    assert (done.returncode, done.stderr) == (2, f"Error: cannot write {out}: permission denied.\n")
    assert _files(tmp_path) == ["f.h5"]


def test_rows_that_are_not_finite_are_skipped_not_stored(photo_folder, tmp_path):
    """An engine (the documented extension point) that returns NaN for one photo: the row is refused."""
    from furnitype.extract.pipeline import Outcome

    def faulty_engine(spec, paths, **options):
        for batch in feature_batches(spec, paths, **options):
            yield [Outcome(o.path, o.sha256, o.features * np.nan) if o.path.endswith("bed_1.jpg") else o for o in batch]

    out = tmp_path / "f.h5"
    result = extract([photo_folder], **SMALL, engine=faulty_engine, out=out)
    assert (result.extracted, result.skipped, result.rows) == (5, 1, 5)
    assert load(out).skipped == [
        (str(photo_folder / "bed" / "bed_1.jpg"),
         "its features are not finite numbers (NaN or infinity): check the weights and precision")
    ]


def _flip_inside_first_features_chunk(store: Path) -> None:
    import h5py

    with h5py.File(store, "r") as h5:
        chunk = h5["features"].id.get_chunk_info(0)
    with open(store, "r+b") as fh:
        fh.seek(chunk.byte_offset + chunk.size // 2)
        byte = fh.read(1)[0]
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte ^ 0xFF]))


def test_overwrite_rebuilds_a_store_whose_features_are_damaged_and_compact_says_so(folder, tmp_path):
    """A damaged /features chunk is found only by reading it: --overwrite reads every row first and rebuilds the
    store instead of reusing its rows; compact, which reads them all, says so in one line."""
    out = tmp_path / "f.h5"
    extract([folder], **SMALL, out=out)
    _flip_inside_first_features_chunk(out)
    with pytest.raises(StoreError, match=r"f.h5 is damaged \(.*\)\.$"):  # load has no --overwrite to suggest
        load(out)
    compacted = _cli("compact", out)
    assert compacted.returncode == 1 and compacted.stderr.count("\n") == 1, compacted.stderr
    assert compacted.stderr.startswith(f"Error: {out} is damaged (")
    rebuilt = json.loads(run_cli("extract", folder, *CLI_SMALL, "--out", out, "--overwrite", "--json").stdout)
    assert (rebuilt["extracted"], rebuilt["reused"]) == (6, 0)
    assert len(load(out)) == 6
    again = extract([folder], **SMALL, out=out, overwrite=True)  # an intact store: its rows are kept
    assert (again.extracted, again.reused) == (0, 6)


def test_a_photo_moved_to_another_class_folder_is_relabelled_not_removed(folder, tmp_path):
    out = tmp_path / "f.h5"
    extract([folder], **SMALL, out=out)
    (folder / "chair" / "bed_0.jpg").write_bytes((folder / "bed" / "bed_0.jpg").read_bytes())
    (folder / "bed" / "bed_0.jpg").unlink()  # moved from bed/ to chair/, the fix a mistakes list asks for
    (folder / "bed" / "bed_1.jpg").rename(folder / "bed" / "renamed.jpg")  # same class: neither

    moved = extract([folder], **SMALL, out=out)

    assert (moved.relabelled, moved.removed, moved.extracted, moved.rows) == (1, 0, 0, 6)
    assert "1 relabelled" in moved.summary() and "removed" not in moved.summary()
    assert summary(out)["classes"] == {"bed": 2, "chair": 4}
    (folder / "chair" / "bed_0.jpg").unlink()  # gone for good: a removal
    assert (extract([folder], **SMALL, out=out).removed, summary(out)["classes"]) == (1, {"bed": 2, "chair": 3})
