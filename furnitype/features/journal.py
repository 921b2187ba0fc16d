"""The journal of a running extraction: rows appended and fsync'ed batch by batch beside the store.

``FILE.h5.journal`` starts with the run's settings; then each record is ``kind (1 byte) | length (u32) |
crc32 (u32) | payload``. A process killed at any moment leaves at most one partial record at the end, which
the next run drops. The journal is folded into the HDF5 store when a run ends, then removed. An exclusive
lock on it keeps a second writer away from the same store.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from furnitype.errors import StoreError
from furnitype.features.store import check_settings

_MAGIC = b"FTJ1"
_HEAD = struct.Struct("<cII")  # kind, payload length, crc32
_ROW, _SKIP = b"R", b"S"


@dataclass(frozen=True)
class Row:
    """One image file's features."""

    path: str
    label: str
    sha256: str
    features: np.ndarray


@dataclass(frozen=True)
class Skip:
    """One image file that could not be used, and why."""

    path: str
    label: str
    sha256: str
    reason: str


class Journal:
    """Append-only, crash-safe record of the rows a run has computed so far.

    Use as a context manager: entering takes the lock and reads what an interrupted run left.
    """

    def __init__(self, store_path: str | os.PathLike, settings: Mapping, *, overwrite: bool = False):
        self.path = Path(f"{store_path}.journal")
        self.settings = json.loads(json.dumps(dict(settings), sort_keys=True))
        self.overwrite = overwrite
        self.rows: list[Row] = []
        self.skips: list[Skip] = []
        self.dropped_bytes = 0
        self._file = None

    def __enter__(self) -> Journal:
        self._file = open(self.path, "a+b")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise StoreError(
                f"another furnitype process is writing {self.path.with_suffix('')}; wait for it to finish."
            ) from None
        self._recover()
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def append(self, rows: Iterable[Row], skips: Iterable[Skip] = ()) -> None:
        """Write records and make them durable (flush + fsync) before returning."""
        chunks = [_record(_ROW, _row_payload(row)) for row in rows]
        chunks += [_record(_SKIP, _skip_payload(skip)) for skip in skips]
        if chunks:
            self._file.write(b"".join(chunks))
            self._file.flush()
            os.fsync(self._file.fileno())

    def remove(self) -> None:
        """Delete the journal once its rows are safely in the store."""
        self.path.unlink(missing_ok=True)

    def _recover(self) -> None:
        self._file.seek(0)
        data = self._file.read()
        header = _record(b"H", json.dumps(self.settings, sort_keys=True).encode())
        if not data.startswith(_MAGIC):
            self._rewrite(_MAGIC + header)
            return
        offset = len(_MAGIC)
        records = []
        while offset + _HEAD.size <= len(data):
            kind, length, crc = _HEAD.unpack_from(data, offset)
            payload = data[offset + _HEAD.size : offset + _HEAD.size + length]
            if len(payload) != length or zlib.crc32(payload) != crc:
                break
            records.append((kind, payload))
            offset += _HEAD.size + length
        self.dropped_bytes = len(data) - offset
        if not records or records[0][0] != b"H":
            self._rewrite(_MAGIC + header)  # nothing usable was recorded
            return
        previous = json.loads(records[0][1])
        if previous != self.settings and self.overwrite:
            self._rewrite(_MAGIC + header)  # asked to replace work made with other settings
            return
        if previous != self.settings:
            self._file.close()
            check_settings(previous, self.settings, f"the interrupted run in {self.path}")
            raise StoreError(f"{self.path} was left by a run with other settings; rerun with --overwrite.")
        for kind, payload in records[1:]:
            if kind == _ROW:
                self.rows.append(_parse_row(payload))
            elif kind == _SKIP:
                self.skips.append(Skip(**json.loads(payload)))
        if self.dropped_bytes:
            self._file.truncate(offset)
        self._file.seek(0, os.SEEK_END)

    def _rewrite(self, content: bytes) -> None:
        self._file.truncate(0)
        self._file.write(content)
        self._file.flush()
        os.fsync(self._file.fileno())


def _record(kind: bytes, payload: bytes) -> bytes:
    return _HEAD.pack(kind, len(payload), zlib.crc32(payload)) + payload


def _row_payload(row: Row) -> bytes:
    text = json.dumps({"path": row.path, "label": row.label, "sha256": row.sha256}).encode()
    return struct.pack("<I", len(text)) + text + np.asarray(row.features, dtype="<f4").tobytes()


def _parse_row(payload: bytes) -> Row:
    (n,) = struct.unpack_from("<I", payload)
    fields = json.loads(payload[4 : 4 + n])
    return Row(features=np.frombuffer(payload[4 + n :], dtype="<f4").copy(), **fields)


def _skip_payload(skip: Skip) -> bytes:
    return json.dumps(skip.__dict__).encode()
