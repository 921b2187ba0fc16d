"""The ``furnitype`` command line: each command parses its options, calls the API once and prints.

What every command shares lives here once: the options (``json_option``, ``quiet_option``, ``out_option``,
``weights_option``, ``batch_options``, ``engine_options``), the choices (taken from the registries and constants
of the API), ``api_command``, which turns the API's errors into ``Error: <one line>`` with their exit code and
shows the API's progress lines on stderr, and ``Group``, which turns Ctrl-C into exit 130 wherever it comes. The
conventions are written in docs/cli.md.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click
from tqdm import tqdm

from furnitype.classify.metadata import MAX_SEED
from furnitype.classify.models import CLASS_WEIGHTS, MODEL_NAMES
from furnitype.engines import ENGINES
from furnitype.errors import FurnitypeError, InputError

#: The exit code of a command stopped by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


class Command(click.Command):
    """A command whose one-line summary in ``furnitype --help`` is never cut short."""

    def get_short_help_str(self, limit: int = 45) -> str:
        return super().get_short_help_str(limit=1_000)


class APIChoice(click.Choice):
    """A choice among the values of an API constant (or registry function), read when first needed: the
    extraction registries import numpy, Pillow and h5py, which ``furnitype --help`` and the other commands need
    not wait for."""

    def __init__(self, module: str, name: str, *, case_sensitive: bool = True):
        self.source = (module, name)
        self.case_sensitive = case_sensitive  # ``choices`` is set when first asked for (``__getattr__``)

    def __getattr__(self, name: str):
        if name != "choices":
            raise AttributeError(name)
        found = getattr(importlib.import_module(self.source[0]), self.source[1])
        self.choices = tuple(found() if callable(found) else found)
        return self.choices


class Group(click.Group):
    """The commands, listed in ``--help`` in the order they are defined here: the order of the pipeline.

    Ctrl-C exits 130 with one line wherever it comes: while click parses the options (some choices import the
    API) as in a command's body, where click would say "Aborted!" and exit 1.
    """

    command_class = Command

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def make_context(self, *args, **kwargs) -> click.Context:
        with _interrupts_exit_130():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context):
        with _interrupts_exit_130():
            return super().invoke(ctx)


@contextmanager
def _interrupts_exit_130() -> Iterator[None]:
    """Ctrl-C as one line on stderr (what was kept, else ``interrupted``) and exit 130."""
    try:
        yield
    except KeyboardInterrupt as stop:
        click.echo(str(stop) or "interrupted", err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


# -- what every command shares ----------------------------------------------------------------------------


def api_command(command: Callable) -> Callable:
    """Run a command's body: the API's progress lines on stderr (unless ``--quiet``), its errors as one line
    ``Error: ...`` with the error's exit code (Ctrl-C: ``Group``)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with _progress_lines(enabled=not kwargs.get("quiet", False)):
                return command(*args, **kwargs)
        except FurnitypeError as err:
            if os.environ.get("FURNITYPE_DEBUG", "") not in ("", "0"):
                traceback.print_exc()  # with its causes, above the one line
            exc = click.ClickException(str(err))
            exc.exit_code = err.exit_code
            raise exc from err

    return wrapper


class _ProgressHandler(logging.Handler):
    """The API's progress lines (``loading vgg16 ...``) on stderr, on lines of their own above a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


@contextmanager
def _progress_lines(*, enabled: bool) -> Iterator[None]:
    logger = logging.getLogger("furnitype")
    if not enabled:
        yield
        return
    handler, level, propagate = _ProgressHandler(logging.INFO), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # Not also through the root logger's handler: TensorFlow's absl logging gives it one on its first log call
    # (int8's conversion), and every later line would be printed twice.
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _options(*decorators: Callable) -> Callable:
    """Apply option decorators in the order given (they appear in ``--help`` in that order)."""

    def apply(command: Callable) -> Callable:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


def json_option(help: str = "Print the result as JSON on stdout.") -> Callable:
    return click.option("--json", "as_json", is_flag=True, help=help)


def quiet_option(help: str = "No progress bar or progress lines on stderr (warnings are still shown).") -> Callable:
    return click.option("--quiet", "-q", is_flag=True, help=help)


def out_option(help: str, *, default: str | None = None) -> Callable:
    return click.option("--out", "-o", default=default, show_default=default is not None,
                        type=click.Path(readable=False), help=help)


def weights_option(help: str, *, default: str | None = None) -> Callable:
    return click.option("--weights", default=default, show_default=default is not None, help=help)


def batch_options(*, ray: bool = False) -> Callable:
    where = " (with --engine ray: threads in each Ray worker, at most 4)" if ray else ""
    return _options(
        click.option("--batch-size", default=32, show_default=True, type=int, help="Photos per batch."),
        click.option("--workers", type=int, help=f"Decoding workers{where}: threads, processes past 4.  "
                                                 "[default: sized to the machine: one per core with a GPU, else up "
                                                 "to 4]"),
        click.option("--device", default="auto", show_default=True, metavar="auto|cpu|gpu|gpu:N",
                     help="Where the network runs: auto is the first GPU the Keras backend sees, else the CPU."),
    )


def engine_options(*, what: str, workers: bool) -> Callable:
    """``--engine`` and ``--address``; with ``workers``, the Ray worker options too (only with ``--engine ray``)."""
    options = [
        click.option("--engine", default="local", show_default=True, type=click.Choice(ENGINES),
                     help=f"ray: {what} on Ray workers (needs pip install 'furnitype[ray]')."),
        click.option("--address", help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT.  "
                     "[default: $RAY_ADDRESS, else a local Ray]"),
    ]
    if workers:
        options += [
            click.option("--ray-workers", type=int,
                         help="Ray workers, one network each.  [default: as many as the cluster's GPUs/CPUs allow]"),
            click.option("--gpus-per-worker", type=float, help="GPUs per Ray worker.  [default: 0]"),
            click.option("--cpus-per-worker", type=float, help="CPUs per Ray worker.  [default: 1]"),
        ]
    return _options(*options)


def top_k_option(help: str, default: int) -> Callable:
    """``-k/--top-k``, with ``--k`` kept as another name for it."""
    return click.option("--top-k", "-k", "--k", "top_k", default=default, show_default=True, type=int, help=help)


def _print_json(obj) -> None:
    from furnitype.outputs import json_ready

    click.echo(json.dumps(json_ready(obj), indent=2, default=str))


# -- the commands, in pipeline order ------------------------------------------------------------------------


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(package_name="furnitype")
def cli() -> None:
    """Recognise furniture and home-goods product photos with pretrained convolutional networks.

    \b
    The pipeline: extract features of photos, train and compare classifiers on them, then label new photos
    or find look-alikes:
      furnitype extract photos/ --out vgg.h5
      furnitype classify vgg.h5 --out runs/furniture
      furnitype predict runs/furniture new-photos/
      furnitype similar vgg.h5 new-sofa.jpg

    Exit codes: 0 success, 1 an error furnitype explains, 2 bad input or usage, 130 interrupted (docs/cli.md).
    """


@cli.command()
@click.argument("images", nargs=-1, type=click.Path(readable=False))
@click.option("--backbone", "-b", type=APIChoice("furnitype.extract.backbones", "list_backbones", case_sensitive=False),
              help="Convolutional base (inception = InceptionV3).  [default: vgg16]")
@weights_option("imagenet, none (random, seeded) or a weights file.  [default: imagenet]")
@click.option("--pooling", type=APIChoice("furnitype.extract.backbones", "POOLINGS"), help="[default: avg]")
@click.option("--image-size", type=int, help="Square input side in pixels.  [default: 224 / 299]")
@click.option("--precision", type=APIChoice("furnitype.extract.backbones", "PRECISIONS"),
              help="Compute precision (mixed; int8: OpenVINO, needs pip install 'furnitype[int8]').  "
              "[default: float32]")
@click.option("--store-dtype", type=APIChoice("furnitype.extract.settings", "STORE_DTYPES"),
              help="[default: float32]")
@click.option("--interpolation", type=APIChoice("furnitype.extract.images", "INTERPOLATIONS"),
              help="[default: bilinear]")
@click.option("--decode", type=APIChoice("furnitype.extract.images", "DECODE_MODES"),
              help="draft: let the JPEG decoder downscale first (faster on big photos).  [default: exact]")
@click.option("--layers", metavar="NAMES",
              help="Blocks to pool, comma-separated (vgg16: block1 .. block5; inception: mixed0 .. mixed10), each "
              "L2-normalised, concatenated; one network pass for all.  [default: last, the network's output, not "
              "normalised]")
@click.option("--mirror/--no-mirror", default=None,
              help="Average each photo's features with its left-right mirror's: twice the network work per photo.  "
              "[default: no]")
@click.option("--like", type=click.Path(dir_okay=False, readable=False),
              help="Take every setting not given from this feature file (int8: its quantized network too).  "
              "[default: the --out file's, when it exists]")
@click.option("--calibrate", type=click.Path(exists=True, readable=False),
              help="int8: calibrate on these photos.  [default: the store's, else a sample of IMAGES]")
@batch_options(ray=True)
@engine_options(what="run the network", workers=True)
@out_option("Feature file.  [default: features-<backbone>.h5]")
@click.option("--manifest", type=click.Path(dir_okay=False, readable=False),
              help="CSV of path,label rows (paths relative to it).")
@click.option("--label", metavar="NAME", help="Label every photo of this call with NAME (default: its folder's or "
              "manifest's; a photo listed without one keeps its stored label).")
@click.option("--rehash", is_flag=True, help="Read every file again, even those whose size and times are unchanged.")
@click.option("--overwrite", is_flag=True, help="Replace a feature file made with other settings, or a damaged one.")
@quiet_option()
@json_option("Print a JSON summary on stdout (progress stays on stderr).")
@api_command
def extract(images, backbone, weights, pooling, image_size, precision, store_dtype, interpolation, decode,
            layers, mirror, like, calibrate, batch_size, workers, device, engine, address, ray_workers, gpus_per_worker,
            cpus_per_worker, out,
            manifest, label, rehash, overwrite, quiet, as_json) -> None:
    """Extract pooled CNN features of photos into an HDF5 feature store (the cache).

    IMAGES are folders (one subfolder per class, or unlabelled photos) or image files. Only photos whose
    content is not in the store yet are computed; files whose size and times are unchanged are not read again.
    Rows of photos gone from a listed folder are removed. Ctrl-C keeps the finished batches (exit 130). A
    setting not given is the --like file's, else the existing store's, else the default.

    \b
    Examples:
      furnitype extract photos/ --backbone inception
      furnitype extract photos/ --weights vgg16_notop.weights.h5 --precision bfloat16 --out vgg.h5
      furnitype extract photos/ --weights vgg16_notop.weights.h5 --layers block4,block5 --out vgg45.h5
      furnitype extract photos/ --weights vgg16_notop.weights.h5 --precision int8 --out vgg-int8.h5
      furnitype extract new-sofas/ --label sofa --out vgg.h5
      furnitype extract test-photos/ --like vgg-int8.h5 --out test-int8.h5
      furnitype extract --manifest labels.csv --json
      furnitype extract photos/ --engine ray --address auto --ray-workers 8 --gpus-per-worker 1
    """
    if not images and not manifest:
        raise click.UsageError("give at least one folder or image file, or --manifest CSV.")
    from furnitype.extraction import extract as run_extract

    result = run_extract(
        images, backbone=backbone, weights=weights, pooling=pooling, image_size=image_size, precision=precision,
        interpolation=interpolation, decode=decode, layers=layers, mirror=mirror, store_dtype=store_dtype,
        calibrate=calibrate, like=like, out=out,
        manifest=manifest, label=label, rehash=rehash, overwrite=overwrite, batch_size=batch_size, workers=workers,
        device=device, engine=engine, ray_address=address, ray_workers=ray_workers, gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker, progress=not quiet,
    )
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        _print_json(result.as_dict())
    else:
        click.echo(result.summary())


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, readable=False))
@quiet_option("No progress lines on stderr (warnings are still shown).")
@json_option("Print everything as JSON.")
@api_command
def info(file, quiet, as_json) -> None:
    """Show what a feature file holds: rows, classes with counts, settings, skipped files with reasons.

    \b
    Example:
      furnitype info features-vgg16.h5
    """
    from furnitype.features import summary as read_summary

    summary = read_summary(file)
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
@click.argument("file", type=click.Path(dir_okay=False, readable=False))
@quiet_option("No progress lines on stderr (warnings are still shown).")
@json_option("Print the result as JSON: file, rows, dropped, bytes_before, bytes_after.")
@api_command
def compact(file, quiet, as_json) -> None:
    """Rewrite a feature file with only its rows: drop removed rows, give back unused space.

    Also upgrades an older feature file to the current format. Extract compacts by itself when removed rows
    pass a quarter of the file.

    \b
    Example:
      furnitype compact features-vgg16.h5
    """
    from furnitype.features.store import compact as run_compact

    done = run_compact(file)
    if as_json:
        _print_json({"file": file, **dataclasses.asdict(done)})
        return
    click.echo(
        f"{file}: {done.rows:,} rows kept, {done.dropped:,} removed entries dropped, "
        f"{done.bytes_before / 1e6:,.1f} MB -> {done.bytes_after / 1e6:,.1f} MB"
    )


@cli.command()
@click.argument("features", nargs=-1, required=True, type=click.Path(dir_okay=False, readable=False))
@click.option("--models", default=",".join(MODEL_NAMES), show_default=True,
              help=f"Comma-separated models, of {', '.join(MODEL_NAMES)}.")
@click.option("--test", "test_files", multiple=True, type=click.Path(dir_okay=False, readable=False),
              help="Separately extracted test features (repeat: one per FEATURES file, matched by settings).")
@click.option("--test-size", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of each class held out for testing.  [default: 0.2]")
@click.option("--val-size", type=click.FloatRange(0, 1, max_open=True), default=0.15, show_default=True,
              help="Share for dense early stopping.")
@click.option("--cv", type=click.IntRange(min=2), default=5, show_default=True, help="CV folds for logreg and svm.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=42, show_default=True,
              help="Seed of the split, folds and weights.")
@click.option("--previous", type=click.Path(file_okay=False, readable=False),
              help="A run to compare with: its best model is scored on this run's test photos too (a note).")
@click.option("--class-weight", default="none", show_default=True,
              type=click.Choice([str(weight).lower() for weight in CLASS_WEIGHTS]),
              help="Weigh classes inversely to their size.")
@click.option("--fuse", is_flag=True, help="Train on one feature set: the FEATURES files' rows of the same photos "
              "side by side (named vgg+inc); predict extracts new photos with each file's settings.")
@engine_options(what="cross-validate", workers=False)
@out_option("Run folder.  [default: runs/<date-time>]")
@click.option("--overwrite", is_flag=True, help="Replace an existing run at --out (swapped in when complete).")
@quiet_option("No progress lines (warnings are still shown).")
@json_option("Print the result as JSON on stdout (progress stays on stderr).")
@api_command
def classify(features, models, test_files, test_size, val_size, cv, seed, previous, class_weight, fuse, engine,
             address, out, overwrite, quiet, as_json) -> None:
    """Train dense, logreg and svm on feature files and compare them in one report.

    A row per FEATURES file x model, best first, scored on held-out photos (split by image content) or on
    --test files; the run folder keeps the report (CSV, Markdown, HTML, PNGs), the split and the models.
    The dense head trains for at most 200 epochs, stopped early when the loss on --val-size of the training
    photos has not improved for 10 (a bar counts its epochs on a terminal).

    \b
    Examples:
      furnitype classify feats/vgg16.h5 feats/inception.h5 --out runs/furniture
      furnitype classify feats/vgg16.h5 feats/inception.h5 --fuse --out runs/fused
      furnitype classify feats/vgg16.h5 --models logreg,svm --test-size 0.25 --cv 3
      furnitype classify feats/train.h5 --test feats/test.h5 --json
      furnitype classify shop.h5 --test new.h5 --previous runs/shop --out runs/shop-2
    """
    from furnitype.engines import joblib_backend
    from furnitype.training import classify as run_classify

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
            previous=previous,
            progress=None if quiet else (lambda line: click.echo(line, err=True)),
            fuse=fuse,
        )
    if quiet:
        for warning in run.warnings:
            click.echo(f"warning: {warning}", err=True)
    _print_run(run, as_json)


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, readable=False))
@out_option("Write the (merged) report files into this folder.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing report at --out (never a run), and an existing --mistakes file.")
@click.option("--mistakes", type=click.Path(readable=False),
              help="Write the misclassified test photos and possible label errors as CSV.")
@quiet_option("No progress lines on stderr (warnings are still shown).")
@json_option()
@api_command
def report(runs, out, overwrite, mistakes, quiet, as_json) -> None:
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
    click.echo(format_table(run.rows, run.document.feature_sets))
    for note in run.notes:
        click.echo(f"note: {note}")
    if run.report_html is not None and run.report_html.is_file():
        click.echo(f"HTML report: {run.report_html}")


@cli.command()
@click.argument("run", type=click.Path(file_okay=False, readable=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("--model", "-m", default="best", show_default=True, type=click.Choice(["best", *MODEL_NAMES]),
              help="best: the model of the run's best row.")
@click.option("--features", "feature_set", multiple=True, help="The run's feature set (training file name without "
              ".h5), or a feature file (FILE.h5) of the run's settings whose rows the photos it holds take, instead of "
              "being extracted (a fused set: repeat it, one per part).  [default: the best row's]")
@top_k_option("Classes kept per photo.", default=3)
@weights_option("Backbone weights file.  [default: the one recorded with the run's features]")
@batch_options()
@out_option("Write the predictions as CSV (the table is then not printed).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@quiet_option("No progress bar, progress lines or summary line.")
@json_option("Print the predictions as a JSON list (progress stays on stderr).")
@api_command
def predict(run, images, model, feature_set, top_k, weights, batch_size, workers, device, out, overwrite, quiet,
            as_json) -> None:
    """Label new photos with a model of a run, extracting them exactly as the run's features were made.

    IMAGES are files or folders (walked like extract); rows come in the order given. The backbone, weights,
    input size, pooling and precision come from the run; a weights file whose sha256 differs from the recorded
    one is refused. A file that cannot be used gets a row with the reason (the command still succeeds).
    With --features FILE.h5, photos whose content the feature file holds take its rows (no network).

    \b
    Examples:
      furnitype predict runs/furniture new-photos/
      furnitype predict runs/furniture a.jpg b.jpg --model svm --top-k 2 --json
      furnitype predict runs/furniture photos/ --weights vgg16_notop.weights.h5 --out preds.csv
      furnitype predict runs/furniture photos/ --features vgg.h5
    """
    from furnitype.predict import predict as run_predict

    files = [f for f in feature_set if f.lower().endswith((".h5", ".hdf5")) or os.sep in f]  # not a set's name
    if len(feature_set) > 1 and len(files) < len(feature_set):
        raise InputError("--features is given more than once only with feature files (one per part of a fused set).")
    store, feature_set = (files or None), (None if files or not feature_set else feature_set[0])
    result = run_predict(run, images, model=model, features=feature_set, top_k=top_k, weights=weights,
                         batch_size=batch_size, workers=workers, device=device, out=out, overwrite=overwrite,
                         progress=not quiet,
                         store=store)
    if as_json:
        _print_json([p.as_dict() for p in result.predictions])
        return
    if not out:
        click.echo(result.format_table())
    if not quiet:
        click.echo(result.summary() + (f"; wrote {out}" if out else ""))


@cli.command()
@click.argument("run", type=click.Path(file_okay=False, readable=False))
@click.argument("features", nargs=-1, required=True, type=click.Path(dir_okay=False, readable=False))
@click.option("--n", "-n", "n", default=40, show_default=True, type=int, help="Photos to suggest.")
@out_option("The CSV to correct: path,label,probability,label_2,probability_2,sha256.", default="to-label.csv")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out or --sheet file.")
@click.option("--sheet", type=click.Path(readable=False), help="Draw the photos with the model's guesses (PNG).")
@quiet_option("No progress lines on stderr (warnings are still shown).")
@json_option()
@api_command
def suggest(run, features, n, out, overwrite, sheet, quiet, as_json) -> None:
    """Pick the new photos most worth labelling to adapt a run's model to their source.

    FEATURES holds new photos (from extract, with the run's feature settings; its labels are ignored); a run
    trained with --fuse takes one feature file per part, in the parts' order. The CSV lists the chosen photos,
    most worth labelling first, with the model's guess in the label column: correct it, then add the photos to
    the training store and retrain:

    \b
      furnitype extract --manifest to-label.csv --out train.h5 [--weights ...]
      furnitype classify train.h5 --test new.h5

    \b
    Examples:
      furnitype suggest runs/furniture new.h5
      furnitype suggest runs/furniture new.h5 --n 20 --sheet to-label.png
      furnitype suggest runs/fused new-vgg.h5 new-inc.h5
    """
    from furnitype.suggest import suggest as run_suggest

    result = run_suggest(run, list(features), n=n, out=out, overwrite=overwrite, sheet=sheet)
    if as_json:
        _print_json({**result.as_dict(), "out": out, "sheet": sheet})
        return
    click.echo(result.format_table())
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(result.summary() + f"; wrote {out}" + (f" and {sheet}" if sheet else ""))


@cli.command()
@click.argument("features", type=click.Path(dir_okay=False, readable=False))
@click.argument("queries", nargs=-1, required=True, type=click.Path(readable=False))
@top_k_option("Neighbours per query.", default=5)
@click.option("--exclude-self", is_flag=True, help="Leave a stored query's own row out of its neighbours.")
@click.option("--sheet", type=click.Path(readable=False), help="Draw a contact sheet PNG of the results.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --sheet file.")
@click.option("--exact", is_flag=True, default=None,
              help="Compare with every stored row (default below 50,000 rows; above, the store's index).")
@weights_option("Weights for new photos.  [default: the one recorded in FEATURES]")
@batch_options()
@quiet_option("No progress lines on stderr.")
@json_option("Print the results as a JSON list.")
@api_command
def similar(features, queries, top_k, exclude_self, sheet, overwrite, exact, weights, batch_size, workers, device,
            quiet,
            as_json) -> None:
    """Find the stored photos that look most like each query photo (cosine distance of their features).

    A QUERY already in FEATURES (same path or same content) uses its stored row and finds itself first, at
    distance 0; another photo is extracted with the feature file's own settings. Folders are walked.

    \b
    Examples:
      furnitype similar feats/vgg16.h5 photos/chair/3f2a.jpg
      furnitype similar feats/vgg16.h5 new-sofa.jpg --top-k 8 --sheet sofa.png
      furnitype similar feats/vgg16.h5 queries/ --exclude-self --json
    """
    from furnitype.similar import similar as run_similar

    matches = run_similar(features, queries, k=top_k, exclude_self=exclude_self, weights=weights,
                          batch_size=batch_size, workers=workers, device=device, sheet=sheet, overwrite=overwrite,
                          exact=exact or None)
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
@click.argument("features", type=click.Path(dir_okay=False, readable=False))
@click.option("--max-distance", type=float, help="Cosine distance (0 to 2) within which two photos are "
              "near-duplicates; 0: identical features only.  [default: 0.05]")
@out_option("Write the groups as CSV: group,kind,conflict,path,label,sha256,distance.")
@click.option("--sheet", type=click.Path(readable=False), help="Draw the groups, a row each, as a PNG.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out or --sheet file.")
@click.option("--exact", is_flag=True, default=None,
              help="Compare every content with every other (default below 50,000 rows; above, the store's index).")
@quiet_option("No progress lines on stderr.")
@json_option("Print the groups as JSON.")
@api_command
def duplicates(features, max_distance, out, sheet, overwrite, exact, quiet, as_json) -> None:
    """Find groups of identical photos (one content under several paths) and of near-duplicates.

    Near-duplicates are photos whose features are within --max-distance of each other, directly or through
    others. Groups whose photos carry different labels come first (one product filed under two classes: a
    label to fix), then larger groups.

    \b
    Examples:
      furnitype duplicates feats/vgg16.h5
      furnitype duplicates feats/vgg16.h5 --max-distance 0.1 --out groups.csv --sheet groups.png
    """
    from furnitype.duplicates import MAX_DISTANCE
    from furnitype.duplicates import duplicates as run_duplicates

    result = run_duplicates(features, max_distance=MAX_DISTANCE if max_distance is None else max_distance, out=out,
                            sheet=sheet, overwrite=overwrite, exact=exact or None)
    if as_json:
        _print_json({**result.as_dict(), "out": out, "sheet": sheet})
        return
    if result.groups:
        click.echo(result.format_table())
    wrote = [path for path in (out, sheet) if path]
    click.echo(result.summary() + (f"; wrote {' and '.join(wrote)}" if wrote else ""))


@cli.command()
@click.argument("run", type=click.Path(file_okay=False, readable=False))
@click.option("--catalogue", required=True, type=click.Path(dir_okay=False, readable=False),
              help="Feature file of the catalogue /v1/similar searches (rows extract adds appear within seconds).")
@click.option("--queue", type=click.Path(dir_okay=False, readable=False),
              help="Feature file of new photos to label (/v1/suggest).")
@click.option("--labels", type=click.Path(dir_okay=False, readable=False),
              help="CSV of path,label rows the labels given on the page are appended to (needs --queue).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (another than a loopback address is reachable from other machines).")
@click.option("--port", default=8000, show_default=True, type=int, help="Port (0: any free port).")
@click.option("--token", envvar="FURNITYPE_TOKEN", help="Require Authorization: Bearer TOKEN on the API.  "
              "[default: $FURNITYPE_TOKEN, else none]")
@click.option("--model", "-m", default="best", show_default=True, type=click.Choice(["best", *MODEL_NAMES]),
              help="best: the model of the run's best row on the catalogue's settings.")
@top_k_option("Classes per prediction, unless a request asks for another number.", default=3)
@weights_option("Backbone weights file.  [default: the one recorded with the run's features]")
@click.option("--max-batch", default=32, show_default=True, type=int, help="Most photos per network pass.")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=float,
              help="How long a batch waits for more photos after its first.")
@click.option("--max-queue", default=256, show_default=True, type=int,
              help="Photos admitted at a time; past it requests get 503 with Retry-After.")
@click.option("--max-upload-mb", default=20.0, show_default=True, type=float, help="Largest request body (413).")
@click.option("--max-pixels", default=40_000_000, show_default=True, type=int, help="Largest photo in pixels (422).")
@click.option("--body-timeout-s", default=60.0, show_default=True, type=float,
              help="How long a request's body may take to arrive (408).")
@click.option("--workers", type=int, help="Decoding threads.  [default: up to 4]")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|gpu|gpu:N",
              help="Where the network runs: auto is the first GPU the Keras backend sees, else the CPU.")
@quiet_option("No progress lines on stderr (the ready line and warnings are still shown).")
@api_command
def serve(run, catalogue, queue, labels, host, port, token, model, top_k, weights, max_batch, max_wait_ms, max_queue,
          max_upload_mb, max_pixels, body_timeout_s, workers, device, quiet) -> None:
    """Serve a run's model and a catalogue over HTTP: a web page at / and a JSON API under /v1 (docs/serve.md).

    The model and the network are loaded once; "ready on http://HOST:PORT" is printed when they are warm.
    Photos of concurrent requests go through the network together. Ctrl-C or SIGTERM stops taking requests
    and finishes those in flight (Ctrl-C exits 130, SIGTERM 0).

    \b
    Examples:
      furnitype serve runs/furniture --catalogue vgg.h5
      furnitype serve runs/furniture --catalogue vgg.h5 --queue new.h5 --labels labels.csv --port 8080
      FURNITYPE_TOKEN="$(cat token.txt)" furnitype serve runs/furniture --catalogue vgg.h5 --host 0.0.0.0
    """
    from furnitype.serve import serve as run_server

    run_server(run, catalogue, host=host, port=port, echo=lambda line: click.echo(line, err=True), queue=queue,
               labels=labels, token=token, model=None if model == "best" else model, top_k=top_k, weights=weights,
               max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, max_upload_mb=max_upload_mb,
               max_pixels=max_pixels, body_timeout_s=body_timeout_s, decode_workers=workers, device=device)


def main() -> None:
    """The command line (``furnitype.__main__`` starts it, and catches Ctrl-C while this module is imported)."""
    cli(prog_name="furnitype")


if __name__ == "__main__":
    main()
