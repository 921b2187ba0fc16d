"""Progress on stderr: bars only on a terminal (a log gets lines, never ``\\r``-joined bars), the dense head's
epochs counted against their cap."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tests.conftest import run_cli as invoke
from tests.images import make_photo_folder

ROOT = Path(__file__).resolve().parents[1]

#: extract then classify (dense only), as one process: TensorFlow starts once.
SCRIPT = """
import sys
from furnitype.cli import cli
photos, base = sys.argv[1:3]
for args in (["extract", photos, "--weights", "none", "--image-size", "32", "--out", base + "/f.h5"],
             ["classify", base + "/f.h5", "--models", "dense", "--out", base + "/run"]):
    cli.main(args, prog_name="furnitype", standalone_mode=False)
"""


def _stderr(tmp_path: Path, *, terminal: bool) -> str:
    photos = make_photo_folder(tmp_path / "photos", per_class=4)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", SCRIPT, str(photos), str(tmp_path)]
    if not terminal:
        done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
        assert done.returncode == 0, done.stderr.decode()
        return done.stderr.decode()
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:  # until the process closes its end (EIO on Linux, or an empty read)
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=600) == 0, b"".join(chunks).decode()
    return b"".join(chunks).decode(errors="replace")


def test_a_log_gets_progress_lines_and_no_bars(tmp_path):
    stderr = _stderr(tmp_path, terminal=False)
    assert "loading vgg16 (random weights) on CPU ..." in stderr.splitlines()
    assert "\r" not in stderr and "img/s" not in stderr and "epochs" not in stderr, stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal as Linux makes it")
def test_a_terminal_gets_the_bars_with_the_epoch_cap(tmp_path):
    stderr = _stderr(tmp_path, terminal=True)
    assert "extract vgg16: 100%" in stderr and "8/8" in stderr
    assert "dense (at most 200 epochs, early stopping)" in stderr and "/200" in stderr


def test_the_epoch_cap_in_help_is_the_dense_heads():
    from furnitype.classify.models.dense import DenseModel

    help_text = " ".join(invoke("classify", "--help").output.split())
    model = DenseModel()
    assert f"at most {model.max_epochs} epochs" in help_text and f"has not improved for {model.patience}" in help_text
