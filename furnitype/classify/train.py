"""Train and compare classifiers on cached features: split, fit, score, write the run folder.

One row per feature file x model. Every feature file is split the same way: stratified by class, seeded,
and by image content (sha256), so identical photos never straddle training and test; two files of the same
photos get the same split. Every row is also compared with a fixed reference, a plain
``StandardScaler + LogisticRegression(C=0.1)`` fitted on the same training rows.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import resource
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import furnitype
from furnitype import features as store
from furnitype.classify.models import CLASS_WEIGHTS, MODEL_NAMES, make_model
from furnitype.classify.run import RUN_FORMAT, Run, commit_out, prepare_out
from furnitype.classify.split import max_folds, split_by_content
from furnitype.errors import InputError, SettingsMismatchError
from furnitype.reports.table import rank_rows, test_set_note, weights_label, write_report

#: A class needs this many distinct photos (by content) to be trained on; smaller classes are dropped.
MIN_PHOTOS_PER_CLASS = 2
#: The fixed reference every row is compared with.
BASELINE = "StandardScaler + LogisticRegression(C=0.1)"
BASELINE_C = 0.1
#: A row trailing the baseline's accuracy by more than this many points gets a note saying why.
TRAIL_POINTS = 2.0


@dataclass(frozen=True)
class _FeatureSet:
    """The labelled rows of one feature file, split into training and test rows."""

    key: str
    source: store.FeatureSet
    X_train: np.ndarray
    y_train: np.ndarray
    groups_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    groups_test: np.ndarray
    test_file: str
    dropped: list[str]


def classify(
    feature_files: Sequence[str | os.PathLike],
    *,
    models: Sequence[str] = MODEL_NAMES,
    test_files: Sequence[str | os.PathLike] = (),
    test_size: float | None = None,
    val_size: float = 0.15,
    cv: int = 5,
    seed: int = 42,
    class_weight: str | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    model_params: Mapping[str, Mapping] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Run:
    """Fit each model on each feature file, score it on held-out photos and write a run folder.

    Parameters
    ----------
    feature_files : sequence of path
        Feature files from ``furnitype extract`` (e.g. one per backbone); each gives a row per model.
    models : sequence of {"dense", "logreg", "svm"}, default=all three
    test_files : sequence of path, default=()
        Separately extracted test photos; each is matched to the feature file with the same settings, and
        every feature file needs one. Without them, ``test_size`` of each class's photos is held out.
    test_size : float, default=None (0.2)
        Share of each class's distinct photos held out for testing; not with ``test_files``.
    val_size : float, default=0.15
        Share of the training photos the dense head holds out for early stopping.
    cv : int, default=5
        Cross-validation folds for choosing logreg's C and the SVM's kernel, C and gamma.
    seed : int, default=42
        Seeds the split, the folds and the dense head's initial weights.
    class_weight : {None, "balanced"}, default=None
        ``"balanced"`` weighs classes inversely to their size in every model.
    out : path, default=None
        The run folder; ``runs/<date-time>`` when not given.
    overwrite : bool, default=False
        Replace an existing run at ``out``.
    model_params : mapping of model name to mapping, default=None
        Extra constructor arguments per model (e.g. a smaller grid).
    progress : callable taking a str, default=None
        Called with a line of progress (and each warning) as the run goes.

    Returns
    -------
    Run
        The written run; ``run.rows`` best first.

    Raises
    ------
    InputError
        Bad options, a missing, empty or unlabelled file, too few photos, a test class unknown to training.
    SettingsMismatchError
        A test file whose settings match no feature file.
    """
    say = progress or (lambda _line: None)
    models = _check_options(models, feature_files, test_files, test_size, val_size, cv, class_weight)
    out = Path(out) if out is not None else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    tmp = prepare_out(out, overwrite=overwrite)
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        say(f"warning: {message}")

    try:
        sets = _load_sets(feature_files, test_files, test_size or 0.2, seed, warn)
        rows, feature_sets, notes, split_rows = [], {}, [], []
        for fs in sets:
            say(
                f"{fs.key}: {len(fs.y_train)} training and {len(fs.y_test)} test rows, "
                f"{len(np.unique(fs.y_train))} classes, {fs.X_train.shape[1]} features"
            )
            baseline, baseline_pred = _fit_baseline(fs)
            feature_sets[fs.key] = _describe_set(fs, baseline)
            settings_file = tmp / "models" / fs.key / "settings.json"
            settings_file.parent.mkdir(parents=True, exist_ok=True)
            settings_file.write_text(json.dumps(feature_sets[fs.key], indent=1) + "\n", encoding="utf-8")
            split_rows += _split_rows(fs)
            set_rows, predictions = [], []
            for name in models:
                params = {
                    "cv": cv,
                    "validation_fraction": val_size,
                    "class_weight": class_weight,
                    "random_state": seed,
                    **(model_params or {}).get(name, {}),
                }
                row, pred = _fit_and_score(fs, name, params, tmp, say)
                row["run"] = out.name
                row["baseline_accuracy"] = baseline["accuracy"]
                row["vs_baseline_points"] = round(100 * (row["accuracy"] - baseline["accuracy"]), 2)
                notes += _row_notes(row, fs, pred, baseline_pred)
                set_rows.append(row)
                predictions.append(pred)
            notes += _baseline_note(fs, set_rows, predictions, baseline_pred)
            rows += set_rows
        document = {
            "format": RUN_FORMAT,
            "kind": "furnitype classify run",
            "run": out.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {"furnitype": furnitype.__version__},
            "options": {
                "feature_files": [str(f) for f in feature_files],
                "models": list(models),
                "test_files": [str(f) for f in test_files],
                "test_size": None if test_files else (test_size or 0.2),
                "val_size": val_size,
                "cv": cv,
                "seed": seed,
                "class_weight": class_weight,
                "min_photos_per_class": MIN_PHOTOS_PER_CLASS,
            },
            "baseline": BASELINE,
            "feature_sets": feature_sets,
            "rows": rank_rows(rows),
            "notes": notes + test_set_note(rows),
            "warnings": warnings,
        }
        _write_split(tmp / "split.csv", split_rows)
        write_report(document, tmp)
        (tmp / "metrics.json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        commit_out(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return Run(out, document)


def score(y_true: np.ndarray, proba: np.ndarray, n_classes: int) -> dict:
    """Test metrics of predicted probabilities.

    Parameters
    ----------
    y_true : ndarray of int, shape (n_rows,)
        Class indices.
    proba : ndarray of shape (n_rows, n_classes)
    n_classes : int

    Returns
    -------
    dict
        accuracy, balanced_accuracy (mean recall over classes in ``y_true``), macro_f1 (over classes in
        ``y_true`` or predicted), top3_accuracy (top-k with k = min(3, n_classes)), log_loss, the confusion
        matrix (rows: true class) and per-class precision, recall, f1, support.
    """
    predicted = np.argmax(proba, axis=1)
    confusion = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(confusion, (y_true, predicted), 1)
    hits = np.diag(confusion).astype(float)
    support, predicted_count = confusion.sum(axis=1), confusion.sum(axis=0)
    precision = np.divide(hits, predicted_count, out=np.zeros(n_classes), where=predicted_count > 0)
    recall = np.divide(hits, support, out=np.zeros(n_classes), where=support > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros(n_classes), where=(precision + recall) > 0
    )
    seen = (support > 0) | (predicted_count > 0)
    k = min(3, n_classes)
    top_k = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    p_true = np.clip(proba[np.arange(len(y_true)), y_true], 1e-15, 1.0)
    return {
        "accuracy": float(hits.sum() / len(y_true)),
        "balanced_accuracy": float(recall[support > 0].mean()),
        "macro_f1": float(f1[seen].mean()),
        "top3_accuracy": float(np.mean(np.any(top_k == y_true[:, None], axis=1))),
        "log_loss": float(np.mean(-np.log(p_true))),
        "confusion": confusion.tolist(),
        "per_class": {
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": support.tolist(),
        },
    }


def mcnemar_p(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value: could two classifiers' accuracy on the same rows differ by chance?"""
    b = int(np.sum(correct_a & ~correct_b))
    c = int(np.sum(~correct_a & correct_b))
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


# -- steps ----------------------------------------------------------------------------------------------


def _check_options(models, feature_files, test_files, test_size, val_size, cv, class_weight) -> list[str]:
    if not feature_files:
        raise InputError("give at least one feature file.")
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if m.strip()]
    unknown = [m for m in names if m not in MODEL_NAMES]
    if unknown or not names:
        raise InputError(
            f"unknown model {', '.join(unknown) or '(none)'}; choose from {', '.join(MODEL_NAMES)}."
        )
    if test_files and test_size is not None:
        raise InputError("give test files or a test size, not both.")
    if test_size is not None and not 0 < test_size < 1:
        raise InputError(f"test size must be between 0 and 1. Received: test_size={test_size}")
    if not 0 <= val_size < 1:
        raise InputError(f"validation size must be in [0, 1). Received: val_size={val_size}")
    if cv < 2:
        raise InputError(f"cross-validation needs at least 2 folds. Received: cv={cv}")
    if class_weight not in CLASS_WEIGHTS:
        raise InputError(f"class weight must be none or balanced. Received: class_weight={class_weight!r}")
    return list(dict.fromkeys(names))


def _load_sets(feature_files, test_files, test_size, seed, warn) -> list[_FeatureSet]:
    trains = [_load_labelled(f, warn) for f in feature_files]
    tests = [_load_labelled(f, warn) for f in test_files]
    test_for = _match_tests(trains, tests)
    keys = _unique_keys([Path(fs.file).stem for fs in trains])
    sets = []
    for key, train in zip(keys, trains, strict=True):
        train, dropped = _drop_small_classes(train, warn)
        test = test_for.get(train.file)
        if test is None:
            train_idx, test_idx = split_by_content(train.labels, train.sha256, test_size=test_size, seed=seed)
            test = train
        else:
            train_idx, test_idx = np.arange(len(train)), _check_test(train, test, dropped, warn)
        classes = np.unique(train.labels[train_idx])
        if max_folds(train.labels[train_idx], train.sha256[train_idx]) < 2:
            raise InputError(
                f"{train.file}: too few photos to cross-validate; every class has a single training photo."
            )
        y_test = np.searchsorted(classes, test.labels[test_idx])
        sets.append(
            _FeatureSet(
                key=key,
                source=train,
                X_train=train.features[train_idx],
                y_train=train.labels[train_idx],
                groups_train=train.sha256[train_idx],
                X_test=test.features[test_idx],
                y_test=y_test,
                groups_test=test.sha256[test_idx],
                test_file=test.file if test is not train else "",
                dropped=dropped,
            )
        )
    return sets


def _load_labelled(path, warn) -> store.FeatureSet:
    """Load a feature file and keep its labelled rows; refuse an empty, unlabelled or non-finite one."""
    fs = store.load(path)
    if len(fs) == 0:
        raise InputError(f"{path} is empty: it holds no photos.")
    labelled = fs.labels != ""
    if not labelled.any():
        raise InputError(
            f"{path} has no labels; classify needs labelled photos (class folders or a manifest with labels)."
        )
    if not np.isfinite(fs.features).all():
        raise InputError(f"{path} holds NaN or infinite features; extract it again.")
    if not labelled.all():
        warn(f"{path}: {int((~labelled).sum())} unlabelled rows ignored.")
        fs = _subset(fs, labelled)
    return fs


def _subset(fs: store.FeatureSet, keep: np.ndarray) -> store.FeatureSet:
    labels = fs.labels[keep]
    return store.FeatureSet(
        fs.features[keep],
        fs.paths[keep],
        labels,
        fs.sha256[keep],
        sorted(set(labels.tolist())),
        fs.skipped,
        fs.meta,
        fs.file,
    )


def _match_tests(trains, tests) -> dict[str, store.FeatureSet]:
    """Pair each test file with the feature file of the same settings; every feature file needs one."""
    if not tests:
        return {}
    pairs = {}
    for test in tests:
        match = next((t for t in trains if _same_settings(t, test)), None)
        if match is None:
            closest = next(
                (t for t in trains if t.meta.get("backbone") == test.meta.get("backbone")), trains[0]
            )
            differing = [k for k in store.SETTING_KEYS if str(closest.meta.get(k)) != str(test.meta.get(k))]
            had = ", ".join(f"{k}={test.meta.get(k)}" for k in differing) or "other feature dimensions"
            want = ", ".join(f"{k}={closest.meta.get(k)}" for k in differing) or "other feature dimensions"
            raise SettingsMismatchError(
                f"test file {test.file} was made with {had}, but {closest.file} with {want}; "
                "a model can only be tested on features made with its own settings."
            )
        if match.file in pairs:
            raise InputError(f"two test files ({pairs[match.file].file}, {test.file}) match {match.file}.")
        pairs[match.file] = test
    missing = [t.file for t in trains if t.file not in pairs]
    if missing:
        raise InputError(f"no test file has the settings of {', '.join(missing)}; give one per feature file.")
    return pairs


def _same_settings(a: store.FeatureSet, b: store.FeatureSet) -> bool:
    return a.settings == b.settings and a.features.shape[1] == b.features.shape[1]


def _drop_small_classes(fs: store.FeatureSet, warn) -> tuple[store.FeatureSet, list[str]]:
    photos = {label: set() for label in fs.classes}
    for label, digest in zip(fs.labels, fs.sha256, strict=True):
        photos[label].add(digest)
    small = sorted(label for label, digests in photos.items() if len(digests) < MIN_PHOTOS_PER_CLASS)
    if not small:
        return fs, []
    for label in small:
        warn(
            f"{fs.file}: class {label!r} has {len(photos[label])} photo; a class needs at least "
            f"{MIN_PHOTOS_PER_CLASS} to be trained and tested, so it is left out."
        )
    if len(photos) - len(small) < 2:
        raise InputError(
            f"{fs.file}: fewer than 2 classes have {MIN_PHOTOS_PER_CLASS} or more photos; nothing to learn."
        )
    return _subset(fs, ~np.isin(fs.labels, small)), small


def _check_test(train: store.FeatureSet, test: store.FeatureSet, dropped: list[str], warn) -> np.ndarray:
    """Rows of a test file to score: refuse unknown classes, leave out photos also used in training."""
    known = set(train.classes)
    unknown = sorted(set(test.classes) - known)
    if unknown:
        why = [f"{c!r} (left out of training: too few photos)" if c in dropped else repr(c) for c in unknown]
        raise InputError(
            f"test file {test.file} has class{'es' if len(unknown) > 1 else ''} {', '.join(why)} "
            f"unknown to training ({train.file})."
        )
    seen = np.isin(test.sha256, train.sha256)
    if seen.any():
        warn(f"{test.file}: {int(seen.sum())} test photos are also training photos; they are not scored.")
    if seen.all():
        raise InputError(f"every photo of test file {test.file} is also a training photo; nothing to test.")
    return np.flatnonzero(~seen)


def _fit_and_score(fs: _FeatureSet, name: str, params: dict, run_dir: Path, say) -> tuple[dict, np.ndarray]:
    model = make_model(name, **params)
    model.prepare()
    say(f"{fs.key}: fitting {name} ...")
    wall, cpu = time.perf_counter(), _cpu_seconds()
    model.fit(fs.X_train, fs.y_train, groups=fs.groups_train)
    fit_seconds, fit_cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    model.predict_proba(fs.X_test[:1])  # warm-up: the first call of a Keras model traces it
    start = time.perf_counter()
    proba = model.predict_proba(fs.X_test)
    predict_ms = 1000 * (time.perf_counter() - start) / len(fs.X_test)
    metrics = score(fs.y_test, proba, len(model.classes_))
    model_dir = Path("models") / fs.key / name
    model.save(run_dir / model_dir)
    meta = fs.source.meta
    row = {
        "features": fs.key,
        "backbone": meta.get("backbone", "?"),
        "weights": weights_label(meta.get("weights")),
        "model": name,
        **{
            k: round(metrics[k], 6)
            for k in ("accuracy", "balanced_accuracy", "macro_f1", "top3_accuracy", "log_loss")
        },
        "fit_seconds": round(fit_seconds, 3),
        "fit_cpu_seconds": round(fit_cpu, 3),
        "predict_ms_per_image": round(predict_ms, 4),
        "n_train": len(fs.y_train),
        "n_test": len(fs.y_test),
        "n_classes": len(model.classes_),
        "test_set": _test_set_id(fs.groups_test),
        "chosen": _chosen(name, model.summary()),
        "details": model.summary(),
        "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.get_params().items()},
        "classes": model.classes_.tolist(),
        "confusion": metrics["confusion"],
        "per_class": metrics["per_class"],
        "model_dir": model_dir.as_posix(),
    }
    say(
        f"{fs.key}: {name} accuracy {row['accuracy']:.3f} ({row['chosen']}), fit {fit_seconds:.1f} s, "
        f"{predict_ms:.3f} ms/image"
    )
    return row, np.argmax(proba, axis=1)


def _fit_baseline(fs: _FeatureSet) -> tuple[dict, np.ndarray]:
    classes = np.unique(fs.y_train)
    y_train = np.searchsorted(classes, fs.y_train)
    wall = time.perf_counter()
    with threadpool_limits(limits=1, user_api="blas"):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=BASELINE_C, max_iter=1000))
        model.fit(fs.X_train, y_train)
    fit_seconds = time.perf_counter() - wall
    proba = model.predict_proba(fs.X_test)
    metrics = score(fs.y_test, proba, len(classes))
    summary = {
        k: round(metrics[k], 6)
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "top3_accuracy", "log_loss")
    }
    summary["fit_seconds"] = round(fit_seconds, 3)
    return summary, np.argmax(proba, axis=1)


def _row_notes(
    row: dict, fs: _FeatureSet, predicted: np.ndarray, baseline_predicted: np.ndarray
) -> list[str]:
    """Say why a row trails the baseline by more than ``TRAIL_POINTS``, and other caveats of a fit."""
    label = f"{row['backbone']} ({row['weights']}) / {row['model']}"
    notes = []
    details = row["details"]
    if row["vs_baseline_points"] < -TRAIL_POINTS:
        p = mcnemar_p(predicted == fs.y_test, baseline_predicted == fs.y_test)
        verdict = (
            "the gap is within chance on this test set" if p >= 0.05 else "the gap is larger than chance"
        )
        cv_part = ""
        if "cv_results" in details:
            best = next(r for r in details["cv_results"] if r["params"] == details["best_params"])
            metric = next(k for k in best if k != "params")
            cv_part = f"; its cross-validated {metric} was {best[metric]:.3f} with {row['chosen']}"
        elif row["model"] == "dense":
            cv_part = (
                f"; the dense head is not tuned beyond early stopping (best epoch {details['best_epoch']} of "
                f"{details['epochs_run']}, {details['n_validation']} validation rows)"
            )
        notes.append(
            f"{label} trails the baseline ({BASELINE}: accuracy {row['baseline_accuracy']:.3f}) by "
            f"{-row['vs_baseline_points']:.1f} points: McNemar p = {p:.3f} over {row['n_test']} test photos, "
            f"{verdict}{cv_part}."
        )
    if details.get("converged") is False:
        notes.append(f"{label}: lbfgs stopped at max_iter before converging.")
    if "n_splits" in details and details["n_splits"] < row["params"]["cv"]:
        notes.append(
            f"{label}: {details['n_splits']}-fold CV instead of {row['params']['cv']} "
            "(the largest class has too few distinct training photos)."
        )
    if row["model"] == "dense" and details.get("n_validation") == 0:
        notes.append(f"{label}: no validation photos, so no early stopping ({details['epochs_run']} epochs).")
    if row["n_classes"] <= 3:
        notes.append(f"{label}: top-3 accuracy is 1 by definition with {row['n_classes']} classes.")
    return notes


def _baseline_note(
    fs: _FeatureSet, rows: list[dict], predictions: list[np.ndarray], baseline_predicted: np.ndarray
) -> list[str]:
    """Say so when no model of a feature set beats the baseline's accuracy, and whether the gap is chance."""
    best = max(
        range(len(rows)), key=lambda i: (rows[i]["accuracy"], rows[i]["macro_f1"], -rows[i]["log_loss"])
    )
    row = rows[best]
    if row["accuracy"] > row["baseline_accuracy"]:
        return []
    p = mcnemar_p(predictions[best] == fs.y_test, baseline_predicted == fs.y_test)
    if row["accuracy"] == row["baseline_accuracy"]:
        how = "ties it"
    else:
        how = f"trails it by {-row['vs_baseline_points']:.1f} points"
    same = ""
    if (
        row["model"] == "logreg"
        and row["details"]["best_params"]["C"] == BASELINE_C
        and row["params"]["class_weight"] is None
    ):
        same = f" (its cross-validation chose the baseline's own C={BASELINE_C:g}: the same model)"
    return [
        f"{fs.key}: no model beats the baseline ({BASELINE}, accuracy {row['baseline_accuracy']:.3f}); "
        f"the best, {row['model']}, {how}{same}; McNemar p = {p:.3f} over {row['n_test']} test photos."
    ]


def _describe_set(fs: _FeatureSet, baseline: dict) -> dict:
    meta = fs.source.meta
    return {
        "file": fs.source.file,
        "test_file": fs.test_file,
        "backbone": meta.get("backbone"),
        "weights": weights_label(meta.get("weights")),
        "settings": fs.source.settings,
        "meta": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "feature_dim": int(fs.X_train.shape[1]),
        "classes": np.unique(fs.y_train).tolist(),
        "dropped_classes": fs.dropped,
        "n_train": len(fs.y_train),
        "n_test": len(fs.y_test),
        "baseline": baseline,
    }


def _split_rows(fs: _FeatureSet) -> list[tuple[str, str, str, str]]:
    classes = np.unique(fs.y_train)
    rows = [(fs.key, g, y, "train") for g, y in zip(fs.groups_train, fs.y_train, strict=True)]
    rows += [(fs.key, g, classes[y], "test") for g, y in zip(fs.groups_test, fs.y_test, strict=True)]
    return rows


def _write_split(path: Path, rows: list[tuple[str, str, str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["features", "sha256", "label", "part"])
        writer.writerows(rows)


def _chosen(name: str, details: dict) -> str:
    if name == "dense":
        return f"epoch {details['best_epoch']}/{details['epochs_run']}"
    params = details["best_params"]
    if name == "logreg":
        return f"C={params['C']:g}"
    if params["kernel"] == "linear":
        return f"linear, C={params['C']:g}"
    return f"rbf, C={params['C']:g}, gamma={params['gamma_factor']:g}x scale"


def _test_set_id(groups: np.ndarray) -> str:
    return hashlib.sha256("\n".join(sorted(set(groups.tolist()))).encode()).hexdigest()[:12]


def _unique_keys(stems: list[str]) -> list[str]:
    keys: list[str] = []
    for stem in stems:
        key, n = stem, 2
        while key in keys:
            key, n = f"{stem}-{n}", n + 1
        keys.append(key)
    return keys


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
