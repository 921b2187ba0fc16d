"""``furnitype report`` and the report writers: ranking, the aligned table, merging runs, files, pictures."""

import csv
import json
import re

import pytest
from scipy.stats import binomtest

from furnitype import features as store
from furnitype.classify import load_run
from furnitype.classify.confidence import wilson_interval
from furnitype.classify.data import weights_label
from furnitype.classify.metadata import Row
from furnitype.classify.run import rank_rows
from furnitype.classify.synthetic import make_features
from furnitype.reports.plots import plot_confusion, plot_scores, scores_figure
from furnitype.reports.table import differing_settings, format_table, write_report
from furnitype.training import classify
from tests.conftest import run_cli as invoke

META = {"backbone": "vgg16", "weights": "imagenet", "pooling": "avg", "image_size": 224}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two small runs (logreg only) on different feature files; one class name needs HTML escaping."""
    base = tmp_path_factory.mktemp("report")
    made = {}
    for name, seed, backbone in (("first", 1, "vgg16"), ("second", 2, "inception")):
        X, labels, sha = make_features(
            [12, 12, 12], 16, seed=seed, separation=2.0, classes=["bed", "<b>chair</b>", "tv"]
        )
        path = base / f"{backbone}.h5"
        store.save(
            path,
            features=X,
            paths=[f"/p/{i}" for i in range(len(labels))],
            labels=list(labels),
            sha256=list(sha),
            meta={**META, "backbone": backbone},
        )
        made[name] = classify(
            [path], models=["logreg"], cv=3, out=base / name, model_params={"logreg": {"Cs": (0.1, 1.0)}}
        ).path
    return made


def test_reprint_a_run(runs):
    result = invoke("report", runs["first"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[2].startswith("1  vgg16") and " logreg " in lines[2]
    assert lines[-1] == f"HTML report: {runs['first'] / 'report.html'}"


def test_report_json_matches_the_saved_table(runs):
    result = invoke("report", runs["first"], "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    with open(runs["first"] / "report.csv", newline="") as fh:
        saved = list(csv.DictReader(fh))
    assert [r["model"] for r in summary["rows"]] == [r["model"] for r in saved]
    assert float(saved[0]["accuracy"]) == pytest.approx(summary["rows"][0]["accuracy"])


def test_merge_runs_into_one_table(runs, tmp_path):
    out = tmp_path / "merged"
    result = invoke("report", runs["first"], runs["second"], "--out", out, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert sorted(r["run"] for r in rows) == ["first", "second"]
    assert [r["rank"] for r in rows] == [1, 2]
    for name in ("report.csv", "report.md", "report.html", "scores.png", "metrics.json"):
        assert (out / name).is_file(), name
    assert len(list(out.glob("confusion-*.png"))) == 2
    assert "<h1>furnitype report: first + second</h1>" in (out / "report.html").read_text()
    assert (out / "report.md").read_text().startswith("# furnitype report: first + second\n")
    assert (runs["first"] / "report.md").read_text().startswith("# furnitype classify: first\n")
    notes = json.loads(result.stdout)["notes"]
    assert any("2 different sets of test photos" in note for note in notes)
    table = invoke("report", runs["first"], runs["second"]).output.splitlines()
    assert table[0].split()[:3] == ["#", "features", "backbone"] and "HTML report" not in table[-1]
    assert table[2].split()[1] in ("first/vgg16", "second/inception")


def test_report_refuses_what_is_not_a_run(tmp_path, runs):
    result = invoke("report", tmp_path)
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: {tmp_path} is not a furnitype run (no metrics.json)."
    result = invoke("report", tmp_path / "missing")
    assert result.output.strip() == f"Error: run folder not found: {tmp_path / 'missing'}"
    result = invoke("report", runs["first"], "--out", runs["first"])
    assert result.exit_code == 2 and "is one of the runs being reported" in result.output


def test_html_escapes_names_and_embeds_pictures(runs):
    html = (runs["first"] / "report.html").read_text()
    assert "&lt;b&gt;chair&lt;/b&gt;" in html and "<b>chair</b>" not in html
    assert html.count('src="data:image/png;base64,') == 2
    markdown = (runs["first"] / "report.md").read_text()
    assert "![confusion matrix](confusion-vgg16-logreg.png)" in markdown


def _row(model, accuracy, macro_f1=0.5, log_loss=1.0, **extra):
    values = {
        "features": "f",
        "backbone": "vgg16",
        "weights": "imagenet",
        "model": model,
        "accuracy": accuracy,
        "balanced_accuracy": accuracy,
        "macro_f1": macro_f1,
        "top3_accuracy": 1.0,
        "log_loss": log_loss,
        "fit_seconds": 1.25,
        "fit_cpu_seconds": 1.5,
        "predict_ms_per_image": 0.01,
        "n_train": 40,
        "n_test": 10,
        "n_classes": 2,
        "test_set": "0123456789ab",
        "chosen": "C=1",
        "details": {},
        "params": {},
        "classes": ["bed", "chair"],
        "confusion": [[5, 0], [1, 4]],
        "per_class": {},
        "model_dir": f"models/f/{model}",
        "run": "r",
        "baseline_accuracy": 0.85,
        "vs_baseline_points": 0.0,
    }
    return Row(**{**values, **extra})


def test_rank_rows_best_first_with_ties_broken():
    rows = rank_rows(
        [_row("a", 0.8), _row("b", 0.9), _row("c", 0.9, macro_f1=0.6), _row("d", 0.9, log_loss=0.5)]
    )
    assert [(r.model, r.rank) for r in rows] == [("c", 1), ("d", 2), ("b", 3), ("a", 4)]


def test_format_table_aligns_columns():
    text = format_table(rank_rows([_row("svm", 0.912), _row("dense", 0.95)]))
    lines = text.splitlines()
    assert len({len(line) for line in lines[:2]}) == 1
    assert lines[2].split()[:6] == ["1", "f", "vgg16", "imagenet", "dense", "0.950"]
    position = lines[0].index("accuracy") + len("accuracy")
    assert all(line[position - 5 : position] in ("0.950", "0.912", "-----") for line in lines[1:])


def test_weights_label():
    assert weights_label("imagenet") == "imagenet"
    assert weights_label("none(seed=0)") == "random"
    assert weights_label("sha256:a9f1375470681ab3") == "file a9f13754"
    assert weights_label(None) == "?"


def test_plots_write_png(tmp_path):
    confusion = plot_confusion([[3, 1], [0, 4]], ["bed", "chair"], "a title", tmp_path / "c.png")
    scores = plot_scores([_row("svm", 0.9), _row("dense", 0.8, baseline_accuracy=0.9)], tmp_path / "s.png")
    for path in (confusion, scores):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_lists_its_files(runs, tmp_path):
    written = write_report(load_run(runs["first"]).document, tmp_path)
    assert written["confusion"] == ["confusion-vgg16-logreg.png"]
    assert all((tmp_path / name).is_file() for names in written.values() for name in names)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """A run on two stores of the same photos and backbone: float32 ImageNet, and bfloat16 random weights."""
    base = tmp_path_factory.mktemp("compared")
    X, labels, sha = make_features([12, 12, 12], 16, seed=5, separation=2.0)
    for name, settings in (
        ("vgg-f32", {"precision": "float32", "store_dtype": "float32", "weights": "imagenet"}),
        ("vgg-bf16", {"precision": "bfloat16", "store_dtype": "float16", "weights": "none(seed=0)"}),
    ):
        store.save(base / f"{name}.h5", features=X, paths=[f"/p/{i}.jpg" for i in range(len(labels))],
                   labels=list(labels), sha256=list(sha),
                   meta={**META, "interpolation": "bilinear", "decode": "exact", **settings})
    return classify([base / "vgg-f32.h5", base / "vgg-bf16.h5"], models=["logreg"], cv=3, out=base / "run")


def test_feature_sets_are_told_apart_by_name_and_differing_settings(compared):
    assert differing_settings(compared.document.feature_sets) == ["precision", "store_dtype"]
    lines = format_table(compared.rows, compared.document.feature_sets).splitlines()
    assert lines[0].split()[:8] == ["#", "features", "backbone", "weights", "precision", "store", "dtype", "model"]
    cells = {line.split()[1]: line.split()[2:6] for line in lines[2:]}
    assert cells == {"vgg-f32": ["vgg16", "imagenet", "float32", "float32"],
                     "vgg-bf16": ["vgg16", "random", "bfloat16", "float16"]}
    markdown = (compared.path / "report.md").read_text()
    assert "logreg on vgg-f32 (vgg16, imagenet)" in markdown and "logreg on vgg-bf16 (vgg16, random)" in markdown
    assert "**Warning.** Made with random weights (--weights none): vgg-bf16." in markdown
    assert format_table(compared.rows).splitlines()[0].split()[:5] == ["#", "features", "backbone", "weights", "model"]


def test_html_aligns_numbers_right_text_left_and_flags_random_weights(compared):
    html = (compared.path / "report.html").read_text()
    results = html.split("<h2>Results, best first</h2>")[1].split("</table>")[0]
    assert '<p class="flag">Made with random weights (--weights none): vgg-bf16.' in results
    header = re.findall(r"<th( class=\"num\")?>([^<]*)</th>", results)
    aligned = {name: bool(num) for num, name in header}
    assert aligned["accuracy"] and aligned["#"] and aligned["vs baseline"] and aligned["fit s"]
    assert not aligned["features"] and not aligned["model"] and not aligned["chosen"] and not aligned["precision"]
    assert '<td class="flag">random</td>' in results and "<td>vgg-bf16</td>" in results
    assert re.search(r'<td class="num">0\.\d{3}</td>', results)
    assert ".num { text-align: right" in html and "text-align: left" in html


@pytest.mark.parametrize("n", [1, 3, 12])
def test_the_scores_chart_has_a_title_a_zero_based_axis_and_a_legend_that_fits(n):
    rows = rank_rows([_row(f"m{i}", 0.5 + i / 40, features=f"features-{i}") for i in range(n)])
    fig = scores_figure(rows, title="run: scores")
    [ax] = fig.axes
    assert ax.get_title() == "run: scores" and ax.get_ylim() == (0.0, 1.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{r.features}\n{r.model}" for r in rows]
    [legend] = fig.legends
    fig.draw_without_rendering()
    box, figure, plot = legend.get_window_extent(), fig.bbox, ax.get_window_extent()
    assert 0 <= box.x0 and box.x1 <= figure.x1 and box.y1 <= plot.y0  # whole, under the chart
    assert box.height < 0.15 * figure.height and plot.width > 0.8 * figure.width


def test_report_refuses_a_run_given_twice(runs, tmp_path):
    """The same run twice (also through a symbolic link) would write a report that cannot be read back."""
    link = tmp_path / "alias"
    link.symlink_to(runs["first"])
    for second in (runs["first"], link):
        result = invoke("report", runs["first"], second, "--out", tmp_path / "merged")
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"Error: run {second} is given twice") and result.output.count("\n") == 1
    assert not (tmp_path / "merged").exists()


def test_report_merges_runs_of_the_same_name_from_different_folders(runs, tmp_path):
    import shutil

    for year in ("2024", "2025"):
        shutil.copytree(runs["first"], tmp_path / year / "vgg")
    out = tmp_path / "merged"
    result = invoke("report", tmp_path / "2024" / "vgg", tmp_path / "2025" / "vgg", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert sorted(r["run"] for r in json.loads(result.stdout)["rows"]) == ["2024/vgg", "2025/vgg"]
    reread = invoke("report", out, "--json")
    assert reread.exit_code == 0, reread.output
    assert len(list(out.glob("confusion-*.png"))) == 2


def test_each_accuracy_has_its_95_percent_interval(runs):
    """On a few dozen test photos accuracies swing by points: the table and every file show how far."""
    row = load_run(runs["first"]).rows[0]
    right = sum(line[i] for i, line in enumerate(row.confusion))
    low, high = binomtest(right, row.n_test).proportion_ci(0.95, method="wilson")
    assert row.accuracy_interval == pytest.approx((low, high)) and low < row.accuracy <= high
    shown = f"{low:.3f}-{high:.3f}"
    table = invoke("report", runs["first"]).output.splitlines()
    assert "95% interval" in table[0] and shown in table[2]
    assert shown in (runs["first"] / "report.html").read_text() and shown in (runs["first"] / "report.md").read_text()
    with open(runs["first"] / "report.csv", newline="") as fh:
        saved = next(csv.DictReader(fh))
    assert (float(saved["accuracy_low"]), float(saved["accuracy_high"])) == pytest.approx((low, high), rel=1e-5)
    rows = json.loads(invoke("report", runs["first"], "--json").stdout)["rows"]
    assert (rows[0]["accuracy_low"], rows[0]["accuracy_high"]) == pytest.approx((low, high), rel=1e-5)


@pytest.mark.parametrize("right, n", [(0, 1), (0, 56), (51, 56), (56, 56), (513, 531)])
def test_wilson_interval_is_scipys(right, n):
    expected = binomtest(right, n).proportion_ci(0.95, method="wilson")
    assert wilson_interval(right, n) == pytest.approx((expected.low, expected.high))


def test_an_int8_quantization_is_shown_by_short_ids_and_no_table_overflows(tmp_path):
    quantization = f"openvino-nncf calibration=sha256:{'a' * 64} (64 photos) network=sha256:{'b' * 64}"
    files = []
    for name, extra in (("f32", {}), ("int8", {"precision": "int8", "quantization": quantization})):
        X, labels, sha = make_features([12, 12], 8, seed=3, separation=2.0)
        files.append(tmp_path / f"{name}.h5")
        store.save(files[-1], features=X, paths=[f"/p/{i}" for i in range(len(labels))], labels=list(labels),
                   sha256=list(sha), meta={**META, "weights": f"sha256:{'c' * 64}", **extra})
    run = classify(files, models=["logreg"], cv=3, out=tmp_path / "run", model_params={"logreg": {"Cs": (1.0,)}})
    short = "openvino-nncf calibration=aaaaaaaa (64 photos) network=bbbbbbbb"
    table = invoke("report", run.path).output
    html = (run.path / "report.html").read_text()
    for shown in (table, html, (run.path / "report.md").read_text()):
        assert short in shown and not re.search("[0-9a-f]{64}", shown)
    assert max(map(len, table.splitlines())) < 260
    assert html.count("<table>") == html.count('<div class="wide"><table>') > 0  # each scrolls in its own box
    assert '<td class="long">' in html  # and long text wraps
    assert json.loads((run.path / "metrics.json").read_text())["feature_sets"]["int8"]["settings"]["quantization"] == (
        quantization  # the data keeps the full ids
    )
