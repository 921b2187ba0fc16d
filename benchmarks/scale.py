"""What a feature store costs as the catalogue grows: a run must cost what changed, not what is stored.

Run by hand (long: about an hour with the 1,000,000-row store; 2 cores)::

    .venv/bin/python benchmarks/scale.py --work SCRATCH --photos PHOTOS/ \\
        [--sizes 20000 200000 1000000]

For each size N it makes a catalogue of N tiny generated files (``cat-N/fXXXX/pXXXXXXX.jpg``, 1,000 a folder,
the folder as label) and a store of N rows over them with the bulk writer (``furnitype.features.save``, random
512-d float32 features), then runs ``extract`` as a fresh child process, each measured by ``os.wait4`` (CPU =
user + system of all threads; peak RSS = ``ru_maxrss``), with ``--weights none --precision bfloat16`` at 224 px:

- **first run**: the catalogue listed; the bulk writer records no stat, so every file is hashed once;
- **unchanged rerun**: the catalogue listed again; CPU inside ``extract()`` (imports excluded) per listed file,
  and the files hashed (0 expected);
- **+32 photos, new folder**: 32 real photos in a new folder, only that folder listed (a folder of new sofas);
- **+32 photos, all listed**: 32 more real photos in another new folder, the whole catalogue listed;
- **removal of 1%**: every hundredth tiny file deleted, the catalogue listed (rows masked in place);
- **compaction**: ``furnitype compact`` (the live rows written beside, renamed over): CPU, wall, size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PER_FOLDER = 1000
DIM = 512
SETTINGS = ["--weights", "none", "--precision", "bfloat16"]


class RandomFeatures:
    """N x 512 float32 rows made block by block (the bulk writer reads slices; nothing is held whole)."""

    def __init__(self, rows: int):
        self.shape = (rows, DIM)

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        block = np.random.default_rng(start).random((stop - start, DIM), dtype=np.float32)
        block[block < 0.3] = 0  # ReLU outputs: a third are zero
        return block


def make_catalogue(root: Path, n: int) -> tuple[list[str], list[str], list[str]]:
    """The tiny files (made once; kept between runs), and their paths, labels and sha256."""
    paths, labels, digests = [], [], []
    ready = root / ".complete"
    for i in range(n):
        label = f"f{i // PER_FOLDER:04d}"
        path = root / label / f"p{i:07d}.jpg"
        data = f"tiny photo {n} {i}\n".encode()
        if not ready.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        paths.append(str(path))
        labels.append(label)
        digests.append(hashlib.sha256(data).hexdigest())
    ready.touch()
    return paths, labels, digests


def child(kind: str, **options) -> dict:
    """Run one measurement in a fresh process: ``{"cpu_s", "rss_mb", "wall_s", ...}``."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps({"kind": kind, **options})], stdout=subprocess.PIPE, text=True
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"{kind} failed: {out}")
    return {
        **json.loads(out),
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "rss_mb": usage.ru_maxrss / 1024,
        "wall_s": time.perf_counter() - started,
    }


def run_child(spec: dict) -> None:
    """The child side: one ``extract`` or ``compact``; prints its result and the CPU inside the call."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    before = usage.ru_utime + usage.ru_stime
    if spec["kind"] == "compact":
        from furnitype.features import compact

        done = compact(spec["out"])
        result = {"rows": done.rows, "dropped": done.dropped, "mb_before": done.bytes_before / 1e6,
                  "mb_after": done.bytes_after / 1e6}
    else:
        from furnitype.extraction import extract

        result = extract(spec["inputs"], weights="none", precision="bfloat16", out=spec["out"], progress=False)
        result = result.as_dict()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["call_cpu_s"] = usage.ru_utime + usage.ru_stime - before
    print(json.dumps(result))


def real_photos(folder: Path, count: int, skip: int) -> list[Path]:
    photos = sorted(folder.rglob("*.jpg"))
    return photos[skip : skip + count]


def bench(size: int, work: Path, photos: Path) -> list[tuple[str, str]]:
    from furnitype.features import save

    root = work / f"cat-{size}"
    paths, labels, digests = make_catalogue(root, size)
    for extra in ("new-a", "new-b"):
        shutil.rmtree(root / extra, ignore_errors=True)
    for path in paths[::100]:  # restore what the last run removed
        Path(path).write_bytes(f"tiny photo {size} {int(path[-11:-4])}\n".encode())
    store = work / f"store-{size}.h5"
    started = time.perf_counter()
    save(store, features=RandomFeatures(size), paths=paths, labels=labels, sha256=digests,
         meta={"backbone": "vgg16", "weights": "none(seed=0)", "pooling": "avg", "image_size": 224,
               "interpolation": "bilinear", "precision": "bfloat16", "decode": "exact", "store_dtype": "float32"})
    built = time.perf_counter() - started
    print(f"{size:,}: bulk build {built:.0f} s, {store.stat().st_size / 1e6:,.0f} MB", flush=True)
    del paths, labels, digests
    time.sleep(2)  # past the racy window: the stats recorded now are trusted by the next run

    rows = []
    first = child("extract", inputs=[str(root)], out=str(store))
    rows.append(("first run after the bulk build", f"{first['cpu_s']:.1f} s CPU, {first['hashed']:,} hashed"))
    again = child("extract", inputs=[str(root)], out=str(store))
    per_file = again["call_cpu_s"] / again["listed"] * 1e6
    rows.append(("unchanged rerun", f"{per_file:.1f} us CPU/file, {again['hashed']} hashed, "
                 f"{again['cpu_s']:.1f} s CPU in all, {again['rss_mb']:,.0f} MB"))
    for name, skip, inputs in (("new folder", 0, [str(root / "new-a")]), ("all listed", 32, [str(root)])):
        target = root / ("new-a" if skip == 0 else "new-b")
        target.mkdir()
        for photo in real_photos(photos, 32, skip):
            shutil.copy(photo, target / photo.name)
        added = child("extract", inputs=inputs, out=str(store))
        assert added["extracted"] == 32, added
        rows.append((f"+32 photos, {name}", f"{added['cpu_s']:.1f} s CPU, {added['rss_mb']:,.0f} MB peak RSS"))
    doomed = [root / f"f{i // PER_FOLDER:04d}" / f"p{i:07d}.jpg" for i in range(0, size, 100)]
    for path in doomed:
        path.unlink()
    removed = child("extract", inputs=[str(root)], out=str(store))
    rows.append(("removal of 1%", f"{removed['removed']:,} removed, {removed['cpu_s']:.1f} s CPU, "
                 f"{removed['wall_s']:.1f} s wall, {removed['rss_mb']:,.0f} MB"))
    compacted = child("compact", out=str(store))
    rows.append(("compaction", f"{compacted['cpu_s']:.1f} s CPU, {compacted['wall_s']:.1f} s wall, "
                 f"{compacted['mb_before']:,.0f} -> {compacted['mb_after']:,.0f} MB"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="Scratch folder for the catalogues and stores.")
    parser.add_argument("--photos", type=Path, help="A folder of real photos (64 are used).")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(json.loads(args.child))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    results = {size: bench(size, args.work, args.photos) for size in args.sizes}
    for size, rows in results.items():
        print(f"\n{size:,} rows")
        for name, figures in rows:
            print(f"  {name:<34} {figures}")


if __name__ == "__main__":
    main()
