"""Decoding workers sized to the machine: past ``THREADS_SCALE_TO`` they are processes, which give the threads'
outcomes in the same order, ignore Ctrl-C (the parent answers it), import no Keras, and go with their parent, even
killed with -9. Real photos, real spawned processes, a real ``furnitype extract``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from furnitype.errors import FurnitypeError
from furnitype.extract import pipeline
from furnitype.extract.decoding import (
    THREADS_SCALE_TO,
    chunk_size,
    default_decode_workers,
    in_processes,
    max_decode_workers,
    read_ahead,
)
from furnitype.extract.images import ImageDecodeError
from furnitype.extract.pipeline import ExtractSpec, decoded, feature_batches
from furnitype.features import load
from tests.images import make_photo_folder, photo
from tests.processes import pause_env, signal_stopped, wait_stopped

PROCESSES = THREADS_SCALE_TO + 1
GUARD_S = 30  # only a guard: spawned processes start slowly on a busy machine


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    """Real photos (JPEG and PNG) and unusable files: damaged bytes, an empty file, a missing one."""
    root = make_photo_folder(tmp_path_factory.mktemp("decode") / "photos", per_class=3)
    photo(99, size=(30, 50)).save(root / "bed" / "tall.png")
    (root / "bed" / "damaged.jpg").write_bytes(b"\xff\xd8\xff\xe0 not the rest of a JPEG")
    (root / "bed" / "empty.jpg").write_bytes(b"")
    paths = sorted(str(p) for p in root.rglob("*.*"))
    return [*paths[:3], str(root / "gone.jpg"), *paths[3:]]


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid``, with their command lines."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):  # not a process, or gone meanwhile
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found[int(entry)] = cmdline
    return found


def _decoders(pid: int) -> dict[int, str]:
    return {child: cmd for child, cmd in _children(pid).items() if "spawn_main" in cmd}


def _wait_gone(pidfds: dict[int, int], timeout: float = GUARD_S) -> list[int]:
    """Wait for the exit of each process (a pidfd turns readable when it ends); the ones still running."""
    poll = select.poll()
    for fd in pidfds.values():
        poll.register(fd, select.POLLIN)
    left = dict(pidfds)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for fd, _ in poll.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            poll.unregister(fd)
            left = {pid: pidfd for pid, pidfd in left.items() if pidfd != fd}
    for fd in pidfds.values():
        os.close(fd)
    return sorted(left)


def test_threads_up_to_the_limit_processes_past_it():
    assert not in_processes(THREADS_SCALE_TO) and in_processes(THREADS_SCALE_TO + 1)


def test_the_default_is_sized_to_the_cores_this_process_may_use():
    """Pinned to one core (of the machine's two or more), a GPU run decodes with one worker, not one per core."""
    program = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
               "from furnitype.extract.decoding import default_decode_workers as d; "
               "print(d(gpu=True), d(gpu=False))")
    pinned = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=GUARD_S)
    assert pinned.stdout.split() == ["1", "1"], pinned.stderr
    cores = len(os.sched_getaffinity(0))
    assert default_decode_workers(gpu=True) == cores
    assert default_decode_workers(gpu=False) == min(THREADS_SCALE_TO, cores)


def test_processes_decode_what_threads_decode_in_the_same_order(photos):
    spec = ExtractSpec("vgg16", "none", image_size=32)
    threads = list(decoded(spec, photos, THREADS_SCALE_TO, window=3))
    processes = list(decoded(spec, photos, PROCESSES, window=3))
    assert [path for path, _ in processes] == [path for path, _ in threads] == photos
    for (path, by_thread), (_, by_process) in zip(threads, processes, strict=True):
        if isinstance(by_thread, ImageDecodeError):
            assert isinstance(by_process, ImageDecodeError), path
            assert (str(by_process), by_process.sha256, by_process.gone) == (
                str(by_thread), by_thread.sha256, by_thread.gone)
        else:
            assert not isinstance(by_process, ImageDecodeError), by_process
            assert by_process[0] == by_thread[0]
            np.testing.assert_array_equal(by_process[1], by_thread[1])


def test_processes_give_the_threads_outcomes_damaged_files_included(photos):
    spec = ExtractSpec("vgg16", "none", image_size=32)
    infer = spec.build()
    threads = [o for batch in feature_batches(spec, photos, batch_size=4, workers=2, infer=infer) for o in batch]
    processes = [o for batch in feature_batches(spec, photos, batch_size=4, workers=PROCESSES, infer=infer)
                 for o in batch]
    assert [(o.path, o.sha256, o.reason) for o in processes] == [(o.path, o.sha256, o.reason) for o in threads]
    reasons = {Path(o.path).name: (o.reason, o.sha256) for o in processes if o.reason}
    damaged = Path(photos[0]).parent / "damaged.jpg"
    assert reasons == {
        "damaged.jpg": ("truncated or corrupt: Truncated File Read", hashlib.sha256(damaged.read_bytes()).hexdigest()),
        "empty.jpg": ("empty file", hashlib.sha256(b"").hexdigest()),
        "gone.jpg": ("file not found", ""),
    }
    rows = [(a.features, b.features) for a, b in zip(threads, processes, strict=True) if not a.reason]
    assert len(rows) == 7
    for by_thread, by_process in rows:
        np.testing.assert_allclose(by_process, by_thread, rtol=1e-6)


@pytest.mark.parametrize("window", [0, 5, None])
def test_processes_read_ahead_within_the_window(photos, monkeypatch, window):
    """Memory stays flat in processes too: at most the window (and the chunk in hand) decoded ahead of the
    consumer, however many photos."""
    real_pool, submitted = pipeline.decode_pool, []

    @contextlib.contextmanager
    def counting_pool(workers):
        with real_pool(workers) as submit:
            yield lambda task, group: (submitted.extend(group), submit(task, group))[1]

    monkeypatch.setattr(pipeline, "decode_pool", counting_pool)
    spec = ExtractSpec("vgg16", "none", image_size=32)
    window = read_ahead(2, PROCESSES) if window is None else window
    chunk = chunk_size(PROCESSES, window)
    paths = photos * 20  # more than the default window
    seen = 0
    for path, _ in decoded(spec, paths, PROCESSES, window):
        seen += 1
        assert submitted[seen - 1] == path and len(submitted) <= seen + window + chunk - 1
    assert seen == len(submitted) == len(paths)


def test_an_unusable_file_s_error_pickles_with_its_attributes():
    err = ImageDecodeError("unreadable: Permission denied", gone=False)
    err.sha256 = "ab" * 32
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), back.gone, back.sha256) == (ImageDecodeError, str(err), False, "ab" * 32)


def test_closing_early_ends_the_decoding_processes(photos):
    spec = ExtractSpec("vgg16", "none", image_size=32)
    outcomes = decoded(spec, photos * 3, PROCESSES, window=8)
    next(outcomes)
    workers = _decoders(os.getpid())
    assert workers, "no decoding process"
    pidfds = {pid: os.pidfd_open(pid) for pid in workers}
    outcomes.close()  # returns once the workers are shut down
    assert _wait_gone(pidfds) == []


def test_a_decoding_process_that_dies_is_one_error_not_a_damaged_photo(photos):
    spec = ExtractSpec("vgg16", "none", image_size=32)
    outcomes = decoded(spec, photos * 5, PROCESSES, window=8)
    next(outcomes)
    workers = _decoders(os.getpid())
    pidfds = {pid: os.pidfd_open(pid) for pid in workers}
    for pid in workers:
        os.kill(pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    assert _wait_gone(pidfds) == []
    with pytest.raises(FurnitypeError) as raised:
        list(outcomes)  # the photos not decoded yet (more than the window) are not reported unusable
    assert str(raised.value) == (
        'a decoding process ended unexpectedly (out of memory? killed? a script that calls furnitype needs if '
        '__name__ == "__main__":); rerun, or give --workers 4 or fewer to decode in threads')


def _start_extract(folder: Path, out: Path, point: str, nth: int) -> subprocess.Popen:
    """``furnitype extract`` decoding in processes, in a process group of its own (as a terminal's job), stopped
    at ``point``."""
    args = ["extract", folder, "--weights", "none", "--image-size", "32", "--batch-size", "2", "--workers",
            PROCESSES, "--quiet", "--out", out]
    return subprocess.Popen([sys.executable, "-m", "furnitype.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=pause_env(point, nth), start_new_session=True)


def test_ctrl_c_of_an_extract_decoding_in_processes_exits_130_with_one_line(tmp_path):
    folder = make_photo_folder(tmp_path / "photos", per_class=4, classes=("bed", "chair", "sofa"))
    out = tmp_path / "f.h5"
    proc = _start_extract(folder, out, "store-commit", 3)  # Ctrl-C while the 4th batch is being committed
    assert wait_stopped(proc, GUARD_S), proc.communicate()
    workers = _decoders(proc.pid)
    assert workers, "extract decodes in processes"
    pidfds = {pid: os.pidfd_open(pid) for pid in workers}
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: to every process of the job, decoders included
    signal_stopped(proc, signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=GUARD_S)
    assert (proc.returncode, stderr, stdout) == (130, "interrupted: 8 rows kept; rerun to go on\n", "")
    assert _wait_gone(pidfds) == []
    assert len(load(out)) == 8 and sorted(p.name for p in tmp_path.iterdir()) == ["f.h5", "photos"]


def test_kill_9_of_an_extract_leaves_no_decoding_process_behind(tmp_path):
    folder = make_photo_folder(tmp_path / "photos", per_class=4, classes=("bed", "chair", "sofa"))
    proc = _start_extract(folder, tmp_path / "f.h5", "store-commit", 2)
    assert wait_stopped(proc, GUARD_S), proc.communicate()
    children = _children(proc.pid)  # the decoders and multiprocessing's resource tracker
    workers = _decoders(proc.pid)
    assert workers, "extract decodes in processes"
    # The decoders import no Keras: TensorFlow's library is mapped in the parent only.
    assert "tensorflow" in Path(f"/proc/{proc.pid}/maps").read_text()
    assert not [pid for pid in workers if "tensorflow" in Path(f"/proc/{pid}/maps").read_text()]
    pidfds = {pid: os.pidfd_open(pid) for pid in children}
    signal_stopped(proc, signal.SIGKILL)
    proc.communicate(timeout=GUARD_S)
    assert _wait_gone(pidfds) == []


def test_more_decoding_workers_than_the_machine_can_use_is_one_line(photos, tmp_path, invoke):
    """A huge --workers would start a process per 8 photos and decode the whole input ahead: refused, nothing
    started."""
    folder = str(Path(photos[0]).parent.parent)
    most = max_decode_workers()
    assert most == max(2 * THREADS_SCALE_TO, 4 * len(os.sched_getaffinity(0)))
    for workers in (most + 1, 10**6):
        result = invoke("extract", folder, "--weights", "none", "--image-size", 32, "--workers", workers,
                        "--out", tmp_path / "f.h5")
        assert (result.exit_code, result.output.strip()) == (2, (
            f"Error: decoding workers must be at most {most} here (4 per usable core): more only share the same "
            f"cores and hold more photos decoded ahead. Received: workers={workers}"))
        assert not (tmp_path / "f.h5").exists() and not _decoders(os.getpid())
    result = invoke("extract", folder, "--weights", "none", "--image-size", 32, "--workers", most, "--quiet",
                    "--out", tmp_path / "f.h5")
    assert result.exit_code == 0, result.output
