"""``duplicates``: groups of identical photos and of near-duplicates in a feature store, label conflicts first.

A store keys its rows by content: a photo stored under several paths has a row per path, all with its sha256
and its features. Each content is a node; two contents are joined when one is among the other's nearest
neighbours (``NEIGHBOURS``) within ``max_distance`` (cosine distance of their features); a group is a connected
component of more than one row. A group of one content is ``exact`` (the same bytes under several paths), one of
several contents is ``near``. Groups whose photos carry different labels come first (one product filed under two
categories: a label to fix), then larger groups first.

Below ``ann.THRESHOLD`` live rows (or with ``exact=True``) the rows are loaded and each content's neighbours are
found by exact search over the contents. Above it the store's approximate index gives each row's ``NEIGHBOURS``
nearest other rows (exact distances, ``ann.all_neighbours``); rows are mapped to contents, pairs within one
content dropped, and only the features of the rows in groups are read. There a content stored under more than
``NEIGHBOURS`` paths can fill a row's neighbours with its own copies and hide a near copy.
"""

from __future__ import annotations

import csv
import io
import numbers
import os
import shlex
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from furnitype.errors import InputError, StoreError
from furnitype.features import ann
from furnitype.features.index import CosineIndex
from furnitype.features.store import FeatureSet, load, read_meta, store_files
from furnitype.features.view import open_store
from furnitype.outputs import (
    check_output,
    data_frame,
    refuse_existing,
    refuse_inputs,
    refuse_photos,
    replace_file,
    significant,
)

#: The default ``max_distance``: measured on VGG16 features of 2,657 product photos (docs/cli.md, duplicates).
MAX_DISTANCE = 0.05
#: Cosine distance that float32 rounding gives rows with identical features (measured up to 7e-7 for 512 and
#: 2,048 features): such rows are at distance 0, so that ``max_distance=0`` groups them.
_ROUNDING = 2e-6
#: Nearest neighbours of each content searched for near-duplicates.
NEIGHBOURS = 10
#: Contents searched at once (bounds the neighbour arrays in memory).
_BATCH = 4096
#: The columns of the CSV ``duplicates`` writes, in order.
CSV_COLUMNS = ("group", "kind", "conflict", "path", "label", "sha256", "distance")


@dataclass(frozen=True)
class GroupPhoto:
    """A photo of a group: its path, label ("" when it has none), sha256, and cosine distance to the group's
    first photo."""

    path: str
    label: str
    sha256: str
    distance: float

    def as_dict(self) -> dict:
        """``{"path", "label", "sha256", "distance"}``: no label is None; the distance has 6 significant digits."""
        return {"path": self.path, "label": self.label or None, "sha256": self.sha256,
                "distance": significant(self.distance)}


@dataclass(frozen=True)
class Group:
    """Photos that are the same (``kind`` "exact": one content under several paths) or look alike (``kind``
    "near": several contents joined by neighbours within the distance).

    Attributes
    ----------
    kind : {"exact", "near"}
    photos : list of GroupPhoto
        The most common label's photos first, then the other labels'; within a label, by cosine distance to the
        first photo.
    """

    kind: str
    photos: list[GroupPhoto]

    @property
    def labels(self) -> list[str]:
        """The distinct labels of its photos (not the empty one), most common first."""
        counts = Counter(p.label for p in self.photos if p.label)
        return [label for label, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]

    @property
    def conflict(self) -> bool:
        """Its photos carry different labels."""
        return len(self.labels) > 1

    def as_dict(self) -> dict:
        """``{"kind", "conflict", "labels", "photos": [{"path", "label", "sha256", "distance"}]}``."""
        return {"kind": self.kind, "conflict": self.conflict, "labels": self.labels,
                "photos": [p.as_dict() for p in self.photos]}


@dataclass(frozen=True)
class DuplicatesResult:
    """What one ``duplicates`` call found.

    Attributes
    ----------
    groups : list of Group
        Groups whose labels differ first, then by size (largest first), exact before near, then by first path.
    file : str
        The feature file.
    rows, contents : int
        Rows of the file, and distinct contents among them.
    max_distance : float
    seconds : float
    """

    groups: list[Group]
    file: str
    rows: int
    contents: int
    max_distance: float
    seconds: float = 0.0

    @property
    def conflicts(self) -> int:
        """Groups whose photos carry different labels."""
        return sum(group.conflict for group in self.groups)

    def count(self, kind: str) -> int:
        """Groups of ``kind`` ("exact" or "near")."""
        return sum(group.kind == kind for group in self.groups)

    def summary(self) -> str:
        """One line: groups found (exact, near), how many carry different labels, photos in them."""
        photos = sum(len(group.photos) for group in self.groups)
        return (
            f"{_groups(len(self.groups))} of duplicate photos in {self.file} ({self.count('exact'):,} exact, "
            f"{self.count('near'):,} near within {self.max_distance:g}), {self.conflicts:,} with different labels; "
            f"{photos:,} of {self.rows:,} photos in groups; {self.seconds:.1f} s"
        )

    def as_dict(self) -> dict:
        """JSON-ready: the file, the counts and the groups (numbered from 1, in order)."""
        return {
            "file": self.file,
            "max_distance": self.max_distance,
            "rows": self.rows,
            "contents": self.contents,
            "exact_groups": self.count("exact"),
            "near_groups": self.count("near"),
            "conflicting_groups": self.conflicts,
            "seconds": significant(self.seconds),
            "groups": [{"group": number, **group.as_dict()} for number, group in enumerate(self.groups, 1)],
        }

    def records(self) -> list[dict]:
        """One record per photo of every group, in order: the CSV's columns (``CSV_COLUMNS``)."""
        return [
            {"group": number, "kind": group.kind, "conflict": group.conflict, "path": photo.path,
             "label": photo.label, "sha256": photo.sha256, "distance": photo.distance}
            for number, group in enumerate(self.groups, 1)
            for photo in group.photos
        ]

    def to_frame(self):
        """The groups' photos as a pandas DataFrame, a row per photo: the CSV's columns (``CSV_COLUMNS``). Needs
        pandas (``pip install 'furnitype[pandas]'``)."""
        return data_frame(self.records(), order=CSV_COLUMNS,
                          attrs={"file": self.file, "max_distance": self.max_distance})

    def format_table(self) -> str:
        """Aligned text: a line per group (number, kind, size, labels), then its photos (distance, label, path)."""
        lines = []
        for number, group in enumerate(self.groups, 1):
            labels = ", ".join(group.labels) or "no label"
            differ = "labels differ: " if group.conflict else ""
            lines.append(f"{number:>3}  {group.kind}, {len(group.photos)} photos, {differ}{labels}")
            lines += [f"     {p.distance:.4f}  {p.label or '-':<12} {p.path}" for p in group.photos]
        return "\n".join(lines)

    def write_csv(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write a row per photo of every group (``CSV_COLUMNS``; distances with 6 significant digits), replacing
        an existing ``path`` only with ``overwrite``; written beside it and renamed into place."""
        path = check_output(path)
        refuse_existing({"--out": path}, overwrite=overwrite)
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for record in self.records():
            record["conflict"] = str(record["conflict"]).lower()
            record["distance"] = significant(record["distance"])
            writer.writerow(record.values())
        return replace_file(path, text.getvalue().encode("utf-8"))  # a store's paths are UTF-8 (extract skips others)


def duplicates(
    features: str | os.PathLike,
    *,
    max_distance: float = MAX_DISTANCE,
    out: str | os.PathLike | None = None,
    sheet: str | os.PathLike | None = None,
    overwrite: bool = False,
    exact: bool | None = None,
) -> DuplicatesResult:
    """Groups of identical and of near-identical photos in a feature file, those with different labels first.

    Parameters
    ----------
    features : path
        A feature file written by ``furnitype extract``.
    max_distance : float, default=MAX_DISTANCE
        Cosine distance (0 to 2) within which two photos are near-duplicates; 0 groups only identical features.
    out : path, default=None
        Also write the groups as CSV there (``DuplicatesResult.write_csv``).
    sheet : path, default=None
        Also draw the groups, a row each, as a PNG there (``furnitype.reports.sheet.groups_sheet``).
    overwrite : bool, default=False
        Replace an existing ``out`` or ``sheet`` file. Both are checked before any work; neither is ever the
        feature file (nor its journal or lock file) or one of its photos.
    exact : bool, default=None
        True: load every row and search exactly (the default below ``ann.THRESHOLD`` rows). None above it, or
        False: each row's ``NEIGHBOURS`` nearest rows through the store's approximate index (exact distances;
        only the rows in groups are loaded); a content under more than ``NEIGHBOURS`` paths can hide a near copy.

    Returns
    -------
    DuplicatesResult

    Raises
    ------
    InputError
        ``max_distance`` out of [0, 2], a missing feature file, or an ``out`` or ``sheet`` that cannot be
        written.
    StoreError
        The feature file is damaged or not furnitype's.
    """
    started = time.perf_counter()
    if isinstance(max_distance, bool) or not isinstance(max_distance, numbers.Real) or not 0 <= max_distance <= 2:
        raise InputError(f"max_distance must be a cosine distance from 0 to 2. Received: max_distance={max_distance}")
    outputs = {"--out": out, "--sheet": sheet}
    for path in (out, sheet):
        if path is not None:
            check_output(path)
    refuse_inputs(outputs, store_files(features))
    if exact or (exact is None and read_meta(features)["n_rows"] < ann.THRESHOLD):
        fs = load(features)
        refuse_photos(outputs, fs.paths)  # the photos listed and drawn
        refuse_existing(outputs, overwrite=overwrite)
        found = find_groups(fs, max_distance=max_distance)
    else:
        neighbourhoods = ann.all_neighbours(features, NEIGHBOURS, exact=False)
        refuse_photos(outputs, neighbourhoods.paths)
        refuse_existing(outputs, overwrite=overwrite)
        found = _index_groups(features, neighbourhoods, max_distance)
    result = replace(found, seconds=time.perf_counter() - started)
    if sheet is not None:  # first: drawing takes long, and Ctrl-C then leaves neither file written
        from furnitype.reports.sheet import groups_sheet

        title = (f"{features}: {_groups(len(result.groups))} of duplicate photos (cosine distance up to "
                 f"{max_distance:g}), {result.conflicts:,} with different labels")
        groups_sheet(result.groups, sheet, title=title)
    if out is not None:
        result.write_csv(out, overwrite=overwrite)
    return result


def find_groups(feature_set: FeatureSet, *, max_distance: float = MAX_DISTANCE) -> DuplicatesResult:
    """The groups of a loaded feature set (``duplicates`` without its files); ``seconds`` is 0."""
    sha, first_row, node = np.unique(feature_set.sha256, return_index=True, return_inverse=True)
    node = node.reshape(-1)
    vectors = feature_set.features[first_row]  # rows of one content hold its features
    a, b = _near_pairs(vectors, NEIGHBOURS, max_distance + _ROUNDING)
    groups = [_group(feature_set, rows, node) for rows in _components(a, b, node, len(sha))]
    return _result(groups, feature_set.file, len(feature_set), len(sha), max_distance)


def _index_groups(features: str | os.PathLike, nb: ann.Neighbourhoods, max_distance: float) -> DuplicatesResult:
    """The groups from each live row's nearest rows (``ann.all_neighbours``): rows joined through their
    contents; only the features of the rows in groups are read."""
    sha, node = np.unique(nb.sha256, return_inverse=True)
    node = node.reshape(-1)
    a = np.repeat(np.arange(len(nb.paths)), nb.neighbours.shape[1])
    b = nb.neighbours.reshape(-1)
    near = (nb.distances.reshape(-1) <= max_distance + _ROUNDING) & (node[a] != node[b])
    members = _components(node[a[near]], node[b[near]], node, len(sha))
    grouped = np.unique(np.concatenate(members)) if members else np.zeros(0, np.intp)
    with open_store(features) as view:
        live = view.live("rows")
        rows = live[grouped] if len(live) >= len(nb.paths) else None  # rows appended since: the same positions
        if rows is None or not np.array_equal(view.column("rows", "sha256", rows).astype(str), nb.sha256[grouped]):
            raise StoreError(f"{features} changed while it was read (another process rewrote it); run again.")
        vectors = view.column("rows", "features", rows)
    part = FeatureSet(vectors, nb.paths[grouped], nb.labels[grouped], nb.sha256[grouped], file=str(features))
    groups = [_group(part, np.searchsorted(grouped, rows), node[grouped]) for rows in members]
    return _result(groups, str(features), len(nb.paths), len(sha), max_distance)


def _components(a: np.ndarray, b: np.ndarray, node: np.ndarray, nodes: int) -> list[np.ndarray]:
    """The rows of each group: contents joined by the pairs (``a[i]``, ``b[i]``), rows by their content
    (``node``), components of more than one row."""
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(nodes, nodes))
    _, component = connected_components(graph, directed=False)
    row_component = component[node]
    return _members(row_component, np.bincount(row_component, minlength=1))


def _result(groups: list[Group], file: str, rows: int, contents: int, max_distance: float) -> DuplicatesResult:
    """The groups in order: label conflicts first, then larger, exact before near, then by first path."""
    groups.sort(key=lambda g: (not g.conflict, -len(g.photos), g.kind != "exact", g.photos[0].path))
    return DuplicatesResult(groups, file, rows, contents, float(max_distance))


def _near_pairs(vectors: np.ndarray, k: int, max_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows (``a[i]``, ``b[i]``) of ``vectors`` where ``b`` is among ``a``'s ``k`` nearest neighbours
    within ``max_distance``; exact search, a batch of rows at a time."""
    if len(vectors) < 2:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    index = CosineIndex(vectors)
    found_a, found_b = [], []
    for start in range(0, len(vectors), _BATCH):
        distances, rows = index.kneighbors(vectors[start : start + _BATCH], k + 1)  # +1: each row finds itself
        near = (distances <= max_distance) & (rows != np.arange(start, start + len(rows))[:, None])
        found_a.append(np.nonzero(near)[0] + start)
        found_b.append(rows[near])
    return np.concatenate(found_a), np.concatenate(found_b)


def _members(row_component: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """The rows of each component of more than one row."""
    order = np.argsort(row_component, kind="stable")
    bounds = np.cumsum(sizes)[:-1]
    return [rows for rows in np.split(order, bounds) if len(rows) > 1]


def _group(fs: FeatureSet, rows: np.ndarray, node: np.ndarray) -> Group:
    """A group of ``rows``: the most common label's photos first (the first by path), each label's photos by
    their cosine distance to the first photo."""
    label = {r: str(fs.labels[r]) for r in rows.tolist()}
    counts = Counter(label.values())

    def label_order(r: int) -> tuple:
        return -counts[label[r]] if label[r] else 1, label[r]

    first = min(label, key=lambda r: (label_order(r), str(fs.paths[r])))
    members = list(label)
    distances, found = CosineIndex(fs.features[members]).kneighbors(fs.features[[first]], len(members))
    to_first = {members[i]: 0.0 if d <= _ROUNDING else float(d)
                for i, d in zip(found[0].tolist(), distances[0].tolist(), strict=True)}
    ordered = sorted(members, key=lambda r: (r != first, label_order(r), to_first[r], str(fs.paths[r])))
    photos = [GroupPhoto(str(fs.paths[r]), label[r], str(fs.sha256[r]), to_first[r]) for r in ordered]
    kind = "exact" if len({node[r] for r in members}) == 1 else "near"
    return Group(kind, photos)


def conflict_note(key: str, *parts: FeatureSet) -> list[str]:
    """A run's note on the labelled photos of one feature set (``parts``: its training and held-out test rows):
    how many groups of duplicates at ``MAX_DISTANCE`` carry different labels, and the command that lists them;
    none when no group does. Features of random weights (``--weights none``) put nearly all photos within
    ``MAX_DISTANCE``: for them only identical photos count."""
    def joined(name: str) -> np.ndarray:
        return np.concatenate([getattr(part, name) for part in parts])

    rows = replace(parts[0], features=joined("features"), paths=joined("paths"), labels=joined("labels"),
                   sha256=joined("sha256"))
    random = str(rows.meta.get("weights", "")).startswith("none")
    conflicts = find_groups(rows, max_distance=0 if random else MAX_DISTANCE).conflicts
    if not conflicts:
        return []
    verb = "carries" if conflicts == 1 else "carry"
    photos = "identical photos" if random else (
        f"identical or near-identical photos (cosine distance up to {MAX_DISTANCE:g})")
    command = f"furnitype duplicates {shlex.quote(parts[0].file)}{' --max-distance 0' if random else ''}"
    return [
        f"{key}: {_groups(conflicts)} of {photos} {verb} different labels, one product filed under two classes? "
        f"`{command}` lists them first."
    ]


def _groups(n: int) -> str:
    """``1 group``, ``2 groups``, ``1,000 groups``."""
    return "1 group" if n == 1 else f"{n:,} groups"
