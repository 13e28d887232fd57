"""Tests for finding and decoding images: odd modes, bad files, hidden files, bombs and cropping."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashion_gan.data.images import (
    BadImageError,
    decode_image,
    decode_image_folder,
    list_image_files,
)
from fashion_gan.errors import DatasetError

IMAGE_SIZE = 32
# Image.MAX_IMAGE_PIXELS during these tests: small enough that a 400x300 PNG counts as a bomb.
PIXEL_LIMIT = 100_000

GOOD_FILES = [
    "UPPER.JPG",
    "bilevel.bmp",
    "bitmap.BMP",
    "cmyk.jpg",
    "gray.png",
    "gray_transparent.png",
    "la.png",
    "palette.png",
    "palette_alpha.png",
    "pants/deep/nested.png",
    "photo.jpeg",
    "rgba.png",
    "shirt/class_member.JpEg",
    "sixteen_bit.png",
    "tiny.png",
    "web.webp",
]
BAD_FILES = ["big_bomb.png", "bomb.png", "empty.png", "fake.jpg", "truncated.jpg"]


def noise_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def build_messy_folder(root: Path) -> Path:
    """Write every kind of good, bad, hidden and non-image file that an image folder may contain."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "shirt").mkdir()
    (root / "pants" / "deep").mkdir(parents=True)
    (root / ".ipynb_checkpoints").mkdir()

    # Good images, in every mode and suffix case that must be accepted.
    noise_rgb(80, 60, seed=1).save(root / "UPPER.JPG", "JPEG")
    noise_rgb(50, 70, seed=2).save(root / "bitmap.BMP", "BMP")
    Image.new("CMYK", (48, 40), (0, 255, 255, 0)).save(root / "cmyk.jpg", "JPEG")
    Image.new("L", (40, 40), 77).save(root / "gray.png")
    Image.new("L", (40, 40), 9).save(root / "gray_transparent.png", transparency=9)
    Image.new("1", (40, 40), 1).save(root / "bilevel.bmp")
    Image.new("LA", (40, 36), (200, 255)).save(root / "la.png")
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([10, 200, 30] + [0, 0, 0] * 255)
    palette.save(root / "palette.png")
    palette_alpha = Image.new("P", (40, 40), 0)
    palette_alpha.putpalette([0, 0, 0] * 256)
    palette_alpha.save(root / "palette_alpha.png", transparency=0)
    noise_rgb(64, 64, seed=3).save(root / "pants" / "deep" / "nested.png")
    noise_rgb(100, 75, seed=4).save(root / "photo.jpeg", "JPEG")
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(root / "rgba.png")
    noise_rgb(45, 60, seed=5).save(root / "shirt" / "class_member.JpEg", "JPEG")
    sixteen_bit = np.full((40, 40), 0x8000, dtype=np.uint16)
    Image.fromarray(sixteen_bit).save(root / "sixteen_bit.png")
    noise_rgb(20, 10, seed=6).save(root / "tiny.png")
    noise_rgb(40, 40, seed=7).save(root / "web.webp", "WEBP")

    # Bad files that must be skipped and named.
    Image.new("L", (400, 300)).save(root / "bomb.png")  # above PIXEL_LIMIT, below twice it
    Image.new("L", (500, 500)).save(root / "big_bomb.png")  # above twice PIXEL_LIMIT
    (root / "empty.png").write_bytes(b"")
    (root / "fake.jpg").write_text("this is not a JPEG\n")
    whole = jpeg_bytes(noise_rgb(100, 100, seed=8))
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])

    # Files that must be ignored without a mention.
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    noise_rgb(40, 40).save(root / ".hidden.jpg", "JPEG")
    noise_rgb(40, 40).save(root / ".ipynb_checkpoints" / "checkpoint.png")
    (root / "notes.txt").write_text("photos from the shoot\n")
    (root / "shirt" / "labels.csv").write_text("name,label\n")
    return root


@pytest.fixture
def messy_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PIXEL_LIMIT)
    return build_messy_folder(tmp_path / "images")


def relative_names(paths: list[Path], root: Path) -> list[str]:
    return [path.relative_to(root).as_posix() for path in paths]


def test_list_image_files_filters_and_sorts(messy_folder: Path) -> None:
    names = relative_names(list_image_files(messy_folder), messy_folder)

    assert names == sorted(GOOD_FILES + BAD_FILES)
    assert ".hidden.jpg" not in names
    assert ".ipynb_checkpoints/checkpoint.png" not in names
    assert "notes.txt" not in names


@pytest.mark.parametrize("channels", [1, 3])
def test_decode_folder_keeps_only_good_images(
    messy_folder: Path, channels: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fashion_gan.data.images")

    result = decode_image_folder(messy_folder, channels, IMAGE_SIZE, show_progress=False)

    assert result.array.shape == (len(GOOD_FILES), channels, IMAGE_SIZE, IMAGE_SIZE)
    assert result.array.dtype == np.uint8
    assert relative_names(result.paths, messy_folder) == GOOD_FILES
    assert [name for name, _ in result.skipped_files] == BAD_FILES
    assert result.upscaled_count == 1

    skipped_warnings = [record.getMessage() for record in caplog.records if "Skipped" in record.getMessage()]
    assert len(skipped_warnings) == 1
    for name in BAD_FILES:
        assert name in skipped_warnings[0]
    upscaled_warnings = [
        record.getMessage() for record in caplog.records if "Upscaled" in record.getMessage()
    ]
    assert len(upscaled_warnings) == 1
    assert "Upscaled 1 of" in upscaled_warnings[0]


def test_decode_folder_names_skip_reasons(messy_folder: Path) -> None:
    result = decode_image_folder(messy_folder, 3, IMAGE_SIZE, show_progress=False)
    reasons = dict(result.skipped_files)

    assert "decompression bomb" in reasons["bomb.png"]
    assert "decompression bomb" in reasons["big_bomb.png"]
    assert "not a recognised image" in reasons["empty.png"]
    assert "not a recognised image" in reasons["fake.jpg"]
    assert "truncated" in reasons["truncated.jpg"]


def test_decode_folder_array_matches_decode_image(messy_folder: Path) -> None:
    result = decode_image_folder(messy_folder, 3, IMAGE_SIZE, max_workers=2, show_progress=False)

    for index, path in enumerate(result.paths):
        expected = decode_image(path, 3, IMAGE_SIZE)
        np.testing.assert_array_equal(result.array[index], expected, err_msg=str(path))


@pytest.mark.parametrize(
    ("name", "expected_rgb", "tolerance"),
    [
        ("rgba.png", (255, 255, 255), 0),  # fully transparent red composites to the white background
        ("palette_alpha.png", (255, 255, 255), 0),  # the transparent palette entry becomes white
        ("palette.png", (10, 200, 30), 0),
        ("gray.png", (77, 77, 77), 0),
        ("gray_transparent.png", (255, 255, 255), 0),  # the tRNS gray value is transparent
        ("bilevel.bmp", (255, 255, 255), 0),
        ("la.png", (200, 200, 200), 0),
        ("sixteen_bit.png", (128, 128, 128), 0),  # 0x8000 of 0xFFFF keeps its top 8 bits
        ("cmyk.jpg", (255, 0, 0), 8),  # C=0 M=255 Y=255 K=0 is red, within JPEG error
    ],
)
def test_decode_image_converts_modes(
    messy_folder: Path, name: str, expected_rgb: tuple[int, int, int], tolerance: int
) -> None:
    rgb = decode_image(messy_folder / name, 3, IMAGE_SIZE).astype(int)
    gray = decode_image(messy_folder / name, 1, IMAGE_SIZE)

    assert rgb.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert gray.shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    for channel, expected in enumerate(expected_rgb):
        assert np.abs(rgb[channel] - expected).max() <= tolerance, f"channel {channel} of {name}"


def test_decode_image_crops_centre(tmp_path: Path) -> None:
    # A 120x40 image of red, green and blue thirds: the centre square is the green third.
    pixels = np.zeros((40, 120, 3), dtype=np.uint8)
    pixels[:, :40, 0] = 255
    pixels[:, 40:80, 1] = 255
    pixels[:, 80:, 2] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)

    array = decode_image(path, 3, 20)

    assert array.shape == (3, 20, 20)
    assert array[1].min() >= 200  # green everywhere
    # Lanczos rings for a pixel or two next to the cut, so only the edge columns see red or blue.
    assert array[0, :, 3:-3].max() <= 5
    assert array[2, :, 3:-3].max() <= 5


def test_decode_image_downscales_large_jpeg(tmp_path: Path) -> None:
    # Draft mode decodes this 800x600 JPEG at 1/8 scale (100x75) before resizing to 64.
    path = tmp_path / "large.jpg"
    Image.new("RGB", (800, 600), (30, 60, 90)).save(path, "JPEG", quality=95)

    array = decode_image(path, 3, 64).astype(int)

    assert array.shape == (3, 64, 64)
    assert np.abs(array[0] - 30).max() <= 3
    assert np.abs(array[2] - 90).max() <= 3


def test_decode_image_applies_exif_orientation(tmp_path: Path) -> None:
    # Stored as 40 wide x 20 high with the left half black; EXIF orientation 6 rotates it upright.
    pixels = np.full((20, 40), 255, dtype=np.uint8)
    pixels[:, :20] = 0
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)

    array = decode_image(path, 1, 20)

    # After rotation the image is 20 wide x 40 high with black on top, so the centre crop is
    # half black (top) and half white (bottom).
    assert array[0, :8].max() <= 10
    assert array[0, -8:].min() >= 245


def test_decode_image_rejects_fake_file(tmp_path: Path) -> None:
    path = tmp_path / "fake.png"
    path.write_text("not an image")

    with pytest.raises(BadImageError) as caught:
        decode_image(path, 3, IMAGE_SIZE)

    assert caught.value.path == path
    assert isinstance(caught.value, DatasetError)
    assert str(path) in str(caught.value)


def test_decode_image_rejects_bomb_without_filter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    path = tmp_path / "bomb.png"
    Image.new("L", (40, 30)).save(path)  # 1,200 pixels: Pillow only warns, decode_image must reject

    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(BadImageError, match="decompression bomb"):
            decode_image(path, 1, 16)


@pytest.mark.parametrize(("channels", "image_size"), [(2, 32), (3, 0)])
def test_decode_image_rejects_bad_settings(tmp_path: Path, channels: int, image_size: int) -> None:
    path = tmp_path / "ok.png"
    Image.new("RGB", (40, 40)).save(path)

    with pytest.raises(DatasetError, match="is not supported|is invalid"):
        decode_image(path, channels, image_size)


def test_empty_folder_raises_dataset_error(tmp_path: Path) -> None:
    (tmp_path / ".DS_Store").write_bytes(b"x")

    with pytest.raises(DatasetError) as caught:
        decode_image_folder(tmp_path, 3, IMAGE_SIZE, show_progress=False)

    message = str(caught.value)
    assert str(tmp_path) in message
    assert "contains no images" in message
    assert "no files besides hidden ones" in message


def test_folder_without_images_lists_other_files(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hello")
    (tmp_path / "photo.tiff").write_bytes(b"II*\x00")

    with pytest.raises(DatasetError) as caught:
        decode_image_folder(tmp_path, 3, IMAGE_SIZE, show_progress=False)

    message = str(caught.value)
    assert "2 files with other suffixes" in message
    assert "readme.txt" in message
    assert "photo.tiff" in message


def test_folder_of_bad_images_raises_dataset_error(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "fake.png").write_text("no pixels here")

    with pytest.raises(DatasetError) as caught:
        decode_image_folder(tmp_path, 3, IMAGE_SIZE, show_progress=False)

    message = str(caught.value)
    assert "None of the 2 image files" in message
    assert str(tmp_path) in message
    assert "empty.jpg" in message
    assert "fake.png" in message


def test_missing_folder_raises_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        list_image_files(tmp_path / "absent")


def test_skipped_warning_caps_names(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Image.new("RGB", (40, 40)).save(tmp_path / "good.png")
    for index in range(13):
        (tmp_path / f"bad_{index:02d}.jpg").write_bytes(b"")

    result = decode_image_folder(tmp_path, 3, IMAGE_SIZE, show_progress=False)

    assert len(result.skipped_files) == 13
    message = next(record.getMessage() for record in caplog.records if "Skipped" in record.getMessage())
    assert "Skipped 13 image files" in message
    assert "bad_09.jpg" in message
    assert "bad_10.jpg" not in message
    assert "and 3 more" in message
