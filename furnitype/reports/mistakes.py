"""The mistakes section of a run's report: thumbnails with labels and paths, as HTML, Markdown and CSV.

For each feature set, two lists (``furnitype.classify.mistakes``): the test photos its best model got wrong,
most confident first, and the training photos whose given label may be wrong, least likely label first; up
to ``SHOWN`` of each. Thumbnails (aspect kept, EXIF orientation applied) go to ``mistakes/`` beside the
report. ``classify`` makes them from the photos, only from a regular file whose content is still the one
recorded (its sha256). ``report`` never reads the paths a run lists (the run may come from someone else): it
takes the thumbnails the runs keep, read from inside them (``furnitype.classify.runfiles``), decoded and
encoded again. A photo without one is listed with "no preview".
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from collections.abc import Sequence
from dataclasses import astuple
from pathlib import Path

from PIL import Image

from furnitype.classify.mistakes import COLUMNS, Mistake
from furnitype.classify.runfiles import Damage, read_inside
from furnitype.errors import StoreError
from furnitype.extract.images import ImageDecodeError, read_file
from furnitype.outputs import replace_file
from furnitype.reports.sheet import fit

#: Photos shown per feature set and list.
SHOWN = 50
THUMBNAIL_FOLDER = "mistakes"
THUMBNAIL_SIDE = 128
#: The largest thumbnail file read from a run (``THUMBNAIL_SIDE`` pixels square are a few kilobytes as JPEG).
MAX_THUMBNAIL_BYTES = 1 << 20
_TITLES = {
    "misclassified": "test photos {model} got wrong, most confident first",
    "label_issue": "training photos whose label may be wrong (confident learning, out of fold), least likely first",
}


def shown(mistakes: Sequence[Mistake], limit: int = SHOWN) -> list[Mistake]:
    """The first ``limit`` mistakes of each feature set and kind (lists are stored worst first)."""
    counts: dict[tuple[str, str], int] = {}
    kept = []
    for m in mistakes:
        key = (m.features, m.kind)
        counts[key] = counts.get(key, 0) + 1
        if counts[key] <= limit:
            kept.append(m)
    return kept


def write_mistakes_csv(mistakes: Sequence[Mistake], path: str | os.PathLike) -> Path:
    """Write the shown lists as CSV (``furnitype.classify.mistakes.COLUMNS``); replaced whole, never half-written."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(astuple(m) for m in shown(mistakes))
    return replace_file(path, text.getvalue().encode("utf-8"))


def write_thumbnails(
    mistakes: Sequence[Mistake], out_dir: str | os.PathLike, *, runs: Sequence[str | os.PathLike] | None = None
) -> dict[str, str]:
    """JPEG thumbnails of the shown photos in ``out_dir/mistakes/``; returns sha256 -> relative file name.

    ``runs`` None: made from the photos whose content is the recorded one; else copied from the thumbnails these
    run folders keep (the photos are not read).
    """
    folder = Path(out_dir) / THUMBNAIL_FOLDER
    names: dict[str, str] = {}
    for m in shown(mistakes):
        if m.sha256 in names:
            continue
        name = f"{THUMBNAIL_FOLDER}/{m.sha256[:16]}.jpg"
        image = _photo_thumbnail(m) if runs is None else _kept_thumbnail(runs, name)
        if image is None:
            continue
        folder.mkdir(exist_ok=True)
        jpeg = io.BytesIO()
        image.save(jpeg, "JPEG", quality=85)
        replace_file(Path(out_dir) / name, jpeg.getvalue())
        names[m.sha256] = name
    return names


def _photo_thumbnail(m: Mistake) -> Image.Image | None:
    """The photo's thumbnail, when its file is still the photo recorded (a file changed since, or any other
    file at that path, is not shown as it)."""
    try:
        data, sha256 = read_file(m.path)
    except ImageDecodeError:
        return None
    return fit(io.BytesIO(data), THUMBNAIL_SIDE) if sha256 == m.sha256 else None


def _kept_thumbnail(runs: Sequence[str | os.PathLike], name: str) -> Image.Image | None:
    """The thumbnail ``name`` the first of ``runs`` that keeps one holds: a JPEG no larger than a thumbnail."""
    for run in runs:
        try:
            data = read_inside(run, name, limit=MAX_THUMBNAIL_BYTES)
        except (Damage, StoreError):
            continue
        image = fit(io.BytesIO(data), THUMBNAIL_SIDE, largest=THUMBNAIL_SIDE)
        if image is not None:
            return image
    return None


def markdown_section(mistakes: Sequence[Mistake], thumbnails: dict[str, str], feature_sets: Sequence[str]) -> list[str]:
    """Markdown lines: per feature set and list, a table of thumbnail, labels, probabilities and path."""
    parts = ["## Mistakes", ""]
    for features, title, items in _groups(mistakes, feature_sets):
        parts += [f"### {features}: {title}", ""]
        if not items:
            parts += ["None.", ""]
            continue
        parts += ["| photo | label | model says | path |", "| --- | --- | --- | --- |"]
        for m in items:
            image = f"![{m.sha256[:12]}]({thumbnails[m.sha256]})" if m.sha256 in thumbnails else "(no preview)"
            parts.append(f"| {image} | {_md(m.label)} ({m.label_probability:.2f}) | {_md(m.predicted)} "
                         f"{m.probability:.2f} | `{_md(m.path)}` |")
        parts.append("")
    return parts


def html_section(
    mistakes: Sequence[Mistake], thumbnails: dict[str, str], feature_sets: Sequence[str], out_dir: str | os.PathLike
) -> list[str]:
    """HTML: per feature set and list, the thumbnails (embedded) with labels, probabilities and paths."""
    esc = html.escape
    parts = ["<h2>Mistakes</h2>"]
    for features, title, items in _groups(mistakes, feature_sets):
        parts.append(f"<h3>{esc(features)}: {esc(title)}</h3>")
        if not items:
            parts.append("<p>None.</p>")
            continue
        parts.append('<div class="mistakes">')
        for m in items:
            if m.sha256 in thumbnails:
                data = base64.b64encode((Path(out_dir) / thumbnails[m.sha256]).read_bytes()).decode("ascii")
                image = f'<img src="data:image/jpeg;base64,{data}" alt="{esc(m.label)}">'
            else:
                image = '<div class="missing">no preview</div>'
            parts.append(
                f"<figure>{image}<figcaption>labelled <b>{esc(m.label)}</b> ({m.label_probability:.2f})<br>"
                f"model: <b>{esc(m.predicted)}</b> {m.probability:.2f}<br><code>{esc(m.path)}</code>"
                "</figcaption></figure>"
            )
        parts.append("</div>")
    return parts


STYLE = """
.mistakes { display: flex; flex-wrap: wrap; gap: 1em; }
.mistakes figure { margin: 0; width: 12em; font-size: 0.8em; }
.mistakes img, .mistakes .missing { display: block; max-width: 128px; max-height: 128px; }
.mistakes .missing { width: 128px; height: 96px; background: #f2f2f2; color: #666; text-align: center; }
.mistakes code { word-break: break-all; }
"""


def _groups(mistakes: Sequence[Mistake], feature_sets: Sequence[str]) -> list[tuple[str, str, list[Mistake]]]:
    """(features, title, shown mistakes) for each feature set and both lists."""
    kept = shown(mistakes)
    groups = []
    for features in feature_sets:
        for kind, title in _TITLES.items():
            every = [m for m in mistakes if m.features == features and m.kind == kind]
            items = [m for m in kept if m.features == features and m.kind == kind]
            count = f"{len(items)} of {len(every)}" if len(every) > len(items) else f"{len(every)}"
            model = every[0].model if every else "the best model"
            groups.append((features, f"{title.format(model=model)} ({count})", items))
    return groups


def _md(text: str) -> str:
    return text.replace("|", "\\|")
