"""Writing run and report folders: one writer at a time, replaced by renames so that a kill -9 at any moment
leaves a whole run, leftovers tidied by the next command, symbolic links resolved, one line for a full disk,
a read-only folder, a one-class store or an option out of range, and never a folder that is not ours."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import pytest
import skops.io

from furnitype import features as store
from furnitype.classify import load_model, load_run
from furnitype.classify.synthetic import make_features
from furnitype.errors import InputError, StoreError
from furnitype.training import classify
from tests.conftest import STORE_META as META
from tests.conftest import run_cli as invoke

FAST = ["--models", "logreg", "--cv", "2", "--quiet"]
GRID = {"logreg": {"Cs": (0.1, 1.0)}}


def write_store(path: Path, counts=(10, 10, 10), classes=None) -> Path:
    X, labels, sha = make_features(list(counts), 8, seed=5, separation=2.0, classes=classes)
    store.save(path, features=X, paths=[f"/p/{i}.jpg" for i in range(len(labels))], labels=list(labels),
               sha256=list(sha), meta=META)
    return path


@pytest.fixture(scope="module")
def feats(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("feats") / "feats.h5")


@pytest.fixture(scope="module")
def runs(feats, tmp_path_factory) -> dict:
    """Two runs of the same features told apart by their seed: "old" (1) and "new" (2)."""
    base = tmp_path_factory.mktemp("made")
    return {
        name: classify([feats], models=["logreg"], cv=2, seed=seed, out=base / name, model_params=GRID).path
        for name, seed in (("old", 1), ("new", 2))
    }


def seed_of(run: Path) -> int:
    return load_run(run).document.options.seed


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def one_line(result, code: int, message: str) -> None:
    assert result.exit_code == code, result.output
    assert result.output == f"Error: {message}\n"


def cli(*args, env=None, preexec_fn=None, code=None) -> subprocess.Popen:
    """``furnitype ARGS`` in a process of its own (``code``: Python run instead of the plain command line)."""
    argv = [sys.executable, "-c", code] if code else [sys.executable, "-m", "furnitype.cli"]
    return subprocess.Popen(
        [*argv, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})}, preexec_fn=preexec_fn,
    )


# -- one writer at a time ------------------------------------------------------------------------------------------

#: The command line, stopping itself (SIGSTOP) when it starts fitting: it then holds its claim on --out.
STOP_WHILE_TRAINING = """
import os, signal, sys
import furnitype.training as training
fit = training.fit_and_score
def stopped(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGSTOP)
    return fit(*args, **kwargs)
training.fit_and_score = stopped
from furnitype.cli import main
sys.argv[0] = "furnitype"
main()
"""


def stopped_writer(*args) -> subprocess.Popen:
    """A real ``furnitype classify`` stopped while training (after it claimed --out)."""
    process = cli(*args, code=STOP_WHILE_TRAINING)
    _, status = os.waitpid(process.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), process.communicate()
    return process


def test_a_second_writer_fails_at_once_while_the_first_trains(feats, runs, tmp_path):
    out = tmp_path / "run"
    first = stopped_writer("classify", feats, *FAST, "--out", out)
    try:
        second = cli("classify", feats, *FAST, "--out", out)
        stdout, stderr = second.communicate(timeout=120)
        assert second.returncode == 1
        assert stderr == f"Error: another furnitype process is writing {out}; wait for it to finish.\n"
        report = cli("report", runs["new"], "--out", out)  # report --out takes the same claim
        assert report.communicate(timeout=120)[1].endswith(f"another furnitype process is writing {out}; wait for "
                                                          "it to finish.\n")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.communicate()
    assert seed_of(out) == 42 and leftovers(tmp_path) == []


def test_two_writers_started_together_one_wins(feats, tmp_path):
    out = tmp_path / "same"
    writers = [cli("classify", feats, *FAST, "--out", out, "--seed", seed) for seed in (7, 8)]
    results = [(w.wait(timeout=300), *w.communicate()) for w in writers]
    codes = sorted(code for code, _, _ in results)
    assert codes[0] == 0 and codes[1] in (1, 2), results
    loser = next(stderr for code, _, stderr in results if code != 0)
    assert loser.count("\n") == 1 and "Traceback" not in loser
    assert loser in (
        f"Error: another furnitype process is writing {out}; wait for it to finish.\n",
        f"Error: {out} already holds a run; use another --out, or --overwrite to replace it.\n",
    )
    winner = 7 if results[0][0] == 0 else 8
    assert seed_of(out) == winner and leftovers(tmp_path) == []


def test_a_killed_writer_leaves_the_old_run_and_the_next_one_tidies(feats, runs, tmp_path):
    out = shutil.copytree(runs["old"], tmp_path / "run")
    writer = stopped_writer("classify", feats, *FAST, "--out", out, "--overwrite")
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert seed_of(out) == 1 and load_model(out).name == "logreg"
    assert leftovers(tmp_path) == [".run.lock", f".run.tmp-{writer.pid}"]
    assert (tmp_path / ".run.lock").read_text().split() == [str(writer.pid)]  # the leftover is known as its
    result = invoke("classify", feats, *FAST, "--out", out, "--overwrite", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert seed_of(out) == 3 and leftovers(tmp_path) == []


# -- kill -9 at every step of a replacement -------------------------------------------------------------------------

#: Replaces runs through ``building``, each replacement in a process of its own forked from this one (which
#: imported furnitype once: a replacement costs a fork, not a Python start-up). A request on stdin, ``OUT NEW
#: KILL_AT FALLBACK``, replaces the run at OUT with a copy of the run at NEW, counting the file system changes
#: it makes (renames, removals, the lock file's record) and killing itself (SIGKILL) before the KILL_AT-th one
#: (0: never); FALLBACK=1 takes the two-rename path of systems that cannot exchange two folders. The answer on
#: stdout: the replacing process's exit code (-9 when killed) and the changes it made.
REPLACER = """
import os, shutil, signal, sys, traceback
from furnitype.classify import output
from furnitype.classify.metadata import RUN_KIND

def replace(out, new, kill_at, fallback):
    steps = []
    def counted(name, real):
        def step(*args, **kwargs):
            steps.append(name)
            if len(steps) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return step
    for name in ("rename", "unlink", "rmdir", "mkdir", "ftruncate", "pwrite"):
        setattr(os, name, counted(name, getattr(os, name)))
    exchange = (lambda *args: False) if fallback else output._renameat2
    output._renameat2 = counted("renameat2", exchange)
    with output.building(out, kind=RUN_KIND, overwrite=True) as folder:
        shutil.copytree(new, folder.path, dirs_exist_ok=True)
    return steps

for request in sys.stdin:
    out, new, kill_at, fallback = request.rstrip("\\n").split("\\t")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read)
            steps = replace(out, new, int(kill_at), fallback == "1")
            os.write(write, " ".join(steps).encode())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as made:
        steps = made.read()
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), steps, flush=True)
"""


@pytest.fixture(scope="module")
def replacer():
    process = subprocess.Popen([sys.executable, "-c", REPLACER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    yield process
    process.stdin.close()
    assert process.wait(timeout=120) == 0


def replace_run(replacer: subprocess.Popen, out: Path, new: Path, kill_at: int, fallback: bool) -> tuple[int, list]:
    """The exit code of a process that replaced ``out`` with ``new`` (killed at step ``kill_at``), and its steps."""
    replacer.stdin.write(f"{out}\t{new}\t{kill_at}\t{int(fallback)}\n")
    replacer.stdin.flush()
    code, *steps = replacer.stdout.readline().split()
    return int(code), steps


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two renames"])
def test_kill_9_at_every_step_of_a_replacement_leaves_a_whole_run(replacer, runs, tmp_path, fallback):
    parent = tmp_path / "runs"
    parent.mkdir()
    out = parent / "run"
    code, steps = replace_run(replacer, shutil.copytree(runs["old"], out), runs["new"], 0, fallback)
    assert code == 0 and seed_of(out) == 2 and leftovers(parent) == []
    assert steps.count("renameat2") == 1 and steps.count("rename") == (2 if fallback else 0), steps
    seen = []
    for kill_at in range(1, len(steps) + 1):
        shutil.rmtree(out)
        shutil.copytree(runs["old"], out)
        assert replace_run(replacer, out, runs["new"], kill_at, fallback)[0] == -signal.SIGKILL
        if not fallback:  # the swap is one step: the path holds a whole run at every moment
            assert out.is_dir()
        seen.append(seed_of(out))  # a reader puts back a run that a two-rename swap had moved aside
        assert load_model(out).name == "logreg"
        assert replace_run(replacer, out, runs["new"], 0, fallback)[0] == 0
        assert seed_of(out) == 2 and leftovers(parent) == [], (kill_at, steps, leftovers(parent))
    assert seen == sorted(seen) and set(seen) == {1, 2}, seen  # old until the swap, new after it


# -- symbolic links, and folders that are not ours ------------------------------------------------------------------


def test_a_symlinked_out_names_the_run_it_points_to(feats, runs, tmp_path):
    run = shutil.copytree(runs["old"], tmp_path / "2024-run")
    link = tmp_path / "latest"
    link.symlink_to(run.name)
    result = invoke("classify", feats, *FAST, "--out", link, "--overwrite", "--seed", "5")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and seed_of(run) == 5 and load_run(run).document.run == "2024-run"
    assert leftovers(tmp_path) == []


def test_report_out_follows_the_rules_of_classify_out(runs, tmp_path):
    run = shutil.copytree(runs["old"], tmp_path / "run")
    before = (run / "metrics.json").read_bytes()
    one_line(invoke("report", runs["new"], "--out", run), 2, f"{run} holds a run (made by classify), which report "
             "does not replace; choose another --out.")
    one_line(invoke("report", runs["new"], "--out", run, "--overwrite"), 2, f"{run} holds a run (made by "
             "classify), which report does not replace; choose another --out.")
    link = tmp_path / "link"
    link.symlink_to(run)
    one_line(invoke("report", runs["new"], "--out", link, "--overwrite"), 2, f"{link} holds a run (made by "
             "classify), which report does not replace; choose another --out.")
    inside = run / "compared" / "today"
    one_line(invoke("report", runs["new"], "--out", inside), 2, f"{inside} is inside {run}, which furnitype made; "
             "choose a folder outside it.")
    assert (run / "metrics.json").read_bytes() == before and not inside.parent.exists()

    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        one_line(invoke("report", runs["new"], "--out", mine, *extra), 2, f"{mine} exists and is not a furnitype "
                 "run; choose another --out.")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    report = tmp_path / "report"
    report.mkdir()  # an empty folder is used
    assert invoke("report", runs["new"], "--out", report).exit_code == 0
    assert load_run(report).document.kind == "furnitype merged report"
    one_line(invoke("report", runs["old"], "--out", report), 2, f"{report} already holds a report; use another "
             "--out, or --overwrite to replace it.")
    assert invoke("report", runs["old"], runs["new"], "--out", report, "--overwrite").exit_code == 0
    assert load_run(report).document.merged_from == ["old", "new"]
    one_line(invoke("classify", "x.h5", "--out", report, "--overwrite"), 2, f"{report} holds a report (made by "
             "report), which classify does not replace; choose another --out.")
    assert leftovers(tmp_path) == []


def test_the_root_folder_is_refused(feats, runs):
    one_line(invoke("report", runs["old"], runs["new"], "--out", "/"), 2,  # replacing it would delete the runs
             f"--out / holds {runs['old']}, which this command reads; choose another path.")


def test_leftovers_that_are_not_recorded_are_left_alone(feats, tmp_path):
    strange = tmp_path / ".run.tmp-1"
    strange.mkdir()
    (strange / "keep.txt").write_text("not furnitype's")
    (tmp_path / ".run.old-2").symlink_to(tmp_path)
    result = invoke("classify", feats, *FAST, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert (strange / "keep.txt").read_text() == "not furnitype's" and (tmp_path / ".run.old-2").is_symlink()
    assert leftovers(tmp_path) == [".run.old-2", ".run.tmp-1"]


def test_a_lock_file_that_is_a_symlink_is_not_followed(feats, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".run.lock").symlink_to(victim)
    result = invoke("classify", feats, *FAST, "--out", tmp_path / "run")
    assert result.exit_code == 2 and result.output.startswith(f"Error: cannot write {tmp_path / 'run'}: ")
    assert victim.read_text() == "precious" and not (tmp_path / "run").exists()


# -- full disks, read-only folders ------------------------------------------------------------------------------------


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    "where",
    [(skops.io, "dump"), (matplotlib.figure.Figure, "savefig"), (Path, "write_text"), (os, "fsync")],
    ids=["model save", "plots", "metadata", "fsync"],
)
def test_a_full_disk_while_writing_a_run_is_one_line(feats, runs, tmp_path, monkeypatch, where):
    out = shutil.copytree(runs["old"], tmp_path / "run")
    monkeypatch.setattr(*where, no_space)
    one_line(invoke("classify", feats, *FAST, "--out", out, "--overwrite"), 2, f"cannot write {out}: No space left "
             "on device")
    monkeypatch.undo()
    assert seed_of(out) == 1 and load_model(out).name == "logreg" and leftovers(tmp_path) == []


def test_a_full_disk_while_writing_a_report_is_one_line(runs, tmp_path, monkeypatch):
    out = tmp_path / "report"
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_space)
    one_line(invoke("report", runs["old"], runs["new"], "--out", out), 2, f"cannot write {out}: No space left on "
             "device")
    assert not out.exists() and leftovers(tmp_path) == []


def small_file_limit():
    """A child with files limited to 20 kB (as a nearly full disk): writes beyond fail with EFBIG."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_a_real_write_failure_leaves_the_old_run(feats, runs, tmp_path):
    out = shutil.copytree(runs["old"], tmp_path / "run")
    writer = cli("classify", feats, *FAST, "--out", out, "--overwrite", preexec_fn=small_file_limit)
    stdout, stderr = writer.communicate(timeout=300)
    assert writer.returncode == 2 and stderr == f"Error: cannot write {out}: File too large\n", stderr
    assert seed_of(out) == 1 and leftovers(tmp_path) == []
    report = cli("report", out, runs["new"], "--out", tmp_path / "merged", preexec_fn=small_file_limit)
    assert report.communicate(timeout=300)[1] == f"Error: cannot write {tmp_path / 'merged'}: File too large\n"
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path) == []


def without_write_permission() -> list[str]:
    """The prefix that runs a command without root's power to write anywhere (nothing when not root)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop the right to write anywhere")
    caps = "-dac_override,-dac_read_search,-fowner"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_a_read_only_folder_is_one_line(feats, runs, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    out = shutil.copytree(runs["old"], parent / "run")
    parent.chmod(0o555)
    try:
        for args in (["classify", feats, *FAST, "--out", out, "--overwrite"],
                     ["classify", feats, *FAST, "--out", parent / "new"],
                     ["report", out, runs["new"], "--out", parent / "merged"]):
            done = subprocess.run([*without_write_permission(), sys.executable, "-m", "furnitype.cli",
                                   *map(str, args)], capture_output=True, text=True, timeout=300)
            assert done.returncode == 2, done.stderr
            written = args[-2] if args[-1] == "--overwrite" else args[-1]
            assert done.stderr == f"Error: cannot write {written}: permission denied in {parent}.\n"
    finally:
        parent.chmod(0o755)
    assert seed_of(out) == 1 and sorted(p.name for p in parent.iterdir()) == ["run"]


# -- input that cannot make a run: one line, nothing written ----------------------------------------------------------


def test_a_store_of_one_class(tmp_path):
    one = write_store(tmp_path / "one.h5", counts=(12,), classes=["bed"])
    one_line(invoke("classify", one, *FAST, "--out", tmp_path / "run"), 2, f"{one}: fewer than 2 classes have 2 or "
             "more photos; nothing to learn.")
    assert leftovers(tmp_path) == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"seed": -1}, "seed must be an integer from 0 to 4294967295. Received: seed=-1"),
        ({"seed": 2**32}, "seed must be an integer from 0 to 4294967295. Received: seed=4294967296"),
        ({"seed": True}, "seed must be an integer from 0 to 4294967295. Received: seed=True"),
        ({"cv": 2.5}, "cross-validation needs at least 2 folds. Received: cv=2.5"),
        ({"test_size": float("nan")}, "test size must be between 0 and 1. Received: test_size=nan"),
        ({"val_size": 1}, "validation size must be in [0, 1). Received: val_size=1"),
        ({"model_params": {"logreg": {"Cs": []}}}, "model parameters of logreg: The 'Cs' parameter of LogRegModel "
         "must be a non-empty list, each item a float in the range (0.0, inf). Got [] instead."),
        ({"model_params": {"logreg": {"colour": "red"}}}, "model parameters: 'colour' is not a model, or not a "
         "parameter of logreg."),
        ({"model_params": {"knn": {}}}, "model parameters: 'knn' is not a model, or not a parameter of logreg."),
    ],
)
def test_options_out_of_range_in_the_api(feats, tmp_path, options, message):
    with pytest.raises(InputError) as raised:
        classify([feats], models=["logreg"], out=tmp_path / "run", **options)
    assert str(raised.value) == message
    assert list(tmp_path.iterdir()) == []


def test_the_lock_is_refused_to_a_second_claim_in_process(feats, tmp_path):
    from furnitype.classify.metadata import RUN_KIND
    from furnitype.classify.output import building

    with building(tmp_path / "run", kind=RUN_KIND, overwrite=False) as folder:
        with pytest.raises(StoreError, match="another furnitype process is writing"):
            classify([feats], models=["logreg"], out=tmp_path / "run")
        (folder.path / "metrics.json").write_text(json.dumps({"kind": RUN_KIND}))
    assert leftovers(tmp_path) == [] and (tmp_path / "run" / "metrics.json").is_file()
