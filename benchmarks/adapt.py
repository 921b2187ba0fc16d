"""Adapting to a new source: which photos of it are worth labelling (the strategy ``furnitype suggest`` uses).

Run by hand::

    .venv/bin/python benchmarks/adapt.py PHOTOS/ --features FEATURES-vgg16.h5 \\
        [--pool-per-class 60] [--seeds 20] [--results benchmarks/results/adapt]

1. **New sources.** ``--pool-per-class`` photos of each class (evenly spaced by path) are written again as
   ``phone`` and ``catalogue`` photos (``benchmarks/predict.py``'s variants) and extracted with the feature
   file's own settings (cached in ``--results``). The old source is every other row of the feature file: the
   originals of the new-source photos are never in it. A third new source needs no extraction:
   ``subgroup``: in each class, up to ``--pool-per-class`` photos of one of two k-means clusters of the class's
   features (drawn by the seed); the old source keeps none of that cluster, as when a supplier's tables all
   stand alone on white and the shop's stand in dining rooms.
2. **The loop.** For each new source and seed, its photos are split (stratified, half and half) into a pool to
   pick from and a test part that is never picked (scoring "the rest of the pool" instead would reward a
   strategy for taking the hard photos out of the test). A model trained on the old source (classify's ``logreg``:
   StandardScaler + LogisticRegression, C chosen by 5-fold CV) scores the test part; then 20, 40 and 80 pool
   photos are picked by each strategy, labelled (their true class), added to the training rows, the model is
   retrained the same way and the test part scored again. One-shot strategies pick all n from the first model;
   ``... x10`` strategies pick 10 at a time and retrain between rounds (as running ``suggest --n 10`` again
   after each labelling would).
3. **Figures.** Accuracy on the test part, mean over the seeds, per strategy and number of photos added, and
   each strategy's gain over random picks at 40 photos (mean of the per-seed differences +- standard error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict import held_apart, write_variant  # noqa: E402 - benchmarks/predict.py's photo variants

from furnitype import features as store  # noqa: E402
from furnitype.classify.models import make_model  # noqa: E402
from furnitype.classify.selection import labelling_order  # noqa: E402
from furnitype.classify.split import ContentSplit  # noqa: E402

VARIANTS = ("phone", "catalogue")
BUDGETS = (20, 40, 80)
ROUND = 10
SETTINGS = ("backbone", "pooling", "image_size", "interpolation", "precision", "decode", "store_dtype")


# -- the new sources -------------------------------------------------------------------------------------


def variant_sets(folder: str, features: store.FeatureSet, per_class: int, work: Path) -> tuple[list, dict]:
    """The pool photos (originals) and the feature set of each variant of them (extracted once, then reused)."""
    from furnitype.extract.images import list_images
    from furnitype.extraction import extract

    pool = held_apart(list_images([folder]).files, per_class)
    settings = {k: features.meta[k] for k in SETTINGS}
    sets = {}
    for variant in VARIANTS:
        out = work / f"{variant}-{per_class}.h5"
        if not out.exists():
            photos = work / f"{variant}-{per_class}"
            if not photos.exists():
                write_variant(pool, variant, photos)
            print(f"extracting {len(pool)} {variant} photos", file=sys.stderr, flush=True)
            extract([photos], out=out, weights=features.meta["weights_source"], progress=False, **settings)
        sets[variant] = store.load(out)
    return pool, sets


def subgroups(X: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Rows of one of two k-means clusters of each class's features (the cluster drawn by ``seed``)."""
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        unit = X[rows] / np.linalg.norm(X[rows], axis=1, keepdims=True)
        cluster = KMeans(2, n_init=4, random_state=seed).fit_predict(unit)
        chosen[rows[cluster == rng.integers(2)]] = True
    return chosen


# -- strategies: (proba, features, n, rng) -> n pool rows, most worth labelling first ----------------------


def _margin(proba: np.ndarray) -> np.ndarray:
    top2 = np.sort(proba, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def random_pick(proba, X, n, rng):
    return rng.permutation(len(proba))[:n]


def least_confidence(proba, X, n, rng):
    """What ``furnitype suggest`` ships."""
    return labelling_order(proba, n)


def margin(proba, X, n, rng):
    return np.argsort(_margin(proba), kind="stable")[:n]


def entropy(proba, X, n, rng):
    h = -np.sum(proba * np.log(np.clip(proba, 1e-12, 1)), axis=1)
    return np.argsort(-h, kind="stable")[:n]


def diverse_margin(proba, X, n, rng, factor=4):
    """Zhdanov (2019): the 4n smallest margins, k-means (weighted by 1 - margin, on unit-length features) into
    n clusters, the row nearest each centre."""
    candidates = np.argsort(_margin(proba), kind="stable")[: factor * n]
    if len(candidates) <= n:
        return candidates
    unit = X[candidates] / np.maximum(np.linalg.norm(X[candidates], axis=1, keepdims=True), 1e-12)
    km = KMeans(n, n_init=1, random_state=0).fit(unit, sample_weight=1 - _margin(proba[candidates]) + 1e-6)
    picked = []
    for c in range(n):
        members = np.flatnonzero(km.labels_ == c)
        if len(members):
            d = np.linalg.norm(unit[members] - km.cluster_centers_[c], axis=1)
            picked.append(candidates[members[np.argmin(d)]])
    return np.array(sorted(picked, key=lambda i: _margin(proba[[i]])[0]))


ONE_SHOT: dict[str, Callable] = {
    "random": random_pick,
    "least confidence": least_confidence,
    "margin": margin,
    "entropy": entropy,
    "margin, k-means on 4n": diverse_margin,
}
ROUNDS: dict[str, Callable] = {
    "least confidence x10": least_confidence,
    "margin x10": margin,
    "margin, k-means on 4n x10": diverse_margin,
}


# -- the loop --------------------------------------------------------------------------------------------


def fit(X, y, groups, seed):
    return make_model("logreg", cv=5, random_state=seed).fit(X, y, groups=groups)


def accuracy(model, X, y) -> float:
    return float(np.mean(model.predict(X) == y))


def adapt(old: tuple, new: tuple, seed: int, say=lambda line: None) -> dict:
    """Accuracy on the new source's test part before and after adding picked photos, per strategy and budget."""
    X_old, y_old, g_old = old
    X_new, y_new, g_new = new
    pool, test = next(ContentSplit(0.5, random_state=seed).split(X_new, y_new, g_new))
    rng = np.random.default_rng(seed)
    base = fit(X_old, y_old, g_old, seed)
    result = {"n_pool": len(pool), "n_test": len(test), "before": accuracy(base, X_new[test], y_new[test])}

    def with_added(rows):
        model = fit(np.vstack([X_old, X_new[rows]]), np.concatenate([y_old, y_new[rows]]),
                    np.concatenate([g_old, g_new[rows]]), seed)
        return model, accuracy(model, X_new[test], y_new[test])

    proba = base.predict_proba(X_new[pool])
    for name, strategy in ONE_SHOT.items():
        result[name] = {n: with_added(pool[strategy(proba, X_new[pool], n, rng)])[1] for n in BUDGETS}
    for name, strategy in ROUNDS.items():
        labelled, scores, model = np.array([], dtype=int), {}, base
        while len(labelled) < max(BUDGETS):
            left = np.setdiff1d(np.arange(len(pool)), labelled)
            picked = left[strategy(model.predict_proba(X_new[pool[left]]), X_new[pool[left]], ROUND, rng)]
            labelled = np.concatenate([labelled, picked])
            model, acc = with_added(pool[labelled])
            if len(labelled) in BUDGETS:
                scores[len(labelled)] = acc
        result[name] = scores
    say(f"seed {seed}: before {result['before']:.3f}, " + ", ".join(
        f"{name} {result[name][40]:.3f}" for name in ("random", "least confidence", "least confidence x10")))
    return result


def scenarios(features: store.FeatureSet, pool: list, variants: dict, per_class: int, seed: int):
    """(name, old source, new source) for each simulated new source; arrays (X, y, groups)."""
    in_pool = np.isin(features.paths, [f.path for f in pool])
    old = (features.features[~in_pool], features.labels[~in_pool], features.sha256[~in_pool])
    for variant, fs in variants.items():
        yield variant, old, (fs.features, fs.labels, fs.sha256)
    chosen = subgroups(features.features, features.labels, seed)
    capped = np.zeros_like(chosen)
    rng = np.random.default_rng(seed)
    for label in np.unique(features.labels):
        rows = np.flatnonzero(chosen & (features.labels == label))
        capped[rng.permutation(rows)[:per_class]] = True
    keep = ~chosen
    yield ("subgroup", (features.features[keep], features.labels[keep], features.sha256[keep]),
           (features.features[capped], features.labels[capped], features.sha256[capped]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="photos, one subfolder per class")
    parser.add_argument("--features", required=True, help="the feature file of those photos (from extract)")
    parser.add_argument("--pool-per-class", type=int, default=60, help="new-source photos per class")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--results", default="benchmarks/results/adapt", help="variant photos, stores, result")
    parser.add_argument("--only-extract", action="store_true")
    args = parser.parse_args()

    work = Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    features = store.load(args.features)
    pool, variants = variant_sets(args.folder, features, args.pool_per_class, work)
    if args.only_extract:
        return
    started = time.perf_counter()
    results: dict[str, list] = {}
    for seed in range(args.seeds):
        for name, old, new in scenarios(features, pool, variants, args.pool_per_class, seed):
            results.setdefault(name, []).append(
                adapt(old, new, seed, say=lambda line, name=name: print(f"  {name} {line}", file=sys.stderr,
                                                                          flush=True)))
    report = {"results": results, "seeds": args.seeds, "pool_per_class": args.pool_per_class,
              "seconds": time.perf_counter() - started, "cpus": os.cpu_count()}
    (work / "adapt.json").write_text(json.dumps(report, indent=1))
    print(table(report))


def table(report: dict) -> str:
    """A Markdown table per new source: mean accuracy over the seeds per strategy and photos added, and each
    strategy's gain over random picks at 40 (mean of the paired differences, +- its standard error)."""
    lines = []
    for name, runs in report["results"].items():
        before = np.mean([r["before"] for r in runs])
        lines += ["", f"**{name}**: {before:.3f} before adding photos; pool {runs[0]['n_pool']}, test "
                      f"{runs[0]['n_test']} photos; mean of {len(runs)} seeds", "",
                  "| strategy | " + " | ".join(f"+{n}" for n in BUDGETS) + " | at 40 vs random at 40 |",
                  "|---|" + "---:|" * (len(BUDGETS) + 1)]

        def at(strategy, n, runs=runs):
            return np.array([r[strategy][str(n)] if str(n) in r[strategy] else r[strategy][n] for r in runs])

        for strategy in [*ONE_SHOT, *ROUNDS]:
            gain = 100 * (at(strategy, 40) - at("random", 40))
            spread = gain.std(ddof=1) / np.sqrt(len(gain)) if len(gain) > 1 else float("nan")
            cells = " | ".join(f"{at(strategy, n).mean():.3f}" for n in BUDGETS)
            versus = "" if strategy == "random" else f"{gain.mean():+.1f} ± {spread:.1f} points"
            lines.append(f"| {strategy} | {cells} | {versus} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
