"""``similar``: the stored photos that look most like a query photo, by cosine distance of their features.

A query is either a photo already in the feature file (the same path, or a file with the same content: its
stored row is used and no network is built) or a new photo, extracted exactly as the file's rows were made
(``furnitype.extract.settings.spec_for``). Below ``furnitype.features.ann.THRESHOLD`` live rows (or with
``exact=True``) the rows are loaded and the search is exact, over every row (``furnitype.features.index.CosineIndex``);
above it, the store's approximate index (``furnitype.features.ann``) proposes candidates, which are re-ranked by
exact cosine from their stored rows: distances are exact, and only the candidates' rows are read.

A stored query finds itself first, at distance 0 (``exclude_self`` leaves it out); other rows with the same
content, stored under other paths, are ordinary neighbours at distance 0.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from furnitype.errors import InputError
from furnitype.extract.backbones import weights_files
from furnitype.extract.images import ImageDecodeError, list_images, sha256_file
from furnitype.extract.pipeline import check_batching
from furnitype.features import ann
from furnitype.features.index import CosineIndex
from furnitype.features.layout import OPTIONAL_SETTING_KEYS, SETTING_KEYS
from furnitype.features.store import FeatureSet, load, read_meta, store_files
from furnitype.features.view import open_store
from furnitype.outputs import check_output, refuse_existing, refuse_inputs, refuse_photos, significant


@dataclass(frozen=True)
class Neighbour:
    """A stored photo near a query: its path, label ("" when it has none), cosine distance (0 = same
    direction, up to 2) and the sha256 of its content."""

    path: str
    label: str
    distance: float
    sha256: str = ""

    def as_dict(self) -> dict:
        """``{"path", "label", "distance"}``: no label is None; the distance has 6 significant digits."""
        return {"path": self.path, "label": self.label or None, "distance": significant(self.distance)}


@dataclass(frozen=True)
class Match:
    """The neighbours of one query photo.

    Attributes
    ----------
    query : str
        Absolute path of the query.
    neighbours : list of Neighbour
        Nearest first; empty when the query could not be used.
    label : str
        The query's stored label, else its folder's label when a folder was walked, else "".
    in_store : bool
        The query's row came from the feature file (same path or same content) rather than the network.
    error : str
        Why the query could not be used ("" when it was).
    """

    query: str
    neighbours: list[Neighbour] = field(default_factory=list)
    label: str = ""
    in_store: bool = False
    error: str = ""

    def as_dict(self) -> dict:
        """``{"query", "label", "in_store", "error", "neighbours": [{"path", "label", "distance"}]}``; a value
        that does not apply is None."""
        return {
            "query": self.query,
            "label": self.label or None,
            "in_store": self.in_store,
            "error": self.error or None,
            "neighbours": [n.as_dict() for n in self.neighbours],
        }


@dataclass
class _Query:
    path: str
    label: str = ""
    row: int | None = None
    vector: np.ndarray | None = None
    error: str = ""


class SimilarIndex:
    """The rows of a feature file, indexed for exact cosine nearest-neighbour search.

    Parameters
    ----------
    feature_set : FeatureSet
        From ``furnitype.features.load``; ``SimilarIndex.open(path)`` loads and indexes in one step.
    """

    def __init__(self, feature_set: FeatureSet):
        if not len(feature_set):
            raise InputError(f"{feature_set.file or 'the feature set'} has no rows to search.")
        self.feature_set = feature_set
        self.index = CosineIndex(feature_set.features)
        self._row_by_path = {path: i for i, path in enumerate(feature_set.paths)}
        self._rows_by_sha: dict[str, list[int]] = {}
        for i, sha in enumerate(feature_set.sha256):
            self._rows_by_sha.setdefault(sha, []).append(i)

    @property
    def meta(self) -> dict:
        """The store's settings and provenance (``n_rows``: its live rows)."""
        return self.feature_set.meta

    @classmethod
    def open(cls, path: str | os.PathLike, *, exact: bool | None = None) -> SimilarIndex:
        """Index a feature file's rows: loaded, for exact search, below ``ann.THRESHOLD`` live rows or with
        ``exact=True``; else searched through the store's approximate index (``exact=False`` forces it)."""
        if exact or (exact is None and read_meta(path)["n_rows"] < ann.THRESHOLD):
            return cls(load(path))
        return _StoredSimilarIndex(path)

    def search(
        self,
        queries: Sequence[str | os.PathLike],
        *,
        k: int = 5,
        exclude_self: bool = False,
        weights: str | None = None,
        batch_size: int = 32,
        workers: int | None = None,
        device: str = "auto",
    ) -> list[Match]:
        """The ``k`` nearest stored photos of each query; see ``similar`` for the parameters."""
        if k < 1:
            raise InputError(f"k must be at least 1. Received: k={k}")
        check_batching(batch_size, workers)
        with self._reading():
            items = self._resolve(queries)
            self._extract([q for q in items if q.row is None and not q.error], weights, batch_size, workers, device)
            found = self._found(items, k, exclude_self)
        return [
            Match(q.path, found.get(i, []), q.label, in_store=q.row is not None, error=q.error)
            for i, q in enumerate(items)
        ]

    def search_vectors(self, X: np.ndarray, *, k: int = 5) -> list[list[Neighbour]]:
        """The ``k`` nearest stored photos of each row of ``X``: features of new photos, made with the file's
        settings and rounded to its dtype, as ``search`` makes them."""
        if k < 1:
            raise InputError(f"k must be at least 1. Received: k={k}")
        with self._reading():
            found = self._found([_Query("", vector=np.asarray(row, np.float32)) for row in X], k, False)
        return [found[i] for i in range(len(X))]

    def search_sha256(self, sha256: str, *, k: int = 5, exclude_self: bool = True) -> Match:
        """The ``k`` nearest stored photos of the stored photo with this content (``query`` is its path).

        Raises ``KeyError`` when no row has this content.
        """
        if k < 1:
            raise InputError(f"k must be at least 1. Received: k={k}")
        with self._reading():
            query = self._stored_content(sha256)
            return Match(query.path, self._found([query], k, exclude_self)[0], query.label, in_store=True)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """While searching (the rows are in memory: nothing to open)."""
        yield

    def _stored_content(self, sha256: str) -> _Query:
        """The query of the stored row with this content (``KeyError`` when none has it)."""
        row = self._rows_by_sha[sha256][0]
        fs = self.feature_set
        return _Query(str(fs.paths[row]), str(fs.labels[row]), row)

    def _found(self, items: list[_Query], k: int, exclude_self: bool) -> dict[int, list[Neighbour]]:
        """The neighbours of each usable query, by its position in ``items``."""
        usable = [i for i, q in enumerate(items) if not q.error]
        found: dict[int, list[Neighbour]] = {}
        if usable:
            X = np.stack([self._vector(items[i]) for i in usable])
            distances, rows = self.index.kneighbors(X, k + 1)
            for i, d, r in zip(usable, distances, rows, strict=True):
                found[i] = self._neighbours(items[i], d, r, k, exclude_self)
        return found

    def _resolve(self, queries: Sequence[str | os.PathLike]) -> list[_Query]:
        """Each query file with its stored row when the store has its path or content."""
        items: list[_Query] = []
        for given in queries:
            path = os.path.abspath(given)
            if os.path.isdir(path):
                items += [self._lookup(f.path, f.label) for f in list_images([path]).files]
            elif os.path.exists(path):
                items.append(self._lookup(path, ""))
            else:  # a stored photo no longer on disk: its row still answers
                items.append(self._stored_path(path) or _Query(path, error="file not found"))
        return items

    def _stored_path(self, path: str) -> _Query | None:
        row = self._row_by_path.get(path)
        return None if row is None else _Query(path, str(self.feature_set.labels[row]), row)

    def _extract_meta(self) -> tuple[dict, dict, str]:
        """The store's meta, settings and name (what new queries are extracted with)."""
        fs = self.feature_set
        return fs.meta, fs.settings, fs.file or "the feature set"

    def _lookup(self, path: str, folder_label: str) -> _Query:
        try:
            sha = sha256_file(path)
        except ImageDecodeError as err:
            return _Query(path, folder_label, error=str(err))
        rows = self._rows_by_sha.get(sha)
        if not rows:
            return _Query(path, folder_label)
        row = self._row_by_path.get(path)
        row = row if row in rows else rows[0]
        return _Query(path, str(self.feature_set.labels[row]) or folder_label, row)

    def _extract(self, todo: list[_Query], weights: str | None, batch_size: int, workers: int | None,
                 device: str) -> None:
        """Features of the queries the store does not hold, made with the store's own settings."""
        if not todo:
            return
        from furnitype.extract.backbones import check_memory, get_backbone
        from furnitype.extract.pipeline import feature_batches
        from furnitype.extract.settings import as_stored, spec_for

        meta, settings, name = self._extract_meta()
        spec = spec_for(
            settings,
            weights=weights,
            source=meta.get("weights_source"),
            calibration_photos=meta.get("calibration_photos"),
            what=f"the rows of {name}",
            device=device,
        )
        check_memory(get_backbone(spec.backbone), spec.image_size, batch_size)
        by_path: dict[str, list[_Query]] = {}
        for query in todo:  # a file given twice is extracted once
            by_path.setdefault(query.path, []).append(query)
        for batch in feature_batches(spec, list(by_path), batch_size=batch_size, workers=workers):
            for outcome in batch:
                for query in by_path[outcome.path]:
                    if outcome.features is None:
                        query.error = outcome.reason
                    else:
                        query.vector = as_stored(outcome.features, meta["store_dtype"])

    def _vector(self, query: _Query) -> np.ndarray:
        """A usable query's features: its stored row, or what the network made of it."""
        if query.row is not None:
            return self.feature_set.features[query.row]
        if query.vector is None:
            raise ValueError(f"{query.path} has no features")  # unreachable: such a query has its error set
        return query.vector

    def _neighbours(self, query: _Query, distances, rows, k: int, exclude_self: bool) -> list[Neighbour]:
        pairs = [(int(r), float(d)) for d, r in zip(distances, rows, strict=True) if r != query.row]
        if query.row is not None and not exclude_self:
            pairs.insert(0, (query.row, 0.0))
        fs = self.feature_set
        return [Neighbour(str(fs.paths[r]), str(fs.labels[r]), d, str(fs.sha256[r])) for r, d in pairs[:k]]


class _StoredSimilarIndex(SimilarIndex):
    """``SimilarIndex`` over a store too large to load: the store's approximate index proposes, the stored rows
    decide (``furnitype.features.ann``). Each search reads the store under its shared lock, once."""

    def __init__(self, path: str | os.PathLike):  # not super().__init__: it loads every row
        self.path = path
        meta = read_meta(path)
        if not meta["n_rows"]:
            raise InputError(f"{path} has no rows to search.")
        self._meta = meta
        self._loaded: FeatureSet | None = None

    @property
    def feature_set(self) -> FeatureSet:  # type: ignore[override]
        """All the rows, loaded on first use (a search does not need them)."""
        if self._loaded is None:
            self._loaded = load(self.path)
        return self._loaded

    @property
    def meta(self) -> dict:
        return self._meta

    @property
    def index(self) -> CosineIndex:  # type: ignore[override]
        return CosineIndex(self.feature_set.features)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """The store open under its shared lock for one search: its rows, dead rows and index agree."""
        with open_store(self.path) as view:
            self._view = view
            self._meta = view.meta
            try:
                yield
            finally:
                del self._view

    def _stored_content(self, sha256: str) -> _Query:
        live = self._view.live("rows")
        rows = live[self._live_sha256() == sha256.encode()]
        if not len(rows):
            raise KeyError(sha256)
        row = rows[:1]
        return _Query(str(self._view.column("rows", "path", row)[0]), str(self._view.column("rows", "label", row)[0]),
                      int(row[0]))

    def _live_sha256(self) -> np.ndarray:
        """The digests of the live rows (read once while the file, its rows and its dead rows are the same: rows
        are only appended or killed in place; a file without a ``file_id`` is read each time)."""
        view = self._view
        key = (view.h5.attrs.get("file_id"), view.n["rows"], len(view.live("rows")))
        if key[0] is None or getattr(self, "_sha_key", None) != key:
            self._sha, self._sha_key = view.column("rows", "sha256", view.live("rows")), key
        return self._sha

    def _found(self, items: list[_Query], k: int, exclude_self: bool) -> dict[int, list[Neighbour]]:
        usable = [i for i, q in enumerate(items) if not q.error]
        if not usable:
            return {}
        view = self._view
        stored = sorted({row for i in usable if (row := items[i].row) is not None})
        vectors = dict(zip(stored, view.column("rows", "features", np.array(stored, np.int64)), strict=True))
        X = np.stack([self._vector(items[i]) if (row := items[i].row) is None else vectors[row] for i in usable])
        distances, rows = ann.kneighbors(view, ann.usable_index(view, self.path), X, k + 1)
        wanted = np.unique(np.concatenate([rows.ravel(), np.array(stored, np.int64)]))
        self._strings = {
            int(r): (p, label, sha.decode())
            for r, p, label, sha in zip(wanted.tolist(), view.column("rows", "path", wanted).tolist(),
                                        view.column("rows", "label", wanted).tolist(),
                                        view.column("rows", "sha256", wanted).tolist(), strict=True)
        }
        return {i: self._neighbours(items[i], d, r, k, exclude_self)
                for i, d, r in zip(usable, distances, rows, strict=True)}

    def _neighbours(self, query: _Query, distances, rows, k: int, exclude_self: bool) -> list[Neighbour]:
        pairs = [(int(r), float(d)) for d, r in zip(distances, rows, strict=True) if r != query.row]
        if query.row is not None and not exclude_self:
            pairs.insert(0, (query.row, 0.0))
        return [Neighbour(*self._strings[r][:2], d, self._strings[r][2]) for r, d in pairs[:k]]

    def _lookup(self, path: str, folder_label: str) -> _Query:
        try:
            sha = sha256_file(path)
        except ImageDecodeError as err:
            return _Query(path, folder_label, error=str(err))
        live = self._view.live("rows")
        rows = live[self._live_sha256() == sha.encode()]
        if not len(rows):
            return _Query(path, folder_label)
        paths = self._view.column("rows", "path", rows).tolist()
        row = int(rows[paths.index(path)] if path in paths else rows[0])
        return _Query(path, str(self._view.column("rows", "label", np.array([row]))[0]) or folder_label, row)

    def _stored_path(self, path: str) -> _Query | None:
        live = self._view.live("rows")
        paths = self._view.column("rows", "path", live)
        at = np.flatnonzero(paths == path)
        if not len(at):
            return None
        row = int(live[at[0]])
        return _Query(path, str(self._view.column("rows", "label", np.array([row]))[0]), row)

    def _extract_meta(self) -> tuple[dict, dict, str]:
        meta = self._meta
        return meta, {k: meta.get(k) for k in SETTING_KEYS if k in meta or k not in OPTIONAL_SETTING_KEYS}, str(
            self.path)


def similar(
    features: str | os.PathLike,
    queries: Sequence[str | os.PathLike],
    *,
    k: int = 5,
    exclude_self: bool = False,
    weights: str | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    sheet: str | os.PathLike | None = None,
    overwrite: bool = False,
    exact: bool | None = None,
) -> list[Match]:
    """The ``k`` stored photos nearest to each query photo, by cosine distance of their features.

    Parameters
    ----------
    features : path
        A feature file written by ``furnitype extract``.
    queries : sequence of path
        Image files and/or folders (walked like ``extract``). A query whose path or content is in the feature
        file uses its stored row (a stored path no longer on disk too); other files are extracted with the
        feature file's settings. A query that cannot be used gets a ``Match`` with ``error`` set.
    k : int, default=5
        Neighbours per query (at most the number of rows).
    exclude_self : bool, default=False
        Leave a stored query's own row out (by default it comes first, at distance 0).
    weights : str, default=None
        Weights for extracting new queries (a file, ``imagenet`` or ``none``); None: the feature file's
        recorded weights source. Weights whose identity differs from the recorded one are refused.
    batch_size : int, default=32
    workers : int, default=None
        Decoding workers for new queries, threads or processes past 4 (None: sized to the machine).
    device : str, default="auto"
        Where the network runs for queries not in the store: ``auto`` (the first GPU, else the CPU), ``cpu``,
        ``gpu`` or ``gpu:N``.
    sheet : path, default=None
        Also draw the results as a contact sheet PNG there (``furnitype.reports.sheet``); checked before any
        work. Never one of the photos (a query, a stored photo).
    overwrite : bool, default=False
        Replace an existing ``sheet`` file.
    exact : bool, default=None
        True: load every row and compare the queries with all of them (the reference). None: so below
        ``furnitype.features.ann.THRESHOLD`` live rows (50,000), else through the store's approximate index, kept
        beside it as ``NAME.h5.usearch`` (made or brought up to date first when this process can write there),
        its candidates re-ranked by exact cosine (distances are exact). False: the index whatever the size.

    Returns
    -------
    list of Match
        One per query file, in the order given (a folder's files sorted by path).
    """
    if sheet is not None:
        check_output(sheet)
        refuse_inputs({"--sheet": sheet}, [*store_files(features), *queries])
    index = SimilarIndex.open(features, exact=exact)
    refuse_inputs({"--sheet": sheet}, weights_files(weights, index.meta.get("weights_source")))
    # Every photo the sheet may draw: the queries and the stored photos (their neighbours), listed only when the
    # sheet's file exists.
    refuse_photos({"--sheet": sheet}, itertools.chain(_query_files(queries), _stored_paths(index)))
    refuse_existing({"--sheet": sheet}, overwrite=overwrite)
    matches = index.search(
        queries, k=k, exclude_self=exclude_self, weights=weights, batch_size=batch_size, workers=workers,
        device=device,
    )
    if sheet is not None:
        from furnitype.reports.sheet import contact_sheet

        meta = index.meta
        title = f"{features}: {meta['n_rows']:,} photos, {meta.get('backbone')} {meta.get('pooling')}"
        contact_sheet(matches, sheet, title=title)
    return matches


def _stored_paths(index: SimilarIndex) -> Iterator[str]:
    yield from index.feature_set.paths


def _query_files(queries: Sequence[str | os.PathLike]) -> Iterator[str]:
    """The files ``queries`` name, folders walked (as ``SimilarIndex.search`` walks them)."""
    for given in queries:
        if os.path.isdir(given):
            with contextlib.suppress(InputError):  # a folder without photos: ``search`` says so
                yield from list_images([given]).paths
        else:
            yield os.fspath(given)
