"""``make demo``: draw a small synthetic catalogue and run the whole pipeline on it, command by command, then
adapt the model to a new source of photos (suggest, label, extract, classify).

Usage: ``python -m furnitype.demo DIR [--weights-vgg16 W] [--weights-inception W]``. Weights default to
``imagenet``; when they cannot be downloaded, the demo says so and goes on with random weights.
"""

from __future__ import annotations

import csv
import shlex
import sys
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw

from furnitype.cli import cli

CLASSES = ("lamp", "shelf", "stool", "mirror")
PER_CLASS = 30


def draw_product(kind: str, rng: np.random.Generator, size: int = 160, *, dark: bool = False) -> Image.Image:
    """One synthetic product photo: a simple drawing of ``kind`` in a random colour, place and scale.

    ``dark``: another source's look, a dim background and a noisier sensor.
    """
    low, high = (40, 110) if dark else (200, 256)
    background = tuple(int(v) for v in rng.integers(low, high, 3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    colour = tuple(int(v) for v in rng.integers(0, 160, 3))
    s = rng.uniform(0.6, 1.0) * size
    x, y = rng.uniform(0, size - s * 0.8), rng.uniform(0, size - s * 0.9)
    if kind == "lamp":
        draw.polygon(
            [(x + s * 0.2, y + s * 0.35), (x + s * 0.6, y + s * 0.35), (x + s * 0.45, y), (x + s * 0.35, y)],
            fill=colour,
        )
        draw.rectangle([x + s * 0.38, y + s * 0.35, x + s * 0.42, y + s * 0.8], fill=colour)
        draw.rectangle([x + s * 0.25, y + s * 0.8, x + s * 0.55, y + s * 0.85], fill=colour)
    elif kind == "shelf":
        for level in range(4):
            top = y + level * s * 0.25
            draw.rectangle([x, top, x + s * 0.75, top + s * 0.04], fill=colour)
        draw.rectangle([x, y, x + s * 0.04, y + s * 0.8], fill=colour)
        draw.rectangle([x + s * 0.71, y, x + s * 0.75, y + s * 0.8], fill=colour)
    elif kind == "stool":
        draw.ellipse([x, y + s * 0.2, x + s * 0.7, y + s * 0.35], fill=colour)
        for leg in (0.1, 0.33, 0.56):
            draw.line([x + s * leg, y + s * 0.3, x + s * (leg + 0.02), y + s * 0.85], fill=colour, width=4)
    else:
        draw.ellipse([x, y, x + s * 0.6, y + s * 0.85], outline=colour, width=int(s * 0.06))
        draw.ellipse([x + s * 0.1, y + s * 0.1, x + s * 0.5, y + s * 0.75], fill=(190, 215, 235))
    noise = rng.normal(0, 14 if dark else 6, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))


def draw_catalogue(folder: Path, per_class: int = PER_CLASS, seed: int = 0, *, dark: bool = False) -> Path:
    """Write ``folder/<class>/<class>_<i>.jpg`` (kept when already there); returns ``folder``."""
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = draw_product(kind, rng, dark=dark)
            target = folder / kind / f"{kind}_{i:02d}.jpg"
            if not target.exists():
                image.save(target, quality=90)
    return folder


def _run(args: list[str]) -> None:
    click.echo(f"\n$ furnitype {shlex.join(args)}", err=True)
    cli.main(args, prog_name="furnitype", standalone_mode=False)


#: VGG16's blocks 4 and 5: +1.2 points of accuracy over block 5 alone for about the same CPU
#: (docs/benchmarks.md, "Richer features").
VGG16_LAYERS = "block4,block5"


def _extract(photos: Path, backbone: str, weights: str, out: Path, *options: str) -> str:
    """Extract ``photos``; returns the weights used (random ones when ImageNet's cannot be downloaded)."""
    args = ["extract", str(photos), "--backbone", backbone, *options, "--out", str(out), "--overwrite"]
    try:
        _run([*args, "--weights", weights])
        return weights
    except click.ClickException as err:
        if weights != "imagenet" or "ImageNet weights" not in err.message:
            raise
        click.secho(f"WARNING: {err.message}", fg="yellow", err=True)
        click.secho(
            f"WARNING: going on with RANDOM {backbone} weights: the figures below mean nothing about "
            "real accuracy; they only show the pipeline working.",
            fg="yellow",
            err=True,
        )
        _run([*args, "--weights", "none"])
        return "none"


def _label_by_folder(to_label: Path) -> None:
    """Play the person who labels: put each photo's true class (its folder) in the CSV's label column."""
    with open(to_label, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    for row in rows[1:]:
        row[1] = Path(row[0]).parent.name
    with open(to_label, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    click.echo(f"\n(the demo labels {len(rows) - 1} photos of {to_label} by eye: the label column now holds the "
               "true classes)", err=True)


def adapt_to_new_source(folder: Path, weights: str) -> None:
    """The loop of docs/adapt.md: suggest photos of a new source, label them, add them, retrain, compare."""
    source = draw_catalogue(folder / "new-source", per_class=12, seed=2, dark=True)
    click.echo(f"\nDrew {len(CLASSES) * 12} photos of a new source (dark, noisy) in {source}", err=True)
    new, train, to_label = folder / "new-source-vgg16.h5", folder / "features-vgg16.h5", folder / "to-label.csv"
    _run(["extract", str(source), "--like", str(train), "--weights", weights, "--out", str(new), "--overwrite"])
    _run(["predict", str(folder / "run"), str(source), "--features", "features-vgg16", "--out",
          str(folder / "new-source-predictions.csv"), "--overwrite"])
    _run(["suggest", str(folder / "run"), str(new), "--n", "8", "--out", str(to_label), "--overwrite",
          "--sheet", str(folder / "to-label.png")])
    _label_by_folder(to_label)
    _run(["extract", "--manifest", str(to_label), "--weights", weights, "--out", str(train)])
    _run(["classify", str(train), "--test", str(new), "--models", "logreg,svm", "--cv", "3", "--out",
          str(folder / "run-adapted"), "--overwrite", "--quiet"])


@click.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--weights-vgg16", default="imagenet", show_default=True)
@click.option("--weights-inception", default="imagenet", show_default=True)
def main(folder: Path, weights_vgg16: str, weights_inception: str) -> None:
    """Run the demo in FOLDER."""
    photos = draw_catalogue(folder / "photos")
    click.echo(f"Drew {len(CLASSES) * PER_CLASS} synthetic product photos in {photos}", err=True)
    try:
        vgg16_weights = _extract(photos, "vgg16", weights_vgg16, folder / "features-vgg16.h5", "--layers", VGG16_LAYERS)
        _extract(photos, "inception", weights_inception, folder / "features-inception.h5")
        _run(["info", str(folder / "features-vgg16.h5")])
        features = [str(folder / "features-vgg16.h5"), str(folder / "features-inception.h5")]
        _run(["classify", *features, "--out", str(folder / "run"), "--overwrite", "--cv", "3"])
        fresh = draw_catalogue(folder / "new-photos", per_class=2, seed=1)
        _run(["predict", str(folder / "run"), str(fresh), "--out", str(folder / "predictions.csv"), "--overwrite"])
        query = str(fresh / "lamp" / "lamp_00.jpg")
        _run(["similar", features[0], query, "--k", "5", "--sheet", str(folder / "similar.png"), "--overwrite"])
        adapt_to_new_source(folder, vgg16_weights)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
