"""Listing and decoding: every awkward file either decodes like Keras would or gets a clear reason."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from furnitype.errors import InputError
from furnitype.extract.images import ImageDecodeError, decode_image, list_images, read_manifest
from tests.images import make_photo_folder, photo


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_decode_matches_keras_load_img(tmp_path):
    import keras

    path = tmp_path / "p.jpg"
    photo(1, size=(61, 47)).save(path)
    for interpolation in ("bilinear", "nearest", "bicubic"):
        ours = decode_image(path.read_bytes(), 32, interpolation)
        theirs = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(32, 32), interpolation=interpolation))
        assert ours.shape == (32, 32, 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours.astype(np.float32), theirs)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"hello, I am text", "not an image"),
        (_bytes(photo(2, size=(200, 160)), "JPEG")[:1500], "truncated"),
        (_bytes(photo(3), "PNG")[:60], "truncated or corrupt"),
    ],
)
def test_broken_files_raise_with_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data, 32)


def test_decompression_bomb_is_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(_bytes(photo(4, size=(48, 40)), "PNG"), 32)


def test_modes_become_rgb():
    base = photo(5, size=(40, 40))
    expected = np.asarray(base.convert("L").convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))

    grey16 = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)  # 16-bit grey
    assert grey16.mode.startswith("I")
    np.testing.assert_allclose(decode_image(_bytes(grey16, "PNG"), 32).astype(int), expected.astype(int), atol=1)

    cmyk = decode_image(_bytes(base.convert("CMYK"), "JPEG", quality=95), 32)
    assert cmyk.shape == (32, 32, 3)
    assert np.abs(cmyk.astype(int) - np.asarray(base.resize((32, 32))).astype(int)).mean() < 12

    for img, fmt in [(base.convert("L"), "PNG"), (base.convert("P"), "GIF"), (base, "BMP"), (base, "TIFF")]:
        assert decode_image(_bytes(img, fmt), 32).shape == (32, 32, 3)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 40))
    out = decode_image(_bytes(rgba, "PNG"), 40)
    np.testing.assert_array_equal(out[:, :20], np.broadcast_to([0, 0, 255], (40, 20, 3)))
    np.testing.assert_array_equal(out[:, 20:], np.broadcast_to([255, 255, 255], (40, 20, 3)))


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(_bytes(img, "JPEG", exif=exif, quality=95), 20, "nearest")
    assert out[:, :, 0].mean(axis=1)[:5].mean() > 200  # white on top once rotated
    assert out[:, :, 0].mean(axis=1)[-5:].mean() < 50


def test_listing_labels_hidden_and_non_images(tmp_path):
    root = make_photo_folder(tmp_path / "photos", per_class=2)
    (root / "bed" / "deep").mkdir()
    photo(9).save(root / "bed" / "deep" / "UPPER.JPG")
    photo(10).save(root / "loose.png")
    photo(11).save(root / ".hidden.jpg")
    (root / ".cache").mkdir()
    photo(12).save(root / ".cache" / "x.jpg")
    (root / "notes.txt").write_text("not a photo")
    listing = list_images([root])
    labels = {p.path.replace(str(root) + "/", ""): p.label for p in listing.files}
    assert labels == {
        "bed/bed_0.jpg": "bed",
        "bed/bed_1.jpg": "bed",
        "bed/deep/UPPER.JPG": "bed",
        "chair/chair_0.jpg": "chair",
        "chair/chair_1.jpg": "chair",
        "loose.png": "",
    }
    assert listing.folders == [str(root)]


def test_manifest_paths_are_relative_to_the_csv(tmp_path):
    root = make_photo_folder(tmp_path / "photos", per_class=1)
    (tmp_path / "m.csv").write_text("path,label\nphotos/bed/bed_0.jpg,sofa\nphotos/chair/chair_0.jpg\n")
    files = read_manifest(tmp_path / "m.csv")
    assert [(f.path, f.label) for f in files] == [
        (str(root / "bed" / "bed_0.jpg"), "sofa"),
        (str(root / "chair" / "chair_0.jpg"), ""),
    ]


def test_a_file_listed_twice_is_kept_once_with_its_first_label(tmp_path):
    root = make_photo_folder(tmp_path / "photos", per_class=1)
    (tmp_path / "m.csv").write_text("photos/bed/bed_0.jpg,sofa\nphotos/bed/../bed/bed_0.jpg,sofa\n")
    listing = list_images([], tmp_path / "m.csv")
    assert (listing.paths, listing.labels) == ([str(root / "bed" / "bed_0.jpg")], ["sofa"])
    both = list_images([root, root / "bed"], tmp_path / "m.csv")
    assert both.labels == ["bed", "chair"] and len(both.paths) == 2


@pytest.mark.parametrize(("text", "message"), [
    ("file,class\nphotos/bed/bed_0.jpg,bed\n", "the first row 'file,class' is neither the header 'path,label'"),
    ("path,label\nphotos/bed/bed_0.jpg,bed\nphotos/bed/bed_0.jpg,chair\n",
     "lists photos/bed/bed_0.jpg twice with different labels \\(line 2: 'bed', line 3: 'chair'\\)"),
    ("path,label\n,bed\n", "line 2: no path in the first column"),
    ('path,label\nphotos/bed/bed_0.jpg,"two\nlines"\n', "line 2: a label must be printable text on one line"),
])
def test_a_manifest_that_cannot_mean_what_it_says_is_one_input_error(tmp_path, text, message):
    make_photo_folder(tmp_path / "photos", per_class=1)
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(InputError, match=message):
        list_images([], tmp_path / "m.csv")


def test_a_manifest_that_is_not_a_regular_file_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "m.csv")  # opened without O_NONBLOCK, reading it would wait for a writer forever
    with pytest.raises(InputError, match="cannot read manifest .*m.csv: not a regular file"):
        list_images([], tmp_path / "m.csv")


def test_missing_or_empty_inputs_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="input not found"):
        list_images([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        list_images([tmp_path / "empty"])
    with pytest.raises(InputError, match="manifest not found"):
        list_images([], tmp_path / "nope.csv")


def test_listing_records_what_cannot_be_a_photo_and_folders_it_cannot_list(tmp_path):
    root = make_photo_folder(tmp_path / "photos", per_class=1)
    os.mkfifo(root / "bed" / "pipe.jpg")
    (root / "bed" / "zero.jpg").symlink_to("/dev/zero")
    (root / "bed" / "gone.jpg").symlink_to(tmp_path / "nothing")
    (root / "sofa").mkdir()
    os.chmod(root / "sofa", 0)
    try:
        listing = subprocess.run(
            ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search",
             sys.executable, "-c", "from furnitype.extract.images import list_images;"
             f"l = list_images([{str(root)!r}]); print(repr((l.paths, l.reasons, l.unlisted, l.stats.tolist())))"],
            capture_output=True, text=True, check=True,
        ).stdout
    finally:
        os.chmod(root / "sofa", 0o755)
    paths, reasons, unlisted, stats = eval(listing)  # noqa: S307 - our own repr
    names = [os.path.basename(p) for p in paths]
    assert names == ["bed_0.jpg", "gone.jpg", "pipe.jpg", "zero.jpg", "chair_0.jpg"]
    assert reasons == {1: "file not found", 2: "not a regular file", 3: "not a regular file"}
    assert unlisted == [(str(root / "sofa"), "Permission denied")]
    assert stats[0][0] == (root / "bed" / "bed_0.jpg").stat().st_size and stats[2] == [-1, 0, 0, 0]
