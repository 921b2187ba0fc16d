"""What the benchmark scripts share: CPU time, a wall + CPU stopwatch, evenly spaced samples, JSON results.

The scripts run by hand as ``python benchmarks/NAME.py``, so this module is imported as ``_common``. CPU time
is the figure that compares here: the usable CPU of a shared machine swings between one and two cores.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def cpu_seconds() -> float:
    """CPU seconds (user + system, all threads) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Measured:
    """Wall and CPU seconds of a ``measure()`` block (set when the block ends)."""

    wall: float = 0.0
    cpu: float = 0.0


@contextmanager
def measure() -> Iterator[Measured]:
    """``with measure() as took: ...`` then ``took.wall``, ``took.cpu`` (seconds, this process)."""
    took = Measured()
    wall, cpu = time.perf_counter(), cpu_seconds()
    try:
        yield took
    finally:
        took.wall, took.cpu = time.perf_counter() - wall, cpu_seconds() - cpu


def evenly_spaced(items: Sequence[T], k: int) -> list[T]:
    """``k`` items evenly spaced over ``items`` (all of them when ``k`` is 0, negative or not smaller), so a
    sample of a sorted listing keeps every class and photo size in its proportion."""
    if k <= 0 or k >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, k).round().astype(int)]


def write_results(path: str | Path, report: dict) -> Path:
    """Write a benchmark's results as indented JSON (its folder made when missing); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path
