"""Small generated product photos for the tests (no files from outside the test's own tmp_path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"bed": (200, 40, 40), "chair": (40, 60, 200), "sofa": (40, 170, 60)}


def photo(seed: int, colour=(200, 40, 40), size=(48, 40)) -> Image.Image:
    """A noisy background with a coloured box: different for every seed, typical for its colour."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(0, 90, (height, width, 3), dtype=np.uint8)
    x0, y0 = rng.integers(0, width // 3), rng.integers(0, height // 3)
    pixels[y0 : y0 + height // 2, x0 : x0 + width // 2] = colour
    return Image.fromarray(pixels, "RGB")


def make_photo_folder(root: Path, per_class: int = 4, classes=("bed", "chair"), size=(48, 40)) -> Path:
    """``root/<class>/<class>_<i>.jpg`` for each class; returns ``root``."""
    seed = 0
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo(seed, COLOURS[name], size).save(root / name / f"{name}_{i}.jpg", quality=90)
            seed += 1
    return root
