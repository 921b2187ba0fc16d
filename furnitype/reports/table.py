"""The comparison table of a run: aligned text, and the report files (CSV, Markdown, HTML, PNGs).

Everything here works on the run document (``RunDocument``, the content of ``metrics.json``) and its ``Row``s;
functions return text or the paths they wrote, and never print. Each row names its feature set (the training
file's stem); the settings that differ between the compared feature sets get columns of their own.
"""

from __future__ import annotations

import base64
import csv
import html
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from furnitype.classify.metadata import REPORT_KIND, ROW_SCALARS, SCORE_NAMES, FeatureSetRecord, Row, RunDocument
from furnitype.classify.mistakes import Mistake
from furnitype.reports.mistakes import STYLE as MISTAKES_STYLE
from furnitype.reports.mistakes import html_section, markdown_section, write_thumbnails
from furnitype.reports.plots import plot_confusion, plot_scores

#: The columns of report.csv, in order (one row per feature set x model).
CSV_COLUMNS = ROW_SCALARS
#: The columns of the printed and rendered table: (row key, header, format); the settings that differ between
#: the compared feature sets come after ``weights``.
DISPLAY_COLUMNS = (
    ("rank", "#", "{}"),
    ("features", "features", "{}"),
    ("backbone", "backbone", "{}"),
    ("weights", "weights", "{}"),
    ("model", "model", "{}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("accuracy_interval", "95% interval", "{0[0]:.3f}-{0[1]:.3f}"),
    ("extract_cpu_ms", "CPU ms/photo", "{:.1f}"),
    ("balanced_accuracy", "bal. acc.", "{:.3f}"),
    ("macro_f1", "macro-F1", "{:.3f}"),
    ("top3_accuracy", "top-3", "{:.3f}"),
    ("log_loss", "log loss", "{:.3f}"),
    ("fit_seconds", "fit s", "{:.1f}"),
    ("predict_ms_per_image", "ms/image", "{:.3f}"),
    ("vs_baseline_points", "vs baseline", "{:+.1f}"),
    ("chosen", "chosen", "{}"),
)
#: Settings shown in their own columns (and in the feature-set table); backbone and weights always are.
SETTING_COLUMNS = ("pooling", "image_size", "interpolation", "precision", "decode", "store_dtype")
_NUMBER = re.compile(r"[+-]?[0-9][0-9,]*(\.[0-9]+)?")
_SHA256_ID = re.compile(r"sha256:([0-9a-f]{8})[0-9a-f]{56}")
#: Text cells longer than this may wrap in the HTML report (shorter ones stay on one line).
_WRAP_AFTER = 12


def differing_settings(feature_sets: Mapping[str, FeatureSetRecord]) -> list[str]:
    """The settings (of ``SETTING_COLUMNS`` and any other recorded one) whose values differ between the
    feature sets, in ``SETTING_COLUMNS`` order."""
    keys = list(SETTING_COLUMNS) + sorted(
        {key for fs in feature_sets.values() for key in fs.settings} - {*SETTING_COLUMNS, "backbone", "weights"}
    )
    return [key for key in keys if len({str(fs.settings.get(key)) for fs in feature_sets.values()}) > 1]


def format_table(rows: Sequence[Row], feature_sets: Mapping[str, FeatureSetRecord] | None = None) -> str:
    """The table as aligned text, one line per row in the given order; numbers right-aligned.

    With ``feature_sets`` (the run document's), the settings that differ between them get columns.
    """
    headers, cells = _table_cells(rows, feature_sets or {})
    numeric = _numeric_columns(cells, len(headers))
    widths = [max(len(line[i]) for line in [headers, *cells]) for i in range(len(headers))]
    lines = []
    for line in [headers, *cells]:
        parts = [
            text.rjust(width) if number else text.ljust(width)
            for text, width, number in zip(line, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_report(
    document: RunDocument,
    out_dir: str | os.PathLike,
    mistakes: Sequence[Mistake] | None = None,
    *,
    runs: Sequence[str | os.PathLike] | None = None,
) -> dict[str, list[str]]:
    """Write report.csv, report.md, report.html, scores.png and a confusion PNG per row into ``out_dir``.

    With ``mistakes`` (the run's, ``furnitype.classify.mistakes``), the reports get a section of them and
    their thumbnails go to ``out_dir/mistakes/``: made from the photos, or with ``runs`` (a report of saved
    runs) copied from the thumbnails those run folders keep (``furnitype.reports.mistakes.write_thumbnails``).

    Returns
    -------
    dict of str to list of str
        File names written, by kind (``csv``, ``markdown``, ``html``, ``bar_chart``, ``confusion``,
        ``thumbnails``).
    """
    out = Path(out_dir)
    rows = document.rows
    thumbnails = write_thumbnails(mistakes, out, runs=runs) if mistakes is not None else {}
    section = _MistakesSection(mistakes, thumbnails, list(document.feature_sets), out)
    confusion = {}
    for row in rows:
        name = f"confusion-{_slug(_row_id(row))}.png"
        title = f"{row.rank}. {row.label}: accuracy {row.accuracy:.3f}"
        plot_confusion(row.confusion, row.classes, title, out / name)
        confusion[_row_id(row)] = name
    plot_scores(rows, out / "scores.png", title=f"{document.run}: scores on the test photos, best first")
    with open(out / "report.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(row.scalars() for row in rows)
    (out / "report.md").write_text(_markdown(document, confusion, section), encoding="utf-8")
    (out / "report.html").write_text(_html(document, confusion, out, section), encoding="utf-8")
    return {
        "csv": ["report.csv"],
        "markdown": ["report.md"],
        "html": ["report.html"],
        "bar_chart": ["scores.png"],
        "confusion": list(confusion.values()),
        "thumbnails": sorted(set(thumbnails.values())),
    }


@dataclass(frozen=True)
class _MistakesSection:
    """What the mistakes section of a report needs (``mistakes`` None: the run records none)."""

    mistakes: Sequence[Mistake] | None
    thumbnails: dict[str, str]
    feature_sets: list[str]
    out: Path

    def markdown(self) -> list[str]:
        return [] if self.mistakes is None else markdown_section(self.mistakes, self.thumbnails, self.feature_sets)

    def html(self) -> list[str]:
        if self.mistakes is None:
            return []
        return html_section(self.mistakes, self.thumbnails, self.feature_sets, self.out)


# -- rendering ------------------------------------------------------------------------------------------


def _display_columns(feature_sets: Mapping[str, FeatureSetRecord]) -> list[tuple[str, str, str]]:
    columns = list(DISPLAY_COLUMNS)
    at = [key for key, _, _ in columns].index("weights") + 1
    columns[at:at] = [(key, key.replace("_", " "), "{}") for key in differing_settings(feature_sets)]
    return columns


def _cell(row: Row, key: str, fmt: str, feature_sets: Mapping[str, FeatureSetRecord]) -> str:
    fs = feature_sets.get(row.features)
    if key == "extract_cpu_ms":  # the feature set's extraction cost; "-" where its file records none
        cost = fs.extract_cpu_ms if fs is not None else None
        return "-" if cost is None else fmt.format(cost)
    if hasattr(row, key):
        value = getattr(row, key)
    else:
        value = fs.settings.get(key) if fs is not None else None
    return "" if value is None else short_ids(fmt.format(value))


def short_ids(text: str) -> str:
    """``text`` with each ``sha256:<64 hex digits>`` shown by its first 8 digits, as weights are (``file a9f13754``):
    tables show short ids, report.csv and JSON the full ones."""
    return _SHA256_ID.sub(r"\1", text)


def _numeric_columns(cells: Sequence[Sequence[str]], n: int) -> list[bool]:
    """Columns whose every non-empty cell is a number (they are right-aligned)."""
    return [
        any(line[i] for line in cells) and all(not line[i] or _NUMBER.fullmatch(line[i]) for line in cells)
        for i in range(n)
    ]


def _row_id(row: Row) -> str:
    return f"{row.features}/{row.model}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def _split_text(document: RunDocument) -> str:
    options = document.options
    if options is None:
        return f"Merged from the runs {', '.join(document.merged_from or [])}; nothing was retrained."
    if options.test_files:
        test = "scored on the separately extracted test files " + ", ".join(options.test_files)
    else:
        test = (
            f"{options.test_size:.0%} of each class's distinct photos held out for testing, split by "
            "image content (sha256) so identical photos never straddle training and test"
        )
    versions = document.versions or {}
    return (
        f"Created {document.created} by furnitype {versions.get('furnitype')}; {test}; seed "
        f"{options.seed}; {options.cv}-fold CV for logreg/svm; {options.val_size:.0%} of the "
        f"training photos for the dense head's early stopping; class weights: "
        f"{options.class_weight or 'none'}."
    )


def _per_class_rows(row: Row) -> list[list[str]]:
    per_class = row.per_class
    return [
        [name, f"{p:.3f}", f"{r:.3f}", f"{f:.3f}", str(s)]
        for name, p, r, f, s in zip(
            row.classes,
            per_class["precision"],
            per_class["recall"],
            per_class["f1"],
            per_class["support"],
            strict=True,
        )
    ]


def _baseline_rows(document: RunDocument) -> list[list[str]]:
    return [
        [
            key,
            fs.backbone or "?",
            fs.weights,
            *(f"{fs.baseline[k]:.3f}" for k in SCORE_NAMES),
            f"{fs.baseline['fit_seconds']:.1f}",
        ]
        for key, fs in document.feature_sets.items()
        if fs.baseline
    ]


_BASELINE_HEADERS = [
    "features",
    "backbone",
    "weights",
    "accuracy",
    "bal. acc.",
    "macro-F1",
    "top-3",
    "log loss",
    "fit s",
]
_SET_HEADERS = ["features", "file", "backbone", "weights", *(key.replace("_", " ") for key in SETTING_COLUMNS),
                "dim", "train", "test", "classes", "left out"]
_CLASS_HEADERS = ["class", "precision", "recall", "F1", "test photos"]


def _set_rows(document: RunDocument) -> list[list[str]]:
    return [
        [
            key,
            fs.file,
            str(fs.backbone),
            fs.weights,
            *(str(fs.settings.get(setting, "")) for setting in SETTING_COLUMNS),
            str(fs.feature_dim),
            str(fs.n_train),
            str(fs.n_test),
            str(len(fs.classes)),
            ", ".join(fs.dropped_classes) or "-",
        ]
        for key, fs in document.feature_sets.items()
    ]


def _random_weights_note(document: RunDocument) -> str:
    """A warning naming the feature sets made with random weights, or ""."""
    random = [key for key, fs in document.feature_sets.items()
              if any(w.startswith("none") for w in str(fs.settings.get("weights")).split("+"))]  # fused: joined
    if not random:
        return ""
    return (
        f"Made with random weights (--weights none): {', '.join(random)}. Their scores show what an untrained "
        "network's features give, not what ImageNet features would."
    )


def _table_cells(
    rows: Sequence[Row], feature_sets: Mapping[str, FeatureSetRecord]
) -> tuple[list[str], list[list[str]]]:
    columns = _display_columns(feature_sets)
    return [h for _, h, _ in columns], [[_cell(row, key, fmt, feature_sets) for key, _, fmt in columns] for row in rows]


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


def _heading(document: RunDocument) -> str:
    """``furnitype classify`` over a run, ``furnitype report`` over a merged report."""
    return "furnitype report" if document.kind == REPORT_KIND else "furnitype classify"


def _markdown(document: RunDocument, confusion: dict[str, str], mistakes: _MistakesSection) -> str:
    rows = document.rows
    parts = [
        f"# {_heading(document)}: {document.run}",
        "",
        _split_text(document),
        "",
        "## Results, best first",
        "",
        *([f"**Warning.** {_random_weights_note(document)}", ""] if _random_weights_note(document) else []),
        _md_table(*_table_cells(rows, document.feature_sets)),
        "",
        f"*vs baseline*: accuracy minus that of a plain {document.baseline} on the same photos, in points.",
        "",
        "![scores](scores.png)",
        "",
    ]
    if document.notes:
        parts += ["## Notes", "", *(f"- {note}" for note in document.notes), ""]
    if document.warnings:
        parts += ["## Warnings", "", *(f"- {warning}" for warning in document.warnings), ""]
    parts += [
        f"## Baseline: {document.baseline}",
        "",
        _md_table(_BASELINE_HEADERS, _baseline_rows(document)),
        "",
        "## Feature sets",
        "",
        _md_table(_SET_HEADERS, _set_rows(document)),
        "",
        "## Per class",
        "",
    ]
    for row in rows:
        parts += [
            f"### {row.rank}. {row.label}: {row.chosen}",
            "",
            _md_table(_CLASS_HEADERS, _per_class_rows(row)),
            "",
            f"![confusion matrix]({confusion[_row_id(row)]})",
            "",
        ]
    return "\n".join(parts + mistakes.markdown())


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], flagged: Sequence[str] = ()) -> str:
    """An HTML table: number columns right-aligned, text left-aligned; a cell whose text is in ``flagged``
    is marked."""
    numeric = _numeric_columns(rows, len(headers))

    def cell(tag: str, text: str, number: bool) -> str:
        marks = (("num", number), ("flag", text in flagged), ("long", len(str(text)) > _WRAP_AFTER))
        classes = " ".join(name for name, on in marks if on)
        attribute = f' class="{classes}"' if classes else ""
        return f"<{tag}{attribute}>{html.escape(str(text))}</{tag}>"

    head = "".join(cell("th", h, number) for h, number in zip(headers, numeric, strict=True))
    body = "".join(
        "<tr>" + "".join(cell("td", c, number) for c, number in zip(r, numeric, strict=True)) + "</tr>" for r in rows
    )
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _image(out: Path, name: str, alt: str) -> str:
    data = base64.b64encode((out / name).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" title="{html.escape(name)}">'


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 80em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.8em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.35em; text-align: left; }
td { white-space: nowrap; }
td.long { white-space: normal; overflow-wrap: anywhere; min-width: 7em; }
.wide { max-width: 100%; overflow-x: auto; }
th { background: #f2f2f2; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.flag { background: #fff3cd; color: #7a4d00; font-weight: 600; }
p.flag { padding: 0.5em 0.8em; border-left: 4px solid #e0a800; }
img { max-width: 100%; }
.row { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
"""


def _html(document: RunDocument, confusion: dict[str, str], out: Path, mistakes: _MistakesSection) -> str:
    rows = document.rows
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_heading(document)}: {esc(document.run)}</title><style>{_STYLE}{MISTAKES_STYLE}</style></head>"
        "<body>",
        f"<h1>{_heading(document)}: {esc(document.run)}</h1>",
        f"<p>{esc(_split_text(document))}</p>",
        "<h2>Results, best first</h2>",
        *([f'<p class="flag">{esc(_random_weights_note(document))}</p>'] if _random_weights_note(document) else []),
        _html_table(*_table_cells(rows, document.feature_sets), flagged=("random",)),
        f"<p><em>vs baseline</em>: accuracy minus that of a plain {esc(str(document.baseline))} "
        "on the same photos, in points.</p>",
        _image(out, "scores.png", "scores of every row"),
    ]
    for title, items in (("Notes", document.notes), ("Warnings", document.warnings)):
        if items:
            parts += [f"<h2>{title}</h2><ul>", *(f"<li>{esc(item)}</li>" for item in items), "</ul>"]
    parts += [
        f"<h2>Baseline: {esc(str(document.baseline))}</h2>",
        _html_table(_BASELINE_HEADERS, _baseline_rows(document), flagged=("random",)),
        "<h2>Feature sets</h2>",
        _html_table(_SET_HEADERS, _set_rows(document), flagged=("random",)),
        "<h2>Per class</h2>",
    ]
    for row in rows:
        parts += [
            f"<h3>{row.rank}. {esc(row.label)}: {esc(row.chosen)}</h3>",
            '<div class="row">',
            _html_table(_CLASS_HEADERS, _per_class_rows(row)),
            _image(out, confusion[_row_id(row)], f"confusion matrix of {row.label}"),
            "</div>",
        ]
    parts += mistakes.html()
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
