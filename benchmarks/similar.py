"""``furnitype similar`` on a feature file of labelled photos: leave-one-out precision@k and the time of a query.

Run by hand (about a minute; the new-photo figures need the weights recorded in the file)::

    .venv/bin/python benchmarks/similar.py FEATURES-vgg16.h5 [--k 5] [--queries 200] [--sheet s.png]

- **precision@k, leave-one-out**: every stored photo is a query (by path, through ``SimilarIndex.search`` with
  ``exclude_self=True``: the API path, file hashing included); the share of its k neighbours that carry its
  own label, averaged over all photos and per class. *Chance* is what k random other photos would give:
  sum over classes of (share of the class) x (its other photos / all other photos).
- **one query against all rows** (median over ``--queries`` stored photos, or as said):
  ``search``: the index alone, ``CosineIndex.kneighbors`` of one stored row, alternating query by query with
  scikit-learn's ``NearestNeighbors(metric="cosine", algorithm="brute")`` on the same row (median and 90th
  percentile of both; and a check that both give the same neighbours); ``query by path``:
  ``SimilarIndex.search([path])`` (hash the file, find its row, search, build the result); ``similar()``: the
  whole API call (read the HDF5 file, index, query), median of 20; ``CLI``: ``furnitype similar FILE PHOTO
  --json`` as a child process (interpreter start-up included), median of 5 wall times; ``new photo``: a photo
  not in the file (a re-encoded copy), CLI cold (TensorFlow import, network build, one extraction), and
  ``search`` in a process where the network is already built (median of 5).
- **growth**: ``kneighbors`` of one query against the rows tiled 10x and 40x (copies with 1% noise).

**The approximate index at catalogue scale** (``--scale``: about an hour, the 10^6-row store ~2 GB)::

    .venv/bin/python benchmarks/similar.py FEATURES-vgg16.h5 --scale WORK [--scale-stores 100000x512 ...]

For each ``ROWSxDIM`` a store ``WORK/sROWSxDIM.h5`` is made once (``build_store``: the real rows of
FEATURES, then copies with 5% noise, ``TiledFeatures``; its first rows keep the real photos' paths and
sha256, so one of them is a stored photo) with the bulk writer, then, each in a fresh child process measured
by ``os.wait4`` (CPU = user + system, all threads; peak RSS):

- **build**: ``ann.update`` with no index (CPU, wall, peak RSS), and the index's bytes per row on disk;
- **recall@10**: 1,000 evenly spaced stored rows as queries, their 10 nearest live rows through the index
  (``ann.kneighbors`` re-ranked) against exact search over every row (``ann.kneighbors`` with no index);
- **query, one thread**: median over those queries of the index's own search (40 candidates, ``threads=1``)
  and of the whole ``ann.kneighbors`` (candidates' rows read from the store and re-ranked);
- **CLI**: ``furnitype similar STORE PHOTO --top-k 10 --json`` (a stored photo) under ``/usr/bin/time -v``:
  wall, CPU and peak RSS, median of 3, and once with ``--exact`` (10^5 rows only; at 10^6 see docs/benchmarks.md);
- **+1,000 rows**: 1,000 rows appended in one transaction, then ``ann.keep_up`` (what ``extract`` runs at its
  end: the index is left as it is, the rows it lacks are searched exactly), the CLI again, and ``ann.update``
  forced (the index rewritten with the 1,000 rows added).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import evenly_spaced, write_results


def _median_ms(fn, items) -> float:
    times = []
    for item in items:
        started = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def precision_at_k(index, k: int) -> dict:
    rows = index.feature_set
    matches = index.search(list(rows.paths), k=k, exclude_self=True)
    hits = np.array([np.mean([n.label == m.label for n in m.neighbours]) for m in matches])
    labels = rows.labels
    classes, counts = np.unique(labels, return_counts=True)
    n = len(labels)
    chance = float(sum((c / n) * (c - 1) / (n - 1) for c in counts))
    return {
        "k": k,
        "photos": n,
        "precision": float(hits.mean()),
        "chance": chance,
        "per_class": {str(c): float(hits[labels == c].mean()) for c in classes},
        "all_k_same": float(np.mean(hits == 1.0)),
    }


def query_times(index, file: str, k: int, n_queries: int) -> dict:
    from sklearn.neighbors import NearestNeighbors

    from furnitype.similar import similar

    rows = index.feature_set
    picks = evenly_spaced(range(len(rows)), n_queries)
    X = rows.features
    sk = NearestNeighbors(metric="cosine", algorithm="brute").fit(X)
    ours = index.index.kneighbors(X[picks], k + 1)[1]
    theirs = sk.kneighbors(X[picks], k + 1)[1]
    exe = Path(sys.executable).with_name("furnitype")
    cli = [str(exe), "similar", file, str(rows.paths[picks[0]]), "--top-k", str(k), "--json"]
    alternating = {"search": (lambda i: index.index.kneighbors(X[i : i + 1], k + 1)),
                   "sklearn": (lambda i: sk.kneighbors(X[i : i + 1], k + 1))}
    times = {name: [] for name in alternating}
    for i in [picks[0], *picks]:  # the first round warms up both, then each query runs through both in turn
        for name, fn in alternating.items():
            started = time.perf_counter()
            fn(i)
            times[name].append(time.perf_counter() - started)
    return {
        "rows": len(rows),
        **{f"{name}_ms": 1000 * float(np.median(t[1:])) for name, t in times.items()},
        **{f"{name}_p90_ms": 1000 * float(np.percentile(t[1:], 90)) for name, t in times.items()},
        "same_neighbours_as_sklearn": float(np.mean(ours == theirs)),
        "query_by_path_ms": _median_ms(lambda i: index.search([rows.paths[i]], k=k), picks),
        "similar_api_ms": _median_ms(lambda i: similar(file, [rows.paths[i]], k=k), picks[:20]),
        "cli_ms": _median_ms(lambda _: subprocess.run(cli, check=True, capture_output=True), range(5)),
    }


def new_photo_times(index, file: str, k: int, work: Path) -> dict:
    from PIL import Image

    rows = index.feature_set
    photos = []
    for i in range(6):
        with Image.open(rows.paths[i * len(rows) // 6]) as img:
            photos.append(work / f"new{i}.jpg")
            img.convert("RGB").save(photos[-1], quality=70)
    exe = Path(sys.executable).with_name("furnitype")
    started = time.perf_counter()
    subprocess.run([str(exe), "similar", file, str(photos[0]), "--json"], check=True, capture_output=True)
    cold = time.perf_counter() - started
    index.search([photos[0]], k=k)  # builds the network in this process
    warm = _median_ms(lambda p: index.search([p], k=k), photos[1:])
    assert not index.search([photos[1]], k=k)[0].in_store
    return {"cli_cold_s": cold, "search_warm_ms": warm}


def growth(index, k: int) -> dict:
    from furnitype.features.index import CosineIndex

    X = index.feature_set.features
    rng = np.random.default_rng(0)
    found = {}
    for times in (10, 40):
        noisy = [X * (1 + 0.01 * rng.standard_normal(X.shape, np.float32)) for _ in range(times - 1)]
        tiled = np.concatenate([X, *noisy])
        search = CosineIndex(tiled).kneighbors
        search(X[:1], k + 1)
        found[len(tiled)] = _median_ms(lambda i, search=search: search(X[i : i + 1], k + 1), range(0, 2000, 40))
    return found


class TiledFeatures:
    """``rows`` x ``dim`` float32 rows made block by block from the real rows: row i is real row ``i % n``
    (``dim`` 2,048: that row and three other real rows side by side), each value times ``1 + 0.05 N(0, 1)``,
    with the real row's zeros kept (ReLU outputs); rows below ``n`` are the real rows as they are."""

    def __init__(self, real: np.ndarray, rows: int, dim: int):
        self.real, self.shape = real, (rows, dim)
        n = len(real)
        self.parts = [np.arange(n)] + [np.random.default_rng(p).permutation(n) for p in range(1, dim // real.shape[1])]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        i = np.arange(start, stop) % len(self.real)
        block = np.concatenate([self.real[part[i]] for part in self.parts], axis=1)
        noise = np.random.default_rng(start + 1).standard_normal(block.shape, np.float32)
        noisy = block * (1 + 0.05 * noise)
        real = np.arange(start, stop) < len(self.real)
        noisy[real] = block[real]
        return noisy


def build_store(real_file: str, out: str, rows: int, dim: int) -> str:
    """A store of ``rows`` x ``dim`` tiled from ``real_file``'s rows (``TiledFeatures``) with the bulk writer:
    its first rows are the real photos (paths, sha256, labels), the others made-up paths under ``out``'s folder."""
    from furnitype.features import load, save

    real = load(real_file)
    n = len(real)
    tiles = np.arange(rows) // n
    paths = [str(real.paths[i]) if t == 0 else f"/catalogue/t{t:04d}/{Path(real.paths[i]).name}"
             for i, t in zip(np.arange(rows) % n, tiles, strict=True)]
    labels = [str(real.labels[i]) for i in np.arange(rows) % n]
    sha = [str(real.sha256[i]) if t == 0 else f"{t:08x}{str(real.sha256[i])[8:]}"
           for i, t in zip(np.arange(rows) % n, tiles, strict=True)]
    meta = dict(real.meta)
    if dim != real.features.shape[1]:
        meta.update(backbone="inception", weights="none(seed=0)", weights_source="none")
    save(out, features=TiledFeatures(real.features, rows, dim), paths=paths, labels=labels, sha256=sha, meta=meta)
    return out


def _child(code: str) -> dict:
    """Run ``code`` (Python, prints JSON) in a fresh process: its result with ``cpu_s``, ``wall_s``, ``rss_mb``."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"child failed: {code}")
    cpu = usage.ru_utime + usage.ru_stime
    return {**json.loads(out or "{}"), "cpu_s": cpu, "wall_s": time.perf_counter() - started,
            "rss_mb": usage.ru_maxrss / 1024}


def _time_v(command: list[str]) -> dict:
    """Wall seconds and peak RSS (MB) of a command under ``/usr/bin/time -v``."""
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, check=True)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    cpu = re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", done.stderr)
    assert wall and rss and cpu, done.stderr
    hours, minutes, seconds = wall.groups()
    return {"wall_s": int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds), "rss_mb": int(rss.group(1)) / 1024,
            "cpu_s": sum(float(c) for c in cpu)}


def _medians(runs: list[dict]) -> dict:
    return {key: float(np.median([r[key] for r in runs])) for key in runs[0]}


_UPDATE = """
import json, sys
from furnitype.features import ann
from furnitype.features.locking import WriterLock
from furnitype.features.view import open_store
with WriterLock(ann.real_path({store!r})), open_store({store!r}) as view:
    ann.update(view, {store!r})
print("{{}}")
"""

_QUERIES = """
import json, time
import numpy as np
from furnitype.features import ann
from furnitype.features.view import open_store
with open_store({store!r}) as view:
    live = view.live("rows")
    picks = live[np.linspace(0, len(live) - 1, {queries}).round().astype(int)]
    X = view.column("rows", "features", picks)
    index = ann.open_index(ann.index_path({store!r}))
    found = ann.kneighbors(view, index, X, 10)[1]
    exact = ann.kneighbors(view, None, X, 10)[1]
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]))
    own, whole = [], []
    for x in X[:200]:
        t = time.perf_counter(); index.candidates(x[None], 40, threads=1); own.append(time.perf_counter() - t)
        t = time.perf_counter(); ann.kneighbors(view, index, x[None], 10); whole.append(time.perf_counter() - t)
print(json.dumps({{"recall_at_10": recall, "index_p50_ms": 1000 * float(np.median(own)),
                  "index_p90_ms": 1000 * float(np.percentile(own, 90)),
                  "kneighbors_p50_ms": 1000 * float(np.median(whole))}}))
"""

_APPEND = """
import numpy as np
from furnitype.features.layout import STAT_UNKNOWN, Folders, Layout
from furnitype.features.locking import WriterLock, real_path
from furnitype.features.view import open_store
from furnitype.features.writing import transaction
real = real_path({store!r})
with WriterLock(real, {store!r}):
    with open_store(real) as view:
        X = view.column("rows", "features", view.live("rows")[:1000])
        folders = Folders(view.folders())
    X = X * (1 + 0.05 * np.random.default_rng(7).standard_normal(X.shape, np.float32))
    paths = [f"/catalogue/added/p{{i:04d}}.jpg" for i in range(1000)]
    with transaction(real, {store!r}) as h5:
        layout = Layout(h5)
        digests = np.array([f"{{i:064x}}" for i in range(1000)], "S64")
        layout.append("rows", features=X.astype(np.float32), sha256=digests, path=paths,
                      label=["added"] * 1000, live=np.ones(1000, np.uint8),
                      stat=np.tile(STAT_UNKNOWN, (1000, 1)), folder=folders.ids(paths))
        layout.write_folders(folders.new())
print("{{}}")
"""

_KEEP_UP = """
from furnitype.features import ann
from furnitype.features.locking import WriterLock, real_path
with WriterLock(real_path({store!r})):
    ann.keep_up(real_path({store!r}), {store!r})
print("{{}}")
"""


def scale(real_file: str, work: Path, stores: list[str], queries: int) -> dict:
    """The ``--scale`` figures (see the module docstring), by store."""
    from furnitype.features import ann

    exe = str(Path(sys.executable).with_name("furnitype"))
    found = {}
    for name in stores:
        rows, dim = (int(x) for x in name.split("x"))
        store = work / f"s{name}.h5"
        if not store.exists():
            build_store(real_file, str(store), rows, dim)
        ann.index_path(store).unlink(missing_ok=True)
        report: dict = {"rows": rows, "dim": dim}
        report["build"] = _child(_UPDATE.format(store=str(store)))
        report["index_bytes_per_row"] = ann.index_path(store).stat().st_size / rows
        report.update(_child(_QUERIES.format(store=str(store), queries=queries)))
        from furnitype.features import load as _load

        photo = str(_load(real_file).paths[0])
        cli = [exe, "similar", str(store), photo, "--top-k", "10", "--json"]
        runs = [_time_v(cli) for _ in range(3)]
        report["cli"] = _medians(runs)
        if rows <= 100_000:
            report["cli_exact"] = _time_v([*cli, "--exact"])
        report["append_1000"] = _child(_APPEND.format(store=str(store)))
        report["keep_up_after_1000"] = _child(_KEEP_UP.format(store=str(store)))
        runs = [_time_v(cli) for _ in range(3)]
        report["cli_after_1000"] = _medians(runs)
        report["update_after_1000"] = _child(_UPDATE.format(store=str(store)))
        print(json.dumps({name: report}), file=sys.stderr, flush=True)
        found[name] = report
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features", help="feature file of labelled photos (from extract)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--queries", type=int, default=200, help="stored photos timed as single queries")
    parser.add_argument("--sheet", help="also draw a contact sheet of 8 evenly spaced queries here")
    parser.add_argument("--no-new-photo", action="store_true", help="skip the new-photo timings (no network)")
    parser.add_argument("--results", default="benchmarks/results/similar.json")
    parser.add_argument("--scale", type=Path, metavar="WORK", help="measure the approximate index on stores made here")
    parser.add_argument("--scale-stores", nargs="+", default=["100000x512", "100000x2048", "1000000x512"])
    parser.add_argument("--scale-queries", type=int, default=1000)
    args = parser.parse_args()
    if args.scale:
        args.scale.mkdir(parents=True, exist_ok=True)
        report = scale(args.features, args.scale, args.scale_stores, args.scale_queries)
        write_results(args.results.replace(".json", "-scale.json"), report)
        print(json.dumps(report, indent=1))
        return

    from furnitype.similar import SimilarIndex

    index = SimilarIndex.open(args.features)
    report = {"file": args.features, "precision": precision_at_k(index, args.k)}
    print(f"precision@{args.k}: {report['precision']['precision']:.4f}", file=sys.stderr, flush=True)
    report["query"] = query_times(index, args.features, args.k, args.queries)
    report["growth_ms"] = growth(index, args.k)
    if not args.no_new_photo:
        with tempfile.TemporaryDirectory() as tmp:
            report["new_photo"] = new_photo_times(index, args.features, args.k, Path(tmp))
    if args.sheet:
        from furnitype.reports.sheet import contact_sheet

        paths = index.feature_set.paths
        queries = [paths[i] for i in np.linspace(0, len(paths) - 1, 8).round().astype(int)]
        contact_sheet(index.search(queries, k=args.k), args.sheet, title=f"{args.features}: {len(paths):,} photos")
    write_results(args.results, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
