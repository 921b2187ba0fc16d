"""Image files: listing (folders, single files, CSV manifests), content hashing and robust decoding."""

from __future__ import annotations

import csv
import hashlib
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from furnitype.errors import InputError

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


class ImageDecodeError(Exception):
    """A file that cannot be used as an image; the message is the reason recorded in the feature file."""


@dataclass(frozen=True)
class ImageFile:
    """One listed image: absolute path and label ("" when unlabelled)."""

    path: str
    label: str = ""


@dataclass(frozen=True)
class Listing:
    """What a set of inputs lists, and the folders it covers (rows under them that are not listed are gone)."""

    files: list[ImageFile]
    folders: list[str]


def list_images(inputs: Sequence[str | os.PathLike], manifest: str | os.PathLike | None = None) -> Listing:
    """List image files from folders, single files and/or a ``path,label`` CSV manifest.

    A folder is walked recursively; a file in a subfolder takes the name of the top subfolder as its label,
    a file directly in the folder is unlabelled. Hidden files and folders and non-image suffixes are ignored.
    Manifest paths are relative to the CSV. The same file listed twice is kept once (the first listing).
    """
    files: dict[str, ImageFile] = {}
    folders: list[str] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            folder = os.path.abspath(path)
            folders.append(folder)
            for found in _walk(folder):
                files.setdefault(found.path, found)
        elif path.is_file():
            absolute = os.path.abspath(path)
            files.setdefault(absolute, ImageFile(absolute))
        else:
            raise InputError(f"input not found: {given}")
    if manifest is not None:
        for found in read_manifest(manifest):
            files.setdefault(found.path, found)
    if not files:
        where = ", ".join(str(p) for p in [*inputs, *([manifest] if manifest else [])])
        raise InputError(f"no images found in {where} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
    return Listing(sorted(files.values(), key=lambda f: f.path), folders)


def read_manifest(manifest: str | os.PathLike) -> list[ImageFile]:
    """Read a CSV of ``path,label`` rows (header optional; label optional); paths relative to the CSV."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise InputError(f"manifest not found: {manifest}")
    base = manifest.parent
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            rows = [row for row in csv.reader(fh) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"cannot read manifest {manifest}: {err}") from None
    if rows and [cell.strip().lower() for cell in rows[0][:2]] in (["path", "label"], ["path"]):
        rows = rows[1:]
    return [ImageFile(os.path.abspath(base / row[0].strip()), row[1].strip() if len(row) > 1 else "") for row in rows]


def _walk(folder: str) -> Iterable[ImageFile]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        relative = os.path.relpath(dirpath, folder)
        label = "" if relative == "." else relative.split(os.sep)[0]
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                yield ImageFile(os.path.join(dirpath, name), label)


def read_file(path: str) -> tuple[bytes, str]:
    """Return a file's bytes and their sha256 hex digest; ``ImageDecodeError`` when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except OSError as err:
        raise ImageDecodeError(f"unreadable: {err.strerror or err}") from None
    return data, hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    """The sha256 hex digest of a file's bytes (read in blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def decode_image(data: bytes, size: int, interpolation: str = "bilinear", decode: str = "exact") -> np.ndarray:
    """Decode image bytes to a ``(size, size, 3)`` uint8 RGB array, as ``keras.utils.load_img`` would.

    EXIF orientation is applied; any mode becomes RGB (16-bit scaled to 8, transparency composited on white);
    then the image is resized (squashed) to the square input with ``interpolation``.

    Raises
    ------
    ImageDecodeError
        With the reason: empty, not an image, too large, truncated or corrupt.
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        img = Image.open(BytesIO(data))
        if decode == "draft" and img.format == "JPEG":
            img.draft(img.mode, (size, size))
        img.load()
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"too large, possible decompression bomb: {err}") from None
    except OSError as err:
        raise ImageDecodeError(f"truncated or corrupt: {err}") from None
    except Exception as err:  # noqa: BLE001 - Pillow's plugins raise many types on broken files
        raise ImageDecodeError(f"corrupt: {type(err).__name__}: {err}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001, S110 - a broken EXIF block only costs the orientation
        pass
    try:
        img = _to_rgb(img)
        if img.size != (size, size):
            img = img.resize((size, size), INTERPOLATIONS[interpolation])
    except (OSError, ValueError) as err:
        raise ImageDecodeError(f"cannot convert to RGB: {err}") from None
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
