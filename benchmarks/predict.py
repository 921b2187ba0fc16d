"""``furnitype predict`` on held-apart photos, as they are and as if from other sources; its speed vs ``extract``.

Run by hand (about 10 minutes on 2 shared cores)::

    .venv/bin/python benchmarks/predict.py PHOTOS/ --features FEATURES-vgg16.h5 \\
        [--per-class 30] [--slices 6 --slice-images 32] [--results benchmarks/results/predict]

1. **Held apart.** ``--per-class`` photos of each class (evenly spaced by path) are taken out of the feature
   file; ``classify`` (dense, logreg, svm) trains a run on the remaining rows, so the run never sees them.
2. **Other sources.** The held-apart photos are written again four ways: ``original`` (the files themselves),
   ``phone`` (off-centre crop of 85-90% of each side, scaled to 60%, JPEG quality 40), ``exif`` (pixels turned
   90 degrees, upright again only through the EXIF orientation tag, JPEG quality 85) and ``catalogue``
   (mirrored, 15% brighter, 10% less contrast, padded to a white square, WebP). ``predict`` (the run's best
   model) labels each set; accuracy and balanced accuracy are against the class folder.
3. **Throughput vs extract.** In one process, with the network already built (as in a long run), slices of
   held-apart photos alternate between ``predict(run, slice)`` and ``extract(slice)`` into a new store (same
   settings: the run's), in the order A B, B A, A B ...; CPU time (``getrusage``, all threads) and wall per
   photo of each; the ratio is predict ÷ extract of the summed CPU time. Usable CPU swings between 1 and 2 cores
   here, so CPU time is the figure that compares; wall is given for the interleaved pairs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import evenly_spaced, measure, write_results
from PIL import Image, ImageEnhance, ImageOps

VARIANTS = ("original", "phone", "exif", "catalogue")


def held_apart(files: list, per_class: int) -> list:
    """``per_class`` files of each label, evenly spaced in path order."""
    chosen = []
    for label in sorted({f.label for f in files}):
        of_class = [f for f in files if f.label == label]
        chosen += evenly_spaced(of_class, per_class)
    return chosen


def write_variant(files: list, variant: str, root: Path) -> Path:
    """The files as ``variant`` in ``root/<label>/``."""
    for f in files:
        folder = root / f.label
        folder.mkdir(parents=True, exist_ok=True)
        stem = Path(f.path).stem
        if variant == "original":
            (folder / Path(f.path).name).symlink_to(f.path)
            continue
        with Image.open(f.path) as img:
            upright = ImageOps.exif_transpose(img).convert("RGB")
        w, h = upright.size
        if variant == "phone":
            cropped = upright.crop((int(0.05 * w), int(0.08 * h), int(0.95 * w), int(0.93 * h)))
            small = cropped.resize((max(1, int(0.6 * cropped.width)), max(1, int(0.6 * cropped.height))),
                                   Image.Resampling.LANCZOS)
            small.save(folder / f"{stem}.jpg", quality=40)
        elif variant == "exif":
            exif = Image.Exif()
            exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
            upright.transpose(Image.Transpose.ROTATE_90).save(folder / f"{stem}.jpg", quality=85, exif=exif)
        elif variant == "catalogue":
            styled = ImageEnhance.Contrast(ImageEnhance.Brightness(ImageOps.mirror(upright)).enhance(1.15)).enhance(0.9)
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), "white")
            canvas.paste(styled, ((side - w) // 2, (side - h) // 2))
            canvas.save(folder / f"{stem}.webp", quality=80)
    return root


def accuracy(result) -> dict:
    rows = [p for p in result.predictions if not p.error]
    truth = np.array([p.given_label for p in rows])
    predicted = np.array([p.label for p in rows])
    recalls = [float(np.mean(predicted[truth == c] == c)) for c in np.unique(truth)]
    return {
        "photos": len(result.predictions),
        "errors": len(result.predictions) - len(rows),
        "accuracy": float(np.mean(predicted == truth)),
        "balanced_accuracy": float(np.mean(recalls)),
        "wrong": {p.path: f"{p.given_label} -> {p.label} ({p.probability:.2f})"
                  for p in rows if p.label != p.given_label},
    }


def train_run(features: str, held: list, work: Path) -> Path:
    """A run trained on the feature file's rows minus the held-apart photos."""
    from furnitype import features as store
    from furnitype.training import classify

    rows = store.load(features)
    keep = ~np.isin(rows.paths, [f.path for f in held])
    assert (~keep).sum() == len(held), "every held-apart photo must be a row of the feature file"
    meta = {k: v for k, v in rows.meta.items() if k not in ("feature_dim", "furnitype_format", "n_rows")}
    train = work / "train.h5"
    store.save(train, features=rows.features[keep], paths=rows.paths[keep], labels=rows.labels[keep],
               sha256=rows.sha256[keep], meta=meta)
    run = work / "run"
    classify([train], out=run, progress=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    return run


def throughput(run: Path, held: list, slices: int, per_slice: int, settings: dict, work: Path) -> dict:
    """Interleaved predict / extract slices on the same photos, network warm."""
    from furnitype.extraction import extract
    from furnitype.predict import predict

    chunks = [held[i::slices][:per_slice] for i in range(slices)]
    predict(run, [chunks[0][0].path])  # build the network, load the model once: a long-lived process
    pairs = []
    for i, chunk in enumerate(chunks):
        folder = write_variant(chunk, "original", work / f"slice{i}")
        measured = {}
        for kind in ("predict", "extract") if i % 2 == 0 else ("extract", "predict"):
            with measure() as took:
                if kind == "predict":
                    done = sum(not p.error for p in predict(run, [folder]).predictions)
                else:
                    done = extract([folder], out=work / f"slice{i}.h5", progress=False, **settings).extracted
            assert done == len(chunk), (kind, done)
            measured[kind] = {"wall_s": took.wall, "cpu_s": took.cpu}
        pairs.append({"images": len(chunk), **measured})
        ratio = measured["predict"]["cpu_s"] / measured["extract"]["cpu_s"]
        print(f"  slice {i}: predict / extract CPU {ratio:.3f}", file=sys.stderr, flush=True)
    n = sum(p["images"] for p in pairs)

    def per_image(kind: str, what: str) -> float:
        return 1000 * sum(p[kind][what] for p in pairs) / n

    return {
        "pairs": pairs,
        "images": n,
        "predict_cpu_ms": per_image("predict", "cpu_s"),
        "extract_cpu_ms": per_image("extract", "cpu_s"),
        "predict_wall_ms": per_image("predict", "wall_s"),
        "extract_wall_ms": per_image("extract", "wall_s"),
        "cpu_ratio": per_image("predict", "cpu_s") / per_image("extract", "cpu_s"),
        "median_pair_cpu_ratio": float(np.median([p["predict"]["cpu_s"] / p["extract"]["cpu_s"] for p in pairs])),
        "median_pair_wall_ratio": float(np.median([p["predict"]["wall_s"] / p["extract"]["wall_s"] for p in pairs])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="photos, one subfolder per class")
    parser.add_argument("--features", required=True, help="the feature file of those photos (from extract)")
    parser.add_argument("--per-class", type=int, default=30, help="held-apart photos per class")
    parser.add_argument("--slices", type=int, default=6, help="interleaved predict/extract pairs")
    parser.add_argument("--slice-images", type=int, default=32, help="photos per slice")
    parser.add_argument("--results", default="benchmarks/results/predict", help="folder of the JSON result")
    args = parser.parse_args()

    from furnitype.classify import load_model
    from furnitype.extract.images import list_images
    from furnitype.predict import predict

    files = list_images([args.folder]).files
    held = held_apart(files, args.per_class)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    report = {"photos": len(files), "held_apart": len(held), "machine": {"cpus": os.cpu_count(),
              "when": time.strftime("%Y-%m-%d %H:%M")}}
    with tempfile.TemporaryDirectory(dir=results) as tmp:
        work = Path(tmp)
        print(f"training a run without {len(held)} held-apart photos", file=sys.stderr, flush=True)
        run = train_run(args.features, held, work)
        best = load_model(run)
        report["run"] = {"model": best.name, "test_accuracy": best.row.accuracy, "n_train": best.row.n_train,
                         "n_test": best.row.n_test}
        report["variants"] = {}
        for variant in VARIANTS:
            folder = write_variant(held, variant, work / variant)
            result = predict(run, [folder])
            report["variants"][variant] = {**accuracy(result), "seconds": result.seconds}
            print(f"  {variant}: accuracy {report['variants'][variant]['accuracy']:.3f}", file=sys.stderr, flush=True)
        settings = {k: best.settings[k] for k in ("backbone", "pooling", "image_size", "interpolation", "precision",
                                                  "decode", "store_dtype")}
        settings["weights"] = best.meta["weights_source"]
        print("interleaved predict / extract slices", file=sys.stderr, flush=True)
        report["throughput"] = throughput(run, held, args.slices, args.slice_images, settings, work)
    write_results(results / "predict.json", report)
    print(table(report))


def table(report: dict) -> str:
    """Markdown tables of the accuracies and the throughput."""
    run = report["run"]
    lines = [
        f"Run: best model {run['model']}, trained on {run['n_train']:,} photos; its own test accuracy "
        f"{run['test_accuracy']:.3f} ({run['n_test']} photos). Held apart: {report['held_apart']} photos.",
        "",
        "| photos | predicted | accuracy | balanced accuracy |",
        "|---|---:|---:|---:|",
    ]
    for variant, r in report["variants"].items():
        lines.append(f"| {variant} | {r['photos'] - r['errors']} of {r['photos']} | {r['accuracy']:.3f} | "
                     f"{r['balanced_accuracy']:.3f} |")
    t = report["throughput"]
    lines += [
        "",
        "| | predict | extract | predict ÷ extract |",
        "|---|---:|---:|---:|",
        f"| CPU ms per photo ({t['images']} photos, {len(t['pairs'])} interleaved slices) | "
        f"{t['predict_cpu_ms']:.1f} | {t['extract_cpu_ms']:.1f} | {t['cpu_ratio']:.3f} |",
        f"| wall ms per photo | {t['predict_wall_ms']:.1f} | {t['extract_wall_ms']:.1f} | "
        f"{t['median_pair_wall_ratio']:.3f} (median of pairs) |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
