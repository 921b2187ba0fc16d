"""Format 2 of the feature store: its columns, and the writer of its datasets.

Datasets (readable with plain h5py, see docs/formats.md)::

    /features   float32 or float16 (N, D), chunked by rows, gzip-compressed
    /sha256     fixed-length ASCII (N,), hex digest of the file's bytes
    /path       UTF-8 (N,), absolute path of the file when it was extracted
    /label      UTF-8 (N,), class name ("" when unlabelled)
    /live       uint8 (N,), 1 for the store's rows; 0 for removed rows, which wait for compaction
    /stat       int64 (N, 4), size, mtime_ns, inode, ctime_ns of the file when hashed (size -1: unknown)
    /folder     int32 (N,), index into /folders of the file's folder
    /folders    UTF-8 (F,), folders of the stored files
    /classes    UTF-8 (C,), the sorted distinct non-empty labels of live rows
    /skipped/   path, sha256, reason, label, live, stat, folder (S,): files that could not be used
    NAME_crc    uint32, beside each string column (and /folders): the crc32 of each block of ``CRC_BLOCK`` strings
    attributes  the settings that made the rows (backbone, weights, pooling, ...), provenance, counts

Format-1 files (the same datasets without live, stat, folder, folders; rows sorted by path) are read as they are
(``view.py``) and upgraded on their first write.
"""

from __future__ import annotations

import json
import os
import uuid
import zlib
from collections.abc import Mapping, Sequence

import h5py
import numpy as np

FORMAT_VERSION = 2
#: Settings that decide a feature's value: rows made with different values are never mixed.
SETTING_KEYS = (
    "backbone",
    "weights",
    "pooling",
    "image_size",
    "interpolation",
    "precision",
    "decode",
    "store_dtype",
    "quantization",
    "layers",
    "mirror",
    "backend",
)
#: Settings recorded only when not the default, so that files written before they existed have the default:
#: ``layers`` (absent: the backbone's output, not normalised), ``mirror`` (absent: no mirror averaging) and
#: ``backend`` (the Keras backend of bfloat16/float16 rows; absent: TensorFlow, or float32/int8 rows, which
#: every backend makes alike).
DEFAULTED_SETTING_KEYS = ("layers", "mirror", "backend")
#: Settings that only some files record (int8 stores: their quantized network; the defaulted ones); absent from
#: ``settings`` else.
OPTIONAL_SETTING_KEYS = ("quantization", *DEFAULTED_SETTING_KEYS)
#: The CPU seconds ``extract`` spent making the store's rows (decoding and the network, all threads, each run's
#: first batch left out: it carries the network's start-up), and how many rows they made.
CPU_SECONDS = "extract_cpu_seconds"
CPU_ROWS = "extract_cpu_rows"
#: Attributes the store keeps for itself (counts; the file's identity), left out of ``meta``.
BOOKKEEPING = ("live_rows", "dead_rows", "live_skipped", "dead_skipped", "label_counts", "file_id")
#: Version 1.10 of the HDF5 format: checksummed metadata, so damaged bytes are found, not misread.
LIBVER = ("v110", "v110")
STAT_UNKNOWN = (-1, 0, 0, 0)
STR = h5py.string_dtype("utf-8")
_COLUMN_CHUNK = {"rows": 1024, "skipped": 256}
_FEATURE_CHUNK_BYTES = 256 << 10
BLOCK_ROWS = 16384
#: Columns of both tables (``/`` for rows, ``/skipped`` for skips): dtype and the shape of one entry.
COLUMNS = {
    "sha256": ("S64", ()),
    "path": (STR, ()),
    "label": (STR, ()),
    "live": ("u1", ()),
    "stat": ("i8", (4,)),
    "folder": ("i4", ()),
}
SKIP_COLUMNS = {**COLUMNS, "reason": (STR, ())}
#: HDF5 keeps variable-length strings in its global heap, which has no checksum: each string column (and
#: /folders) has a ``NAME_crc`` dataset beside it, the crc32 of ``b"\0".join`` of each block of ``CRC_BLOCK``
#: entries' UTF-8 bytes. The attribute ``string_crc`` (the block size) says that a file has them.
CRC_BLOCK = 1024
CRC_ATTR = "string_crc"
STRING_COLUMNS = {"rows": ("path", "label"), "skipped": ("path", "label", "reason")}


class StringsDamaged(ValueError):
    """Stored strings whose checksum is not the one recorded when they were written."""


def crc_blocks(raw: Sequence[bytes]) -> list[int]:
    """The crc32 of each block of ``CRC_BLOCK`` entries of ``raw`` (the first entry starts a block)."""
    return [zlib.crc32(b"\0".join(raw[k : k + CRC_BLOCK])) for k in range(0, len(raw), CRC_BLOCK)]


def read_strings(group: h5py.Group, name: str, index: np.ndarray | None = None) -> list[bytes]:
    """The raw bytes of string column ``name`` (at sorted ``index``), checked against ``NAME_crc`` when the file
    has the checksums: every block an entry falls in is read whole and checked.

    Raises ``StringsDamaged`` for a block whose bytes are not the ones written.
    """
    dataset = group[name]
    if CRC_ATTR not in group.file.attrs:
        return read_at(dataset, index).tolist()
    n = len(dataset)
    index = None if index is None else np.asarray(index, np.int64)
    if index is not None and len(index) == n:
        index = None  # sorted and distinct: every entry
    blocks = np.arange(-(-n // CRC_BLOCK)) if index is None else np.unique(index // CRC_BLOCK)
    if not len(blocks):
        return []
    crcs = group[f"{name}_crc"]
    picked: list[bytes] = []
    for run in np.split(blocks, np.flatnonzero(np.diff(blocks) != 1) + 1):
        first, last = int(run[0]) * CRC_BLOCK, min((int(run[-1]) + 1) * CRC_BLOCK, n)
        raw = dataset[first:last].tolist()
        stored = crcs[int(run[0]) : int(run[-1]) + 1].tolist()
        for k, crc in enumerate(crc_blocks(raw)):
            if k >= len(stored) or crc != stored[k]:
                start = first + k * CRC_BLOCK
                where = "/skipped" if group.name == "/skipped" else ""
                raise StringsDamaged(
                    f"{where}/{name} entries {start}-{min(start + CRC_BLOCK, n) - 1} are not the bytes written "
                    "(wrong checksum)"
                )
        if index is None:
            picked += raw
        else:
            lo, hi = np.searchsorted(index, [first, last])
            picked += [raw[i - first] for i in index[lo:hi].tolist()]
    return picked


class Folders:
    """The folder table: ``ids(paths)`` gives each path's folder index, adding folders not seen before."""

    def __init__(self, known: Sequence[str] = ()):
        self.names = list(known)
        self.index = {name: i for i, name in enumerate(self.names)}
        self._stored = len(self.names)

    def ids(self, paths: Sequence[str]) -> np.ndarray:
        return self.folder_ids([os.path.dirname(path) for path in paths])

    def folder_ids(self, folders: Sequence[str]) -> np.ndarray:
        out = np.empty(len(folders), np.int32)
        index, names = self.index, self.names
        for i, folder in enumerate(folders):
            found = index.get(folder)
            if found is None:
                found = index[folder] = len(names)
                names.append(folder)
            out[i] = found
        return out

    def new(self) -> list[str]:
        """Folders added since the table was read (to append to /folders); marks them stored."""
        added = self.names[self._stored :]
        self._stored = len(self.names)
        return added


class Layout:
    """Writes the datasets of format 2 into an open HDF5 file (a new file, or a transaction)."""

    def __init__(self, h5: h5py.File):
        self.h5 = h5

    def group(self, table: str) -> h5py.Group:
        return self.h5 if table == "rows" else self.h5["skipped"]

    def create(self, *, dim: int, store_dtype: str, meta: Mapping) -> None:
        """The empty datasets and the attributes (settings and provenance from ``meta``)."""
        h5 = self.h5
        self._create_features(dim, store_dtype)
        skipped = h5.create_group("skipped")
        for table, group, columns in (("rows", h5, COLUMNS), ("skipped", skipped, SKIP_COLUMNS)):
            for name, (dtype, shape) in columns.items():
                group.create_dataset(
                    name,
                    shape=(0, *shape),
                    maxshape=(None, *shape),
                    dtype=dtype,
                    chunks=(_COLUMN_CHUNK[table], *shape),
                    fletcher32=dtype is not STR,
                )
        h5.create_dataset("folders", shape=(0,), maxshape=(None,), dtype=STR, chunks=(256,))
        h5.create_dataset("classes", data=[], dtype=STR)
        self.add_checksums()
        self.h5.attrs["file_id"] = uuid.uuid4().hex
        for key, value in meta.items():
            if key not in BOOKKEEPING and key != "n_rows":
                h5.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        h5.attrs["store_dtype"] = store_dtype
        h5.attrs["furnitype_format"] = FORMAT_VERSION
        self.set_counts()

    def ensure_dim(self, dim: int) -> None:
        """Give /features its width when the first row comes (a store with no rows yet has width 0)."""
        features = self.h5["features"]
        if features.shape[1] != dim and features.shape[0] == 0:
            dtype = features.dtype
            del self.h5["features"]
            self._create_features(dim, dtype)
        elif features.shape[1] != dim:
            raise ValueError(f"rows of {dim} features do not fit a store of {features.shape[1]}.")

    def append(self, table: str, **columns) -> int:
        """Append entries to ``table`` (every column given); returns the index of the first one."""
        group = self.h5 if table == "rows" else self.h5["skipped"]
        start = len(group["path"])
        count = len(columns["path"])
        if not count:
            return start
        if table == "rows":
            self.ensure_dim(np.asarray(columns["features"]).shape[1])
        for name, values in columns.items():
            if name in STRING_COLUMNS[table]:
                self._append_strings(group, name, list(values))
                continue
            dataset = group[name]
            dataset.resize(start + count, axis=0)
            dataset[start:] = values
        return start

    def write_folders(self, names: Sequence[str]) -> None:
        if names:
            self._append_strings(self.h5, "folders", list(names))

    def write_strings(self, table: str, name: str, index: np.ndarray, values: Sequence[str]) -> None:
        """``column[index] = values`` for string column ``name`` (sorted ``index``), keeping its checksums: each
        block is checked before it changes, so damage is never sealed as valid."""
        group = self.group(table)
        index = np.asarray(index, np.int64)
        values = [str(v) for v in values]
        crcs = {}
        if CRC_ATTR in self.h5.attrs and len(index):
            n = len(group[name])
            new = dict(zip(index.tolist(), (v.encode("utf-8") for v in values), strict=True))
            for block in np.unique(index // CRC_BLOCK).tolist():
                first = block * CRC_BLOCK
                raw = read_strings(group, name, np.arange(first, min(first + CRC_BLOCK, n)))
                crcs[block] = crc_blocks([new.get(first + k, v) for k, v in enumerate(raw)])[0]
        write_at(group[name], index, values)
        for block, crc in crcs.items():
            group[f"{name}_crc"][block] = crc

    def add_file_id(self) -> None:
        """Give a file written before furnitype recorded one a ``file_id`` (what its similarity index records)."""
        if "file_id" not in self.h5.attrs:
            self.h5.attrs["file_id"] = uuid.uuid4().hex

    def add_checksums(self) -> None:
        """Give a file without string checksums (written before furnitype kept them) its ``NAME_crc`` datasets,
        made from its strings as they are now."""
        if CRC_ATTR in self.h5.attrs:
            return
        tables = ((self.h5, (*STRING_COLUMNS["rows"], "folders")), (self.h5["skipped"], STRING_COLUMNS["skipped"]))
        for group, names in tables:
            for name in names:
                dataset = group[name]
                crcs = [
                    crc
                    for start in range(0, len(dataset), BLOCK_ROWS)  # a multiple of CRC_BLOCK
                    for crc in crc_blocks(dataset[start : start + BLOCK_ROWS].tolist())
                ]
                group.create_dataset(
                    f"{name}_crc",
                    data=np.array(crcs, np.uint32),
                    maxshape=(None,),
                    chunks=(CRC_BLOCK,),
                    fletcher32=True,
                )
        self.h5.attrs[CRC_ATTR] = CRC_BLOCK

    def _append_strings(self, group: h5py.Group, name: str, values: list) -> None:
        dataset = group[name]
        start = len(dataset)
        if CRC_ATTR in self.h5.attrs:
            first = start - start % CRC_BLOCK  # the last block, checked before it grows
            raw = read_strings(group, name, np.arange(first, start)) + [str(v).encode("utf-8") for v in values]
            crcs = group[f"{name}_crc"]
            crcs.resize(-(-(start + len(values)) // CRC_BLOCK), axis=0)
            crcs[first // CRC_BLOCK :] = crc_blocks(raw)
        dataset.resize(start + len(values), axis=0)
        dataset[start:] = values

    def set_counts(
        self, *, live_rows=0, dead_rows=0, live_skipped=0, dead_skipped=0, label_counts: Mapping | None = None
    ) -> None:
        """The counts kept as attributes, and /classes (the non-empty labels with live rows)."""
        attrs = self.h5.attrs
        counts = {label: int(n) for label, n in sorted((label_counts or {}).items()) if n > 0}
        for key, value in (
            ("live_rows", live_rows),
            ("dead_rows", dead_rows),
            ("live_skipped", live_skipped),
            ("dead_skipped", dead_skipped),
        ):
            attrs[key] = int(value)
        attrs["label_counts"] = json.dumps(counts)
        classes = sorted(label for label in counts if label)
        if [c.decode() for c in self.h5["classes"][...].tolist()] != classes:
            del self.h5["classes"]
            self.h5.create_dataset("classes", data=classes, dtype=STR)
        attrs["feature_dim"] = int(self.h5["features"].shape[1])

    def add_cpu(self, seconds: float, rows: int) -> None:
        """Add to the CPU time ``extract`` spent making rows and to the rows it was measured on (``CPU_SECONDS``,
        ``CPU_ROWS``); a total that is not a number starts again."""
        attrs = self.h5.attrs
        total, counted = _plain_number(attrs.get(CPU_SECONDS)), _plain_number(attrs.get(CPU_ROWS))
        if total is None or counted is None or counted != int(counted):
            total, counted = 0.0, 0
        attrs[CPU_SECONDS] = float(total) + float(seconds)
        attrs[CPU_ROWS] = int(counted) + int(rows)

    def _create_features(self, dim: int, dtype) -> None:
        rows_per_chunk = int(np.clip(_FEATURE_CHUNK_BYTES // max(4 * dim, 1), 1, 64))
        self.h5.create_dataset(
            "features",
            shape=(0, dim),
            maxshape=(None, dim if dim else None),
            dtype=dtype,
            chunks=(rows_per_chunk, max(dim, 1)),
            compression="gzip",
            compression_opts=1,
            shuffle=True,
            fletcher32=True,
        )



def read_at(dataset: h5py.Dataset, index: np.ndarray | None) -> np.ndarray:
    """``dataset[index]`` for sorted row indices, read as runs of consecutive rows (whole when dense)."""
    if index is None:
        return dataset[...]
    index = np.asarray(index, dtype=np.int64)
    if not len(index):
        return np.empty((0, *dataset.shape[1:]), dtype=dataset.dtype)
    first, last = int(index[0]), int(index[-1]) + 1
    if len(index) == last - first:
        return dataset[first:last]
    if len(index) * 4 >= last - first:  # dense enough: one read, then pick
        return dataset[first:last][index - first]
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(index)]])
    return np.concatenate([dataset[index[s] : index[e - 1] + 1] for s, e in zip(starts, ends, strict=True)])


def write_at(dataset: h5py.Dataset, index: np.ndarray, values) -> None:
    """``dataset[index] = values`` for sorted row indices, written as runs of consecutive rows."""
    index = np.asarray(index, dtype=np.int64)
    if not len(index):
        return
    values = np.asarray(values, dtype=dataset.dtype if dataset.dtype.kind != "O" else object)
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(index)]])
    for s, e in zip(starts, ends, strict=True):
        chunk = values[s:e]
        dataset[index[s] : index[e - 1] + 1] = chunk.tolist() if chunk.dtype == object else chunk



def _plain_number(value) -> float | None:
    """A finite, non-negative number attribute as a float (0 when absent); None for anything else."""
    if value is None:
        return 0.0
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return value if np.isfinite(value) and value >= 0 else None
