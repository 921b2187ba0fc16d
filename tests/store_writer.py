"""A writer of the real append path without a network, for the race and kill tests.

``python -m tests.store_writer STORE BATCHES [BATCH] [--compact]`` appends ``BATCHES`` batches of ``BATCH`` rows
to STORE through ``FeatureCache`` (one transaction per batch, as ``extract`` does), each row's features a
function of its path, and prints ``committed N`` after each commit. With ``--compact`` it then removes every
other row and compacts, in a loop.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from hashlib import sha256

import numpy as np

from furnitype.faults import pause_point
from furnitype.features.cache import FeatureCache, Hashed

SETTINGS = {"backbone": "vgg16", "weights": "none(seed=0)", "pooling": "avg", "image_size": 32,
            "interpolation": "bilinear", "precision": "float32", "decode": "exact", "store_dtype": "float32"}
DIM = 64


def features_of(path: str) -> np.ndarray:
    """The features a fake photo gets: a function of its path only."""
    seed = int(sha256(path.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).random(DIM, dtype=np.float32)


def digest(path: str) -> str:
    return sha256(path.encode()).hexdigest()


@dataclass
class FakeListing:
    """A listing of photos that do not exist on disk (the cache never reads them: hashes are given)."""

    paths: list[str]
    labels: list[str]
    folders: list[str] = field(default_factory=list)
    unlisted: list = field(default_factory=list)
    reasons: dict = field(default_factory=dict)

    @property
    def stats(self) -> np.ndarray:
        return np.tile(np.array([1, 1, 1, 1], np.int64), (len(self.paths), 1))


@dataclass
class Outcome:
    path: str
    sha256: str
    features: np.ndarray
    reason: str = ""


def append(store: str, start: int, count: int, batch: int, folder: str = "/photos/a", overwrite: bool = False) -> None:
    paths = [f"{folder}/{i:06d}.jpg" for i in range(start, start + count)]
    listing = FakeListing(paths, ["a"] * count)
    with FeatureCache(store, SETTINGS, meta=SETTINGS, overwrite=overwrite) as cache:
        cache.compare(listing)
        cache.hashed({i: Hashed(digest(p), (1, 1, 1, 1)) for i, p in enumerate(paths)})
        todo = cache.todo()
        for first in range(0, len(todo), batch):
            time.sleep(0.002)  # the network's time
            cache.add([Outcome(p, digest(p), features_of(p)) for p in todo[first : first + batch]])
            print("committed", cache.live_rows, flush=True)
        cache.finish()


def remove_half(store: str, folder: str = "/photos/a") -> None:
    """List the folder with every other stored photo gone: their rows are removed, then compacted."""
    from furnitype.features import load

    kept = [p for p in load(store).paths.tolist() if int(p[-10:-4]) % 2 == 0]
    listing = FakeListing(kept, ["a"] * len(kept), folders=[folder])
    with FeatureCache(store, SETTINGS, meta=SETTINGS) as cache:
        cache.compare(listing)
        cache.hashed({})
        cache.finish()
        print("compacted", cache.live_rows, flush=True)
        pause_point("compacted")  # FURNITYPE_TEST_PAUSE_AT=compacted: stopped while it still holds the store


def start(store, batches: int, batch: int = 8, *, compact: bool = False, **popen) -> subprocess.Popen:
    """This module as a separate process (stdout: ``committed N`` lines)."""
    args = [sys.executable, "-m", "tests.store_writer", str(store), str(batches), str(batch)]
    return subprocess.Popen([*args, *(["--compact"] if compact else [])], stdout=subprocess.PIPE, text=True, **popen)


if __name__ == "__main__":
    store, batches = sys.argv[1], int(sys.argv[2])
    size = int(sys.argv[3]) if len(sys.argv) > 3 and not sys.argv[3].startswith("-") else 8
    if "--compact" in sys.argv:
        while True:
            append(store, 0, batches * size, size)
            remove_half(store)
    append(store, 0, batches * size, size)
