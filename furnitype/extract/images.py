"""Image files: listing (folders, single files, CSV manifests), safe reading and hashing, robust decoding."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import os
import stat
import warnings
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from furnitype.errors import InputError
from furnitype.outputs import is_utf8

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
#: ``exact`` decodes every pixel; ``draft`` lets the JPEG decoder scale down by 1/2, 1/4 or 1/8 first. Draft is
#: only a flag: on the shared photos it changed VGG16 features by 5% relative (median; 15% max) on the 3% of photos
#: it applies to, and saved 5% of decoding time (see benchmarks/extract.py).
DECODE_MODES = ("exact", "draft")
# Images over Pillow's limit (89 Mpx) decode (with a warning we do not need); twice over it, they are refused.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


#: Files larger than this are skipped, not read (no photo is that large; a device or a runaway file may be).
MAX_FILE_BYTES = 1 << 30
NOT_REGULAR = "not a regular file"
MISSING = "file not found"
LINKED_FOLDER = "a symbolic link to a folder, not followed"
#: The first bytes of an HDF5 file: a feature store (or a weights file) given where a photo was expected.
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
NOT_A_PHOTO_HDF5 = "an HDF5 file (a feature store?), not a photo"


class ImageDecodeError(Exception):
    """A file that cannot be used as an image; the message is the reason recorded in the feature file.

    ``gone`` is False for a file that exists but could not be read this time (permissions, I/O).
    """

    def __init__(self, reason: str, *, gone: bool = True):
        super().__init__(reason)
        self.gone = gone

    #: The sha256 of the bytes that were read ("" when none were): a store remembers bad bytes by content.
    sha256: str = ""


class ImageFile(NamedTuple):
    """One listed image: absolute path and label ("" when unlabelled)."""

    path: str
    label: str = ""


@dataclass(frozen=True)
class Listing:
    """What a set of inputs lists, as columns (one entry per file, in listing order).

    Attributes
    ----------
    paths, labels : list of str
        Absolute paths; labels ("" when unlabelled).
    stats : ndarray of shape (n_files, 4), int64
        ``size, mtime_ns, inode, ctime_ns`` of each file (symbolic links followed).
    reasons : dict of int to str
        Files that cannot be photos and why: ``not a regular file``, ``file not found``, ``too large ...``.
    folders : list of str
        The folders walked (stored rows under them whose file is not listed are gone).
    unlisted : list of (folder, reason)
        Folders (or subfolders) that could not be listed: their stored rows are kept.
    """

    paths: list[str]
    labels: list[str]
    stats: np.ndarray
    reasons: dict[int, str]
    folders: list[str]
    unlisted: list[tuple[str, str]]

    @property
    def files(self) -> list[ImageFile]:
        return [ImageFile(p, label) for p, label in zip(self.paths, self.labels, strict=True)]


class _Collector:
    """Builds a ``Listing``: one entry per path (the first listing of a path wins)."""

    def __init__(self, unique: bool):
        self.paths: list[str] = []
        self.labels: list[str] = []
        self.stats = array("q")
        self.reasons: dict[int, str] = {}
        self.unlisted: list[tuple[str, str]] = []
        self._seen: set[str] | None = set() if unique else None

    def add(self, path: str, label: str, entry: os.DirEntry | None = None) -> None:
        if self._seen is not None:
            if path in self._seen:
                return
            self._seen.add(path)
        try:
            st = entry.stat() if entry is not None else os.stat(path)
        except OSError as err:
            reason = MISSING if err.errno == errno.ENOENT else f"unreadable: {err.strerror or err}"
        else:
            reason = _unusable(st)
            if not reason:
                self.stats.extend((st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))
        if reason:
            self.reasons[len(self.paths)] = reason
            self.stats.extend((-1, 0, 0, 0))
        self.paths.append(path)
        self.labels.append(label)

    def walk(self, root: str) -> None:
        """Add the images under ``root`` (depth first, names sorted); record folders that cannot be listed."""
        stack = [(root, "")]
        suffixes = IMAGE_SUFFIXES
        while stack:
            folder, label = stack.pop()
            try:
                with os.scandir(folder) as scan:
                    entries = sorted(scan, key=lambda e: e.name)
            except OSError as err:
                self.unlisted.append((folder, err.strerror or str(err)))
                continue
            subfolders = []
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue
                try:
                    is_folder = entry.is_dir(follow_symlinks=False)
                except OSError:
                    is_folder = False
                if is_folder:
                    subfolders.append((entry.path, label or name))
                elif _links_to_folder(entry):  # not walked, yet what is stored under it is not gone
                    self.unlisted.append((entry.path, LINKED_FOLDER))
                elif os.path.splitext(name)[1].lower() in suffixes:
                    self.add(entry.path, label, entry)
            stack.extend(reversed(subfolders))

    def listing(self, folders: list[str]) -> Listing:
        stats = np.frombuffer(self.stats, dtype=np.int64).reshape(-1, 4).copy()
        return Listing(self.paths, self.labels, stats, self.reasons, folders, self.unlisted)


def _links_to_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_symlink() and entry.is_dir()
    except OSError:
        return False


def list_images(inputs: Sequence[str | os.PathLike], manifest: str | os.PathLike | None = None) -> Listing:
    """List image files from folders, single files and/or a ``path,label`` CSV manifest.

    A folder is walked recursively; a file in a subfolder takes the name of the top subfolder as its label,
    a file directly in the folder is unlabelled. Hidden files and folders and non-image suffixes are ignored;
    symbolic links to files are followed, links to folders are not walked (they are ``unlisted``, as folders
    that cannot be listed: what is stored under them stays). Manifest paths are relative to the CSV. The same
    file listed twice is kept once (the first listing). A listed file that cannot be a photo (a FIFO, a device,
    a broken link, over ``MAX_FILE_BYTES``) is kept with its reason, never opened here.
    """
    collector = _Collector(unique=len(inputs) > 1 or manifest is not None)
    folders: list[str] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            folder = os.path.abspath(path)
            folders.append(folder)
            collector.walk(folder)
        elif os.path.lexists(path) and not path.is_dir():
            collector.add(os.path.abspath(path), "")
        else:
            raise InputError(f"input not found: {given}")
    if manifest is not None:
        for found in read_manifest(manifest):
            collector.add(found.path, found.label)
    if not collector.paths and not collector.unlisted:
        where = ", ".join(str(p) for p in [*inputs, *([manifest] if manifest else [])])
        raise InputError(f"no images found in {where} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
    return collector.listing(folders)


def read_manifest(manifest: str | os.PathLike) -> list[ImageFile]:
    """Read a CSV of ``path,label`` rows (header optional; label optional); paths relative to the CSV.

    The file must be a regular file (a FIFO is refused, not waited on). A first row that is neither the header
    ``path,label`` nor a photo path (another header), a row without a path, and a path listed twice with
    different labels are ``InputError`` naming the line; a path listed twice with one label is kept once.
    """
    manifest = Path(manifest)
    try:
        with open_photo(str(manifest)) as (fd, _):
            data = _read(fd, MAX_FILE_BYTES)
    except ImageDecodeError as err:
        if str(err) == MISSING:
            raise InputError(f"manifest not found: {manifest}") from err
        raise InputError(f"cannot read manifest {manifest}: {err}") from err
    return parse_manifest(data, manifest)


def parse_manifest(data: bytes, manifest: Path) -> list[ImageFile]:
    """The files listed by the bytes ``data`` of the manifest ``manifest``, as ``read_manifest`` reads them."""
    base = manifest.parent
    try:
        text = data.decode("utf-8-sig")
        rows = [(n, row) for n, row in _csv_rows(text) if row and any(cell.strip() for cell in row)]
    except (UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"cannot read manifest {manifest}: {err}") from err
    if rows and _is_header(rows[0][1], manifest):
        rows = rows[1:]
    files: list[ImageFile] = []
    first_line: dict[str, tuple[int, str]] = {}
    for line, row in rows:
        given = row[0].strip()
        if not given:
            raise InputError(f"manifest {manifest}, line {line}: no path in the first column.")
        path = os.path.abspath(base / given)
        label = row[1].strip() if len(row) > 1 else ""
        if bad_label(label):
            raise InputError(f"manifest {manifest}, line {line}: {bad_label(label)}")
        if path in first_line:
            seen_line, seen_label = first_line[path]
            if seen_label != label:
                raise InputError(f"manifest {manifest} lists {given} twice with different labels "
                                 f"(line {seen_line}: {seen_label!r}, line {line}: {label!r}); keep one.")
            continue
        first_line[path] = (line, label)
        files.append(ImageFile(path, label))
    return files


def check_folder_labels(listing: Listing) -> None:
    """Refuse a listing with a class folder whose name cannot be a label (``bad_label``), naming the folder.

    A folder name that is not UTF-8 is left to the store's own rule (its photos are skipped, with a warning).

    Raises
    ------
    InputError
    """
    for label in dict.fromkeys(listing.labels):
        if not label or not bad_label(label) or not is_utf8(label):
            continue
        path = listing.paths[listing.labels.index(label)]
        folder = next(os.path.join(root, label) for root in listing.folders
                      if path.startswith(os.path.join(root, label, "")))
        raise InputError(f"the name of class folder {folder!r} cannot be a label: a label must be printable text "
                         "on one line; rename the folder, or give --label.")


def bad_label(label: str) -> str:
    """Why a label cannot be recorded ("" when it can): a class name is one line of printable text, as the
    tables, CSV files and reports that show it expect."""
    if label.isprintable():
        return ""
    return f"a label must be printable text on one line. Received: label={label!r}"


def _csv_rows(text: str) -> Iterator[tuple[int, list[str]]]:
    """CSV rows with the line each starts on."""
    reader = csv.reader(text.splitlines(keepends=True))
    line = 1
    for row in reader:
        yield line, row
        line = reader.line_num + 1


def _is_header(row: list[str], manifest: Path) -> bool:
    """Whether a manifest's first row is its header; ``InputError`` for a header other than ``path,label``."""
    cells = [cell.strip().lower() for cell in row[:2]]
    if cells in (["path", "label"], ["path"]):
        return True
    first = row[0].strip()
    if os.path.splitext(first)[1].lower() in IMAGE_SUFFIXES or os.path.lexists(manifest.parent / first):
        return False
    raise InputError(f"manifest {manifest}: the first row {','.join(row)!r} is neither the header "
                     f"'path,label' nor a photo path; start the CSV with the header 'path,label'.")


def _unusable(st: os.stat_result) -> str:
    """Why a file with this stat cannot be a photo ("" when it can)."""
    if not stat.S_ISREG(st.st_mode):
        return NOT_REGULAR
    if st.st_size > MAX_FILE_BYTES:
        return f"too large: {st.st_size / (1 << 30):.1f} GiB (the limit is {MAX_FILE_BYTES / (1 << 30):g} GiB)"
    return ""


@contextlib.contextmanager
def open_photo(path: str) -> Iterator[tuple[int, os.stat_result]]:
    """Open a file for reading only if it is a regular file within ``MAX_FILE_BYTES``: ``(fd, stat)``.

    Opening never blocks (a FIFO is refused, not waited on); ``ImageDecodeError`` says why a file is refused.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as cause:
        raise ImageDecodeError(MISSING) from cause
    except OSError as err:
        raise ImageDecodeError(f"unreadable: {err.strerror or err}", gone=False) from err
    try:
        st = os.fstat(fd)
        reason = _unusable(st)
        if reason:
            raise ImageDecodeError(reason)
        yield fd, st
    finally:
        os.close(fd)


def read_file(path: str) -> tuple[bytes, str]:
    """Return a file's bytes and their sha256 hex digest; ``ImageDecodeError`` when it cannot be read."""
    with open_photo(path) as (fd, st):
        data = _read(fd, st.st_size)
    return data, hashlib.sha256(data).hexdigest()


def load_photo(
    path: str, image_size: int, interpolation: str = "bilinear", decode: str = "exact"
) -> tuple[str, np.ndarray]:
    """Read, hash and decode one file: ``(sha256, uint8 image)``; ``ImageDecodeError`` (with ``sha256`` when the
    bytes were read) when unusable."""
    data, sha256 = read_file(path)
    try:
        return sha256, decode_image(data, image_size, interpolation, decode)
    except ImageDecodeError as err:
        err.sha256 = sha256  # the bytes are known bad: the cache remembers them by content
        raise


def hash_file(path: str) -> tuple[str, tuple[int, int, int, int]]:
    """The sha256 hex digest of a file's bytes and what the file was when read (size, mtime_ns, inode,
    ctime_ns); ``ImageDecodeError`` when it cannot be read, or changed while being read."""
    digest = hashlib.sha256()
    with open_photo(path) as (fd, st):
        try:
            while block := os.read(fd, 1 << 20):
                digest.update(block)
            after = os.fstat(fd)
        except OSError as err:
            raise ImageDecodeError(f"unreadable: {err.strerror or err}", gone=False) from err
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if stamp != (after.st_size, after.st_mtime_ns, after.st_ino, after.st_ctime_ns):
        raise ImageDecodeError("changed while being read; rerun to include it", gone=False)
    return digest.hexdigest(), stamp


def sha256_file(path: str) -> str:
    """The sha256 hex digest of a file's bytes; ``ImageDecodeError`` when it cannot be read."""
    return hash_file(path)[0]


def _read(fd: int, size: int) -> bytes:
    """All bytes of an open file (at most ``MAX_FILE_BYTES``: a file growing past it is refused)."""
    chunks, total = [], 0
    try:
        while chunk := os.read(fd, max(size - total + 1, 1 << 16)):
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_FILE_BYTES:
                raise ImageDecodeError("changed while being read; rerun to include it", gone=False)
    except OSError as err:
        raise ImageDecodeError(f"unreadable: {err.strerror or err}", gone=False) from err
    return b"".join(chunks)


def decode_image(
    data: bytes, size: int, interpolation: str = "bilinear", decode: str = "exact", *, max_pixels: int | None = None
) -> np.ndarray:
    """Decode image bytes to a ``(size, size, 3)`` uint8 RGB array, as ``keras.utils.load_img`` would.

    EXIF orientation is applied; any mode becomes RGB (16-bit scaled to 8, transparency composited on white);
    then the image is resized (squashed) to the square input with ``interpolation``. An image of more than
    ``max_pixels`` pixels is refused from its header, before any pixel is decoded.

    Raises
    ------
    ImageDecodeError
        With the reason: empty, not an image (an HDF5 file named as such), too large, truncated or corrupt.
    """
    if not data:
        raise ImageDecodeError("empty file")
    if data.startswith(HDF5_SIGNATURE):  # Pillow knows the format only to say it cannot load it
        raise ImageDecodeError(NOT_A_PHOTO_HDF5)
    try:
        img: Image.Image = Image.open(BytesIO(data))
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ImageDecodeError(
                f"too large: {img.width} x {img.height} pixels (the limit is {max_pixels:,} pixels)"
            )
        if decode == "draft" and img.format == "JPEG":
            img.draft(img.mode, (size, size))
        img.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as cause:
        raise ImageDecodeError("not an image (unrecognised format)") from cause
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"too large, possible decompression bomb: {err}") from err
    except OSError as err:
        raise ImageDecodeError(f"truncated or corrupt: {err}") from err
    except Exception as err:  # noqa: BLE001 - Pillow's plugins raise many types on broken files
        raise ImageDecodeError(f"corrupt: {type(err).__name__}: {err}") from err
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001, S110 - a broken EXIF block only costs the orientation
        pass
    try:
        img = _to_rgb(img)
        if img.size != (size, size):
            img = img.resize((size, size), INTERPOLATIONS[interpolation])
    except (OSError, ValueError) as err:
        raise ImageDecodeError(f"cannot convert to RGB: {err}") from err
    return np.asarray(img, dtype=np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def check_interpolation(interpolation: str) -> None:
    """Reject an unknown interpolation name before any work starts."""
    if interpolation not in INTERPOLATIONS:
        raise InputError(
            f"interpolation must be one of {', '.join(INTERPOLATIONS)}. Received: interpolation={interpolation!r}"
        )
