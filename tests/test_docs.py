"""Every code block of README.md and docs/*.md runs as written, so the documentation cannot drift from the code.

A fence's language says what a block is: ``python`` blocks run, in order, in one namespace per page;
``console`` (``$ command`` lines and their output) and ``bash`` (one command a line) blocks run their
``furnitype`` commands; ``text`` and ``json`` blocks are shown output and are not run; ``python signature``
blocks are call signatures (not run). The prepared folder holds the photos, stores and runs the examples name,
drawn small, with random weights. A ``bash`` block is a list of examples: it runs in a fresh copy of that folder.
A page's ``console`` blocks are one session (a worked example): they run in order in one fresh copy, as do its
``python`` blocks. An example that writes a run, a report or a CSV (``classify``, ``report``, ``suggest``, or
``out="runs/..."`` in Python) shows it written anew: what its output names is removed first.

Only the documented placeholders are substituted (docs/cli.md, "The examples"): a weights file or ``imagenet``
becomes ``none`` (random weights, no download), ``/data/`` the prepared folder, benchmarks.md's ``PHOTOS/`` and
``FEATURES-`` the prepared photos and stores. Commands that need what a test machine does not give cheaply are
left out, each with its reason (``NOT_RUN``); every other command must exit 0.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.images import COLOURS, photo

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "console", "bash", "text", "json"}
#: ``KERAS_BACKEND=jax`` before ``furnitype``: the command's environment.
ASSIGNMENT = re.compile(r"[A-Z_]+=\S*")

#: Commands that are not run here, with the reason: a Ray cluster and NNCF's quantization cost minutes.
NOT_RUN = {
    "--engine ray": "needs a Ray cluster (tests/test_ray_engine.py runs the Ray engine)",
    "--precision int8": "quantizes with NNCF (tests/test_int8.py runs int8)",
    "--like vgg-int8.h5": "takes the int8 store the command above (not run) makes",
    "classify vgg16-int8.h5": "takes the int8 store the command above (not run) makes",
    "KERAS_BACKEND=torch": "PyTorch's wheels are several GB, not in CI (test_keras_backends.py runs on it by hand)",
    "furnitype serve": "serves until stopped (tests/test_serve.py runs docs/serve.md's curl lines against a server)",
}
#: Python blocks that are not run, by a word of their fence's info string.
NOT_RUN_PYTHON = {"signature": "a call signature, not a statement", "ray": "needs a Ray cluster",
                  "serve": "serves until stopped"}


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    language: str
    tags: tuple[str, ...]
    text: str


def blocks(page: str) -> list[Block]:
    """The fenced blocks of a page, in order."""
    found, lines, i = [], (ROOT / page).read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(.*)$", lines[i])
        if not fence:
            i += 1
            continue
        indent, info = len(fence.group(1)), fence.group(2).split()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        body = "\n".join(line[indent:] for line in lines[i + 1 : end])
        found.append(Block(page, i + 1, info[0] if info else "", tuple(info[1:]), body))
        i = end + 1
    return found


def commands(block: Block) -> list[str]:
    """A console block's ``$`` lines, or a bash block's lines; continuation lines joined, comments kept."""
    text = block.text.replace("\\\n", " ")
    if block.language == "console":
        return [line[2:] for line in text.splitlines() if line.startswith("$ ")]
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def substitute(command: str, world: Path, variables: dict[str, str]) -> list[str] | None:
    """The command's arguments with the documented placeholders replaced; None for a command not run here."""
    if any(marker in command for marker in NOT_RUN):
        return None
    args = [variables.get(a[1:], a) if a.startswith("$") else a for a in shlex.split(command, comments=True)]
    environment = []  # KERAS_BACKEND=jax furnitype ...: the command runs in a process of its own, with that
    while len(args) > 1 and ASSIGNMENT.fullmatch(args[0]):
        environment.append(args.pop(0))
    if not args or args[0] != "furnitype":
        if len(args) == 1 and "=" in args[0]:  # a shell variable: W=imagenet
            name, value = args[0].split("=", 1)
            variables[name] = "none" if value == "imagenet" else value
        return None
    out = []
    for arg in args[1:]:
        arg = "none" if arg == "imagenet" or arg.endswith("vgg16_notop.weights.h5") else arg
        arg = arg.replace("/data/", f"{world}/data/").replace("PHOTOS/", "photos/").replace("FEATURES-", "features-")
        out.append(arg)
    if out[0] == "extract" and "--weights" not in out:
        out += ["--weights", "none"]  # imagenet by default: a download
    return environment + out


def python_source(block: Block) -> str:
    return re.sub(r"[\w./-]*vgg16_notop\.weights\.h5", "none", block.text)


# -- the prepared folder ---------------------------------------------------------------------------------------


def _draw(path: Path, seed: int, colour=COLOURS["bed"]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(seed, colour).save(path, quality=90)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """What the examples name: ``photos/`` (bed, chair, sofa) in ``vgg.h5`` and ``inc.h5``; a new source ``new/``
    in ``new.h5`` and ``new-inc.h5``; the training store ``shop.h5`` with its run ``runs/shop``; runs
    ``runs/vgg16``, ``runs/inception`` and ``runs/fused`` (the two stores fused); single photos and small
    folders. Photos that only stand for "a photo" repeat a stored photo's content, so that they cost no network
    pass."""
    root = tmp_path_factory.mktemp("docs") / "world"
    seed = 0
    for name in ("bed", "chair", "sofa"):
        for i in range(5):
            file = "6562a8972ad6.jpg" if (name, i) == ("sofa", 0) else f"{name}_{i}.jpg"
            _draw(root / "photos" / name / file, seed, COLOURS[name])
            seed += 1
        for i in range(15):  # a new source: more than the 40 photos adapt.md's example labels
            _draw(root / "new" / name / f"new_{name}_{i}.jpg", 1000 + seed + i, tuple(c // 2 for c in COLOURS[name]))
    sofa = root / "photos" / "sofa" / "6562a8972ad6.jpg"
    for copy in ("new-photos/chair-1.jpg", "data/new-photos/chair-1.jpg", "new-arrivals/sofa-9.jpg",
                 "new-sofas/s1.jpg", "queries/q.jpg", "demo/new-photos/lamp/lamp_00.jpg", "new-sofa.jpg",
                 "query.jpg", "photo.jpg", "a.jpg", "b.jpg", "new.jpg"):
        (root / copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sofa, root / copy)
    (root / "data" / "new-photos" / "broken.jpg").write_bytes(b"not a photo")
    shutil.copytree(root / "photos", root / "demo" / "photos")
    (root / "labels.csv").write_text(f"path,label\n{sofa},sofa\n")
    for args in (
        ("extract", "photos/", "--out", "vgg.h5"),
        ("extract", "photos/", "-b", "inception", "--out", "inc.h5"),
        ("extract", "new/", "--out", "new.h5"),
        ("extract", "new/", "-b", "inception", "--out", "new-inc.h5"),
        ("classify", "vgg.h5", "--models", "logreg", "--out", "runs/vgg16"),
        ("classify", "inc.h5", "--models", "logreg", "--out", "runs/inception"),
        ("classify", "vgg.h5", "inc.h5", "--models", "logreg,svm", "--out", "runs/furniture"),
        ("classify", "vgg.h5", "inc.h5", "--fuse", "--models", "logreg", "--out", "runs/fused"),
    ):
        _run(root, list(args) + (["--weights", "none"] if args[0] == "extract" else []))
    for name in ("shop.h5", "train-vgg.h5", "features-vgg16.h5"):
        shutil.copy(root / "vgg.h5", root / name)
    shutil.copy(root / "new.h5", root / "test-vgg.h5")
    shutil.copy(root / "inc.h5", root / "features-inception.h5")
    _run(root, ["classify", "shop.h5", "--models", "logreg", "--out", "runs/shop"])
    return root


def _run(where: Path, args: list[str]) -> str:
    environment = {}
    while args and ASSIGNMENT.fullmatch(args[0]):
        name, value = args[0].split("=", 1)
        environment[name], args = value, args[1:]
    if environment:
        done = subprocess.run([sys.executable, "-m", "furnitype", *args], cwd=where, env={**os.environ, **environment},
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{environment} furnitype {shlex.join(args)} failed:\n{done.stderr}"
        return done.stdout + done.stderr
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(where)
        result = run_cli(*args)
    assert result.exit_code == 0, f"furnitype {shlex.join(args)} failed ({result.exit_code}):\n{result.output}"
    return result.output


def _fresh(world: Path, where: Path) -> Path:
    shutil.rmtree(where, ignore_errors=True)
    shutil.copytree(world, where, symlinks=True)
    return where


def _new_output(where: Path, args: list[str]) -> None:
    """Remove what a ``classify``, ``report`` or ``suggest`` example writes (its ``--out``, or to-label.csv)."""
    if args[0] not in ("classify", "report", "suggest"):
        return
    names = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--out", "-o", "--mistakes")]
    for name in names or (["to-label.csv"] if args[0] == "suggest" else []):
        target = where / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


# -- the tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_every_block_says_what_it_is(page):
    unknown = [f"{page}:{b.line} ```{b.language}" for b in blocks(page) if b.language not in LANGUAGES]
    assert not unknown, "fence each block as python, console, bash, text or json: " + ", ".join(unknown)
    for block in blocks(page):
        if block.language == "python" and not set(block.tags) & set(NOT_RUN_PYTHON):
            compile(block.text, f"{page}:{block.line}", "exec")


@pytest.mark.parametrize("page", PAGES)
def test_commands_run_as_written(page, world, tmp_path):
    variables: dict[str, str] = {}
    session = _fresh(world, tmp_path / "session")
    ran = 0
    for block in blocks(page):
        if block.language not in ("console", "bash"):
            continue
        where = session if block.language == "console" else _fresh(world, tmp_path / "example")
        for command in commands(block):
            args = substitute(command, where, variables)
            if args is None:
                continue
            _new_output(where, [a for a in args if not ASSIGNMENT.fullmatch(a)])
            output = _run(where, args)
            assert "Traceback" not in output, f"{page}:{block.line}: {command}"
            ran += 1
    if page in ("README.md", "docs/adapt.md", "docs/cli.md"):
        assert ran >= 5, f"{page}: only {ran} commands ran"


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.language == "python" for b in blocks(p))])
def test_python_blocks_run_as_written(page, world, tmp_path, monkeypatch):
    session = _fresh(world, tmp_path / "session")
    monkeypatch.chdir(session)
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks(page):
        if block.language != "python" or set(block.tags) & set(NOT_RUN_PYTHON):
            continue
        for run in re.findall(r'\bout="(runs/[^"]+)"', block.text):  # a run the example writes anew
            shutil.rmtree(session / run, ignore_errors=True)
        exec(compile(python_source(block), f"{page}:{block.line}", "exec"), namespace)  # noqa: S102
