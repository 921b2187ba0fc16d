"""The photos a run trains and tests on: feature files loaded, checked, paired with test files, and split.

Every feature file is split the same way: stratified by class, seeded, and by image content (sha256), so
identical photos never straddle training and test, and two files of the same photos get the same split. A
separately extracted test file is paired with the feature file of the same settings instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from furnitype import features as store
from furnitype.classify.fused import MISSING_FILE, Missing, fuse, joined, missing_warning
from furnitype.classify.metadata import FeaturePart
from furnitype.classify.runfiles import CONTROL_CHARACTERS
from furnitype.classify.split import ContentSplit, max_splits
from furnitype.errors import InputError, SettingsMismatchError
from furnitype.extract.keras_backend import DEFAULT_BACKEND
from furnitype.features.store import short_ids

#: A class needs this many distinct photos (by content) to be trained on; smaller classes are dropped.
MIN_PHOTOS_PER_CLASS = 2


@dataclass(frozen=True)
class TrainTestSet:
    """The labelled rows of one feature file, split into training and test rows.

    Attributes
    ----------
    key : str
        Name of the feature set in the run (the file's name without ``.h5``, made unique).
    train, test : FeatureSet
        The training rows, and the test rows (held out of the same file, or from a separate test file);
        each keeps the ``meta`` and ``file`` of the file it comes from.
    test_file : str
        The separate test file ("" when the test rows were held out).
    dropped : list of str
        Classes left out for having fewer than ``MIN_PHOTOS_PER_CLASS`` distinct photos.
    parts : list of FeaturePart or None
        A fused set's feature files, in column order (None for one feature file).
    missing : list of Missing
        Photos of a fused set that not every part holds (left out).
    """

    key: str
    train: store.FeatureSet
    test: store.FeatureSet
    test_file: str
    dropped: list[str]
    parts: list[FeaturePart] | None = None
    missing: list[Missing] = dataclasses.field(default_factory=list)

    @property
    def backbone(self) -> str:
        return str(self.train.meta.get("backbone", "?"))

    @property
    def weights(self) -> str:
        """Short name of the weights (``file a9f13754``; a fused set's parts' joined: ``file a9f13754+random``)."""
        if self.parts is not None:
            return joined([part.weights for part in self.parts])
        return weights_label(self.train.meta.get("weights"))

    @property
    def weights_identity(self) -> str | None:
        """The weights' full identity as the feature file records it; None for a fused set (one per part)."""
        return None if self.parts is not None else self.train.meta.get("weights")

    @property
    def classes(self) -> np.ndarray:
        """The training classes, sorted: class index ``j`` is ``classes[j]``."""
        return np.unique(self.train.labels)

    @property
    def y_test(self) -> np.ndarray:
        """The test rows' class indices."""
        return np.searchsorted(self.classes, self.test.labels)

    @property
    def test_set_id(self) -> str:
        """A short digest of the test photos' sha256 set: equal for rows scored on the same photos."""
        return hashlib.sha256("\n".join(sorted(set(self.test.sha256.tolist()))).encode()).hexdigest()[:12]

    def describe(self) -> str:
        """One line: training and test rows, classes, feature dimension."""
        return (
            f"{self.key}: {len(self.train)} training and {len(self.test)} test rows, "
            f"{len(self.classes)} classes, {self.train.features.shape[1]} features"
        )


def load_train_test_sets(
    feature_files: Sequence[str | os.PathLike],
    test_files: Sequence[str | os.PathLike],
    *,
    test_size: float,
    seed: int,
    warn: Callable[[str], None],
    fuse_files: bool = False,
) -> list[TrainTestSet]:
    """Load feature files (and test files) and split each into training and test rows.

    Parameters
    ----------
    feature_files : sequence of path
    test_files : sequence of path
        Empty, or one per feature file, each paired with the feature file of the same settings.
    test_size : float
        Share of each class's distinct photos held out when there are no test files.
    seed : int
        Seeds the split.
    warn : callable taking a str
        Called with each problem worked around (unlabelled rows, a dropped class, test photos seen in training,
        photos that not every fused file holds).
    fuse_files : bool, default=False
        One feature set of all the feature files' rows of the same photos, side by side (``furnitype.classify.
        fused``), instead of one set per file; each test file is paired with the part of its settings.

    Raises
    ------
    InputError
        A missing, empty or unlabelled file, too few photos, a test class unknown to training, a fused photo
        whose labels differ between parts.
    SettingsMismatchError
        A test file whose settings match no feature file.
    """
    trains = [_load_labelled(f, warn) for f in feature_files]
    tests = [_load_labelled(f, warn) for f in test_files]
    test_for = _match_tests(trains, tests)
    keys = _unique_keys([Path(fs.file).stem for fs in trains])
    parts: list[FeaturePart] | None = None
    missing: list[Missing] = []
    if fuse_files:
        parts = [_part(fs, test_for.get(fs.file)) for fs in trains]
        key = "+".join(keys)
        fused, missing = fuse(trains)
        fused_test = None
        if tests:
            fused_test, missing_tests = fuse([test_for[fs.file] for fs in trains])
            missing += missing_tests
            test_for = {fused.file: fused_test}
        if missing:
            warn(missing_warning(key, missing, f"models/{key}/{MISSING_FILE} of the run"))
        if len(fused) == 0:
            raise InputError(f"{fused.file}: no photo is in every fused feature file; nothing to train on.")
        keys, trains = [key], [fused]
    sets = []
    for key, labelled in zip(keys, trains, strict=True):
        labelled, dropped = _drop_small_classes(labelled, warn)
        test_file = test_for.get(labelled.file)
        if test_file is None:
            splitter = ContentSplit(test_size, random_state=seed)
            train_rows, test_rows = next(splitter.split(labelled.features, labelled.labels, labelled.sha256))
            train, test = _subset(labelled, train_rows), _subset(labelled, test_rows)
        else:
            train, test = labelled, _subset(test_file, _unseen_test_rows(labelled, test_file, dropped, warn))
        if max_splits(train.labels, train.sha256) < 2:
            raise InputError(
                f"{train.file}: too few photos to cross-validate; every class has a single training photo."
            )
        test_name = test_file.file if test_file is not None else ""
        sets.append(TrainTestSet(key, train, test, test_name, dropped, parts, missing))
    return sets


def weights_label(weights: str | None) -> str:
    """A short name for a feature file's weights identity: ``imagenet``, ``random``, ``file a9f13754``."""
    if not weights:
        return "?"
    if weights.startswith("none"):
        return "random"
    if weights.startswith("sha256:"):
        return f"file {weights[len('sha256:') :][:8]}"
    return weights


def _part(fs: store.FeatureSet, test: store.FeatureSet | None) -> FeaturePart:
    """A fused set's record of one of its feature files."""
    return FeaturePart(
        file=fs.file,
        test_file=test.file if test is not None else "",
        backbone=fs.meta.get("backbone"),
        weights=weights_label(fs.meta.get("weights")),
        settings=fs.settings,
        meta={k: v for k, v in fs.meta.items() if isinstance(v, (str, int, float, bool, type(None)))},
        feature_dim=int(fs.features.shape[1]),
    )


def _load_labelled(path, warn) -> store.FeatureSet:
    """Load a feature file and keep its labelled rows; refuse an empty or unlabelled one (``load`` refuses one
    holding features that are not finite: damage)."""
    fs = store.load(path)
    if len(fs) == 0:
        raise InputError(f"{path} is empty: it holds no photos.")
    labelled = fs.labels != ""
    if not labelled.any():
        raise InputError(
            f"{path} has no labels; classify needs labelled photos (class folders or a manifest with labels)."
        )
    unusable = [label for label in fs.classes if CONTROL_CHARACTERS.search(label)]
    if unusable:
        raise InputError(
            f"{path} has the class {unusable[0]!r}, which a run cannot record: a class name is one line without "
            "control characters; rename its folder (or fix the manifest) and extract again."
        )
    if not labelled.all():
        warn(f"{path}: {int((~labelled).sum())} unlabelled rows ignored.")
        fs = _subset(fs, labelled)
    return fs


def _subset(fs: store.FeatureSet, rows: np.ndarray) -> store.FeatureSet:
    """The given rows (indices or a mask) of a feature set, with its metadata."""
    labels = fs.labels[rows]
    return dataclasses.replace(
        fs,
        features=fs.features[rows],
        paths=fs.paths[rows],
        labels=labels,
        sha256=fs.sha256[rows],
        classes=sorted(set(labels.tolist())),
    )


def _match_tests(trains, tests) -> dict[str, store.FeatureSet]:
    """Pair each test file with the feature file of the same settings; every feature file needs one."""
    if not tests:
        return {}
    pairs: dict[str, store.FeatureSet] = {}
    for test in tests:
        match = next((t for t in trains if _same_settings(t, test)), None)
        if match is None:
            closest = next((t for t in trains if t.meta.get("backbone") == test.meta.get("backbone")), trains[0])
            differing = [k for k in store.SETTING_KEYS if str(closest.meta.get(k)) != str(test.meta.get(k))]
            had = ", ".join(_shown(k, test.meta) for k in differing) or "other feature dimensions"
            want = ", ".join(_shown(k, closest.meta) for k in differing) or "other feature dimensions"
            raise SettingsMismatchError(
                f"test file {test.file} was made with {had}, but {closest.file} with {want}; a model can only be "
                f"tested on features made with its own settings: extract the test photos with --like {closest.file}."
            )
        if match.file in pairs:
            raise InputError(f"two test files ({pairs[match.file].file}, {test.file}) match {match.file}.")
        pairs[match.file] = test
    missing = [t.file for t in trains if t.file not in pairs]
    if missing:
        raise InputError(f"no test file has the settings of {', '.join(missing)}; give one per feature file.")
    return pairs


def _shown(key: str, meta: dict) -> str:
    """``pooling=avg``; hashes cut to 12 digits; an int8 quantization as its network: ``int8 network sha256:…``."""
    value = str(meta.get(key, DEFAULT_BACKEND if key == "backend" else None))  # no backend recorded: TensorFlow's
    network = re.search(r"network=(sha256:\S+)", value) if key == "quantization" else None
    return f"int8 network {short_ids(network.group(1))}" if network else f"{key}={short_ids(value)}"


def _same_settings(a: store.FeatureSet, b: store.FeatureSet) -> bool:
    return a.settings == b.settings and a.features.shape[1] == b.features.shape[1]


def _drop_small_classes(fs: store.FeatureSet, warn) -> tuple[store.FeatureSet, list[str]]:
    photos: dict[str, set[str]] = {label: set() for label in fs.classes}
    for label, digest in zip(fs.labels, fs.sha256, strict=True):
        photos[label].add(digest)
    small = sorted(label for label, digests in photos.items() if len(digests) < MIN_PHOTOS_PER_CLASS)
    for label in small:
        warn(
            f"{fs.file}: class {label!r} has {len(photos[label])} photo; a class needs at least "
            f"{MIN_PHOTOS_PER_CLASS} to be trained and tested, so it is left out."
        )
    if len(photos) - len(small) < 2:
        raise InputError(
            f"{fs.file}: fewer than 2 classes have {MIN_PHOTOS_PER_CLASS} or more photos; nothing to learn."
        )
    if not small:
        return fs, []
    return _subset(fs, ~np.isin(fs.labels, small)), small


def _unseen_test_rows(train: store.FeatureSet, test: store.FeatureSet, dropped: list[str], warn) -> np.ndarray:
    """Rows of a test file to score: refuse unknown classes, leave out photos also used in training."""
    unknown = sorted(set(test.classes) - set(train.classes))
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


def _unique_keys(stems: list[str]) -> list[str]:
    keys: list[str] = []
    for stem in stems:
        key, n = stem, 2
        while key in keys:
            key, n = f"{stem}-{n}", n + 1
        keys.append(key)
    return keys
