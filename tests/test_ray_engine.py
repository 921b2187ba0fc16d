"""The ray engine on a local Ray (2 CPUs, started and stopped here): the same rows as the local engine, the
cache, resumption after the driver is killed, ``classify --engine ray``, and the errors."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from furnitype import features as store
from furnitype.cli import cli
from furnitype.errors import FurnitypeError, InputError
from furnitype.extract.pipeline import ExtractSpec, feature_batches
from furnitype.extraction import extract
from furnitype.features import load
from tests.images import make_photo_folder, photo
from tests.processes import pause_env, signal_stopped, wait_stopped

SMALL = {"backbone": "vgg16", "weights": "none", "image_size": 32, "batch_size": 4, "progress": False}


@pytest.fixture(scope="module")
def ray_installed():
    """The ``ray`` module; skips a test of Ray where the ray extra is not installed (CI installs every extra)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    return ray


@pytest.fixture(scope="module")
def ray_local(ray_installed):
    """A local Ray with 2 CPUs for this module, used through connected() from the start (whatever test runs
    first), so that no line Ray forwards lands in a CliRunner's stdout."""
    from furnitype.engines.ray import connected

    ray = ray_installed
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    with connected():
        yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """18 photos in 3 classes, and 2 files that cannot be used."""
    root = tmp_path_factory.mktemp("photos")
    folder = make_photo_folder(root / "photos", per_class=6, classes=("bed", "chair", "sofa"))
    (folder / "bed" / "empty.jpg").write_bytes(b"")
    (folder / "chair" / "text.png").write_text("not an image")
    return folder


def _same_store(a: store.FeatureSet, b: store.FeatureSet) -> None:
    assert list(a.paths) == list(b.paths) and list(a.labels) == list(b.labels)
    assert list(a.sha256) == list(b.sha256) and a.skipped == b.skipped
    np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-5)


def test_ray_batches_equal_local_batches(ray_local, photos):
    from furnitype.engines.ray import RayEngine

    paths = sorted(str(p) for p in photos.rglob("*.*"))
    spec = ExtractSpec("vgg16", "none", image_size=32)
    local = {o.path: o for batch in feature_batches(spec, paths, batch_size=4) for o in batch}
    batches = list(RayEngine(workers=2)(spec, paths, batch_size=4))

    assert len(batches) == math.ceil(len(paths) / 4) and all(0 < len(b) <= 4 for b in batches)
    remote = {o.path: o for batch in batches for o in batch}
    assert remote.keys() == local.keys() == set(paths)
    for path, outcome in remote.items():
        assert (outcome.sha256, outcome.reason) == (local[path].sha256, local[path].reason)
        if outcome.reason:
            assert outcome.features is None
        else:
            np.testing.assert_allclose(outcome.features, local[path].features, rtol=1e-5, atol=1e-5)
    assert sorted(Path(o.path).name for o in remote.values() if o.reason) == ["empty.jpg", "text.png"]


def test_ray_store_equals_local_store_and_cli_json(ray_local, photos, tmp_path):
    local = extract([photos], **SMALL, out=tmp_path / "local.h5")
    result = CliRunner().invoke(
        cli,
        ["extract", str(photos), "--weights", "none", "--image-size", "32", "--batch-size", "4", "--engine", "ray",
         "--ray-workers", "2", "--workers", "2", "--out", str(tmp_path / "ray.h5"), "--json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["extracted"], summary["skipped"], summary["rows"]) == (local.extracted, 2, 18) == (18, 2, 18)
    ray_store = load(tmp_path / "ray.h5")
    _same_store(ray_store, load(tmp_path / "local.h5"))
    assert ray_store.meta["backbone"] == "vgg16" and ray_store.features.dtype == np.float32


def test_cache_only_missing_photos_reach_ray(ray_local, photos, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    for bad in ("bed/empty.jpg", "chair/text.png"):
        (folder / bad).unlink()
    out = tmp_path / "f.h5"
    extract([folder], **SMALL, out=out)  # the local engine fills the store; Ray reads the same one
    sent: list[list[str]] = []
    from_items = ray_local.data.from_items

    def spy(items, **kwargs):
        sent.append(sorted(Path(item["path"]).name for item in items))
        return from_items(items, **kwargs)

    monkeypatch.setattr(ray_local.data, "from_items", spy)
    again = extract([folder], **SMALL, out=out, engine="ray")
    assert (again.extracted, again.reused, sent) == (0, 18, [])

    photo(500).save(folder / "sofa" / "new.jpg")
    shutil.copy(folder / "bed" / "bed_0.jpg", folder / "bed" / "same_bytes.jpg")
    grown = extract([folder], **SMALL, out=out, engine="ray", ray_workers=1)
    assert (grown.extracted, grown.reused, grown.rows, sent) == (1, 19, 20, [["new.jpg"]])
    reference = extract([folder], **SMALL, out=tmp_path / "reference.h5")
    _same_store(load(out), load(tmp_path / "reference.h5"))
    assert reference.extracted == 19


def test_killed_ray_driver_resumes_and_equals_an_uninterrupted_run(ray_local, tmp_path):
    folder = make_photo_folder(tmp_path / "photos", per_class=12, classes=("bed", "chair", "sofa"), size=(96, 96))
    settings = ["--weights", "none", "--image-size", "32", "--batch-size", "2", "--quiet"]
    out = tmp_path / "killed.h5"
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-m", "furnitype.cli", "extract", str(folder), *settings, "--out", str(out),
         "--engine", "ray", "--address", address, "--ray-workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=pause_env("store-commit", 3),  # a few batches appended, the next one written in place
    )
    assert wait_stopped(proc), "the run ended before its 3rd in-place commit"
    signal_stopped(proc, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and Path(f"{out}.undo").exists()

    options = {**SMALL, "batch_size": 2}
    resumed = extract([folder], **options, out=out, engine="ray", ray_workers=2)
    assert 0 < resumed.extracted < 36 and resumed.reused == 36 - resumed.extracted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.h5", "photos"]
    whole = extract([folder], **options, out=tmp_path / "whole.h5")
    assert whole.extracted == 36
    _same_store(load(out), load(tmp_path / "whole.h5"))


@pytest.fixture(scope="module")
def thirty_six(tmp_path_factory) -> tuple[Path, store.FeatureSet]:
    """36 photos (18 batches of 2), and their store made without stopping."""
    root = tmp_path_factory.mktemp("thirty_six")
    folder = make_photo_folder(root / "photos", per_class=12, classes=("bed", "chair", "sofa"), size=(96, 96))
    whole = extract([folder], **{**SMALL, "batch_size": 2}, out=root / "whole.h5")
    assert whole.extracted == 36
    return folder, load(root / "whole.h5")


def _own_ray_extract(
    folder: Path, out: Path, program: Sequence[str] = ("-m", "furnitype.cli"), pause_at: int = 0
) -> tuple[subprocess.Popen, str]:
    """``furnitype extract --engine ray`` starting its own local Ray, and its tag: a string in the environment of
    every process it starts (the driver, and through it Ray's services and workers), and the name of their working
    directory; ``pause_at``: the driver stops itself at that in-place commit (``furnitype.faults``)."""
    tag = uuid.uuid4().hex
    env = {key: value for key, value in (pause_env("store-commit", pause_at) if pause_at else os.environ).items()
           if key != "RAY_ADDRESS"}
    _workdir(tag).mkdir()
    proc = subprocess.Popen(
        [sys.executable, *program, "extract", str(folder), "--weights", "none", "--image-size", "32",
         "--batch-size", "2", "--engine", "ray", "--ray-workers", "1", "--out", str(out)],
        env={**env, "FURNITYPE_TEST_TAG": tag},
        cwd=_workdir(tag),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, tag


def _workdir(tag: str) -> Path:
    return Path(tempfile.gettempdir()) / f"furnitype-ray-{tag}"


def _tagged(tag: str) -> dict[int, str]:
    """The running processes with ``tag`` in their environment or its folder as working directory: pid -> command
    line. Both, as a process that names itself (setproctitle, as Ray's agents do) may overwrite the environment
    that /proc shows, and a process may change its directory."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if (f"FURNITYPE_TEST_TAG={tag}".encode() in (entry / "environ").read_bytes().split(b"\0")
                    or os.readlink(entry / "cwd") == str(_workdir(tag))):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):  # not a process, or one that ended meanwhile
            pass
    return found


def _ended(proc: subprocess.Popen, tag: str) -> tuple[int, str, dict[int, str], dict[int, str]]:
    """The exit status and stderr of ``proc`` (killed if it hangs), the processes running as it ended, and those
    it left running."""
    try:
        _, stderr = proc.communicate(timeout=600)  # a guard: a replaced worker imports TensorFlow again
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        stderr += "\n(hung: killed)"
    at_exit = _tagged(tag)
    deadline = time.monotonic() + 120  # a guard: Ray's services may take a moment to exit after the driver
    while _tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _tagged(tag)
    for pid in left:  # not to leave them to the next test
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(_workdir(tag), ignore_errors=True)
    return proc.returncode, stderr, at_exit, left


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds Ray's processes through /proc")
def test_ctrl_c_during_a_ray_extraction_keeps_the_batches_and_stops_ray(ray_local, thirty_six, tmp_path):
    folder, whole = thirty_six
    out = tmp_path / "f.h5"
    proc, tag = _own_ray_extract(folder, out, pause_at=2)
    assert wait_stopped(proc), proc.communicate()[1]
    assert any("raylet" in command for command in _tagged(tag).values())  # its own Ray, not the test's
    signal_stopped(proc, signal.SIGINT)  # Ctrl-C in the middle of the run
    code, stderr, _, left = _ended(proc, tag)
    kept = len(load(out))
    assert code == 130, stderr
    assert stderr.splitlines()[-1] == f"interrupted: {kept} rows kept; rerun to go on" and 4 <= kept < 36
    assert "Traceback" not in stderr and left == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]
    rerun = extract([folder], **{**SMALL, "batch_size": 2}, out=out, engine="ray", ray_workers=1)
    assert (rerun.extracted, rerun.reused) == (36 - kept, kept)
    _same_store(load(out), whole)


# The extract command, with Ctrl-C arriving inside ray.init once its local Ray is up (its raylet registered and
# its agents started), before ray.init has recorded the processes for ray.shutdown. The agents are known by the
# names they give themselves and the working directory they share with the driver (see _tagged).
CTRL_C_INSIDE_RAY_INIT = """
import os, signal, sys, time
from pathlib import Path
from ray._private import services
from furnitype.cli import main

get_node = services.get_node
AGENTS = {b"ray::DashboardAgent", b"ray::RuntimeEnvAgent"}

def agents() -> set:
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if os.readlink(entry / "cwd") == os.getcwd():
                found |= {name for name in AGENTS if (entry / "cmdline").read_bytes().startswith(name)}
        except (OSError, ValueError):
            pass
    return found

def then_ctrl_c(*args, **kwargs):
    services.get_node = get_node
    node = get_node(*args, **kwargs)
    deadline = time.monotonic() + 50  # a guard only, within the test's: Ctrl-C comes then anyway
    while agents() != AGENTS and time.monotonic() < deadline:
        time.sleep(0.05)
    print("agents:", *sorted(name.decode() for name in agents()), file=sys.stderr, flush=True)
    signal.raise_signal(signal.SIGINT)
    return node

services.get_node = then_ctrl_c
sys.argv[0] = "furnitype"
main()
"""


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds Ray's processes through /proc")
def test_ctrl_c_while_ray_starts_leaves_no_ray_process(ray_installed, tmp_path):
    folder = make_photo_folder(tmp_path / "photos", per_class=1, classes=("bed",))
    proc, tag = _own_ray_extract(folder, tmp_path / "f.h5", program=["-c", CTRL_C_INSIDE_RAY_INIT])
    code, stderr, at_exit, left = _ended(proc, tag)
    assert "agents: ray::DashboardAgent ray::RuntimeEnvAgent\n" in stderr  # Ctrl-C came once they ran
    assert code == 130 and stderr.splitlines()[-1] == "interrupted: 0 rows kept; rerun to go on", stderr
    # Stopped by the driver: processes it lost track of would end only after Ray's GCS reconnection timeout.
    assert "Traceback" not in stderr and at_exit == {} and left == {}


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds Ray's processes through /proc")
def test_a_ray_worker_killed_mid_run_is_replaced_and_the_store_is_whole(ray_installed, thirty_six, tmp_path):
    folder, whole = thirty_six
    out = tmp_path / "f.h5"
    proc, tag = _own_ray_extract(folder, out, pause_at=2)
    assert wait_stopped(proc), proc.communicate()[1]  # the driver, in the middle of the run
    workers = [pid for pid, command in _tagged(tag).items() if command.startswith("ray::MapWorker")]
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    os.kill(proc.pid, signal.SIGCONT)
    code, stderr, _, left = _ended(proc, tag)
    assert code == 0 and "Traceback" not in stderr and left == {}, stderr
    _same_store(load(out), whole)


def test_classify_on_ray_equals_local(ray_local, tmp_path):
    from joblib import Parallel, delayed

    from furnitype.classify import load_run
    from furnitype.classify.synthetic import make_features
    from furnitype.engines import joblib_backend

    X, labels, sha256 = make_features([14, 14, 12], 16, seed=3, separation=1.5)
    features = tmp_path / "f.h5"
    store.save(
        features,
        features=X,
        paths=[f"/photos/{label}/{i}.jpg" for i, label in enumerate(labels)],
        labels=list(labels),
        sha256=list(sha256),
        meta={"backbone": "vgg16", "weights": "imagenet", "pooling": "avg", "image_size": 224},
    )
    rows = {}
    for engine in ("local", "ray"):
        args = ["classify", str(features), "--models", "logreg,svm", "--cv", "3", "--engine", engine, "--quiet",
                "--json", "--out", str(tmp_path / engine)]
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["run"] == str(tmp_path / engine)
        rows[engine] = {r.model: r for r in load_run(tmp_path / engine).rows}
    with joblib_backend("ray"):  # the tasks inside do leave this process
        pids = set(Parallel()(delayed(os.getpid)() for _ in range(4)))
    assert pids and os.getpid() not in pids
    for model in ("logreg", "svm"):
        local, remote = rows["local"][model], rows["ray"][model]
        assert remote.chosen == local.chosen and remote.details["cv_results"] == local.details["cv_results"]
        assert remote.accuracy == local.accuracy and remote.log_loss == pytest.approx(local.log_loss)


def test_a_worker_failure_is_one_line_and_keeps_nothing_half_done(ray_local, photos):
    from furnitype.engines.ray import RayEngine

    spec = ExtractSpec("vgg16", str(photos / "no-such-weights.h5"), image_size=32)  # unreadable on the worker
    with pytest.raises(FurnitypeError) as caught:
        list(RayEngine(workers=1)(spec, [str(photos / "bed" / "bed_0.jpg")], batch_size=4))
    message = str(caught.value)
    assert message.startswith("the ray engine failed (InputError: weights must be imagenet, none or an existing file.")
    assert message.endswith("rerun to resume.") and "\n" not in message


def test_missing_ray_is_a_one_line_error(photos, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    with pytest.raises(FurnitypeError, match=r"^the ray engine needs Ray: pip install 'furnitype\[ray\]'$"):
        extract([photos], **SMALL, out=tmp_path / "f.h5", engine="ray")
    result = CliRunner().invoke(cli, ["extract", str(photos), "--engine", "ray", "--out", str(tmp_path / "f.h5")])
    assert result.exit_code == 1
    assert result.output == "Error: the ray engine needs Ray: pip install 'furnitype[ray]'\n"
    assert not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ray-workers", "2"], "Error: ray_workers applies only to the ray engine. Received: engine='local'"),
        (["--address", "auto", "--gpus-per-worker", "1"], "Error: ray_address, gpus_per_worker apply only to the ray"),
        (["--engine", "gpu"], "Invalid value for '--engine'"),
    ],
)
def test_ray_options_need_the_ray_engine(photos, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["extract", str(photos), "--out", str(tmp_path / "f.h5"), *args])
    assert result.exit_code == 2 and message in result.output


def test_engine_options_are_checked_before_any_work(photos, tmp_path):
    with pytest.raises(InputError, match="ray_workers applies only to the ray engine"):
        extract([photos], **SMALL, out=tmp_path / "f.h5", ray_workers=2)
    with pytest.raises(InputError, match="engine must be one of local, ray. Received: engine='spark'"):
        extract([photos], **SMALL, out=tmp_path / "f.h5", engine="spark")
    pytest.importorskip("ray")
    with pytest.raises(InputError, match="ray workers must be at least 1"):
        extract([photos], **SMALL, out=tmp_path / "f.h5", engine="ray", ray_workers=0)
    with pytest.raises(InputError, match="gpus per worker must be 0 or more"):
        extract([photos], **SMALL, out=tmp_path / "f.h5", engine="ray", gpus_per_worker=-1)
    with pytest.raises(InputError, match="with --engine ray, --workers is decoding threads in each Ray worker, at "
                       "most 4; .* Received: workers=5"):
        extract([photos], **SMALL, out=tmp_path / "f.h5", engine="ray", workers=5)
    assert not (tmp_path / "f.h5").exists()



def _quiet_ray_extract(folder: Path, out: Path, *options: str, ray_address: str = "") -> subprocess.Popen:
    """``furnitype extract --engine ray -q OPTIONS`` in a process of its own (``$RAY_ADDRESS`` as given)."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-m", "furnitype.cli", "extract", str(folder), "--weights", "none", "--image-size", "32",
         "--engine", "ray", "--out", str(out), "-q", *options],
        env={**env, "RAY_ADDRESS": ray_address}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _stderr_when_ended(proc: subprocess.Popen, timeout: float) -> str:
    """The stderr of ``proc`` once it ends; killed (and said so) if it has not within ``timeout`` seconds."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1] + "\n(hung: killed)"


def _http_server(server: socket.socket) -> None:
    """Answer one connection as a web server (Ray's dashboard, say) answers an HTTP/2 preface."""
    connection, _ = server.accept()
    with connection:
        connection.recv(1024)
        connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize("listening", ["nothing", "a web server"])
def test_an_address_where_no_ray_answers_is_one_line_at_once(photos, tmp_path, listening):
    pytest.importorskip("ray")
    with socket.socket() as server:
        server.bind(("", 0))  # bound, so no one else takes the port; not listening: connections are refused
        if listening == "a web server":
            server.listen()
            threading.Thread(target=_http_server, args=(server,), daemon=True).start()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        proc = _quiet_ray_extract(photos, tmp_path / "f.h5", "--address", address)
        stderr = _stderr_when_ended(proc, 120)  # before the fix: ray.init retried for many minutes
    assert proc.returncode == 1, stderr
    assert stderr == (f"Error: no Ray cluster answers at {address}: start one with 'ray start --head' or leave "
                      "--address out\n")
    assert not (tmp_path / "f.h5").exists()


def test_a_ray_address_in_the_environment_where_no_ray_answers(photos, tmp_path):
    pytest.importorskip("ray")
    with socket.socket() as server:
        server.bind(("", 0))
        address = f"ray://127.0.0.1:{server.getsockname()[1]}"
        proc = _quiet_ray_extract(photos, tmp_path / "f.h5", ray_address=address)
        stderr = _stderr_when_ended(proc, 120)
    assert proc.returncode == 1, stderr
    assert stderr == (f"Error: no Ray cluster answers at {address} ($RAY_ADDRESS): start one with 'ray start --head' "
                      "or unset it\n")


def test_ctrl_c_while_waiting_for_a_cluster_that_does_not_answer(photos, tmp_path):
    pytest.importorskip("ray")
    with socket.socket() as server:
        server.bind(("", 0))
        server.listen()
        server.settimeout(120)  # a guard: the driver connects at once
        proc = _quiet_ray_extract(photos, tmp_path / "f.h5", "--address", f"127.0.0.1:{server.getsockname()[1]}")
        received = b""
        try:
            connection, _ = server.accept()
            connection.settimeout(120)
            while len(received) < 24 and (chunk := connection.recv(1024)):  # the HTTP/2 preface: now it waits
                received += chunk
            proc.send_signal(signal.SIGINT)
        finally:
            stderr = _stderr_when_ended(proc, 60)  # before the fix: Ctrl-C was held back for good
        connection.close()  # only now: an answer (even EOF) before the signal would end the wait otherwise
    assert received.startswith(b"PRI * HTTP/2.0")
    assert proc.returncode == 130 and stderr == "interrupted: 0 rows kept; rerun to go on\n", stderr


def test_quiet_leaves_out_rays_own_lines(photos, tmp_path):
    pytest.importorskip("ray")
    proc = _quiet_ray_extract(photos, tmp_path / "f.h5", "--ray-workers", "1")  # its own local Ray
    stderr = _stderr_when_ended(proc, 300)
    assert proc.returncode == 0, stderr
    assert stderr == ""  # before: Ray's core logged a line about its actors' constructor arguments
    assert len(load(tmp_path / "f.h5")) == 18


# A driver using Ray through connected(), as the ray engine does: a Ray worker prints a line and pushes an error
# message to every driver (printed as "(raylet) ..."); the driver waits until Ray has printed both (or dropped
# them), then writes its result on stdout. argv[1]: "progress" (the furnitype logger at INFO), "quiet",
# "initialised" (Ray started by the program, with progress off, before furnitype uses it), or "client" (progress
# on, Ray Client to the server at argv[2]: only the worker's line reaches it).
RAY_LINES = """
import logging, sys, threading
import ray
from ray._private import worker
from ray._private.ray_logging import global_worker_stdstream_dispatcher
from ray._private.utils import push_error_to_driver
from ray.util.client.logsclient import LogstreamClient
from furnitype.engines.ray import connected

WORKER, RAYLET = "a line from a ray worker", "a line from the raylet"

@ray.remote
def speak():
    print(WORKER, flush=True)
    push_error_to_driver(worker.global_worker, "furnitype_test", RAYLET)

def printed(expected):
    arrived = {text: threading.Event() for text in expected}

    def seen(lines):
        for text, event in arrived.items():
            if any(text in line for line in lines):
                event.set()

    print_to_stdstream = worker.print_to_stdstream  # prints the raylet's lines
    def then_seen(data, ignore_prefix):
        print_to_stdstream(data, ignore_prefix)
        seen(data["lines"])

    stdstream = LogstreamClient.stdstream  # prints Ray Client's
    def client_then_seen(client, level, msg):
        stdstream(client, level, msg)
        seen([msg])

    worker.print_to_stdstream = then_seen
    LogstreamClient.stdstream = client_then_seen
    # after the handler that prints the workers' lines
    global_worker_stdstream_dispatcher.add_handler("seen", lambda data: seen(data["lines"]))
    ray.get(speak.remote())
    for text, event in arrived.items():
        if not event.wait(120):
            sys.exit(f"never printed: {text}")

mode = sys.argv[1]
if mode in ("progress", "client"):
    logging.getLogger("furnitype").setLevel(logging.INFO)
if mode == "initialised":
    ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.ERROR)
    with connected():
        pass
    printed([WORKER, RAYLET])
    ray.shutdown()
else:
    with connected(sys.argv[2] if mode == "client" else None):
        printed({"progress": [WORKER, RAYLET], "quiet": [RAYLET], "client": [WORKER]}[mode])
print("furnitype's result")
"""

# A Ray Client server on a local Ray: prints its port, serves until its stdin closes.
RAY_CLIENT_SERVER = """
import socket, sys
import ray
from ray.util.client.server.server import serve

info = ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
while True:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    try:
        handle = serve("127.0.0.1", port, ray_connect_handler=lambda job_config=None, **kwargs: info)  # kept: serves
        break
    except RuntimeError:  # another process took the port meanwhile
        pass
print(port, flush=True)
sys.stdin.read()
"""


def _ray_lines(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """RAY_LINES run with ``args``, in ``env`` (default: this one without ``$RAY_ADDRESS``)."""
    if env is None:
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-c", RAY_LINES, *args], env={**env, "RAY_COLOR_PREFIX": "0"},
                          capture_output=True, text=True, timeout=300)


def _worker_line(stderr: str) -> bool:
    return any(re.fullmatch(r"\(speak pid=\d+\) a line from a ray worker", line) for line in stderr.splitlines())


@pytest.mark.parametrize("mode", ["progress", "quiet", "initialised"])
def test_lines_ray_forwards_never_reach_stdout(mode):
    pytest.importorskip("ray")
    done = _ray_lines(mode)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "furnitype's result\n"  # before: Ray printed both lines on stdout
    if mode == "quiet":
        assert done.stderr == ""
    else:
        assert "(raylet) a line from the raylet" in done.stderr.splitlines(), done.stderr
        assert _worker_line(done.stderr), done.stderr


def test_lines_ray_client_forwards_never_reach_stdout():
    pytest.importorskip("ray")
    # no token (a client has none for a Ray that ray.init started with its own); the server colours the lines
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_COLOR_PREFIX="0")
    server = subprocess.Popen([sys.executable, "-c", RAY_CLIENT_SERVER], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()  # type: ignore[union-attr]
        assert port.isdigit(), "the Ray Client server did not start"
        done = _ray_lines("client", f"ray://127.0.0.1:{port}", env=env)
    finally:
        try:
            server.communicate(timeout=120)  # stdin closed: it stops
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert done.returncode == 0, done.stderr
    assert done.stdout == "furnitype's result\n"  # before: Ray Client printed the worker's line on stdout
    assert _worker_line(done.stderr), done.stderr


def test_a_running_cluster_given_by_address_answers_and_is_joined(ray_local, photos, tmp_path):
    port = ray_local.get_runtime_context().gcs_address.rpartition(":")[2]  # this test process's Ray: its GCS
    proc = _quiet_ray_extract(photos, tmp_path / "f.h5", "--address", f"127.0.0.1:{port}", "--ray-workers", "1")
    stderr = _stderr_when_ended(proc, 300)
    assert proc.returncode == 0 and stderr == "", stderr
    assert len(load(tmp_path / "f.h5")) == 18
