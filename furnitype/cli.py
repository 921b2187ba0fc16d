"""The ``furnitype`` command line: each command parses its options, calls the API once and prints."""

from __future__ import annotations

import functools
import json
import sys

import click

from furnitype.classify.metadata import MAX_SEED
from furnitype.errors import FurnitypeError


def _api_errors(command):
    """Turn furnitype's exceptions into a one-line ``Error: ...`` and the error's exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FurnitypeError as err:
            exc = click.ClickException(str(err))
            exc.exit_code = err.exit_code
            raise exc from None

    return wrapper


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _ray_only(engine: str, **options) -> None:
    """Refuse Ray's options without ``--engine ray``."""
    given = ["--" + name.replace("_", "-") for name, value in options.items() if value is not None]
    if given and engine != "ray":
        raise click.UsageError(f"{', '.join(given)} only apply with --engine ray.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="furnitype")
def cli() -> None:
    """Recognise furniture and home-goods product photos with pretrained convolutional networks."""


@cli.command()
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--backbone", "-b", default="vgg16", show_default=True,
              type=click.Choice(["vgg16", "inception", "inception_v3"], case_sensitive=False),
              help="Convolutional base (inception = InceptionV3).")
@click.option("--weights", default="imagenet", show_default=True, help="imagenet, none (random, seeded) or a file.")
@click.option("--pooling", default="avg", show_default=True, type=click.Choice(["avg", "max", "flatten"]))
@click.option("--image-size", type=click.IntRange(min=1), help="Square input side.  [default: 224 / 299]")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--precision", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16", "int8"]),
              help="Compute precision (mixed; int8: OpenVINO, needs pip install 'furnitype[int8]').")
@click.option("--store-dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16"]))
@click.option("--interpolation", default="bilinear", show_default=True,
              type=click.Choice(["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]))
@click.option("--decode", default="exact", show_default=True, type=click.Choice(["exact", "draft"]),
              help="draft: let the JPEG decoder downscale first (faster on big photos).")
@click.option("--calibrate", type=click.Path(exists=True),
              help="int8: calibrate on these photos.  [default: the store's, else a sample of IMAGES]")
@click.option("--workers", type=click.IntRange(min=1),
              help="Decoding threads (in each Ray worker with --engine ray).  [default: up to 4]")
@click.option("--engine", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="ray: run the network on Ray workers (needs pip install 'furnitype[ray]').")
@click.option("--address", help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT.  [default: $RAY_ADDRESS, else local]")
@click.option("--ray-workers", type=click.IntRange(min=1),
              help="Ray workers, one network each.  [default: as many as the cluster's GPUs/CPUs allow]")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), help="GPUs per Ray worker.  [default: 0]")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True),
              help="CPUs per Ray worker.  [default: 1]")
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Feature file.  [default: features-<backbone>.h5]")
@click.option("--manifest", type=click.Path(dir_okay=False), help="CSV of path,label rows (paths relative to it).")
@click.option("--label", help="Label every photo of this call with NAME (default: its folder's or manifest's; "
              "a photo listed without one keeps its stored label).", metavar="NAME")
@click.option("--rehash", is_flag=True, help="Read every file again, even those whose size and times are unchanged.")
@click.option("--overwrite", is_flag=True, help="Replace a feature file made with other settings, or a damaged one.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@_api_errors
def extract(images, backbone, weights, pooling, image_size, batch_size, precision, store_dtype, interpolation, decode,
            calibrate, workers, engine, address, ray_workers, gpus_per_worker, cpus_per_worker, out, manifest, label,
            rehash, overwrite, quiet, as_json) -> None:
    """Extract pooled CNN features of IMAGES into an HDF5 feature cache.

    IMAGES are folders (one subfolder per class, or unlabelled photos) or image files. Only photos whose
    content is not in the cache yet are computed; files whose size and times are unchanged are not read again.
    Rows of photos gone from a listed folder are removed. Ctrl-C keeps the finished batches (exit 130).

    \b
    Examples:
      furnitype extract photos/ --backbone inception
      furnitype extract photos/ --weights vgg16_notop.weights.h5 --precision bfloat16 --out vgg.h5
      furnitype extract photos/ --weights vgg16_notop.weights.h5 --precision int8 --out vgg-int8.h5
      furnitype extract new-sofas/ --label sofa --out vgg.h5
      furnitype extract --manifest labels.csv --json
      furnitype extract photos/ --engine ray --address auto --ray-workers 8 --gpus-per-worker 1
    """
    if not images and not manifest:
        raise click.UsageError("give at least one folder or image file, or --manifest CSV.")
    _ray_only(engine, address=address, ray_workers=ray_workers, gpus_per_worker=gpus_per_worker,
              cpus_per_worker=cpus_per_worker)
    from furnitype.errors import Interrupted
    from furnitype.extraction import extract as run_extract

    try:
        result = run_extract(
            images, backbone=backbone, weights=weights, pooling=pooling, image_size=image_size,
            batch_size=batch_size, precision=precision, store_dtype=store_dtype, interpolation=interpolation,
            decode=decode, calibrate=calibrate, out=out, manifest=manifest, label=label, rehash=rehash,
            overwrite=overwrite, progress=not quiet and not as_json, workers=workers, engine=engine,
            ray_address=address, ray_workers=ray_workers, gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker,
        )
    except Interrupted as stop:
        click.echo(str(stop), err=True)
        sys.exit(stop.exit_code)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        _print_json(result.as_dict())
    else:
        click.echo(result.summary())


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@_api_errors
def info(file, as_json) -> None:
    """Show a feature file: rows, classes with counts, settings, skipped files with reasons.

    \b
    Example:
      furnitype info features-vgg16.h5
    """
    from furnitype.features.describe import describe

    summary = describe(file)
    if as_json:
        _print_json(summary)
        return
    click.echo(f"{file}: {summary['rows']:,} rows x {summary['feature_dim']:,} features")
    if summary["dead_rows"]:
        click.echo(f"  {summary['dead_rows']:,} removed rows wait for compaction (furnitype compact {file})")
    for name, count in summary["classes"].items():
        click.echo(f"  {name or '(unlabelled)':<20} {count:>8,}")
    click.echo("settings:")
    for key, value in summary["meta"].items():
        click.echo(f"  {key:<20} {value}")
    click.echo(f"skipped: {len(summary['skipped'])}")
    for path, reason in summary["skipped"]:
        click.echo(f"  {path}: {reason}")


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@_api_errors
def compact(file) -> None:
    """Rewrite a feature file with only its rows: drop removed rows, give back unused space.

    Also upgrades an older feature file to the current format. Extract compacts by itself when removed rows
    pass a quarter of the file.

    \b
    Example:
      furnitype compact features-vgg16.h5
    """
    from furnitype.features.store import compact as run_compact

    done = run_compact(file)
    click.echo(
        f"{file}: {done.rows:,} rows kept, {done.dropped:,} removed entries dropped, "
        f"{done.bytes_before / 1e6:,.1f} MB -> {done.bytes_after / 1e6:,.1f} MB"
    )


@cli.command()
@click.argument("features", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--models", default="dense,logreg,svm", show_default=True, help="Comma-separated models.")
@click.option(
    "--test",
    "test_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Separately extracted test features (repeat: one per FEATURES file, matched by settings).",
)
@click.option("--test-size", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of each class held out for testing.  [default: 0.2]")
@click.option("--val-size", type=click.FloatRange(0, 1, max_open=True), default=0.15, show_default=True,
              help="Share for dense early stopping.")
@click.option("--cv", type=click.IntRange(min=2), default=5, show_default=True, help="CV folds for logreg and svm.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=42, show_default=True,
              help="Seed of the split, folds and weights.")
@click.option(
    "--class-weight",
    type=click.Choice(["none", "balanced"]),
    default="none",
    show_default=True,
    help="Weigh classes inversely to their size.",
)
@click.option("--engine", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="ray: cross-validate on Ray workers (needs pip install 'furnitype[ray]').")
@click.option("--address", help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT.  [default: $RAY_ADDRESS, else local]")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder.  [default: runs/<date-time>]")
@click.option("--overwrite", is_flag=True, help="Replace an existing run at --out (swapped in when complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines (warnings are still shown).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@_api_errors
def classify(
    features, models, test_files, test_size, val_size, cv, seed, class_weight, engine, address, out, overwrite, quiet,
    as_json
) -> None:
    """Train dense, logreg and svm on FEATURES files and compare them in one report.

    A row per FEATURES file x model, best first, scored on held-out photos (split by image content) or on
    --test files; the run folder keeps the report (CSV, Markdown, HTML, PNGs), the split and the models.

    \b
    Examples:
      furnitype classify feats/vgg16.h5 feats/inception.h5 --out runs/furniture
      furnitype classify feats/vgg16.h5 --models logreg,svm --test-size 0.25 --cv 3
      furnitype classify feats/train.h5 --test feats/test.h5 --json
    """
    from furnitype.engines import joblib_backend
    from furnitype.training import classify as run_classify

    if test_files and test_size is not None:
        raise click.UsageError("use either --test or --test-size, not both.")
    _ray_only(engine, address=address)
    with joblib_backend(engine, ray_address=address):
        run = run_classify(
            features,
            models=models.split(","),
            test_files=test_files,
            test_size=test_size,
            val_size=val_size,
            cv=cv,
            seed=seed,
            class_weight=None if class_weight == "none" else class_weight,
            out=out,
            overwrite=overwrite,
            progress=None if quiet else (lambda line: click.echo(line, err=True)),
        )
    if quiet:
        for warning in run.warnings:
            click.echo(f"warning: {warning}", err=True)
    _print_run(run, as_json)


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Write the (merged) report files here.")
@click.option("--overwrite", is_flag=True, help="Replace an existing report at --out (never a run).")
@click.option("--mistakes", type=click.Path(dir_okay=False),
              help="Write the misclassified test photos and possible label errors as CSV.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@_api_errors
def report(runs, out, overwrite, mistakes, as_json) -> None:
    """Reprint saved runs, or merge several into one table; nothing is retrained.

    \b
    Examples:
      furnitype report runs/furniture
      furnitype report runs/vgg16 runs/inception --out runs/compared
      furnitype report runs/furniture --mistakes mistakes.csv
      furnitype report runs/furniture --json
    """
    from furnitype.training import report_runs

    _print_run(report_runs(runs, out=out, overwrite=overwrite, mistakes=mistakes), as_json)
    if mistakes and not as_json:
        click.echo(f"mistakes: {mistakes}")


def _print_run(run, as_json: bool) -> None:
    """Print a run's table best first, its notes and the HTML report's path (or all of it as JSON)."""
    from furnitype.reports.table import format_table

    if as_json:
        _print_json(run.summary())
        return
    click.echo(format_table(run.rows))
    for note in run.notes:
        click.echo(f"note: {note}")
    if run.report_html is not None and run.report_html.is_file():
        click.echo(f"HTML report: {run.report_html}")


@cli.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--model", "-m", default="best", show_default=True,
              type=click.Choice(["best", "dense", "logreg", "svm"]), help="best: the model of the run's best row.")
@click.option("--features", "feature_set", help="The run's feature set (training file name without .h5).  "
              "[default: the best row's]")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1), help="Classes kept per photo.")
@click.option("--weights", help="Backbone weights file.  [default: the one recorded with the run's features]")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", type=click.IntRange(min=1), help="Decoding threads.  [default: up to 4]")
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Write the predictions as CSV.")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as a JSON list.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary line.")
@_api_errors
def predict(run, images, model, feature_set, top_k, weights, batch_size, workers, out, as_json, quiet) -> None:
    """Label IMAGES with a model of RUN, extracting them exactly as the run's features were made.

    IMAGES are files or folders (walked like extract). The backbone, weights, input size, pooling and precision
    come from the run; a weights file whose sha256 differs from the recorded one is refused. A file that
    cannot be used gets a row with the reason (the command still succeeds).

    \b
    Examples:
      furnitype predict runs/furniture new-photos/
      furnitype predict runs/furniture a.jpg b.jpg --model svm --top-k 2 --json
      furnitype predict runs/furniture photos/ --weights vgg16_notop.weights.h5 --out preds.csv
    """
    from furnitype.predict import predict as run_predict

    result = run_predict(run, images, model=model, features=feature_set, top_k=top_k, weights=weights,
                         batch_size=batch_size, workers=workers, progress=not quiet and not as_json)
    if out:
        result.write_csv(out)
    if as_json:
        _print_json([p.as_dict() for p in result.predictions])
        return
    if not out:
        click.echo(result.format_table())
    if not quiet:
        click.echo(result.summary() + (f"; wrote {out}" if out else ""))


@cli.command()
@click.argument("features", type=click.Path(dir_okay=False))
@click.argument("queries", nargs=-1, required=True, type=click.Path())
@click.option("--k", "-k", "k", default=5, show_default=True, type=click.IntRange(min=1), help="Neighbours per query.")
@click.option("--exclude-self", is_flag=True, help="Leave a stored query's own row out of its neighbours.")
@click.option("--sheet", type=click.Path(dir_okay=False), help="Draw a contact sheet PNG of the results.")
@click.option("--weights", help="Weights for new photos.  [default: the one recorded in FEATURES]")
@click.option("--json", "as_json", is_flag=True, help="Print the results as a JSON list.")
@_api_errors
def similar(features, queries, k, exclude_self, sheet, weights, as_json) -> None:
    """Find the stored photos of FEATURES that look most like each QUERY (cosine distance).

    A QUERY already in FEATURES (same path or same content) uses its stored row and finds itself first, at
    distance 0; another photo is extracted with the feature file's own settings. Folders are walked.

    \b
    Examples:
      furnitype similar feats/vgg16.h5 photos/chair/3f2a.jpg
      furnitype similar feats/vgg16.h5 new-sofa.jpg --k 8 --sheet sofa.png
      furnitype similar feats/vgg16.h5 queries/ --exclude-self --json
    """
    from furnitype.similar import SimilarIndex

    index = SimilarIndex.open(features)
    matches = index.search(queries, k=k, exclude_self=exclude_self, weights=weights)
    if sheet:
        from furnitype.reports.sheet import contact_sheet

        meta = index.feature_set.meta
        title = f"{features}: {len(index.feature_set):,} photos, {meta.get('backbone')} {meta.get('pooling')}"
        contact_sheet(matches, sheet, title=title)
    if as_json:
        _print_json([m.as_dict() for m in matches])
        return
    for match in matches:
        where = "in the store" if match.in_store else "new photo"
        click.echo(f"{match.query} ({match.label or 'no label'}, {where})")
        if match.error:
            click.echo(f"  error: {match.error}")
        for rank, n in enumerate(match.neighbours, 1):
            click.echo(f"  {rank:>2}  {n.distance:.4f}  {n.label or '-':<12} {n.path}")
    if sheet:
        click.echo(f"contact sheet: {sheet}")


@cli.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.argument("features", type=click.Path(dir_okay=False))
@click.option("--n", "-n", "n", default=40, show_default=True, type=click.IntRange(min=1), help="Photos to suggest.")
@click.option("--out", "-o", default="to-label.csv", show_default=True, type=click.Path(dir_okay=False),
              help="The CSV to correct: path,label,probability,label_2,probability_2,sha256.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--sheet", type=click.Path(dir_okay=False), help="Draw the photos with the model's guesses (PNG).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_api_errors
def suggest(run, features, n, out, overwrite, sheet, as_json) -> None:
    """Pick the photos of FEATURES most worth labelling to adapt RUN's model to their source.

    FEATURES holds new photos (from extract, with the run's feature settings; its labels are ignored). The
    CSV lists the chosen photos, most worth labelling first, with the model's guess in the label column:
    correct it, then add the photos to the training store and retrain:

    \b
      furnitype extract --manifest to-label.csv --out train.h5 [--weights ...]
      furnitype classify train.h5 --test new.h5

    \b
    Examples:
      furnitype suggest runs/furniture new.h5
      furnitype suggest runs/furniture new.h5 --n 20 --sheet to-label.png
    """
    from furnitype.suggest import suggest as run_suggest

    result = run_suggest(run, features, n=n)
    result.write_csv(out, overwrite=overwrite)
    if sheet:
        from furnitype.reports.sheet import labelling_sheet

        labelling_sheet(result.suggestions, sheet, title=f"{features}: to label for run {run} ({result.model})")
    if as_json:
        _print_json({**result.as_dict(), "out": out, "sheet": sheet})
        return
    click.echo(result.format_table())
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(result.summary() + f"; wrote {out}" + (f" and {sheet}" if sheet else ""))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="furnitype")


if __name__ == "__main__":
    sys.exit(main())
