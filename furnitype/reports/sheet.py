"""Contact sheets (Pillow, PNG): ``similar`` results, one row per query, the query photo then its neighbours;
groups of look-alike photos (``duplicates``), one row per group; and photos to label (``suggest``), in a grid in
priority order.

Each tile shows the photo (aspect kept, EXIF orientation applied) above caption lines and the file name. In a
``similar`` sheet the frame tells the label apart at a glance: blue for the query, green for a neighbour with
the query's label, red for another label, grey when either has none.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from PIL import Image, ImageDraw, ImageFont, ImageOps

from furnitype.outputs import replace_file


class ToLabel(Protocol):
    """What a tile of a labelling sheet shows (``furnitype.suggest.Suggestion`` is one)."""

    @property
    def path(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def probability(self) -> float: ...
    @property
    def label_2(self) -> str: ...
    @property
    def probability_2(self) -> float: ...


class Neighbour(Protocol):
    """What a tile of a neighbour or of a group's photo shows (``furnitype.similar.Neighbour`` and
    ``furnitype.duplicates.GroupPhoto`` are ones)."""

    @property
    def path(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def distance(self) -> float: ...


class Group(Protocol):
    """What a row of a groups sheet shows (``furnitype.duplicates.Group`` is one)."""

    @property
    def kind(self) -> str: ...
    @property
    def photos(self) -> Sequence[Neighbour]: ...


class Match(Protocol):
    """What a row of the sheet shows (``furnitype.similar.Match`` is one)."""

    @property
    def query(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def in_store(self) -> bool: ...
    @property
    def error(self) -> str: ...
    @property
    def neighbours(self) -> Sequence[Neighbour]: ...


QUERY, SAME, OTHER, UNKNOWN = "#1f77b4", "#2ca02c", "#d62728", "#9a9a9a"
MARGIN, GAP, QUERY_GAP, FRAME = 16, 10, 28, 4


def contact_sheet(
    matches: Sequence[Match], path: str | os.PathLike, *, title: str = "", thumb: int = 160, max_rows: int = 50
) -> Path:
    """Draw queries and their neighbours with labels and distances; save as PNG.

    Parameters
    ----------
    matches : sequence of Match
        From ``furnitype.similar``.
    path : str or path-like
        The PNG to write.
    title : str, default=""
        First header line (e.g. the feature file and its backbone).
    thumb : int, default=160
        Side of a photo's square box, in pixels.
    max_rows : int, default=50
        Queries drawn; the footer counts any left out.

    Returns
    -------
    Path
        ``path``.
    """
    rows = []
    for match in list(matches)[:max_rows]:
        where = "in the store" if match.in_store else "new photo"
        lead = (match.query, QUERY, ["query, " + where, match.label or "(no label)"])
        tiles = []
        for j, n in enumerate(match.neighbours):
            rank = f"#{j + 1}{' itself' if n.path == match.query else ''}  d = {n.distance:.3f}"
            tiles.append((n.path, _frame(match.label, n.label), [rank, n.label or "(no label)"]))
        rows.append(_Row(lead, tiles, f"cannot use this photo: {match.error}" if match.error else ""))
    legend = ("d: cosine distance (0 = same direction). Frame: blue query; neighbour green with the query's label, "
              "red with another, grey when the query has none")
    left = len(matches) - len(rows)
    footer = f"... and {left} more queries not drawn" if left else ""
    return _rows_sheet(rows, path, header=[title, legend], footer=footer, thumb=thumb)


def groups_sheet(
    groups: Sequence[Group],
    path: str | os.PathLike,
    *,
    title: str = "",
    thumb: int = 120,
    max_rows: int = 50,
    max_photos: int = 10,
) -> Path:
    """Draw groups of look-alike photos (``furnitype.duplicates``), a row each, with labels and distances;
    save as PNG.

    Parameters
    ----------
    groups : sequence of Group
        In the order to draw them.
    path : str or path-like
        The PNG to write.
    title : str, default=""
        First header line.
    thumb : int, default=120
        Side of a photo's square box, in pixels.
    max_rows, max_photos : int, default=50, 10
        Groups drawn, and photos drawn per group; the footer and the group's first caption count any left out.

    Returns
    -------
    Path
        ``path``.
    """
    rows = []
    for number, group in enumerate(list(groups)[:max_rows], 1):
        first, *others = group.photos
        kind = f"#{number} {group.kind}, {len(group.photos)} photos"
        lead = (first.path, QUERY, [kind, first.label or "(no label)"])
        tiles = [(p.path, _frame(first.label, p.label), [f"d = {p.distance:.3f}", p.label or "(no label)"])
                 for p in others[: max_photos - 1]]
        rows.append(_Row(lead, tiles, ""))
    legend = ("A row per group, labels that differ first. d: cosine distance to the row's first photo (blue); "
              "frame green with its label, red with another, grey when either has none")
    left = len(groups) - len(rows)
    footer = f"... and {left} more groups not drawn" if left else ""
    return _rows_sheet(rows, path, header=[title, legend], footer=footer, thumb=thumb)


@dataclass(frozen=True)
class _Row:
    """A row of a sheet: its first tile, the tiles after the divider (photo, frame colour, captions), and an
    error written in their place."""

    lead: tuple[str, str, list[str]]
    tiles: list[tuple[str, str, list[str]]]
    error: str


def _frame(first_label: str, label: str) -> str:
    """Green for the first tile's label, red for another, grey when either has none."""
    return UNKNOWN if not (label and first_label) else SAME if label == first_label else OTHER


def _rows_sheet(rows: Sequence[_Row], path: str | os.PathLike, *, header: list[str], footer: str,
                thumb: int) -> Path:
    """Rows of tiles: each row's first tile, a divider, then the others."""
    font, small = _font(max(11, thumb // 12)), _font(max(10, thumb // 14))
    line = _line_height(font)
    tile_w, tile_h = thumb + 2 * FRAME, thumb + 2 * FRAME + 3 * line + 6
    columns = 1 + max((len(row.tiles) for row in rows), default=0)
    footers = [footer] if footer else []
    width = 2 * MARGIN + tile_w + QUERY_GAP + max(columns - 1, 1) * (tile_w + GAP)
    header = [wrapped for text in header if text for wrapped in _wrap(text, font, width - 2 * MARGIN)]
    top = MARGIN + len(header) * line + (GAP if header else 0)
    height = top + len(rows) * (tile_h + GAP) + len(footers) * line + MARGIN
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(header):
        draw.text((MARGIN, MARGIN + i * line), text, fill="black", font=font)
    for r, row in enumerate(rows):
        y = top + r * (tile_h + GAP)
        photo, colour, captions = row.lead
        _tile(sheet, draw, (MARGIN, y), photo, colour, captions, thumb, font, small)
        x0 = MARGIN + tile_w + QUERY_GAP
        draw.line([(x0 - QUERY_GAP // 2, y), (x0 - QUERY_GAP // 2, y + tile_h)], fill="#cccccc", width=2)
        if row.error:
            draw.text((x0, y + thumb // 2), _fit(row.error, font, width - x0 - MARGIN), fill=OTHER, font=font)
        for j, (photo, colour, captions) in enumerate(row.tiles):
            _tile(sheet, draw, (x0 + j * (tile_w + GAP), y), photo, colour, captions, thumb, font, small)
    for i, text in enumerate(footers):
        draw.text((MARGIN, height - MARGIN - (len(footers) - i) * line), text, fill="black", font=font)
    return _save(sheet, path)


def labelling_sheet(
    photos: Sequence[ToLabel],
    path: str | os.PathLike,
    *,
    title: str = "",
    thumb: int = 160,
    columns: int = 6,
    max_tiles: int = 120,
) -> Path:
    """Draw photos to label in a grid, most worth labelling first, each with the model's two best guesses.

    Parameters
    ----------
    photos : sequence of ToLabel
        From ``furnitype.suggest``, in priority order.
    path : str or path-like
        The PNG to write.
    title : str, default=""
        First header line (e.g. the run and the feature file).
    thumb : int, default=160
        Side of a photo's square box, in pixels.
    columns : int, default=6
    max_tiles : int, default=120
        Photos drawn; the footer counts any left out.

    Returns
    -------
    Path
        ``path``.
    """
    font, small = _font(max(11, thumb // 12)), _font(max(10, thumb // 14))
    line = _line_height(font)
    tile_w, tile_h = thumb + 2 * FRAME, thumb + 2 * FRAME + 3 * line + 6
    shown = list(photos)[:max_tiles]
    columns = max(1, min(columns, len(shown)))
    rows = -(-len(shown) // columns)
    width = 2 * MARGIN + columns * tile_w + (columns - 1) * GAP
    header = [title, "In order of how much their labels would teach the model: rank, the model's guess and its "
              "probability, the runner-up. Correct the label column of the CSV by eye."]
    header = [wrapped for text in header if text for wrapped in _wrap(text, font, width - 2 * MARGIN)]
    footer = [f"... and {len(photos) - len(shown)} more photos not drawn"] if len(photos) > len(shown) else []
    top = MARGIN + len(header) * line + GAP
    height = top + rows * (tile_h + GAP) + len(footer) * line + MARGIN
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(header):
        draw.text((MARGIN, MARGIN + i * line), text, fill="black", font=font)
    for i, photo in enumerate(shown):
        corner = (MARGIN + (i % columns) * (tile_w + GAP), top + (i // columns) * (tile_h + GAP))
        captions = [f"#{i + 1}  {photo.label} {photo.probability:.2f}", f"or {photo.label_2} {photo.probability_2:.2f}"]
        _tile(sheet, draw, corner, photo.path, UNKNOWN, captions, thumb, font, small)
    for i, text in enumerate(footer):
        draw.text((MARGIN, height - MARGIN - (len(footer) - i) * line), text, fill="black", font=font)
    return _save(sheet, path)


def _save(sheet: Image.Image, path: str | os.PathLike) -> Path:
    """The sheet as a PNG at ``path``, written beside and renamed (a failed write leaves the old file)."""
    png = io.BytesIO()
    sheet.save(png, "PNG")
    return replace_file(path, png.getvalue())


def _tile(sheet, draw, corner, photo_path: str, colour: str, captions: list[str], thumb: int, font, small) -> None:
    """A framed photo box with caption lines and the file name under it."""
    x, y = corner
    side = thumb + 2 * FRAME
    draw.rectangle([x, y, x + side - 1, y + side - 1], fill=colour)
    draw.rectangle([x + FRAME, y + FRAME, x + FRAME + thumb - 1, y + FRAME + thumb - 1], fill="#f2f2f2")
    image = thumbnail(photo_path, thumb)
    if image is None:
        draw.text((x + FRAME + 8, y + side // 2 - 8), "no preview", fill="#666666", font=font)
    else:
        sheet.paste(image, (x + FRAME + (thumb - image.width) // 2, y + FRAME + (thumb - image.height) // 2))
    line = _line_height(font)
    lines = [*captions, os.path.basename(photo_path)]
    for i, text in enumerate(lines):
        last = i == len(lines) - 1
        draw.text((x, y + side + 3 + i * line), _fit(text, small if last else font, side),
                  fill="#555555" if last else "black", font=small if last else font)


def thumbnail(path: str, size: int) -> Image.Image | None:
    """The photo upright (EXIF), in RGB, fitting a ``size`` square; None when it is gone or cannot be opened.

    Only a regular file is read: a path named by a received run or store that leads to a FIFO or a device
    gets the placeholder instead of a reader that waits forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        try:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return None
        except OSError:
            return None
        return fit(fh, size)


def fit(source: BinaryIO, size: int, *, largest: int | None = None) -> Image.Image | None:
    """The picture of an image file upright (EXIF), in RGB, fitting a ``size`` square; None when it cannot be
    decoded, or (``largest``) when it is wider or taller than ``largest`` pixels (checked before decoding)."""
    try:
        with Image.open(source) as img:
            if largest is not None and max(img.size) > largest:
                return None
            img.draft("RGB", (size, size))
            upright = ImageOps.exif_transpose(img).convert("RGB")
        upright.thumbnail((size, size))
        return upright
    except Exception:  # noqa: BLE001 - missing, moved or broken files all get the placeholder
        return None


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _line_height(font) -> int:
    top, bottom = font.getbbox("Ag")[1::2]
    return bottom + max(4, bottom - top) // 3 + 2


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` broken into lines of whole words that fit ``width`` pixels (a too-long word is cut)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(_fit(word, font, width))
    return lines


def _fit(text: str, font, width: int) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"
