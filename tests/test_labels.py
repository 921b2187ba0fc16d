"""The labels file (``furnitype.labels``): real files, real processes writing at once, a kill -9 and a full disk."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import furnitype.labels as labels_module
from furnitype.errors import FurnitypeError, InputError
from furnitype.extract.images import ImageFile, read_manifest
from furnitype.features.store import load
from furnitype.labels import append_label, count_labels, labelled_paths
from tests.conftest import run_cli
from tests.images import make_photo_folder
from tests.processes import pause_env, signal_stopped, wait_stopped
from tests.test_store import WITHOUT_ROOT_POWERS

#: A child that waits for ``GO`` (a file), then adds ``ROWS`` labels ``PREFIX-i.jpg,LABEL`` to ``LABELS``.
WRITER = """
import os, sys, time
from furnitype.labels import append_label
labels, prefix, rows, label, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
open(f"{prefix}.ready", "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
for i in range(rows):
    append_label(labels, f"{prefix}-{i}.jpg", label)
"""


def writer(labels: Path, prefix: Path, rows: int, label: str, go: Path, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(labels), str(prefix), str(rows), label, str(go)],
                            env=env, stderr=subprocess.PIPE, text=True)


def start(*writers: tuple[subprocess.Popen, Path], go: Path) -> None:
    """Let the writers go once each has started (its ``.ready`` file), so that they write at the same time."""
    deadline = time.monotonic() + 120  # a guard only
    for proc, prefix in writers:
        while not Path(f"{prefix}.ready").exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "a writer did not start"
            time.sleep(0.01)
    go.touch()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "labels.csv")


def test_labels_are_added_once_and_read_back_as_extract_reads_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    labels = tmp_path / "new" / "labels.csv"  # a folder that does not exist yet is made
    assert count_labels(labels) == 0 and labelled_paths(labels) == set()
    odd = ['a "quoted", name.jpg', "two\nlines.jpg", "s\u2028e\x1cp\x85.jpg", "plain.jpg"]
    counts = [append_label(labels, name, label) for name, label in zip(odd, ["bed", " sofa, new ", "bed", "tv"],
                                                                         strict=True)]
    assert counts == [1, 2, 3, 4]
    assert labels.read_bytes().startswith(b"path,label\n")
    expected = [ImageFile(str(tmp_path / name), label)
                for name, label in zip(odd, ["bed", "sofa, new", "bed", "tv"], strict=True)]
    assert read_manifest(labels) == expected
    assert count_labels(labels) == 4 and labelled_paths(labels) == {row.path for row in expected}

    before = labels.read_bytes()
    assert append_label(labels, tmp_path / "plain.jpg", "tv") == 4  # the same label again: nothing added
    with pytest.raises(InputError, match=r"plain.jpg is already labelled 'tv' in .*labels.csv; edit the file"):
        append_label(labels, "plain.jpg", "bed")  # read_manifest refuses a path listed with two labels
    assert labels.read_bytes() == before and leftovers(labels.parent) == []


@pytest.mark.parametrize(("path", "label", "message"), [
    (os.fsdecode(b"caf\xe9.jpg"), "bed", r"cannot label .*caf\\xe9.jpg: its name is not UTF-8 text"),
    ("spaced.jpg ", "bed", "a labels file would not read its name back the same"),
    ("tab.jpg\t", "bed", "a labels file would not read its name back the same"),
    ("a.jpg", "  ", "a label must not be empty"),
    ("a.jpg", "two\nlines", "a label must be printable text on one line"),
], ids=["not utf-8", "trailing space", "trailing tab", "empty label", "two-line label"])
def test_what_would_not_read_back_the_same_is_refused(tmp_path, path, label, message):
    labels = tmp_path / "labels.csv"
    append_label(labels, str(tmp_path / "first.jpg"), "bed")
    before = labels.read_bytes()
    with pytest.raises(InputError, match=message):
        append_label(labels, str(tmp_path / path), label)
    assert labels.read_bytes() == before


def test_a_hand_written_manifest_is_kept_as_it_is(tmp_path):
    labels = tmp_path / "labels.csv"
    # A byte order mark, Windows line ends, relative paths, an unlabelled row, no line end on the last row.
    labels.write_bytes("\ufeffpath,label\r\nold/a.jpg,bed\r\nold/b.jpg,\r\nold/c.jpg,chair".encode())
    assert count_labels(labels) == 2
    assert append_label(labels, str(tmp_path / "d.jpg"), "sofa") == 3
    assert labels.read_bytes() == ("\ufeffpath,label\r\nold/a.jpg,bed\r\nold/b.jpg,\r\nold/c.jpg,chair\r\n"
                                   f"{tmp_path / 'd.jpg'},sofa\r\n").encode()
    assert [(Path(r.path).name, r.label) for r in read_manifest(labels)] == [
        ("a.jpg", "bed"), ("b.jpg", ""), ("c.jpg", "chair"), ("d.jpg", "sofa")]


def test_a_last_line_cut_inside_a_quote_is_refused_not_swallowed(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text('path,label\n"/photos/a, b.jpg')  # read as one unlabelled row; a row added after it would
    with pytest.raises(InputError, match="its last line is cut off"):  # become part of its path
        append_label(labels, str(tmp_path / "c.jpg"), "bed")
    assert labels.read_text() == 'path,label\n"/photos/a, b.jpg'


def test_a_damaged_labels_file_is_one_input_error_and_left_alone(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"path,label\n/photos/\xff.jpg,bed\n")
    for call in (lambda: append_label(labels, str(tmp_path / "c.jpg"), "bed"), lambda: count_labels(labels)):
        with pytest.raises(InputError, match=r"cannot read manifest .*labels.csv: 'utf-8' codec can't decode"):
            call()
    assert labels.read_bytes() == b"path,label\n/photos/\xff.jpg,bed\n" and leftovers(tmp_path) == []


def test_two_processes_adding_labels_at_once_keep_every_row_once(tmp_path):
    labels, go = tmp_path / "labels.csv", tmp_path / "go"
    a, b = tmp_path / "a", tmp_path / "b"
    procs = [writer(labels, a, 60, "bed", go), writer(labels, b, 60, "chair", go)]
    start((procs[0], a), (procs[1], b), go=go)
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    rows = read_manifest(labels)
    assert sorted(rows) == sorted([ImageFile(f"{a}-{i}.jpg", "bed") for i in range(60)]
                                  + [ImageFile(f"{b}-{i}.jpg", "chair") for i in range(60)])
    assert count_labels(labels) == 120
    assert labels.read_text().count("\n") == 121  # the header and one line per row: nothing torn, nothing twice


def test_threads_adding_labels_at_once_keep_every_row_once(tmp_path):
    labels = tmp_path / "labels.csv"  # as a server's request threads do: one process, a lock each
    barrier = threading.Barrier(3)

    def add(prefix: str) -> None:
        barrier.wait()
        for i in range(30):
            append_label(labels, str(tmp_path / f"{prefix}-{i}.jpg"), prefix)

    threads = [threading.Thread(target=add, args=(name,)) for name in ("bed", "chair", "sofa")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(read_manifest(labels)) == sorted(ImageFile(str(tmp_path / f"{name}-{i}.jpg"), name)
                                                   for name in ("bed", "chair", "sofa") for i in range(30))


def test_a_writer_waits_for_the_one_writing(tmp_path):
    labels, go = tmp_path / "labels.csv", tmp_path / "go"
    go.touch()
    a, b = tmp_path / "a", tmp_path / "b"
    first = writer(labels, a, 1, "bed", go, env=pause_env("labels-write"))
    assert wait_stopped(first)  # it holds the lock, has read the file and is about to write it
    second = writer(labels, b, 1, "chair", go, env=pause_env("labels-wait"))
    assert wait_stopped(second)  # it found the file locked: without the lock it would write and be overwritten
    for proc in (first, second):
        os.kill(proc.pid, signal.SIGCONT)
    for proc in (first, second):
        assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    assert sorted(read_manifest(labels)) == [ImageFile(f"{a}-0.jpg", "bed"), ImageFile(f"{b}-0.jpg", "chair")]


def test_a_writer_held_up_too_long_is_one_line_not_a_wait_forever(tmp_path, monkeypatch):
    labels, go = tmp_path / "labels.csv", tmp_path / "go"
    go.touch()
    holder = writer(labels, tmp_path / "a", 1, "bed", go, env=pause_env("labels-write"))
    assert wait_stopped(holder)  # it holds the lock and will not let go while stopped
    monkeypatch.setattr(labels_module, "WAIT_SECONDS", 0.2)
    try:
        with pytest.raises(FurnitypeError, match=r"^another process has been writing .*labels.csv for over 0.2 s; "
                                                 r"try again.$") as refused:
            append_label(labels, str(tmp_path / "b.jpg"), "chair")
        assert not isinstance(refused.value, InputError)  # not the user's input: exit 1, a server's 500
    finally:
        signal_stopped(holder, signal.SIGCONT)
    assert holder.wait(timeout=120) == 0
    assert read_manifest(labels) == [ImageFile(f"{tmp_path / 'a'}-0.jpg", "bed")]


def test_a_kill_9_while_writing_leaves_the_previous_rows_whole(tmp_path):
    labels, go = tmp_path / "labels.csv", tmp_path / "go"
    go.touch()
    prefix = tmp_path / "a"
    proc = writer(labels, prefix, 5, "bed", go, env=pause_env("labels-write", 3))
    assert wait_stopped(proc)  # writing its third row
    signal_stopped(proc, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert read_manifest(labels) == [ImageFile(f"{prefix}-{i}.jpg", "bed") for i in range(2)]
    assert labels.read_text().count("\n") == 3
    assert leftovers(tmp_path) == ["a.ready", "go", "labels.csv.lock"]  # the killed writer's lock, not held

    assert append_label(labels, f"{prefix}-2.jpg", "bed") == 3  # the next writer takes the lock and removes it
    assert read_manifest(labels) == [ImageFile(f"{prefix}-{i}.jpg", "bed") for i in range(3)]
    assert leftovers(tmp_path) == ["a.ready", "go"]


@pytest.mark.parametrize("written", [0, 7], ids=["nothing written", "part written"])
@pytest.mark.parametrize("existing", [True, False], ids=["existing file", "new file"])
def test_a_full_disk_leaves_the_file_as_it_was(tmp_path, monkeypatch, written, existing):
    labels = tmp_path / "labels.csv"
    if existing:
        append_label(labels, str(tmp_path / "a.jpg"), "bed")
    before = labels.read_bytes() if existing else None
    real_write = os.write

    def full(fd, data):  # as a disk that fills up: some bytes may go in, then ENOSPC
        if written and len(data) > written:
            return real_write(fd, bytes(data[:written]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(InputError, match=r"^cannot write .*labels.csv: the disk is full$"):
        append_label(labels, str(tmp_path / "b.jpg"), "chair")
    monkeypatch.undo()
    assert (labels.read_bytes() if labels.exists() else None) == before
    assert leftovers(tmp_path) == []
    assert append_label(labels, str(tmp_path / "b.jpg"), "chair") == (2 if existing else 1)


def test_a_symlinked_labels_file_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.csv"
    victim.write_text("path,label\n/photos/a.jpg,bed\n")
    labels = tmp_path / "labels.csv"
    labels.symlink_to(victim)
    for call in (lambda: append_label(labels, "/photos/b.jpg", "bed"), lambda: count_labels(labels),
                 lambda: labelled_paths(labels)):
        with pytest.raises(InputError, match=r"labels.csv is a symbolic link; give the labels file itself"):
            call()
    assert victim.read_text() == "path,label\n/photos/a.jpg,bed\n" and labels.is_symlink()

    labels.unlink()
    (tmp_path / "labels.csv.lock").symlink_to(victim)  # nor is a lock file that is a link followed
    with pytest.raises(InputError, match=r"labels.csv.lock is a symbolic link, not furnitype's lock file"):
        append_label(labels, "/photos/b.jpg", "bed")
    assert victim.read_text() == "path,label\n/photos/a.jpg,bed\n" and not labels.exists()


def test_a_labels_file_that_is_not_a_regular_file_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "labels.csv")
    with pytest.raises(InputError, match=r"labels.csv is not a regular file, so not a labels file"):
        append_label(tmp_path / "labels.csv", "/photos/b.jpg", "bed")
    with pytest.raises(InputError, match=r"labels.csv is not a regular file"):
        count_labels(tmp_path / "labels.csv")


def test_extract_reads_the_labels_file(tmp_path):
    photos = make_photo_folder(tmp_path / "photos", per_class=2)
    labels = tmp_path / "labels.csv"
    for name in ("bed_0", "bed_1", "chair_0"):
        append_label(labels, str(photos / name.split("_")[0] / f"{name}.jpg"), "sofa" if name == "bed_1" else "tv")
    out = tmp_path / "f.h5"
    result = run_cli("extract", "--manifest", labels, "--weights", "none", "--image-size", "32", "--quiet",
                     "--out", out)
    assert result.exit_code == 0, result.output
    store = load(out)
    assert sorted(zip((Path(p).name for p in store.paths), store.labels, strict=True)) == [
        ("bed_0.jpg", "tv"), ("bed_1.jpg", "sofa"), ("chair_0.jpg", "tv")]


def test_a_folder_that_cannot_be_written_is_one_line_and_the_file_is_left_alone(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    labels = folder / "labels.csv"
    append_label(labels, str(tmp_path / "a.jpg"), "bed")
    before = labels.read_bytes()
    os.chmod(folder, 0o555)
    try:
        done = subprocess.run([*WITHOUT_ROOT_POWERS, sys.executable, "-c", (
            "import sys\nfrom furnitype.errors import InputError\nfrom furnitype.labels import append_label\n"
            "try:\n    append_label(sys.argv[1], sys.argv[2], 'chair')\n"
            "except InputError as err:\n    sys.exit(f'Error: {err}')\n"), str(labels), str(tmp_path / "b.jpg")],
            capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(folder, 0o755)
    assert (done.returncode, done.stderr) == (1, f"Error: cannot write {labels}: Permission denied (cannot create "
                                                 f"{labels}.lock).\n")
    assert labels.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["labels.csv"]
