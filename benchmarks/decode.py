"""Decoding workers: photos per second and CPU per photo of ``decoded()`` in threads and in processes, and the
decoding cores a network of a given speed needs.

Run by hand (a few minutes on 2 cores with ``--limit 400``)::

    .venv/bin/python benchmarks/decode.py PHOTOS/ --limit 400 --network-rate 3155 4742

Each configuration (threads 1, 2, 4; processes 2, 4 by default: what 2 cores allow) reads, hashes, decodes and
resizes an evenly spaced sample of ``--limit`` photos to ``--image-size`` px with ``decoded()``, the pool
started and shut down inside the call as in ``extract``, with ``feature_batches``' window at batch size 32.
Rounds interleave the configurations in one process (their order rotated each round), so wall times are
comparable on a shared machine; medians over the rounds:

- **photos/s**: photos ÷ wall seconds of one call.
- **CPU ms/photo**: CPU (user + system) of this process and of its decoding processes (``RUSAGE_SELF`` +
  ``RUSAGE_CHILDREN``; a process's CPU counts once it is shut down), start-up included, ÷ photos.
- **start-up CPU ms**: the CPU of a call over one task per worker (processes: ``CHUNK`` photos each), which
  starts every worker (processes: spawning them, their imports).
- **steady CPU ms/photo**: (CPU of the call − start-up CPU) ÷ (photos − the start-up call's): a photo's cost in a
  long run.
- **of which this process**: its own CPU ÷ photos (processes: receiving the decoded photos; it caps the rate, as
  this process also feeds the network).

Then, for each ``--network-rate`` N photos/s (3155: VGG16 float32 on an H200; 4742: JAX bfloat16): the cores that
decoding needs to keep that network busy, N × steady CPU seconds per photo.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from _common import evenly_spaced, write_results

from furnitype.extract import decoding
from furnitype.extract.images import ImageDecodeError, list_images, sha256_file
from furnitype.extract.pipeline import ExtractSpec, decoded

CONFIGS = (("threads", 1), ("threads", 2), ("threads", 4), ("processes", 2), ("processes", 4))


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds of this process, and of this process with its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = own.ru_utime + own.ru_stime
    return mine, mine + children.ru_utime + children.ru_stime


@contextlib.contextmanager
def kind(name: str) -> Iterator[None]:
    """Decode in ``name`` ("threads" or "processes") whatever the number of workers: the limit moved for the
    measurement only."""
    saved = decoding.THREADS_SCALE_TO
    decoding.THREADS_SCALE_TO = 1 << 30 if name == "threads" else 0
    try:
        yield
    finally:
        decoding.THREADS_SCALE_TO = saved


def started(name: str, workers: int | str) -> int:
    """Photos of the start-up call: one task per worker, so that every worker starts."""
    return int(workers) * (decoding.CHUNK if name == "processes" else 1)


def one_call(spec: ExtractSpec, paths: list[str], name: str, workers: int) -> tuple[float, float, float]:
    """Wall, CPU (with the decoding processes) and this process's CPU seconds of one ``decoded()`` over
    ``paths`` (every photo decoded, none unusable)."""
    with kind(name):
        wall, (mine, cpu) = time.perf_counter(), cpu_seconds()
        for path, result in decoded(spec, paths, workers, window=decoding.read_ahead(32, workers)):
            if isinstance(result, ImageDecodeError):
                raise SystemExit(f"{path}: {result}")
        mine_after, cpu_after = cpu_seconds()
        return time.perf_counter() - wall, cpu_after - cpu, mine_after - mine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="photos, one subfolder per class")
    parser.add_argument("--limit", type=int, default=400, help="an evenly spaced sample of N photos (0: all)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every configuration")
    parser.add_argument("--network-rate", type=float, nargs="*", default=[3155.0, 4742.0],
                        help="photos/s of a network to feed")
    parser.add_argument("--results", default="benchmarks/results", help="folder of the JSON results")
    args = parser.parse_args()

    paths = evenly_spaced(sorted(list_images([args.folder]).paths), args.limit)
    for path in paths:  # the files in the page cache before anything is timed
        sha256_file(path)
    spec = ExtractSpec("vgg16", "none", image_size=args.image_size)
    names = [f"{name} {workers}" for name, workers in CONFIGS]
    walls: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[float]] = {n: [] for n in names}
    startups: dict[str, list[float]] = {n: [] for n in names}
    parents: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(args.rounds):
        order = CONFIGS[round_ % len(CONFIGS):] + CONFIGS[: round_ % len(CONFIGS)]
        for name, workers in order:
            startups[f"{name} {workers}"].append(one_call(spec, paths[:started(name, workers)], name, workers)[1])
            wall, cpu, mine = one_call(spec, paths, name, workers)
            walls[f"{name} {workers}"].append(wall)
            cpus[f"{name} {workers}"].append(cpu)
            parents[f"{name} {workers}"].append(mine)

    n = len(paths)
    rows = {}
    print(f"{n} photos, {args.image_size} px, {args.rounds} rounds (medians)\n")
    print("| workers | photos/s | CPU ms/photo | start-up CPU ms | steady CPU ms/photo | of which this process |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        wall, cpu, startup, mine = (statistics.median(v) for v in (walls[name], cpus[name], startups[name],
                                                                    parents[name]))
        steady = (cpu - startup) / (n - started(*name.split()))
        rows[name] = {"photos_per_s": n / wall, "cpu_ms_per_photo": 1000 * cpu / n, "startup_cpu_ms": 1000 * startup,
                      "steady_cpu_ms_per_photo": 1000 * steady, "this_process_cpu_ms_per_photo": 1000 * mine / n}
        print(f"| {name} | {n / wall:,.0f} | {1000 * cpu / n:.2f} | {1000 * startup:,.0f} | {1000 * steady:.2f} "
              f"| {1000 * mine / n:.2f} |")
    print("\n| network photos/s | decoding cores needed (threads 1) | (processes 4) |")
    print("|---:|---:|---:|")
    needs = {}
    for rate in args.network_rate:
        one, four = (rate * rows[name]["steady_cpu_ms_per_photo"] / 1000 for name in ("threads 1", "processes 4"))
        needs[f"{rate:g}"] = {"threads 1": one, "processes 4": four}
        print(f"| {rate:,.0f} | {one:.1f} | {four:.1f} |")
    saved = write_results(Path(args.results) / "decode.json",
                          {"photos": n, "image_size": args.image_size, "rounds": args.rounds, "configs": rows,
                           "cores_needed": needs})
    print(f"\nsaved {saved}")


if __name__ == "__main__":
    main()
