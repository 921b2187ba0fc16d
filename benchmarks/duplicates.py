"""``furnitype duplicates`` on a feature file of labelled photos: the distances that choose the default
``max_distance``, the groups at several distances, the CPU time, and a sample of groups to check by eye.

Run by hand (seconds)::

    .venv/bin/python benchmarks/duplicates.py FEATURES-vgg16.h5 [--sample 20] [--seed 2026] [--sheet eye.png]

- **nearest-neighbour distances**: each photo's cosine distance to its nearest other photo (percentiles, and
  counts in bands of 0.01): near-duplicates make a low mode, apart from the bulk of different products.
- **groups**: ``find_groups`` at each ``--distances`` value: exact and near groups, groups with different labels,
  photos in groups, the largest group.
- **time**: ``duplicates(FILE)`` at the default distance (reading the file included), CPU seconds
  (``getrusage``, all threads), median of 3.
- **by eye** (``--sheet``): ``--sample`` near groups at the default distance drawn at random (``--seed``), a row
  each, for a person to count those that are one product.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
from _common import measure, write_results

from furnitype.duplicates import MAX_DISTANCE, duplicates, find_groups
from furnitype.features import load
from furnitype.features.index import CosineIndex
from furnitype.reports.sheet import groups_sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("features")
    parser.add_argument("--distances", default="0.01,0.02,0.03,0.05,0.07,0.1,0.15")
    parser.add_argument("--sample", type=int, default=20)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--sheet", help="Draw the sample of near groups here (PNG).")
    parser.add_argument("--results", default="benchmarks/results", help="Folder of the JSON results.")
    args = parser.parse_args()

    fs = load(args.features)
    distances, _ = CosineIndex(fs.features).kneighbors(fs.features, 2)
    nearest = distances[:, 1]
    bands = np.histogram(nearest, bins=20, range=(0, 0.2))[0]
    print(f"{len(fs):,} photos, {len(set(fs.sha256.tolist())):,} contents")
    print("nearest other photo, percentiles 1/5/10/50/90:",
          " ".join(f"{v:.3f}" for v in np.percentile(nearest, [1, 5, 10, 50, 90])))
    print("photos whose nearest is in [0, 0.01), [0.01, 0.02), ...:", " ".join(str(int(n)) for n in bands))

    rows = []
    print(f"{'distance':>8}  {'exact':>5}  {'near':>5}  {'labels differ':>13}  {'photos':>6}  {'largest':>7}")
    for d in (float(x) for x in args.distances.split(",")):
        found = find_groups(fs, max_distance=d)
        row = {"distance": d, "exact": found.count("exact"), "near": found.count("near"),
               "conflicts": found.conflicts, "photos": sum(len(g.photos) for g in found.groups),
               "largest": max((len(g.photos) for g in found.groups), default=0)}
        rows.append(row)
        print(f"{d:>8g}  {row['exact']:>5}  {row['near']:>5}  {row['conflicts']:>13}  {row['photos']:>6}  "
              f"{row['largest']:>7}")

    cpu = []
    for _ in range(3):
        with measure() as took:
            result = duplicates(args.features)
        cpu.append(took.cpu)
    print(f"duplicates() at {MAX_DISTANCE:g}: {statistics.median(cpu):.2f} s CPU (median of 3); {result.summary()}")

    if args.sheet:
        near = [g for g in result.groups if g.kind == "near"]
        picked = sorted(np.random.default_rng(args.seed).choice(len(near), min(args.sample, len(near)), replace=False))
        groups_sheet([near[i] for i in picked], args.sheet, thumb=110, max_photos=7,
                     title=f"{len(picked)} of {len(near)} near groups at {MAX_DISTANCE:g}, drawn at random")
        print(f"sample to check by eye: {args.sheet}")

    percentiles = dict(zip(("1", "5", "10", "50", "90"), np.percentile(nearest, [1, 5, 10, 50, 90]).tolist(),
                           strict=True))
    write_results(Path(args.results) / "duplicates.json", {"features": str(Path(args.features)), "rows": len(fs),
                              "nearest_percentiles": percentiles, "nearest_bands": bands.tolist(), "groups": rows,
                              "cpu_seconds": statistics.median(cpu)})


if __name__ == "__main__":
    main()
