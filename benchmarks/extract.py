"""How close ``furnitype extract`` runs to the speed of the network alone, per backbone, precision and Keras backend.

Run by hand (long: about 40 minutes for everything on 2 cores; each configuration can run on its own)::

    .venv/bin/python benchmarks/extract.py PHOTOS/ \\
        --weights vgg16_notop.weights.h5 [--backbone vgg16] [--precision bfloat16] [--limit N]
    .venv/bin/python benchmarks/extract.py PHOTOS/ --weights vgg16_notop.weights.h5 --backend jax   # or torch
    .venv/bin/python benchmarks/extract.py --table          # the table of all saved results, as Markdown
    .venv/bin/python benchmarks/extract.py --accuracy FLOAT32.h5 INT8.h5   # classify on both, 5 held-out splits

``--backend`` (``tensorflow``, ``jax`` or ``torch``; default ``tensorflow``) sets ``KERAS_BACKEND`` for this
process and every child before Keras is imported; int8 runs on TensorFlow only (OpenVINO converts its network).
For each configuration it measures, and saves as ``<results>/extract-<backbone>-<precision>.json`` (TensorFlow)
or ``<results>/extract-<backbone>-<precision>-<backend>.json`` (JAX, PyTorch):

- **model CPU ms/img**: the network alone, in steady state: the network ``extract`` builds (Keras' compiled
  predict function on the backend) on batches of ``--batch-size`` photos already decoded, resized and
  preprocessed in memory, after a warm-up batch (no import, build, decoding or writing counted). The strictest
  denominator: everything else ``extract`` does is counted against it.
- **extract CPU ms/img**: ``furnitype extract FOLDER`` as a fresh child process into a new store, end to end
  (interpreter and Keras backend start-up, network build, listing, hashing, decoding, journal, HDF5 write),
  CPU time (user + system, all threads) from ``os.wait4``, divided by the photos extracted.
- **efficiency** = model ÷ extract CPU per image.
- **wall ratio**: in one process, slices alternate A B A B ... where A is the network alone on a slice's
  decoded photos and B is ``extract()`` on the same photos into a new store (the network already built, as in
  a long run); the median over pairs of (A wall per image) ÷ (B wall per image). Usable CPU swings between 1
  and 2 cores here, so only slices interleaved in one process are comparable in wall time.
- **CPU ratio**: the same pairs' (A CPU per image) ÷ (B CPU per image), median: efficiency without start-up.
- **start-up CPU s**: ``furnitype extract`` over a single photo (interpreter, imports, build, first trace).
- **rerun**: the same command again over the unchanged folder, its wall time as a fraction of the first run.
- **peak RSS**: ``ru_maxrss`` of the child for an evenly spaced sample of ``--memory-sample`` photos and for all.
- **draft decoding**: on the photos where Pillow's JPEG draft mode changes the decoded pixels, the relative
  feature difference (``|f_draft - f_exact| / |f_exact|``, L2 per photo) and decoding CPU per photo both ways.

``--table`` adds the bfloat16- and int8-vs-float32 feature differences from the stores of each backbone and
backend, and for JAX and PyTorch, per precision, how their rows differ from TensorFlow's (relative L2 per row)
and their CPU per photo next to TensorFlow's, the network alone and end to end.
InceptionV3 has no pretrained weights here: it runs with ``--weights none`` (random, seeded), which costs the
same arithmetic.

int8 (``furnitype[int8]``): every run calibrates on the same photos (``--calibrate`` the whole folder) and uses
a cache folder of its own, made before the timed runs; **calibration CPU s** is the CPU of a one-photo
``extract`` with an empty cache minus the same with the cache made (conversion + calibration, paid once). The
int8 network takes the decoded photos and preprocesses them inside the graph, so its "model alone" includes
``preprocess_input`` (0.1 ms of the Keras rows' work).

``--accuracy FLOAT32.h5 INT8.h5``: ``classify`` (dense, logreg, svm) on each store with 5 seeds of the held-out
split (20% of each class), the accuracy of each model on each, and how often the two models of a seed give the
same label to a held-out photo.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import evenly_spaced, measure, write_results

BACKBONES = ("vgg16", "inception")
PRECISIONS = ("float32", "bfloat16", "int8")
BACKENDS = ("tensorflow", "jax", "torch")
DEFAULT_BACKEND = "tensorflow"


def _link_folder(files, root: Path) -> Path:
    """A folder of symlinks to ``files`` keeping their class subfolders (what ``extract`` lists)."""
    root.mkdir(parents=True)
    for f in files:
        target = root / (f.label or ".") / Path(f.path).name
        target.parent.mkdir(exist_ok=True)
        target.symlink_to(f.path)
    return root


def _run_child(cmd: list[str]) -> dict:
    """Run a command; its wall seconds, CPU seconds (all threads), peak RSS (MiB) and parsed JSON stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err.read().decode()[-2000:]}")
        return {
            "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024,
            "result": json.loads(out.read()),
        }


def _extract_cmd(folder: Path, out: Path, backbone: str, weights: str, precision: str, batch_size: int,
                 calibrate: Path) -> list:
    exe = Path(sys.executable).with_name("furnitype")
    return [str(exe), "extract", str(folder), "--backbone", backbone, "--weights", weights, "--precision", precision,
            "--batch-size", str(batch_size), "--out", str(out), "--json",
            *(["--calibrate", str(calibrate)] if precision == "int8" else [])]


def _relative(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-row relative L2 difference of ``a`` to the reference ``b``: median, 95th percentile, max."""
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    cosine = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"rows": len(rel), "median": float(np.median(rel)), "p95": float(np.percentile(rel, 95)),
            "max": float(rel.max()), "cosine_min": float(cosine.min())}


def _network(args, spec, files: list):
    """``(infer, prepare)``: the network alone and what it takes (Keras: preprocessed floats; int8: uint8)."""
    from dataclasses import replace

    from furnitype.extract import int8
    from furnitype.extract.backbones import build_model, get_backbone

    backbone = get_backbone(args.backbone)
    if args.precision == "int8":
        photos = int8.choose_photos(spec, [f.path for f in files], "the photos")
        spec = int8.prepare(replace(spec, quantization=int8.Quantization(photos)))
        return int8.build(spec), lambda images: images
    network = build_model(backbone, weights=args.weights, pooling="avg", image_size=spec.image_size,
                          precision=args.precision)
    return network, backbone.preprocess


def in_process(args) -> dict:
    """Model alone, interleaved slices and the draft check, in this (fresh) process."""
    from furnitype.extract.backbones import get_backbone
    from furnitype.extract.images import decode_image, list_images, read_file
    from furnitype.extract.pipeline import ExtractSpec
    from furnitype.extraction import extract

    backbone = get_backbone(args.backbone)
    spec = ExtractSpec(backbone.name, args.weights, image_size=backbone.default_size, precision=args.precision)
    files = list_images([args.folder]).files
    if args.limit:
        files = evenly_spaced(files, args.limit)
    network, preprocess = _network(args, spec, files)
    bs = args.batch_size
    calibration = tempfile.TemporaryDirectory()
    calibrate = _link_folder(files, Path(calibration.name, "photos")) if spec.precision == "int8" else None

    def model_alone(arrays: np.ndarray) -> tuple[float, float]:
        with measure() as took:
            for start in range(0, len(arrays), bs):
                network(arrays[start : start + bs])
        return took.wall, took.cpu

    def prepared(chosen) -> np.ndarray:
        return preprocess(np.stack([spec.load(f.path)[1] for f in chosen]))

    arrays = prepared(evenly_spaced(files, args.model_images))
    network(arrays[:bs])  # warm-up: trace and oneDNN primitives
    wall, cpu = model_alone(arrays)
    n = len(arrays)
    report = {"model": {"images": n, "cpu_ms": 1000 * cpu / n, "wall_ms": 1000 * wall / n}}
    del arrays

    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        slices = [files[i :: args.slices][: args.slice_images] for i in range(args.slices)]
        settings = dict(backbone=spec.backbone, weights=spec.weights, precision=spec.precision, batch_size=bs,
                        progress=False, calibrate=calibrate)
        extract([_link_folder(slices[0][:bs], Path(tmp, "warm"))], out=Path(tmp, "warm.h5"), **settings)
        for i, chosen in enumerate(slices):
            folder, arrays = _link_folder(chosen, Path(tmp, f"slice{i}")), prepared(chosen)
            a_wall, a_cpu = model_alone(arrays)
            with measure() as took:
                result = extract([folder], out=Path(tmp, f"slice{i}.h5"), **settings)
            b_wall, b_cpu = took.wall, took.cpu
            assert result.extracted == len(chosen), result
            n = len(chosen)
            pairs.append({"images": n, "model_wall_ms": 1000 * a_wall / n, "model_cpu_ms": 1000 * a_cpu / n,
                          "extract_wall_ms": 1000 * b_wall / n, "extract_cpu_ms": 1000 * b_cpu / n,
                          "ratio": a_wall / b_wall})
            print(f"  slice {i}: wall ratio {a_wall / b_wall:.3f}", file=sys.stderr, flush=True)
    report["interleaved"] = {"pairs": pairs, "median_ratio": float(np.median([p["ratio"] for p in pairs]))}

    decode_cpu, changed = {"exact": 0.0, "draft": 0.0}, []
    for f in files:
        data, _ = read_file(f.path)
        both = {}
        for mode in decode_cpu:
            with measure() as took:
                both[mode] = decode_image(data, spec.image_size, spec.interpolation, mode)
            decode_cpu[mode] += took.cpu
        if not np.array_equal(both["exact"], both["draft"]):
            changed.append((both["exact"], both["draft"]))
    draft = {"photos": len(files), "changed": len(changed),
             **{f"{mode}_cpu_ms": 1000 * s / len(files) for mode, s in decode_cpu.items()}}
    if changed:
        feats = {}
        for k, mode in enumerate(("exact", "draft")):
            images = preprocess(np.stack([pair[k] for pair in changed]))
            feats[mode] = np.concatenate([network(images[s : s + bs]) for s in range(0, len(images), bs)])
        draft["difference"] = _relative(feats["draft"], feats["exact"])
    report["draft"] = draft
    calibration.cleanup()
    return report


def run_config(args, results: Path, work: Path) -> dict:
    """All measurements of one backbone x precision; saved as JSON and returned."""
    from furnitype.extract.images import list_images

    weights = args.weights if args.backbone == "vgg16" else "none"
    files = list_images([args.folder]).files
    if args.limit:
        files = evenly_spaced(files, args.limit)
    tag = f"{args.backbone}-{args.precision}" + ("" if args.backend == DEFAULT_BACKEND else f"-{args.backend}")
    cache = work / f"int8-cache-{tag}"  # children inherit it: int8 is quantized once, in the timed calibration run
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["FURNITYPE_CACHE_DIR"] = str(cache)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        everything = _link_folder(files, Path(tmp, "all")) if args.limit else Path(args.folder)
        store = work / f"{tag}.h5"
        for stale in (store, Path(f"{store}.journal")):
            stale.unlink(missing_ok=True)

        def command(folder: Path, out: Path, batch_size: int = args.batch_size) -> list:
            return _extract_cmd(folder, out, args.backbone, weights, args.precision, batch_size, everything)

        one = _link_folder(files[:1], Path(tmp, "one"))
        calibration = None
        if args.precision == "int8":
            print(f"{tag}: conversion and calibration", file=sys.stderr, flush=True)
            calibration = _run_child(command(one, Path(tmp, "calibration.h5"), 1))
        print(f"{tag}: extract over {len(files)} photos", file=sys.stderr, flush=True)
        first = _run_child(command(everything, store))
        rerun = _run_child(command(everything, store))
        sample_runs = {}
        if args.memory_sample and args.memory_sample < len(files):
            print(f"{tag}: extract over {args.memory_sample} photos", file=sys.stderr, flush=True)
            folder = _link_folder(evenly_spaced(files, args.memory_sample), Path(tmp, "sample"))
            sample_runs = _run_child(command(folder, Path(tmp, "sample.h5")))
        startup = _run_child(command(one, Path(tmp, "one.h5"), 1))
    print(f"{tag}: model alone, interleaved slices, draft check", file=sys.stderr, flush=True)
    child = [sys.executable, __file__, str(args.folder), "--in-process", "--backbone", args.backbone,
             "--backend", args.backend, "--precision", args.precision, "--weights", weights,
             "--batch-size", str(args.batch_size),
             "--model-images", str(args.model_images), "--slices", str(args.slices),
             "--slice-images", str(args.slice_images), "--limit", str(args.limit or 0)]
    inner = _run_child(child)["result"]
    extracted = first["result"]["extracted"]
    report = {
        "backbone": args.backbone,
        "precision": args.precision,
        "backend": args.backend,
        "weights": "vgg16_notop.weights.h5" if weights != "none" else "none (random, seeded)",
        "photos": len(files),
        "extract": {**first, "cpu_ms": 1000 * first["cpu_s"] / extracted, "images": extracted},
        "rerun": {**rerun, "fraction_of_first": rerun["wall_s"] / first["wall_s"]},
        "sample": {**sample_runs, "images": args.memory_sample} if sample_runs else {},
        "startup": startup,
        "calibration": {"cpu_s": calibration["cpu_s"] - startup["cpu_s"],
                        "wall_s": calibration["wall_s"] - startup["wall_s"]} if calibration else {},
        **inner,
        "store": str(store),
        "machine": {"cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M")},
    }
    report["efficiency"] = inner["model"]["cpu_ms"] / report["extract"]["cpu_ms"]
    write_results(results / f"extract-{tag}.json", report)
    return report


def _backend(report: dict) -> str:
    return report.get("backend", DEFAULT_BACKEND)  # results saved before --backend are TensorFlow's


def _difference(store: str, reference: str) -> dict | None:
    """``_relative`` of one store's rows to another's, photo by photo; None unless both stores are there."""
    from furnitype.features import load

    if not (Path(store).is_file() and Path(reference).is_file()):
        return None
    a, b = load(store), load(reference)
    assert sorted(a.sha256) == sorted(b.sha256), f"{store} and {reference} hold other photos"
    row = {sha: i for i, sha in enumerate(a.sha256)}
    return _relative(a.features[[row[sha] for sha in b.sha256]], b.features)


def table(results: Path) -> str:
    """The Markdown table of every saved configuration, with the bfloat16, int8 and backend checks."""
    reports = {(r["backbone"], r["precision"], _backend(r)): r
               for r in (json.loads(p.read_text()) for p in sorted(results.glob("extract-*.json")))}
    lines = [
        "| backbone | precision | backend | photos | model CPU ms/img | extract CPU ms/img | efficiency | wall ratio "
        "(interleaved) | CPU ratio (interleaved) | start-up CPU s | calibration CPU s (once) | rerun / first | "
        "peak RSS sample / all (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (backbone, precision, backend), r in sorted(reports.items()):
        sample = r["sample"]
        rss = f"{sample['peak_rss_mib']:.0f} ({sample['images']}) / " if sample else ""
        steady = np.median([p["model_cpu_ms"] / p["extract_cpu_ms"] for p in r["interleaved"]["pairs"]])
        calibration = f"{r['calibration']['cpu_s']:.1f}" if r.get("calibration") else "-"
        lines.append(
            f"| {backbone} | {precision} | {backend} | {r['extract']['images']:,} | {r['model']['cpu_ms']:.1f} | "
            f"{r['extract']['cpu_ms']:.1f} | {r['efficiency']:.3f} | {r['interleaved']['median_ratio']:.3f} | "
            f"{steady:.3f} | {r['startup']['cpu_s']:.1f} | "
            f"{calibration} | "
            f"{r['rerun']['fraction_of_first']:.4f} ({r['rerun']['wall_s']:.2f} s) | "
            f"{rss}{r['extract']['peak_rss_mib']:.0f} |"
        )
    notes = []
    for backend, backbone, precision in [(k, b, p) for k in BACKENDS for b in BACKBONES for p in PRECISIONS[1:]]:
        f32, other = reports.get((backbone, "float32", backend)), reports.get((backbone, precision, backend))
        if f32 and other:
            speed = f32["model"]["cpu_ms"] / other["model"]["cpu_ms"]
            e2e = f32["extract"]["cpu_ms"] / other["extract"]["cpu_ms"]
            on = "" if backend == DEFAULT_BACKEND else f" on {backend}"
            line = (f"- {backbone}{on}: {precision} is {speed:.2f}x float32 in model CPU per image, {e2e:.2f}x end "
                    f"to end")
            bf16 = reports.get((backbone, "bfloat16", backend))
            if precision == "int8" and bf16:
                line += f" ({other['extract']['cpu_ms'] / bf16['extract']['cpu_ms']:.2f}x bfloat16's CPU per photo)"
            diff = _difference(other["store"], f32["store"])
            if diff:
                line += (f"; features differ from float32 by {100 * diff['median']:.2f}% relative (L2, median "
                         f"over {diff['rows']:,} photos), {100 * diff['p95']:.2f}% p95, {100 * diff['max']:.2f}% max, "
                         f"cosine similarity >= {diff['cosine_min']:.4f}")
            notes.append(line + ".")
    for backend, backbone, precision in [(k, b, p) for k in BACKENDS[1:] for b in BACKBONES for p in PRECISIONS]:
        tf, other = reports.get((backbone, precision, DEFAULT_BACKEND)), reports.get((backbone, precision, backend))
        if tf and other:
            line = (f"- {backbone} {precision} on {backend}: "
                    f"{other['model']['cpu_ms'] / tf['model']['cpu_ms']:.2f}x TensorFlow's CPU per photo for the "
                    f"network alone ({other['model']['cpu_ms']:.1f} vs {tf['model']['cpu_ms']:.1f} ms), "
                    f"{other['extract']['cpu_ms'] / tf['extract']['cpu_ms']:.2f}x end to end "
                    f"({other['extract']['cpu_ms']:.1f} vs {tf['extract']['cpu_ms']:.1f} ms)")
            diff = _difference(other["store"], tf["store"])
            if diff:
                line += (f"; its rows differ from TensorFlow's by {diff['median']:.1e} relative (L2, median over "
                         f"{diff['rows']:,} photos), {diff['p95']:.1e} p95, {diff['max']:.1e} max")
            notes.append(line + ".")
    for (backbone, precision, backend), r in sorted(reports.items()):
        d = r["draft"]
        on = "" if backend == DEFAULT_BACKEND else f" ({backend})"
        line = (f"- draft decoding, {backbone} {precision}{on}: changes the pixels of {d['changed']} of "
                f"{d['photos']:,} photos; decoding {d['exact_cpu_ms']:.2f} ms CPU/photo exact, "
                f"{d['draft_cpu_ms']:.2f} draft")
        if "difference" in d:
            diff = d["difference"]
            line += (f"; on those photos features differ by {100 * diff['median']:.2f}% relative (median), "
                     f"{100 * diff['p95']:.2f}% p95, {100 * diff['max']:.2f}% max")
        notes.append(line + ".")
    return "\n".join(lines + [""] + notes)


def accuracy(float32: Path, quantized: Path, seeds: int, work: Path) -> str:
    """``classify`` on both stores with ``seeds`` held-out splits; Markdown rows of accuracy and agreement."""
    import csv

    from furnitype.classify import load_model
    from furnitype.features import load
    from furnitype.training import classify

    stores = {"float32": load(float32), "int8": load(quantized)}
    assert sorted(stores["float32"].sha256) == sorted(stores["int8"].sha256), "the stores hold other photos"
    rows_by_sha = {name: dict(zip(s.sha256, s.features, strict=True)) for name, s in stores.items()}
    found: dict[str, dict[str, list]] = {}
    for seed in range(seeds):
        predicted = {}
        for name, path in (("float32", float32), ("int8", quantized)):
            run = work / f"accuracy-{name}-{seed}"
            result = classify([path], seed=seed, out=run, overwrite=True)
            with open(run / "split.csv", newline="") as fh:
                test = [(row["sha256"], row["label"]) for row in csv.DictReader(fh) if row["part"] == "test"]
            for row in result.rows:
                loaded = load_model(run, row.model)
                proba = loaded.model.predict_proba(np.stack([rows_by_sha[name][sha] for sha, _ in test]))
                labels = np.asarray(loaded.classes)[np.argmax(proba, axis=1)]
                predicted[name, row.model] = (labels, np.array([lab for _, lab in test]))
            print(f"  seed {seed}: {name} done", file=sys.stderr, flush=True)
        for model in sorted({m for _, m in predicted}):
            (a, truth), (b, _) = predicted["float32", model], predicted["int8", model]
            scores = found.setdefault(model, {"float32": [], "int8": [], "agree": [], "n": []})
            scores["float32"].append(np.mean(a == truth))
            scores["int8"].append(np.mean(b == truth))
            scores["agree"].append(np.mean(a == b))
            scores["n"].append(len(truth))
    lines = ["| model | accuracy float32 | accuracy int8 | difference (points) | predictions that agree |",
             "|---|---:|---:|---:|---:|"]
    for model, s in found.items():
        f32, q, agree = (100 * float(np.mean(s[k])) for k in ("float32", "int8", "agree"))
        lines.append(f"| {model} | {f32:.2f}% | {q:.2f}% | {q - f32:+.2f} | {agree:.2f}% "
                     f"({seeds} splits x {s['n'][0]} photos) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", help="photos, one subfolder per class")
    parser.add_argument("--weights", help="VGG16 weights file (or none for random weights)")
    parser.add_argument("--backbone", choices=[*BACKBONES, "all"], default="all")
    parser.add_argument("--precision", choices=[*PRECISIONS, "all"], default="all")
    parser.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                        help="Keras' backend (KERAS_BACKEND of this process and its children)")
    parser.add_argument("--limit", type=int, default=0, help="an evenly spaced sample of N photos (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--memory-sample", type=int, default=1000, help="photos of the smaller peak-RSS run")
    parser.add_argument("--model-images", type=int, default=192, help="photos timed through the model alone")
    parser.add_argument("--slices", type=int, default=6, help="interleaved A/B pairs")
    parser.add_argument("--slice-images", type=int, default=96, help="photos per interleaved slice")
    parser.add_argument("--results", default="benchmarks/results", help="folder of the JSON results and the stores")
    parser.add_argument("--table", action="store_true", help="only print the table of saved results")
    parser.add_argument("--accuracy", nargs=2, metavar=("FLOAT32_H5", "INT8_H5"),
                        help="only compare classify on two stores of the same photos")
    parser.add_argument("--seeds", type=int, default=5, help="held-out splits of --accuracy")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend != DEFAULT_BACKEND and args.precision == "int8":
        parser.error(f"--precision int8 runs OpenVINO's network, converted on TensorFlow: not with --backend "
                     f"{args.backend}")
    os.environ["KERAS_BACKEND"] = args.backend  # before anything imports Keras, here or in a child

    if args.accuracy:
        Path(args.results).mkdir(parents=True, exist_ok=True)
        print(accuracy(*map(Path, args.accuracy), args.seeds, Path(args.results)))
        return

    if args.in_process:
        print(json.dumps(in_process(args)))
        return
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    if not args.table:
        if not args.folder or not args.weights:
            parser.error("give the photo folder and --weights (or --table)")
        every = PRECISIONS if args.backend == DEFAULT_BACKEND else PRECISIONS[:-1]  # int8: TensorFlow's only
        for backbone in BACKBONES if args.backbone == "all" else [args.backbone]:
            for precision in every if args.precision == "all" else [args.precision]:
                run_config(argparse.Namespace(**{**vars(args), "backbone": backbone, "precision": precision}),
                           results, results)
    print(table(results))


if __name__ == "__main__":
    main()
