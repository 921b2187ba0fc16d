"""``classify``: train and compare classifiers on cached features and write a run folder; ``report_runs``.

One row per feature file x model: each feature file is split into training and test photos
(``furnitype.classify.data``), the baseline and every model are fitted and scored
(``furnitype.classify.evaluation``), the run notes what is worth knowing (``furnitype.classify.notes``) and
lists each feature set's mistakes (``furnitype.classify.mistakes``), and the run folder
(``furnitype.classify.run``) gets the models, the split, the mistakes, ``metrics.json`` and the report
(``furnitype.reports.table``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import furnitype
from furnitype.classify.data import MIN_PHOTOS_PER_CLASS, TrainTestSet, load_train_test_sets
from furnitype.classify.evaluation import BASELINE, Baseline, fit_and_score, fit_baseline
from furnitype.classify.fused import MISSING_FILE, write_missing
from furnitype.classify.metadata import (
    MAX_SEED,
    REPORT_KIND,
    RUN_FORMAT,
    RUN_KIND,
    FeatureSetRecord,
    RunDocument,
    RunOptions,
    write_feature_set,
    write_run_document,
)
from furnitype.classify.mistakes import MISTAKES_FILE, Mistake, find_mistakes, read_mistakes, write_mistakes
from furnitype.classify.models import CLASS_WEIGHTS, MODEL_NAMES, MODELS, make_model
from furnitype.classify.notes import baseline_note, fit_notes
from furnitype.classify.output import building, refuse_one_of
from furnitype.classify.previous import check_previous, score_previous
from furnitype.classify.run import (
    SPLIT_FILE,
    Run,
    load_run,
    merge_documents,
    mixed_test_sets_note,
    rank_rows,
    write_split,
)
from furnitype.duplicates import conflict_note
from furnitype.errors import InputError
from furnitype.outputs import check_output, refuse_existing, refuse_inputs, refuse_photos
from furnitype.reports.mistakes import write_mistakes_csv
from furnitype.reports.table import write_report

#: Share of each class's distinct photos held out for testing when no test files are given.
DEFAULT_TEST_SIZE = 0.2


def default_run_folder(runs: Path, now: datetime) -> Path:
    """``runs/<date-time>``, or ``runs/<date-time>-2`` (``-3`` ...) when a run made in the same second holds it."""
    stamp = now.strftime("%Y%m%d-%H%M%S")
    names = itertools.chain([stamp], (f"{stamp}-{i}" for i in itertools.count(2)))
    return next(runs / name for name in names if not os.path.lexists(runs / name))


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
    previous: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    fuse: bool = False,
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
        The run folder; ``runs/<date-time>`` when not given. A symbolic link names the folder it points to.
        One process at a time writes a run folder; the run is built beside it and renamed in when complete.
    overwrite : bool, default=False
        Replace an existing run at ``out`` (by renames: the old run stays whole until the new one is in).
    model_params : mapping of model name to mapping, default=None
        Extra constructor arguments per model (e.g. a smaller grid), checked before anything is trained.
    previous : path, default=None
        A run to compare with on the same photos: its best model on each feature set with the same settings is
        scored on this run's test photos, in a note beside this run's best (a run made before photos were
        labelled, say; their leaving the test set would otherwise make the comparison one of different photos).
    progress : callable taking a str, default=None
        Called with a line of progress (and each warning) as the run goes.
    fuse : bool, default=False
        Train on one feature set made of all the feature files' rows of the same photos (matched by sha256),
        side by side: VGG16 and InceptionV3 features in one model, say. The set is named by the files joined
        with ``+`` (``vgg+inc``) and records each part's settings, so ``predict`` extracts new photos with each.
        Photos that not every file holds are left out, with a warning and a list in the run
        (``models/<key>/missing.csv``); each test file is paired with the part of its settings.

    Returns
    -------
    Run
        The written run; ``run.rows`` best first.

    Raises
    ------
    InputError
        Bad options or model parameters, a missing, empty or unlabelled file, too few photos or classes, a test
        class unknown to training, fused files that label a photo differently;
        ``out`` holds something that may not be replaced, or cannot be written
        (a full disk or a read-only folder, also while writing).
    SettingsMismatchError
        A test file whose settings match no feature file.
    StoreError
        Another process is writing ``out``.
    """
    say = progress or (lambda _line: None)
    options = _check_options(feature_files, models, test_files, test_size, val_size, cv, seed, class_weight, fuse)
    for name in options.models:
        _new_model(name, options, model_params)  # every model's parameters checked before anything is trained
    if previous is not None:
        check_previous(previous)
    out = check_output(out if out is not None else default_run_folder(Path("runs"), datetime.now()), kind="folder")
    refuse_inputs({"--out": out}, [*feature_files, *test_files, *([previous] if previous is not None else [])])
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        say(f"warning: {message}")

    from furnitype.classify.models.dense import epoch_progress

    with building(out, kind=RUN_KIND, overwrite=overwrite) as folder, epoch_progress(progress is not None):
        run_name = folder.target.name
        sets = load_train_test_sets(
            feature_files, test_files, test_size=options.test_size or DEFAULT_TEST_SIZE, seed=seed, warn=warn,
            fuse_files=fuse,
        )
        rows, feature_sets, notes, mistakes = [], {}, [], []
        for data in sets:
            say(data.describe())
            baseline = fit_baseline(data)
            feature_sets[data.key] = _feature_set_record(data, baseline)
            fits = []
            for model_name in options.models:
                model = _new_model(model_name, options, model_params)
                fit = fit_and_score(data, model, baseline=baseline, run=run_name, say=say)
                fit.model.save(folder.path / fit.row.model_dir)
                notes += fit_notes(fit, data, baseline)
                fits.append(fit)
            notes += baseline_note(data, fits, baseline)
            notes += conflict_note(data.key, data.train, *([] if data.test_file else [data.test]))
            rows += [fit.row for fit in fits]
            best = rank_rows([fit.row for fit in fits])[0]
            best_fit = next(fit for fit in fits if fit.row.model == best.model)
            mistakes += find_mistakes(data, best_fit, n_splits=options.cv, seed=seed)
            if previous is not None:
                before = score_previous(previous, data)[0]
                notes.append(before.note(data.key, best))
        document = RunDocument(
            format=RUN_FORMAT,
            kind=RUN_KIND,
            run=run_name,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            versions={"furnitype": furnitype.__version__},
            options=options,
            baseline=BASELINE,
            feature_sets=feature_sets,
            rows=rank_rows(rows),
            notes=notes + mixed_test_sets_note(rows),
            warnings=warnings,
        )
        _write_run(folder.path, document, sets, mistakes)
    return Run(out, document)


def report_runs(
    run_dirs: Sequence[str | os.PathLike],
    *,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    mistakes: str | os.PathLike | None = None,
) -> Run:
    """Reprint or merge saved runs without retraining; with ``out``, write the (merged) report files there.

    Parameters
    ----------
    run_dirs : sequence of str or path-like
        One or more run folders. Several give one table; rows keep their run's name.
    out : str or path-like, optional
        Folder for report.csv/md/html, the pictures (made from the stored confusion matrices) and
        ``metrics.json`` (a report, not a run: it holds no models). Written as ``classify`` writes a run: one
        process at a time, built beside and renamed in; a folder that is not empty is refused unless it is
        a report and ``overwrite`` is set, and a run is never written into.
        The runs' mistakes are shown when every run records them.
    overwrite : bool, default=False
        Replace an existing report at ``out``, and an existing ``mistakes`` file.
    mistakes : str or path-like, optional
        A CSV to write the report's lists of mistakes to (``furnitype.classify.mistakes.COLUMNS``): per feature
        set, the misclassified test photos and the possible label errors, up to 50 of each. Never one of the
        photos it lists.

    Returns
    -------
    Run
        One run as it is, or the merged view (``path`` is ``out``, or ``None``).

    Raises
    ------
    InputError
        No runs, a run folder that does not exist, an ``out`` that may not be written (see ``classify``), or
        ``mistakes`` asked of a run that records none.
    StoreError
        A damaged run, or another process writing ``out``.
    """
    if not run_dirs:
        raise InputError("give at least one run folder.")
    if out is not None:
        check_output(out, kind="folder")
        refuse_inputs({"--out": out}, [d for d in run_dirs if os.path.realpath(d) != os.path.realpath(out)])
    if mistakes is not None:
        check_output(mistakes)
        refuse_inputs({"--mistakes": mistakes}, run_dirs, kept=run_dirs)
    folders = [Path(d) for d in run_dirs]
    names = _run_names(folders)
    runs = [load_run(folder) for folder in folders]
    recorded = _recorded_mistakes(folders, names)
    if mistakes is not None:
        if recorded is None:
            missing = [str(folder) for folder in folders if read_mistakes(folder) is None]
            raise InputError(
                f"run {', '.join(missing)} records no mistakes (made by an earlier furnitype); "
                "train it again with furnitype classify."
            )
        refuse_photos({"--mistakes": mistakes}, (m.path for m in recorded))
        refuse_existing({"--mistakes": mistakes}, overwrite=overwrite)
    if out is None:
        if mistakes is not None and recorded is not None:
            write_mistakes_csv(recorded, mistakes)
        if len(runs) == 1:
            return runs[0]
    if len(runs) > 1:
        document = merge_documents([(name, run.document) for name, run in zip(names, runs, strict=True)])
    else:
        document = dataclasses.replace(runs[0].document, kind=REPORT_KIND, merged_from=names)
    if out is None:
        return Run(None, document)
    refuse_one_of(out, folders, str(out))
    with building(out, kind=REPORT_KIND, overwrite=overwrite) as folder:
        if recorded is not None:
            write_mistakes(folder.path / MISTAKES_FILE, recorded)
        write_report(document, folder.path, recorded, runs=folders)
        write_run_document(folder.path, document)
        if mistakes is not None and recorded is not None:  # only once --out is known to be writable
            write_mistakes_csv(recorded, mistakes)
    return Run(Path(out), document)


def _run_names(folders: Sequence[Path]) -> list[str]:
    """Each run's name in a merged report: its folder's name, with as many folders above it as it takes to tell
    runs of the same name apart (``2024/vgg``, ``2025/vgg``); a run given twice is refused.

    Raises
    ------
    InputError
        The same run folder is given twice (also through a symbolic link).
    """
    real = [Path(os.path.realpath(folder)) for folder in folders]  # "." is named by its folder's name
    for i, path in enumerate(real):
        if path in real[:i]:
            first = folders[real.index(path)]
            also = "" if str(first) == str(folders[i]) else f" (as {first} and {folders[i]})"
            raise InputError(f"run {folders[i]} is given twice{also}; give each run once.")
    for depth in range(1, max(len(path.parts) for path in real) + 1):
        names = ["/".join(path.parts[-depth:]).lstrip("/") or "/" for path in real]
        if len(set(names)) == len(names):
            return names
    raise AssertionError("distinct real paths have distinct names")  # unreachable: the full paths differ


def _recorded_mistakes(folders: Sequence[Path], names: Sequence[str]) -> list[Mistake] | None:
    """The runs' recorded mistakes, feature sets named ``run/key`` when several; None when a run records none."""
    found = []
    for folder, name in zip(folders, names, strict=True):
        mistakes = read_mistakes(folder)
        if mistakes is None:
            return None
        if len(folders) > 1:
            mistakes = [dataclasses.replace(m, features=f"{name}/{m.features}") for m in mistakes]
        found += mistakes
    return found


def _check_options(feature_files, models, test_files, test_size, val_size, cv, seed, class_weight,
                   fuse) -> RunOptions:
    if not feature_files:
        raise InputError("give at least one feature file.")
    if fuse and len(feature_files) < 2:
        raise InputError("fusing needs at least 2 feature files (the same photos, by other networks or settings).")
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if m.strip()]
    unknown = [m for m in names if m not in MODEL_NAMES]
    if unknown or not names:
        raise InputError(f"unknown model {', '.join(unknown) or '(none)'}; choose from {', '.join(MODEL_NAMES)}.")
    if test_files and test_size is not None:
        raise InputError("give test files or a test size, not both.")
    if test_size is not None and not (_is_number(test_size) and 0 < test_size < 1):
        raise InputError(f"test size must be between 0 and 1. Received: test_size={test_size!r}")
    if not (_is_number(val_size) and 0 <= val_size < 1):
        raise InputError(f"validation size must be in [0, 1). Received: val_size={val_size!r}")
    if not (_is_integer(cv) and cv >= 2):
        raise InputError(f"cross-validation needs at least 2 folds. Received: cv={cv!r}")
    if not (_is_integer(seed) and 0 <= seed <= MAX_SEED):
        raise InputError(f"seed must be an integer from 0 to {MAX_SEED}. Received: seed={seed!r}")
    if class_weight not in CLASS_WEIGHTS:
        raise InputError(f"class weight must be none or balanced. Received: class_weight={class_weight!r}")
    return RunOptions(
        feature_files=[str(f) for f in feature_files],
        models=list(dict.fromkeys(names)),
        test_files=[str(f) for f in test_files],
        test_size=None if test_files else (test_size or DEFAULT_TEST_SIZE),
        val_size=val_size,
        cv=cv,
        seed=seed,
        class_weight=class_weight,
        min_photos_per_class=MIN_PHOTOS_PER_CLASS,
        fuse=bool(fuse),
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _new_model(name: str, options: RunOptions, model_params: Mapping[str, Mapping] | None):
    """An unfitted model with the run's options (those it takes) and its own ``model_params``, both checked."""
    given = dict((model_params or {}).get(name, {}))
    unknown = sorted(set(model_params or {}) - set(MODELS)) + sorted(set(given) - set(MODELS[name]().get_params()))
    if unknown:
        raise InputError(f"model parameters: {unknown[0]!r} is not a model, or not a parameter of {name}.")
    params = {
        "cv": options.cv,
        "validation_fraction": options.val_size,
        "class_weight": options.class_weight,
        "random_state": options.seed,
    }
    try:
        return make_model(name, **params).set_params(**given).check_params()
    except ValueError as err:  # scikit-learn's InvalidParameterError: one line naming the parameter
        raise InputError(f"model parameters of {name}: {err}") from err


def _feature_set_record(data: TrainTestSet, baseline: Baseline) -> FeatureSetRecord:
    meta = data.train.meta
    return FeatureSetRecord(
        file=data.train.file,
        test_file=data.test_file,
        backbone=meta.get("backbone"),
        weights=data.weights,
        settings=data.train.settings,
        meta={k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, type(None)))},
        feature_dim=int(data.train.features.shape[1]),
        classes=data.classes.tolist(),
        dropped_classes=data.dropped,
        n_train=len(data.train),
        n_test=len(data.test),
        baseline=baseline.summary(),
        parts=data.parts,
    )


def _write_run(run_dir: Path, document: RunDocument, sets: Sequence[TrainTestSet], mistakes: list[Mistake]) -> None:
    """Write a run's metadata, split, mistakes and report (the models are already saved)."""
    split = []
    for data in sets:
        write_feature_set(run_dir / "models" / data.key, document.feature_sets[data.key])
        if data.missing:
            write_missing(run_dir / "models" / data.key / MISSING_FILE, data.missing)
        for part, rows in (("train", data.train), ("test", data.test)):
            split += [(data.key, g, p, y, part) for g, p, y in zip(rows.sha256, rows.paths, rows.labels, strict=True)]
    write_split(run_dir / SPLIT_FILE, split)
    write_mistakes(run_dir / MISTAKES_FILE, mistakes)
    write_report(document, run_dir, mistakes)
    write_run_document(run_dir, document)
