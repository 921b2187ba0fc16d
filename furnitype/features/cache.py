"""The feature cache as one extraction run sees it: what the store holds for the listed files, and the changes
that bring it up to date, committed batch by batch.

A run goes through four steps::

    with FeatureCache(out, settings, meta=provenance) as cache:
        to_hash = cache.compare(listing)      # files whose content must be read (new, or their stat changed)
        cache.hashed(results)                 # their sha256, or why they cannot be read
        for outcomes in engine(spec, cache.todo()):   # one path per content the store lacks
            cache.add(outcomes)               # one transaction: the batch (the first also carries the rest)
        cache.finish()                        # what is left (removals, labels, reused rows); compaction

Nothing that grows with the store is loaded beyond a sorted 64-bit prefix of every sha256 and the folder and
live columns (about 20 bytes a row); paths, labels and stat are read only for rows under the listed folders.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import h5py
import numpy as np

from furnitype.errors import SettingsMismatchError, StoreError, deferred_interrupts
from furnitype.features import ann
from furnitype.features.layout import STAT_UNKNOWN, Folders, Layout, read_at, read_strings, write_at
from furnitype.features.locking import WriterLock
from furnitype.features.store import CompactResult, check_settings, compact_locked
from furnitype.features.view import (
    READ_ERRORS,
    DamagedStoreError,
    StoreView,
    damaged,
    from_file,
    open_store,
    recover,
    remove_leftovers,
)
from furnitype.features.writing import WriteFailed, new_file, transaction, writable, write_failed
from furnitype.outputs import is_utf8, shown_name

#: The reason of a listed file skipped but not recorded: a feature file records only UTF-8 names.
NOT_UTF8 = "not a UTF-8 name"

#: A file modified this close to the moment it was hashed may change again within the same mtime tick:
#: its stat is recorded as unknown, so the next run reads it again (git's "racily clean" rule).
RACY_NS = 2_000_000_000
#: Compact when dead rows and skips are more than this share of all entries.
COMPACT_FRACTION = 0.25
_HEX = np.full(256, 255, np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


@dataclass(slots=True)
class Hashed:
    """What reading one listed file gave: its sha256 and stat, or the reason it could not be read.

    ``gone`` tells a file that is not a photo any more (missing, not a regular file, too large: its entry
    leaves the store) from one that could not be read this time (its entry is kept).
    """

    sha256: str = ""
    stat: tuple[int, int, int, int] | None = None
    reason: str = ""
    gone: bool = True


@dataclass
class RunCounts:
    """What a run did to the store (``ExtractResult`` reports them)."""

    listed: int = 0
    extracted: int = 0
    removed: int = 0
    relabelled: int = 0
    hashed: int = 0
    rows: int = 0
    warnings: list[str] = field(default_factory=list)
    #: The listed files that could not be used, with the reason: ``(path, reason)``.
    skipped_files: list[tuple[str, str]] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)

    @property
    def reused(self) -> int:
        return self.listed - self.skipped - self.extracted


@dataclass
class _Changes:
    """Changes waiting for a transaction: entries to kill, relabel, restat; rows and skips to append."""

    kill: dict = field(default_factory=lambda: {"rows": {}, "skipped": {}})  # index -> label
    labels: dict = field(default_factory=lambda: {"rows": {}, "skipped": {}})  # index -> (old, new)
    stats: dict = field(default_factory=lambda: {"rows": {}, "skipped": {}})  # index -> stat
    copies: list = field(default_factory=list)  # (source row, path, label, sha256, stat, label from source)
    rows: list = field(default_factory=list)  # (path, label, sha256, stat, features)
    skips: list = field(default_factory=list)  # (path, label, sha256, reason, stat)

    def __bool__(self) -> bool:
        return any(self.kill[t] or self.labels[t] or self.stats[t] for t in self.kill) or bool(
            self.copies or self.rows or self.skips
        )


class FeatureCache:
    """A feature store opened by one writer for one extraction run (see the module docstring).

    Parameters
    ----------
    path : path
        The store; a symbolic link is followed (the file it names is written, in place).
    settings : mapping
        The settings of the rows this run makes (``SETTING_KEYS``); a store made with others is refused.
    meta : mapping
        Settings and provenance recorded in a store this run creates.
    overwrite : bool, default=False
        Replace a store made with other settings, or a damaged one (every row of a store with the same settings
        is read to find out), at the first commit (until then it stays).
    """

    def __init__(self, path: str | os.PathLike, settings: Mapping, *, meta: Mapping, overwrite: bool = False):
        self.given = str(path)
        self.settings = dict(settings)
        self.meta = dict(meta)
        self.overwrite = overwrite
        self.counts = RunCounts()
        self._lock: WriterLock | None = None
        self._changes = _Changes()
        self._failed = False
        self._started_ns = time.time_ns()
        self.compacted: CompactResult | None = None

    # -- opening ---------------------------------------------------------------------------------------------

    def __enter__(self) -> FeatureCache:
        self.real = writable(self.given)
        self._lock = WriterLock(self.real, self.given).acquire()
        try:
            discarded = recover(self.real, self.given, discard_damaged=self.overwrite)
            remove_leftovers(self.real)
            self._open(rebuild=discarded)
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()

    def _open(self, *, rebuild: bool) -> None:
        self.fresh, self.upgrade = True, False
        self._empty()
        if rebuild or not os.path.lexists(self.real):
            return
        try:
            with open_store(self.real, given=self.given, check_undo=False) as view:
                self._stored_meta = view.meta
                check_settings(view.meta, {**self.meta, **self.settings}, self.given)
                if self.overwrite:
                    view.verify()  # --overwrite keeps an intact store's rows, never a damaged one's
                self._index(view)
                self.fresh, self.upgrade = False, view.format == 1
        except (SettingsMismatchError, DamagedStoreError):
            if not self.overwrite:
                raise
            self._empty()

    def require(self, settings: Mapping, *, meta: Mapping) -> None:
        """Settings completed after the store was opened (int8: the quantized network, made from the listing)."""
        self.settings, self.meta = dict(settings), dict(meta)
        if self.fresh:
            return
        try:
            check_settings(self._stored_meta, {**self.meta, **self.settings}, self.given)
        except SettingsMismatchError:
            if not self.overwrite:
                raise
            self.fresh, self.upgrade = True, False
            self._empty()

    def _empty(self) -> None:
        self.dim = 0
        self.n = {"rows": 0, "skipped": 0}
        self.live = {"rows": np.zeros(0, np.uint8), "skipped": np.zeros(0, np.uint8)}
        self.folder = {"rows": np.zeros(0, np.int32), "skipped": np.zeros(0, np.int32)}
        self.folders = Folders()
        self.label_counts: Counter | None = Counter()
        self.dead = {"rows": 0, "skipped": 0}
        self._keys = np.zeros(0, np.uint64)
        self._key_rows = np.zeros(0, np.int64)
        self._new_rows: dict[str, int] = {}
        self._skip_reasons: dict[str, str] = {}

    def _index(self, view: StoreView) -> None:
        self.dim = view.dim
        for table in ("rows", "skipped"):
            self.n[table] = view.n[table]
            self.live[table] = view.column(table, "live").astype(np.uint8)
            self.folder[table] = view.column(table, "folder").astype(np.int32)
        self.dead = {"rows": view.dead_rows, "skipped": view.dead_skipped}
        self.folders = Folders(view.folders())
        self.label_counts = None  # counted from the rows at the first commit: a run that changes nothing never does
        keys = np.concatenate(  # in blocks: the digests as text would take 64 bytes a row
            [np.zeros(0, np.uint64)]
            + [
                _prefix_keys(
                    view.column("rows", "sha256", np.arange(start, min(start + 65536, self.n["rows"]))), self.given
                )
                for start in range(0, self.n["rows"], 65536)
            ]
        )
        self._key_rows = np.argsort(keys, kind="stable")
        self._keys = keys[self._key_rows]
        shas = view.column("skipped", "sha256")
        reasons = view.column("skipped", "reason", np.flatnonzero(shas != b""))
        self._skip_reasons = {s.decode(): r for s, r in zip(shas[shas != b""].tolist(), reasons.tolist(), strict=True)}

    @property
    def live_rows(self) -> int:
        return self.n["rows"] - self.dead["rows"]

    # -- the run ---------------------------------------------------------------------------------------------

    def compare(self, listing, *, label: str | None = None, rehash: bool = False) -> list[int]:
        """Match the listed files to what the store holds; return the indices of files to read and hash.

        ``listing`` has ``paths``, ``labels``, ``stats`` (n, 4), ``reasons`` ({index: reason} for files that
        cannot be photos), ``folders`` (walked) and ``unlisted`` ([(folder, reason)] that could not be listed).
        ``label`` labels every listed file; otherwise a file listed without a label keeps its row's label.
        ``rehash`` reads every file even when its stat is unchanged.
        """
        self.listing = listing
        self.explicit_label = label
        n = len(listing.paths)
        self.counts.listed = n
        candidates = self._candidates(listing)
        self._entries = candidates
        match = np.fromiter((candidates.by_path.get(p, -1) for p in listing.paths), np.int64, n)
        self._match = match
        known = match >= 0
        same_stat = np.zeros(n, bool)
        if known.any():
            stored = candidates.stat[match[known]]
            same_stat[known] = (stored == listing.stats[known]).all(axis=1) & (stored[:, 0] >= 0)
        failed = np.zeros(n, bool)
        failed[list(listing.reasons)] = True
        for i in _not_utf8(listing.paths):
            failed[i] = True
            name = shown_name(listing.paths[i])
            self.counts.skipped_files.append((name, NOT_UTF8))
            self.counts.warnings.append(f"skipped {name}: a feature file records only UTF-8 names; rename it")
        unchanged = same_stat & ~failed & (not rehash)
        self._unchanged = unchanged
        self._hashed: dict[int, Hashed] = {}
        for folder, reason in listing.unlisted:
            self.counts.warnings.append(f"could not list {folder} ({reason}); its rows are kept")
        return np.flatnonzero(~unchanged & ~failed).tolist()

    def hashed(self, results: Mapping[int, Hashed]) -> None:
        """Take the sha256 (or the reason) of each file ``compare`` asked for, and plan the changes."""
        self._hashed = dict(results)
        self.counts.hashed = sum(1 for r in results.values() if r.sha256)
        listing, entries, match, changes = self.listing, self._entries, self._match, self._changes
        self._todo: dict[str, list[tuple[str, str, tuple]]] = {}  # sha256 -> (path, label, stat) of each file
        labels = self._labels()
        tables, entry_labels = entries.table, entries.label
        for i in np.flatnonzero(self._unchanged).tolist():
            entry = match[i]
            if tables[entry] == "skipped":
                self.counts.skipped_files.append((listing.paths[i], str(entries.reason[entry])))
            if labels[i] and labels[i] != entry_labels[entry]:
                self._relabel(int(entry), labels[i])
        for i, reason in listing.reasons.items():
            self._unusable(i, Hashed(reason=reason, gone=True), labels[i])
        for i, result in self._hashed.items():
            entry = int(match[i])
            if not result.sha256:
                self._unusable(i, result, labels[i])
                continue
            stat = self._recorded_stat(result.stat)
            if entry >= 0 and entries.sha[entry] == result.sha256.encode():
                if entries.table[entry] == "skipped":
                    self.counts.skipped_files.append((listing.paths[i], str(entries.reason[entry])))
                self._relabel(entry, labels[i])
                if tuple(entries.stat[entry]) != stat:
                    changes.stats[entries.table[entry]][int(entries.index[entry])] = stat
                continue
            if entry >= 0:
                self._kill(entry)
            row = self._row_of(result.sha256)
            path = listing.paths[i]
            if row is not None:
                changes.copies.append((row, path, labels[i], result.sha256, stat, not labels[i]))
            elif result.sha256 in self._skip_reasons:
                changes.skips.append((path, labels[i], result.sha256, self._skip_reasons[result.sha256], stat))
                self.counts.skipped_files.append((path, self._skip_reasons[result.sha256]))
            else:
                self._todo.setdefault(result.sha256, []).append((path, labels[i], stat))
        self._moved(self._remove_unlisted())
        self._sent: dict[str, str] = {}
        # What grows with the listing is not needed any more: the network's memory comes on top of what is left.
        del self.listing, self._entries, self._match, self._unchanged, self._hashed

    def todo(self) -> list[str]:
        """One path per content the store lacks (the others with the same content get copies of its row)."""
        paths = []
        for sha, members in self._todo.items():
            paths.append(members[0][0])
            self._sent[paths[-1]] = sha
        return paths

    def add(self, outcomes: Iterable, *, cpu_seconds: float | None = None) -> None:
        """Commit one batch of network results (objects with ``path``, ``sha256``, ``features``, ``reason``).

        The first commit also carries the changes that need no network (removals, labels, reused rows).
        ``cpu_seconds``: the CPU time the batch took, added to the store's running total (``Layout.add_cpu``).
        """
        extracted = 0
        for outcome in outcomes:
            sha = self._sent.pop(outcome.path)
            members = self._todo.pop(sha)
            features = None if outcome.reason else np.asarray(outcome.features, dtype=np.float32)
            if features is not None and outcome.sha256 == sha:
                stored = features.astype(self.settings.get("store_dtype", "float32"))
                if np.isfinite(stored).all():
                    self._changes.rows += [(path, label, sha, stat, stored) for path, label, stat in members]
                    extracted += 1
                    continue
                reason = "its features are not finite numbers (NaN or infinity): check the weights and precision"
            elif outcome.sha256 == sha:
                reason = outcome.reason
            else:
                reason = outcome.reason or "changed while being read; rerun to include it"
                first = members[0][0]
                for n, (path, label, _) in enumerate(members):
                    why = reason if n == 0 else f"not read: {first}, with the same content, was {reason}"
                    self._changes.skips.append((path, label, "", why, STAT_UNKNOWN))
                    self.counts.skipped_files.append((path, why))
                continue
            self._changes.skips += [(path, label, sha, reason, stat) for path, label, stat in members]
            self.counts.skipped_files += [(path, reason) for path, _, _ in members]
        self._commit(extracted, cpu_seconds)

    def finish(self) -> RunCounts:
        """Commit what is left, compact when dead entries pass ``COMPACT_FRACTION``; return the counts."""
        if self._changes:
            self._commit()
        self.counts.rows = self.live_rows
        dead = self.dead["rows"] + self.dead["skipped"]
        total = self.n["rows"] + self.n["skipped"]
        if dead and dead > COMPACT_FRACTION * total and not self.fresh:
            try:
                self.compacted = compact_locked(self.real, self.given)
            except StoreError as err:
                self.counts.warnings.append(f"{err} (compaction; furnitype compact {self.given} tries again)")
        if not self.fresh:
            try:
                ann.keep_up(self.real, self.given)
            except StoreError as err:
                self.counts.warnings.append(f"{err} (the similarity index; the next similar tries again)")
        return self.counts

    # -- planning helpers ------------------------------------------------------------------------------------

    def _labels(self) -> list[str]:
        if self.explicit_label is not None:
            return [self.explicit_label] * len(self.listing.paths)
        return self.listing.labels

    def _relabel(self, entry: int, label: str) -> None:
        """A listed label (or ``--label``) replaces the stored one; an empty listed label keeps it."""
        old = self._entries.label[entry]
        if label and label != old:
            table = self._entries.table[entry]
            self._changes.labels[table][int(self._entries.index[entry])] = (old, label)
            if table == "rows":
                self.counts.relabelled += 1

    def _unusable(self, i: int, result: Hashed, label: str) -> None:
        entry = int(self._match[i])
        if entry >= 0 and not result.gone:
            self.counts.warnings.append(f"could not read {self.listing.paths[i]} ({result.reason}); its row is kept")
            return
        self.counts.skipped_files.append((self.listing.paths[i], result.reason))
        if entry >= 0:
            if self._entries.table[entry] == "skipped" and self._entries.reason[entry] == result.reason:
                return
            self._kill(entry)
        self._changes.skips.append((self.listing.paths[i], label, "", result.reason, STAT_UNKNOWN))

    def _kill(self, entry: int) -> None:
        self._changes.kill[self._entries.table[entry]][int(self._entries.index[entry])] = self._entries.label[entry]

    def _remove_unlisted(self) -> list[int]:
        """Entries under the walked folders whose file was not listed leave the store (those under a folder
        that could not be listed stay); return the rows among them."""
        entries = self._entries
        listed = np.zeros(len(entries.path), bool)
        listed[self._match[self._match >= 0]] = True
        removed = []
        for entry in np.flatnonzero(~listed & entries.walked).tolist():
            self._kill(entry)
            if entries.table[entry] == "rows":
                removed.append(entry)
        self.counts.removed += len(removed)
        return removed

    def _moved(self, removed: list[int]) -> None:
        """A removed row whose content this run lists under a new path was moved, not removed: relabelled when
        it arrives with another label (a photo moved to the right class folder), else only renamed."""
        arrived: dict[bytes, list[str]] = {}
        for copy in self._changes.copies:
            arrived.setdefault(copy[3].encode(), []).append(copy[2])
        for entry in removed:
            labels = arrived.get(self._entries.sha[entry])
            if labels:
                label = labels.pop()
                self.counts.removed -= 1
                if label and label != self._entries.label[entry]:
                    self.counts.relabelled += 1

    def _row_of(self, sha: str) -> int | None:
        """A row holding features of content ``sha`` (checked against the full digest when copied)."""
        if sha in self._new_rows:
            return self._new_rows[sha]
        key = np.uint64(int(sha[:16], 16))
        at = int(np.searchsorted(self._keys, key))
        if at < len(self._keys) and self._keys[at] == key:
            return int(self._key_rows[at])
        return None

    def _recorded_stat(self, stat) -> tuple[int, int, int, int]:
        if stat is None or stat[1] >= self._started_ns - RACY_NS:
            return STAT_UNKNOWN
        size, mtime_ns, inode, ctime_ns = (int(v) for v in stat)
        return size, mtime_ns, inode, ctime_ns

    def _candidates(self, listing) -> _Entries:
        """The live entries that may be listed: those in the listed files' folders and under walked folders."""
        roots = [os.path.join(folder, "") for folder in listing.folders]
        unlisted = [os.path.join(folder, "") for folder, _ in listing.unlisted]
        walked, kept = set(), set()
        for fid, name in enumerate(self.folders.names):
            inside = os.path.join(name, "")
            if inside.startswith(tuple(roots)):
                walked.add(fid)
                if inside.startswith(tuple(unlisted)):
                    kept.add(fid)
        near = {self.folders.index[d] for d in {os.path.dirname(p) for p in listing.paths} if d in self.folders.index}
        wanted = np.fromiter(walked | near, np.int32)
        walked_ids = np.fromiter(walked - kept, np.int32)
        entries = _Entries()
        if not len(wanted) or self.fresh:
            return entries
        with open_store(self.real, given=self.given, check_undo=False) as view:
            for table in ("rows", "skipped"):
                index = np.flatnonzero(np.isin(self.folder[table], wanted) & (self.live[table] == 1))
                entries.extend(view, table, index, np.isin(self.folder[table][index], walked_ids))
        return entries

    # -- committing ------------------------------------------------------------------------------------------

    def _commit(self, extracted: int = 0, cpu_seconds: float | None = None) -> None:
        """Write the pending changes in one transaction; Ctrl-C waits until the run's counts know of them."""
        changes, self._changes = self._changes, _Changes()
        if not changes:
            return
        if self._failed:
            raise StoreError(f"{self.given}: an earlier write failed; rerun to go on.")
        with deferred_interrupts():
            self._write(changes, (cpu_seconds, extracted) if cpu_seconds is not None and extracted else None)
            self.counts.extracted += extracted

    def _write(self, changes: _Changes, cpu: tuple[float, int] | None = None) -> None:
        rows_before = self.live_rows
        try:
            if self.upgrade:
                compact_locked(self.real, self.given)  # format 1 -> 2: the same rows in the same order
                self.upgrade = False
            if self.fresh:
                with new_file(self.real, self.given, rows_before=0) as (h5, _):
                    layout = Layout(h5)
                    layout.create(dim=self.dim, store_dtype=self.settings.get("store_dtype", "float32"), meta=self.meta)
                    state = self._apply(h5, layout, changes, cpu)
                self.fresh = False
            else:
                if self.label_counts is None:
                    with open_store(self.real, given=self.given, check_undo=False) as view:
                        self.label_counts = view.label_counts()
                with transaction(self.real, self.given) as h5:
                    layout = Layout(h5)
                    layout.add_checksums()  # a store written before furnitype kept them gets them now
                    layout.add_file_id()
                    state = self._apply(h5, layout, changes, cpu)
        except WriteFailed as err:
            self._failed = True
            kept = f"{self.counts.extracted:,} rows extracted by this run are kept; " if self.counts.extracted else ""
            raise write_failed(self.given, err.error, rows_before, kept) from err
        except READ_ERRORS as err:  # HDF5 met damaged bytes while changing the file; the change was rolled back
            self._failed = True
            if not from_file(err):
                raise
            raise damaged(self.given, err) from err
        except BaseException:
            self._failed = True
            raise
        self._adopt(state)

    def _apply(self, h5: h5py.File, layout: Layout, changes: _Changes, cpu: tuple[float, int] | None) -> dict:
        """Write ``changes`` (and ``cpu``: CPU seconds and the rows they made) into the open store; return the new
        in-memory state (adopted after the commit)."""
        n = dict(self.n)
        dead = dict(self.dead)
        labels = Counter(self.label_counts)
        folder_ids: dict[str, list[int] | np.ndarray] = {table: [] for table in n}
        for table, kills in changes.kill.items():
            if kills:
                index = np.array(sorted(kills))
                write_at(layout.group(table)["live"], index, np.zeros(len(index), np.uint8))
                dead[table] += len(index)
                if table == "rows":
                    labels.subtract(kills.values())
        for table, relabels in changes.labels.items():
            if relabels:
                index = np.array(sorted(relabels))
                layout.write_strings(table, "label", index, [relabels[i][1] for i in index])
                if table == "rows":
                    labels.subtract(old for old, _ in relabels.values())
                    labels.update(new for _, new in relabels.values())
        for table, stats in changes.stats.items():
            if stats:
                index = np.array(sorted(stats))
                write_at(layout.group(table)["stat"], index, np.array([stats[i] for i in index], np.int64))
        new_rows = {}
        rows = list(changes.rows)
        if changes.copies:
            rows = self._copied(h5, changes.copies) + rows
        if rows:
            first = n["rows"]
            paths = [r[0] for r in rows]
            ids = self.folders.ids(paths)
            layout.append(
                "rows",
                features=np.stack([r[4] for r in rows]),
                sha256=np.array([r[2] for r in rows], dtype="S64"),
                path=paths,
                label=[r[1] for r in rows],
                live=np.ones(len(rows), np.uint8),
                stat=np.array([r[3] for r in rows], np.int64),
                folder=ids,
            )
            folder_ids["rows"] = ids
            labels.update(r[1] for r in rows)
            new_rows = {r[2]: first + k for k, r in enumerate(rows)}
            n["rows"] += len(rows)
        if changes.skips:
            paths = [s[0] for s in changes.skips]
            ids = self.folders.ids(paths)
            layout.append(
                "skipped",
                path=paths,
                label=[s[1] for s in changes.skips],
                sha256=np.array([s[2] for s in changes.skips], dtype="S64"),
                reason=[s[3] for s in changes.skips],
                live=np.ones(len(paths), np.uint8),
                stat=np.array([s[4] for s in changes.skips], np.int64),
                folder=ids,
            )
            folder_ids["skipped"] = ids
            n["skipped"] += len(paths)
        layout.write_folders(self.folders.new())
        layout.set_counts(
            live_rows=n["rows"] - dead["rows"],
            dead_rows=dead["rows"],
            live_skipped=n["skipped"] - dead["skipped"],
            dead_skipped=dead["skipped"],
            label_counts=labels,
        )
        if cpu is not None:
            layout.add_cpu(*cpu)
        return {
            "n": n,
            "dead": dead,
            "labels": labels,
            "kills": {t: sorted(k) for t, k in changes.kill.items()},
            "folder_ids": folder_ids,
            "new_rows": new_rows,
            "skip_reasons": {s[2]: s[3] for s in changes.skips if s[2]},
            "dim": int(h5["features"].shape[1]),
        }

    def _copied(self, h5: h5py.File, copies: list) -> list:
        """Rows for files whose content the store already has: features (and label) read from that row."""
        sources = np.unique([c[0] for c in copies])
        read = {}
        if len(sources):
            features = read_at(h5["features"], sources)
            shas = read_at(h5["sha256"], sources)
            labels = read_strings(h5, "label", sources)
            if not np.isfinite(features).all():
                raise damaged(self.given, "a row of /features holds numbers that are not finite (NaN or infinity)")
            read = {int(r): (features[k], shas[k].decode(), labels[k].decode()) for k, r in enumerate(sources)}
        rows = []
        for source, path, label, sha, stat, inherit in copies:
            if read[source][1] != sha:  # two contents sharing a 64-bit prefix: never seen, never wrong either
                raise StoreError(f"{self.given}: two contents share the sha256 prefix {sha[:16]}; please report it.")
            rows.append((path, read[source][2] if inherit else label, sha, stat, read[source][0]))
        return rows

    def _adopt(self, state: dict) -> None:
        self.n, self.dead, self.label_counts, self.dim = state["n"], state["dead"], state["labels"], state["dim"]
        for table in ("rows", "skipped"):
            self.live[table] = np.concatenate(
                [self.live[table], np.ones(len(state["folder_ids"][table]), np.uint8)]
            )
            self.live[table][state["kills"][table]] = 0
            self.folder[table] = np.concatenate(
                [self.folder[table], np.asarray(state["folder_ids"][table], np.int32)]
            )
        self._new_rows.update(state["new_rows"])
        self._skip_reasons.update(state["skip_reasons"])


@dataclass
class _Entries:
    """Live entries of the store near the listing: their table, index, path, label, sha256, stat, reason."""

    table: list = field(default_factory=list)
    index: list = field(default_factory=list)
    path: list = field(default_factory=list)
    label: list = field(default_factory=list)
    sha: list = field(default_factory=list)
    reason: list = field(default_factory=list)
    stat: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    walked: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    by_path: dict = field(default_factory=dict)

    def extend(self, view: StoreView, table: str, index: np.ndarray, walked: np.ndarray) -> None:
        paths = view.column(table, "path", index).tolist()
        start = len(self.path)
        self.table += [table] * len(index)
        self.index += index.tolist()
        self.path += paths
        interned: dict[str, str] = {}
        self.label += [interned.setdefault(label, label) for label in view.column(table, "label", index).tolist()]
        self.sha += view.column(table, "sha256", index).tolist()  # bytes: half the size of str
        reasons = view.column(table, "reason", index).tolist() if table == "skipped" else [""] * len(index)
        self.reason += reasons
        self.stat = np.concatenate([self.stat, view.column(table, "stat", index).reshape(-1, 4)])
        self.walked = np.concatenate([self.walked, walked])
        self.by_path.update(zip(paths, range(start, start + len(paths)), strict=True))


def _not_utf8(paths: list[str]) -> list[int]:
    """Indices of paths with bytes that are not UTF-8 (``os.fsdecode`` keeps them as lone surrogates)."""
    try:
        "\0".join(paths).encode("utf-8")
    except UnicodeEncodeError:
        return [i for i, path in enumerate(paths) if not path.isascii() and not is_utf8(path)]
    return []


def _prefix_keys(sha256: np.ndarray, given: str) -> np.ndarray:
    """The first 16 hex digits of each S64 digest as uint64 (``damaged`` for anything not hex)."""
    if not len(sha256):
        return np.zeros(0, np.uint64)
    digits = _HEX[sha256.view(np.uint8).reshape(len(sha256), 64)[:, :16]]
    if (digits == 255).any():
        raise damaged(given, "a /sha256 is not 64 lowercase hex digits")
    keys = np.zeros(len(sha256), np.uint64)
    for column in range(16):
        keys = (keys << np.uint64(4)) | digits[:, column].astype(np.uint64)
    return keys


