"""A fused feature set (``classify --fuse``) on the shared photos: accuracy and CPU per photo against its parts.

Run by hand, in two steps::

    .venv/bin/python benchmarks/fuse.py accuracy VGG.h5 INCEPTION.h5 --work WORK [--seeds 5] [--models logreg]
    .venv/bin/python benchmarks/fuse.py cpu PHOTOS/ VGG.h5 INCEPTION.h5 --work WORK [--photos 200] [--repeats 2]

``accuracy``: ``classify`` on each store alone and on the two fused (``fuse=True``), with ``--seeds`` held-out
content-grouped splits (seed 0 ..; 20 % of each class's photos): mean accuracy, its range and macro-F1 per
feature set and model (WORK/accuracy.json, resumed when rerun).

``cpu``: what a new photo costs each part: decoding and the network of each store's settings (the spec
``predict`` rebuilds from the run, ``furnitype.extract.settings.spec_for``) on ``--photos`` evenly spaced
photos, the networks built before the clock, the parts interleaved in one process; CPU is user + system of all
threads. The fused set costs the sum of its parts: ``predict`` extracts each part in turn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from _common import cpu_seconds, evenly_spaced, write_results


def accuracy(args) -> None:
    """``classify`` on each store and on the fused pair, ``--seeds`` splits each; WORK/accuracy.json."""
    from furnitype.training import classify

    work = Path(args.work)
    results_file = work / "accuracy.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    sets = {Path(args.vgg).stem: ([args.vgg], False), Path(args.inception).stem: ([args.inception], False),
            "fused": ([args.vgg, args.inception], True)}
    for name, (files, fuse) in sets.items():
        for seed in range(args.seeds):
            key = f"{name}/{seed}"
            if key in results:
                continue
            run = classify(files, fuse=fuse, seed=seed, models=args.models.split(","), overwrite=True,
                           out=work / "runs" / f"{name}-{seed}")
            results[key] = {r.model: {"accuracy": r.accuracy, "macro_f1": r.macro_f1, "dims": r.features and
                                      run.document.feature_sets[r.features].feature_dim,
                                      "fit_cpu_seconds": r.fit_cpu_seconds, "n_test": r.n_test}
                            for r in run.rows}
            results[key]["warnings"] = run.warnings
            write_results(results_file, results)
            print(key, {m: round(v["accuracy"], 4) for m, v in results[key].items() if m != "warnings"},
                  file=sys.stderr, flush=True)
    print(accuracy_table(results, list(sets), args.seeds))


def accuracy_table(results: dict, names: list[str], seeds: int) -> str:
    """Markdown: mean accuracy and macro-F1 of each feature set and model over the seeds."""
    lines = ["| features | dims | model | accuracy (mean of splits) | min - max | macro-F1 | fit CPU s |",
             "|---|---:|---|---:|---|---:|---:|"]
    for name in names:
        runs = [results[f"{name}/{s}"] for s in range(seeds) if f"{name}/{s}" in results]
        for model in sorted({m for r in runs for m in r if m != "warnings"}):
            got = [r[model] for r in runs if model in r]
            acc = [g["accuracy"] for g in got]
            lines.append(
                f"| {name} | {got[0]['dims']} | {model} | {100 * np.mean(acc):.2f} % ({len(got)} splits) | "
                f"{100 * min(acc):.1f} - {100 * max(acc):.1f} | {100 * np.mean([g['macro_f1'] for g in got]):.2f} % "
                f"| {np.mean([g['fit_cpu_seconds'] for g in got]):.1f} |"
            )
    return "\n".join(lines)


def cpu(args) -> None:
    """CPU per photo of each part's decoding + network on the same photos, interleaved; WORK/cpu.json."""
    from furnitype.extract.images import list_images
    from furnitype.extract.pipeline import feature_batches
    from furnitype.extract.settings import spec_for
    from furnitype.features import read_meta

    paths = [f.path for f in evenly_spaced(list_images([args.folder]).files, args.photos)]
    parts = {}
    for file in (args.vgg, args.inception):
        meta = read_meta(file)
        spec = spec_for(meta, source=meta.get("weights_source"), what=file)
        infer = spec.build()
        list(feature_batches(spec, paths[:8], batch_size=8, infer=infer))  # warm-up: the first call traces
        parts[Path(file).stem] = (spec, infer)
    results: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(args.repeats):
        for name, (spec, infer) in parts.items():
            before = cpu_seconds()
            for _batch in feature_batches(spec, paths, batch_size=32, infer=infer):
                pass
            ms = 1000 * (cpu_seconds() - before) / len(paths)
            results[name].append(ms)
            print(f"{name}: {ms:.1f} ms CPU per photo ({len(paths)} photos)", file=sys.stderr, flush=True)
    write_results(Path(args.work) / "cpu.json", results)
    medians = {name: float(np.median(values)) for name, values in results.items()}
    first = next(iter(medians))
    for name, ms in medians.items():
        print(f"| {name} | {ms:.1f} | {ms / medians[first]:.2f}x |")
    total = sum(medians.values())
    print(f"| fused ({' + '.join(medians)}) | {total:.1f} | {total / medians[first]:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    acc = steps.add_parser("accuracy")
    acc.add_argument("vgg")
    acc.add_argument("inception")
    acc.add_argument("--work", required=True)
    acc.add_argument("--seeds", type=int, default=5)
    acc.add_argument("--models", default="logreg")
    acc.set_defaults(run=accuracy)
    timing = steps.add_parser("cpu")
    timing.add_argument("folder")
    timing.add_argument("vgg")
    timing.add_argument("inception")
    timing.add_argument("--work", required=True)
    timing.add_argument("--photos", type=int, default=200)
    timing.add_argument("--repeats", type=int, default=2)
    timing.set_defaults(run=cpu)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
