"""Fixtures and helpers shared by the tests: the command line, and small generated photos."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from furnitype.cli import cli
from tests.images import make_photo_folder

#: The settings of a VGG16 float32 store (ImageNet weights), for stores a test writes with ``save``.
STORE_META = {
    "backbone": "vgg16",
    "weights": "imagenet",
    "pooling": "avg",
    "image_size": 224,
    "interpolation": "bilinear",
    "precision": "float32",
    "decode": "exact",
    "store_dtype": "float32",
}


def run_cli(*args) -> Result:
    """``furnitype ARGS...`` in-process, as sqlite-utils' tests do; exceptions propagate (a traceback fails)."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def invoke() -> Callable[..., Result]:
    """``invoke("extract", folder, "--out", file)``: run the command line in-process."""
    return run_cli


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """``photos/bed`` and ``photos/chair``, 3 tiny JPEGs each; read-only by convention: copy before changing."""
    return make_photo_folder(tmp_path_factory.mktemp("photos") / "photos", per_class=3)


# -- Ctrl-C reaches the processes the tests start ------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _sigint_reaches_child_processes() -> None:
    """Started with SIGINT ignored (a background job of a non-interactive shell, nohup), the suite would pass that
    on to every process it starts, and a test's real Ctrl-C would be ignored: give SIGINT a handler here, so that
    the processes started from here begin with its default action (Python's KeyboardInterrupt)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
