"""A feature file the server reads, following its store: rows that an ``extract`` commits to it appear within
``refresh_s`` seconds, without a restart.

The file is read with the store's own reader (``furnitype.features.load``), under its shared lock, so a reload
sees only committed rows; a reload happens when the file's size, times or inode change, and a reload that
fails (the file damaged or gone a moment) keeps the rows read before. From ``furnitype.features.ann.THRESHOLD``
live rows on, only the rows' paths, labels and digests are held, and the look-alikes go through the store's
approximate index (``SimilarIndex.open``), which reads the candidates' rows under the lock at each search.
Thumbnails are made only of rows of the file, from the recorded path, when it is a regular file that still has
the row's content.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from dataclasses import dataclass

import numpy as np

from furnitype.errors import FurnitypeError, first_line
from furnitype.extract.images import ImageDecodeError, read_file
from furnitype.features.store import load, settings_of
from furnitype.features.view import open_store
from furnitype.reports.sheet import fit
from furnitype.similar import SimilarIndex, _StoredSimilarIndex

log = logging.getLogger("furnitype")


@dataclass(frozen=True)
class Snapshot:
    """The rows of the file at one moment: the settings of its features, its search index (None when not indexed),
    the path and label of each row, and the first row of each content."""

    settings: dict
    index: SimilarIndex | None
    paths: np.ndarray
    labels: np.ndarray
    rows: dict[str, int]

    @classmethod
    def of(cls, settings: dict, index: SimilarIndex | None, paths, labels, sha256) -> Snapshot:
        rows: dict[str, int] = {}
        for i, sha in enumerate(sha256):
            rows.setdefault(sha, i)
        return cls(settings, index, paths, labels, rows)

    def __len__(self) -> int:
        return len(self.paths)

    def path_of(self, sha256: str) -> str | None:
        row = self.rows.get(sha256)
        return None if row is None else str(self.paths[row])

    def label_of(self, sha256: str) -> str:
        row = self.rows.get(sha256)
        return "" if row is None else str(self.labels[row])


class FollowedStore:
    """A feature file read again whenever it changes (``refresh``); ``snapshot`` is its rows as last read.

    Parameters
    ----------
    path : path
    index : bool, default=True
        Index the rows for ``SimilarIndex`` search (the catalogue); the queue of photos to label needs none.

    Raises
    ------
    InputError, StoreError
        The file cannot be read at the start (or, with ``index``, has no rows).
    """

    def __init__(self, path: str | os.PathLike, *, index: bool = True):
        self.path = os.fspath(path)
        self.indexed = index
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.snapshot = self._read()
        self._settings = self.snapshot.settings
        self._warned = ""

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def refresh(self) -> bool:
        """Read the file again if it changed since the last read; True when the rows were replaced."""
        with self._lock:  # one reload at a time
            stamp = self._stat()
            if stamp == self._stamp:
                return False
            try:
                snapshot = self._read()
            except FurnitypeError as err:  # tried again at the next refresh
                self._warn(first_line(err))
                return False
            self._stamp = stamp
            if snapshot.settings != self._settings:  # its rows are no longer the model's features
                self._warn("it was rebuilt with other settings; restart the server to use them")
                return False
            self.snapshot, self._warned = snapshot, ""
            return True

    def _warn(self, problem: str) -> None:
        """Say once (not at every refresh) that the rows read before are kept, and why."""
        if problem != self._warned:
            log.warning("warning: keeping the rows of %s read before: %s", self.path, problem)
            self._warned = problem

    def thumbnail(self, sha256: str, size: int) -> bytes | None:
        """A JPEG of a row's photo fitting a ``size`` square; None when no row has this content, or its recorded
        file is gone, not a regular file, changed, or not an image."""
        path = self.snapshot.path_of(sha256)
        if path is None:
            return None
        try:
            data, digest = read_file(path)
        except ImageDecodeError:
            return None
        if digest != sha256:
            return None
        picture = fit(io.BytesIO(data), size)
        if picture is None:
            return None
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=85)
        return out.getvalue()

    def _stat(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _read(self) -> Snapshot:
        index = SimilarIndex.open(self.path) if self.indexed else None
        if isinstance(index, _StoredSimilarIndex):  # too many rows to hold: read all but their features
            with open_store(self.path) as view:
                live = view.live("rows")
                return Snapshot.of(settings_of(view.meta), index, view.column("rows", "path", live),
                                   view.column("rows", "label", live), view.column("rows", "sha256", live).astype(str))
        fs = load(self.path) if index is None else index.feature_set
        return Snapshot.of(fs.settings, index, fs.paths, fs.labels, fs.sha256.tolist())
