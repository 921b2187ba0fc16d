"""Which VGG16 features classify the shared photos best for their CPU: block5 (today), block4+block5, mirror.

Run by hand, in three steps::

    .venv/bin/python benchmarks/features.py rows PHOTOS/ --weights vgg16_notop.weights.h5 --work WORK
    .venv/bin/python benchmarks/features.py accuracy --work WORK [--seeds 5]
    .venv/bin/python benchmarks/features.py cpu PHOTOS/ --weights vgg16_notop.weights.h5 --work WORK [--photos 200]
    .venv/bin/python benchmarks/features.py check PHOTOS/ --weights vgg16_notop.weights.h5 --work WORK --photos 16

``rows``: one pass of every photo and its left-right mirror through VGG16 (float32, 224 px, furnitype's own
decoding), keeping each block's average-pooled output (``block3_pool`` .. ``block5_pool``) of both: every
combination below is derived from them, so the network runs once for all of them (checkpointed, so an
interrupted pass goes on where it stopped).

``accuracy``: for each combination a feature store (the rows as ``extract --layers ... [--mirror]`` makes them:
each block L2-normalised, concatenated, averaged with the mirror's) and ``classify`` (dense, logreg, svm) on it
with ``--seeds`` held-out content-grouped splits (seed 0 ..; 20 % of each class's photos).

``check``: the rows ``accuracy`` derives equal those ``extract`` makes, on ``--photos`` photos.

``cpu``: the real ``extract`` command path (``furnitype.extraction.extract``, a fresh child process per
combination, interleaved, CPU = user + system of all its threads) on ``--photos`` evenly spaced photos; the CPU
per photo is what the store records (``extract_cpu_seconds`` / ``extract_cpu_rows``), the network's start-up
not included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import evenly_spaced, write_results

#: name -> (blocks, mirror); None: today's default (block5 average, not normalised).
COMBINATIONS = {
    "block5 (today)": (None, False),
    "block5 + mirror": (None, True),
    "block4,block5": (("block4", "block5"), False),
    "block4,block5 + mirror": (("block4", "block5"), True),
    "block3,block4,block5": (("block3", "block4", "block5"), False),
}
CHANNELS = {"block3": 256, "block4": 512, "block5": 512}
BLOCKS = ("block3", "block4", "block5")


def _save(path: Path, arrays: dict) -> None:
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)


def rows(args) -> None:
    """Pooled block outputs of every photo and its mirror, into WORK/rows.npz (checkpointed)."""
    from furnitype.extract.backbones import get_backbone, keras_model
    from furnitype.extract.images import list_images
    from furnitype.extract.pipeline import ExtractSpec, decoded
    from furnitype.keras_loader import import_keras

    keras = import_keras()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = list_images([args.folder]).files
    target = work / "rows.npz"
    if args.part:  # part K of N of the photos rows.npz does not hold, into rows-K.npz (for N processes)
        k, n = (int(x) for x in args.part.split("/"))
        with np.load(target) as held:
            files = files[len(held["path"]) :][k::n]
        target = work / f"rows-{k}.npz"
    done: dict = {}
    if target.exists():
        with np.load(target) as held:
            done = {key: list(held[key]) for key in held.files}
    start = len(done.get("path", []))
    print(f"{len(files)} photos, {start} done", file=sys.stderr, flush=True)
    backbone = get_backbone("vgg16")
    spec = ExtractSpec("vgg16", args.weights)
    base = keras_model(backbone, weights=args.weights, pooling="avg", image_size=spec.image_size)
    pooled = [keras.layers.GlobalAveragePooling2D()(base.get_layer(f"{b}_pool").output) for b in BLOCKS]
    model = keras.Model(base.input, pooled)
    names = ["path", "label", "sha256", *BLOCKS, *(f"{b}_mirror" for b in BLOCKS)]
    held = {name: done.get(name, []) for name in names}
    todo = files[start:]
    batch: list = []

    def run() -> None:
        images = np.stack([image for _, _, image in batch])
        both = np.concatenate([images, images[:, :, ::-1]])
        outputs = model.predict_on_batch(backbone.preprocess(both))
        n = len(batch)
        for f, sha, _ in batch:
            held["path"].append(f.path)
            held["label"].append(f.label)
            held["sha256"].append(sha)
        for b, out in zip(BLOCKS, outputs, strict=True):
            held[b].extend(np.asarray(out[:n], np.float32))
            held[f"{b}_mirror"].extend(np.asarray(out[n:], np.float32))
        batch.clear()

    by_path = {f.path: f for f in todo}
    for k, (path, result) in enumerate(decoded(spec, [f.path for f in todo], workers=2, window=32)):
        if isinstance(result, Exception):
            print(f"skipped {path}: {result}", file=sys.stderr)
            continue
        batch.append((by_path[path], result[0], result[1]))
        if len(batch) == args.batch_size:
            run()
        if (k + 1) % 256 == 0:
            _save(target, {name: np.array(values) for name, values in held.items()})
            print(f"{start + k + 1} / {len(files)}", file=sys.stderr, flush=True)
    if batch:
        run()
    _save(target, {name: np.array(values) for name, values in held.items()})
    print(f"done: {len(held['path'])} rows in {target}", file=sys.stderr)


def load_rows(work: Path) -> dict:
    """rows.npz and the parts ``rows --part`` wrote, as one set of arrays."""
    parts = [work / "rows.npz", *sorted(work.glob("rows-*.npz"))]
    loaded = [dict(np.load(p)) for p in parts if not p.name.endswith(".partial.npz")]
    return {key: np.concatenate([d[key] for d in loaded]) for key in loaded[0]}


def combined(data, blocks: tuple[str, ...] | None, mirror: bool) -> np.ndarray:
    """The rows ``extract --layers BLOCKS [--mirror]`` gives, from the pooled outputs (None: no --layers)."""

    def part(suffix: str) -> np.ndarray:
        if blocks is None:
            return data[f"block5{suffix}"]
        parts = [data[f"{b}{suffix}"] for b in blocks]
        return np.concatenate([p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12) for p in parts], 1)

    return (part("") + part("_mirror")) / 2 if mirror else part("")


def accuracy(args) -> None:
    """Stores of every combination and ``classify`` on each with ``--seeds`` splits; WORK/accuracy.json."""
    from furnitype import features as store
    from furnitype.training import classify

    work = Path(args.work)
    data = load_rows(work)
    # One file per --only choice, so that several processes can share the combinations.
    results_file = work / f"accuracy{'-' + args.only if args.only else ''}.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name, (blocks, mirror) in _chosen(args).items():
        path = work / f"{name.replace(' ', '').replace(',', '-').replace('(today)', '')}.h5"
        if not path.exists():
            store.save(path, features=combined(data, blocks, mirror), paths=list(data["path"]),
                       labels=list(data["label"]), sha256=list(data["sha256"]),
                       meta={"backbone": "vgg16", "weights": "vgg16_notop", "pooling": "avg",
                             **({"layers": ",".join(blocks)} if blocks else {}),
                             **({"mirror": "yes"} if mirror else {})})
        for seed in range(args.seeds):
            key = f"{name}/{seed}"
            if key in results:
                continue
            run = classify([path], seed=seed, out=work / "runs" / f"{path.stem}-{seed}", overwrite=True,
                           progress=False)
            results[key] = {r.model: {"accuracy": r.accuracy, "macro_f1": r.macro_f1} for r in run.rows}
            write_results(results_file, results)
            print(key, {m: round(v["accuracy"], 4) for m, v in results[key].items()}, file=sys.stderr, flush=True)
    every = {}
    for found in sorted(work.glob("accuracy*.json")):
        every.update(json.loads(found.read_text()))
    print(accuracy_table(every, args.seeds))


def accuracy_table(results: dict, seeds: int) -> str:
    """Markdown: mean accuracy and macro-F1 of each model and combination over the seeds."""
    lines = ["| features | dims | model | accuracy (mean of splits) | min - max | macro-F1 |",
             "|---|---:|---|---:|---|---:|"]
    for name, (blocks, _) in COMBINATIONS.items():
        dims = sum(CHANNELS[b] for b in blocks or ("block5",))
        for model in ("logreg", "svm", "dense"):
            got = [results[f"{name}/{s}"][model] for s in range(seeds) if f"{name}/{s}" in results]
            if not got:
                continue
            acc = [g["accuracy"] for g in got]
            f1 = [g["macro_f1"] for g in got]
            lines.append(f"| {name} | {dims} | {model} | {100 * np.mean(acc):.2f} % | {100 * min(acc):.1f} - "
                         f"{100 * max(acc):.1f} | {100 * np.mean(f1):.2f} % |")
    return "\n".join(lines)


def cpu(args) -> None:
    """``extract`` of each combination on the same sample, each in a fresh child; WORK/cpu.json."""
    from furnitype.extract.images import list_images

    work = Path(args.work)
    files = evenly_spaced(list_images([args.folder]).files, args.photos)
    results = {}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        listing = Path(tmp, "photos.csv")
        listing.write_text("".join(f"{f.path},{f.label}\n" for f in files))
        for rep in range(args.repeats):
            for name, (blocks, mirror) in _chosen(args).items():
                out = Path(tmp, f"{rep}-{len(results)}.h5")
                code = (
                    "import sys; from furnitype.extraction import extract; from furnitype.features import read_meta;"
                    f"extract(manifest={str(listing)!r}, out={str(out)!r}, weights={args.weights!r}, "
                    f"layers={','.join(blocks) if blocks else None!r}, mirror={mirror}, progress=False);"
                    f"m = read_meta({str(out)!r}); print(m['extract_cpu_seconds'], m['extract_cpu_rows'])"
                )
                done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                seconds, count = done.stdout.split()
                ms = 1000 * float(seconds) / int(count)
                results.setdefault(name, []).append(ms)
                print(f"{name}: {ms:.1f} ms per photo ({count} photos)", file=sys.stderr, flush=True)
    write_results(work / "cpu.json", results)
    today = np.median(results["block5 (today)"])
    for name, values in results.items():
        print(f"| {name} | {np.median(values):.1f} | {np.median(values) / today:.2f}x |")


def check(args) -> None:
    """The rows ``accuracy`` derives equal ``extract``'s own for ``--photos`` evenly spaced photos, every
    combination: the largest difference relative to the row's largest value."""
    from furnitype.extract.images import list_images
    from furnitype.extraction import extract
    from furnitype.features import load

    work = Path(args.work)
    data = load_rows(work)
    where = {path: i for i, path in enumerate(data["path"].tolist())}
    files = evenly_spaced(list_images([args.folder]).files, args.photos)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        listing = Path(tmp, "photos.csv")
        listing.write_text("".join(f"{f.path},{f.label}\n" for f in files))
        for name, (blocks, mirror) in _chosen(args).items():
            out = Path(tmp, f"{len(blocks or ())}-{mirror}.h5")
            extract(manifest=listing, out=out, weights=args.weights, layers=",".join(blocks) if blocks else None,
                    mirror=mirror, progress=False)
            rows = load(out)
            derived = combined(data, blocks, mirror)[[where[p] for p in rows.paths]]
            worst = np.abs(rows.features - derived).max(axis=1) / np.abs(derived).max(axis=1)
            print(f"{name}: {len(rows)} photos, largest relative difference {worst.max():.2e}")


def _chosen(args) -> dict:
    """The combinations ``--only`` names (their numbers in ``COMBINATIONS``, from 1), else all of them."""
    if not args.only:
        return COMBINATIONS
    names = list(COMBINATIONS)
    return {names[int(k) - 1]: COMBINATIONS[names[int(k) - 1]] for k in args.only.split(",")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("rows", "accuracy", "cpu", "check"))
    parser.add_argument("folder", nargs="?")
    parser.add_argument("--weights")
    parser.add_argument("--work", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--part", help="rows: part K/N of the photos rows.npz does not hold")
    parser.add_argument("--only", help="combinations to run, by number from 1 (e.g. 1,3)")
    args = parser.parse_args()
    {"rows": rows, "accuracy": accuracy, "cpu": cpu, "check": check}[args.step](args)


if __name__ == "__main__":
    main()
