"""Time ``furnitype classify`` on features the size of the shared photos: 2,657 rows x 2,048 dimensions.

Run by hand::

    .venv/bin/python benchmarks/classify.py [--dim 2048] [--models dense,logreg,svm] [--target 60]

The features are synthetic but class-structured (``furnitype.classify.synthetic``), in the shared photos'
class sizes (bed 703, chair 811, cupboard 106, fridge 101, sofa 712, table 110, tv 114). The whole
``classify()`` call is timed (split, the three models with their cross-validation, the baseline, the report),
in wall-clock and CPU seconds (``resource.getrusage``: usable CPU swings between 1 and 2 cores on a shared
machine, so CPU time is the steadier figure), and compared with the target.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import measure

from furnitype import features as store
from furnitype.classify.synthetic import make_features

COUNTS = (703, 811, 106, 101, 712, 110, 114)


def main() -> None:
    """Make the features, run classify once, print fit seconds per model and the total against the target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--models", default="dense,logreg,svm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=60.0, help="seconds all models may take")
    args = parser.parse_args()

    from furnitype.classify.models import make_model
    from furnitype.training import classify

    make_model("dense").prepare()  # import TensorFlow before the clock starts, as a long-lived process would
    X, labels, sha = make_features(COUNTS, args.dim, seed=args.seed, separation=0.9)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.h5"
        store.save(
            path,
            features=X,
            paths=[f"/photos/{label}/{i}.jpg" for i, label in enumerate(labels)],
            labels=list(labels),
            sha256=list(sha),
            meta={"backbone": "synthetic", "weights": "none(seed=0)", "pooling": "avg"},
        )
        with measure() as took:
            run = classify([path], models=args.models.split(","), out=Path(tmp) / "run")
        total_wall, total_cpu = took.wall, took.cpu

    print(f"{len(labels)} rows x {args.dim} features, {len(COUNTS)} classes; 5-fold CV; 80/20 split")
    print(f"{'model':8} {'fit s':>7} {'fit CPU s':>10} {'ms/image':>9} {'accuracy':>9}  chosen")
    for row in sorted(run.rows, key=lambda r: r.model):
        print(
            f"{row.model:8} {row.fit_seconds:7.1f} {row.fit_cpu_seconds:10.1f} "
            f"{row.predict_ms_per_image:9.3f} {row.accuracy:9.3f}  {row.chosen}"
        )
    fits = sum(row.fit_seconds for row in run.rows)
    verdict = "within" if total_wall <= args.target else "OVER"
    print(f"sum of fits: {fits:.1f} s wall")
    print(
        f"whole classify run: {total_wall:.1f} s wall, {total_cpu:.1f} s CPU "
        f"({total_cpu / total_wall:.2f} cores busy); {verdict} the {args.target:g} s target"
    )


if __name__ == "__main__":
    main()
