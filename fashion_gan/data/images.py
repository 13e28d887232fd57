"""Find the images in a folder and decode them into uint8 (C, H, W) arrays at the training size.

Decoding resizes the shorter side to `image_size` (antialiased Lanczos) and crops the centre square.
Files that cannot be decoded are skipped, named in one warning and returned to the caller.
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from fashion_gan.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
"""Lower-case suffixes of the files read as images. A file's suffix is compared case-insensitively."""

SUPPORTED_CHANNELS = (1, 3)

# Transparent pixels are composited onto white, the usual background of product photos.
_ALPHA_BACKGROUND = 255

# A warning names at most this many files and counts the rest.
_MAX_NAMES_IN_WARNING = 10

# Errors that Pillow 13 raises for truncated, empty, fake or corrupt files. Image.open documents
# UnidentifiedImageError (an OSError), ValueError and TypeError. The plugins raise the others on
# malformed headers and data.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


class BadImageError(DatasetError):
    """An image file is truncated, empty, not an image, or larger than Pillow's pixel limit."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"Cannot decode image {self.path}: {reason}")


@dataclass
class FolderScan:
    """The files found under an image folder: `images` are decoded, `ignored` are not images."""

    root: Path
    images: list[Path] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)


@dataclass
class DecodedImages:
    """The result of `decode_images`.

    `array` is uint8 (N, C, H, W) in the order of `paths`. `skipped_files` contains (name, reason)
    pairs with names relative to the folder. `upscaled_count` counts images smaller than `image_size`.
    """

    array: np.ndarray
    paths: list[Path]
    skipped_files: list[tuple[str, str]]
    upscaled_count: int


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def scan_image_folder(root: Path | str) -> FolderScan:
    """List the image files under `root` (flat or in class subfolders), sorted by relative path.

    Hidden files and folders (names starting with ".", such as .DS_Store and .ipynb_checkpoints) are
    left out entirely. Other files whose suffix is not in IMAGE_SUFFIXES go to `ignored`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"Image folder {root} does not exist or is not a directory. "
            "Set data.source to a folder of JPEG, PNG, WebP or BMP images."
        )
    scan = FolderScan(root=root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # Pruning dirnames in place stops os.walk from entering hidden folders.
        dirnames[:] = [name for name in dirnames if not is_hidden(name)]
        for name in filenames:
            if is_hidden(name):
                continue
            path = Path(dirpath, name)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                scan.images.append(path)
            else:
                scan.ignored.append(path)
    scan.images.sort(key=lambda path: path.relative_to(root).as_posix())
    scan.ignored.sort(key=lambda path: path.relative_to(root).as_posix())
    return scan


def list_image_files(root: Path | str) -> list[Path]:
    """Return the image files under `root`, sorted, without hidden files, hidden folders or other suffixes."""
    return scan_image_folder(root).images


def check_decode_settings(channels: int, image_size: int) -> None:
    if channels not in SUPPORTED_CHANNELS:
        raise DatasetError(f"channels={channels!r} is not supported; use 1 (grayscale) or 3 (RGB).")
    if not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"image_size={image_size!r} is invalid; use a positive number of pixels, e.g. 64.")


def decode_image(path: Path | str, channels: int, image_size: int) -> np.ndarray:
    """Decode one image file into a uint8 array (channels, image_size, image_size).

    Raises BadImageError for a truncated, empty or fake file and for an image above
    `Image.MAX_IMAGE_PIXELS`. An image smaller than `image_size` is upscaled and logged at DEBUG;
    `decode_images` counts those in one warning.
    """
    array, _ = _decode_image_and_flag_upscale(Path(path), channels, image_size)
    return array


def _decode_image_and_flag_upscale(path: Path, channels: int, image_size: int) -> tuple[np.ndarray, bool]:
    check_decode_settings(channels, image_size)
    try:
        with Image.open(path) as image:
            _reject_decompression_bomb(path, image)
            if image.format == "JPEG":
                # libjpeg decodes at 1/2, 1/4 or 1/8 scale (0.6 instead of 2.5 ms for a 400x533
                # photo here). Pillow keeps both sides at least image_size, so Lanczos still
                # does the final downscale.
                image.draft("L" if channels == 1 else "RGB", (image_size, image_size))
            image.load()
            image = _apply_exif_orientation(path, image)
            image = _convert_mode(image, channels)
    except BadImageError:
        raise
    except _DECODE_ERRORS as err:
        raise BadImageError(path, _describe_decode_error(err)) from err

    upscaled = min(image.size) < image_size
    if upscaled:
        log.debug("Upscaling %s from %dx%d to image_size=%d", path, *image.size, image_size)
    square = _resize_shorter_side_and_crop(image, image_size)
    array = np.asarray(square, dtype=np.uint8)
    if channels == 1:
        array = array[np.newaxis, :, :]
    else:
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array), upscaled


def _apply_exif_orientation(path: Path, image: Image.Image) -> Image.Image:
    # Phone photos store pixels sideways with an EXIF Orientation tag. A malformed EXIF block only
    # costs the rotation, not the image.
    try:
        return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as err:
        log.debug("Ignoring unreadable EXIF orientation of %s: %s", path, err)
        return image


def _reject_decompression_bomb(path: Path, image: Image.Image) -> None:
    # Image.open raises DecompressionBombError only above twice the limit and merely warns above it.
    # Rejecting at the limit itself keeps the result independent of the caller's warning filters.
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise BadImageError(
            path,
            f"decompression bomb: {width}x{height} = {width * height} pixels exceeds "
            f"PIL.Image.MAX_IMAGE_PIXELS={limit}",
        )


def _describe_decode_error(err: BaseException) -> str:
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb: {err}"
    if isinstance(err, UnidentifiedImageError):
        return "not a recognised image (empty or not an image file)"
    text = str(err) or type(err).__name__
    return text


def _convert_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode (CMYK, RGBA, P, 1, L, LA, I;16, I, F, YCbCr ...) to L or RGB."""
    target = "L" if channels == 1 else "RGB"
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_bit_depth_to_l(image)
    if image.has_transparency_data:
        image = _composite_on_background(image)
    # Pillow converts every mode to RGB, but not every mode straight to L (LAB, for one).
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    if image.mode != target:
        image = image.convert(target)
    return image


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    # Pillow's own I;16 -> L conversion clips at 255 instead of scaling, which turns a 16-bit
    # photo white. Keep the 8 most significant bits instead.
    values = np.asarray(image)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = np.right_shift(values.astype(np.uint32), 8)
    values = np.clip(values, 0, 255).astype(np.uint8)
    return Image.fromarray(values)


def _composite_on_background(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (_ALPHA_BACKGROUND,) * 3 + (255,))
    background.alpha_composite(rgba)
    return background.convert("RGB")


def _resize_shorter_side_and_crop(image: Image.Image, image_size: int) -> Image.Image:
    # Resizing only the centre square (the `box` argument) equals resizing the shorter side to
    # image_size and then cropping the centre, without resampling pixels that are cropped away.
    width, height = image.size
    side = min(width, height)
    left = (width - side) / 2
    top = (height - side) / 2
    box = (left, top, left + side, top + side)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS, box=box)


def usable_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def decode_images(
    paths: Sequence[Path],
    root: Path,
    channels: int,
    image_size: int,
    max_workers: int | None = None,
    show_progress: bool = True,
) -> DecodedImages:
    """Decode `paths` in a thread pool into one uint8 (N, C, H, W) array, skipping bad files.

    Threads suffice because Pillow releases the GIL while it decodes and resamples: a busy Python
    thread kept running while another thread decoded a 3000x3000 JPEG with Pillow 13. Skipped files
    and upscaled images are each reported in one aggregated warning.
    """
    check_decode_settings(channels, image_size)
    max_workers = max_workers or usable_cpu_count()
    decoded = np.empty((len(paths), channels, image_size, image_size), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    skipped: dict[int, tuple[str, str]] = {}
    upscaled_count = 0

    # The warnings filter is process-wide, so it also applies in the pool's threads. It turns the
    # DecompressionBombWarning that Image.open emits into an error that skips the file.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="decode") as pool:
            futures = {
                pool.submit(_decode_image_and_flag_upscale, path, channels, image_size): index
                for index, path in enumerate(paths)
            }
            progress = tqdm(
                as_completed(futures),
                total=len(futures),
                desc="Decoding images",
                unit="image",
                disable=not show_progress,
            )
            for future in progress:
                index = futures[future]
                try:
                    decoded[index], upscaled = future.result()
                except BadImageError as err:
                    skipped[index] = (_relative_name(paths[index], root), err.reason)
                    continue
                ok[index] = True
                upscaled_count += upscaled

    skipped_files = [skipped[index] for index in sorted(skipped)]
    if skipped_files:
        log.warning("%s", describe_skipped_files(skipped_files, root))
    if upscaled_count:
        log.warning(
            "Upscaled %d of %d images in %s because their shorter side is below image_size=%d. "
            "Upscaled images look blurrier than the rest, so remove them or lower image_size if needed.",
            upscaled_count,
            int(ok.sum()),
            root,
            image_size,
        )
    kept_paths = [path for path, good in zip(paths, ok) if good]
    array = decoded if ok.all() else decoded[ok]
    return DecodedImages(
        array=array,
        paths=kept_paths,
        skipped_files=skipped_files,
        upscaled_count=upscaled_count,
    )


def _relative_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def describe_skipped_files(skipped_files: Sequence[tuple[str, str]], root: Path | str) -> str:
    """Write one message naming the skipped files (at most 10, then a count of the rest) and why."""
    named = "; ".join(f"{name} ({reason})" for name, reason in skipped_files[:_MAX_NAMES_IN_WARNING])
    unnamed_count = len(skipped_files) - _MAX_NAMES_IN_WARNING
    more = f"; and {unnamed_count} more" if unnamed_count > 0 else ""
    return (
        f"Skipped {len(skipped_files)} image files in {root} that could not be decoded: {named}{more}. "
        "Replace or delete them to train on them."
    )


def decode_image_folder(
    root: Path | str,
    channels: int,
    image_size: int,
    max_workers: int | None = None,
    show_progress: bool = True,
    scan: FolderScan | None = None,
) -> DecodedImages:
    """Decode every image in `root`, or in `scan` of it when given, and raise DatasetError if none decodes."""
    root = Path(root)
    if scan is None:
        scan = scan_image_folder(root)
    if not scan.images:
        raise DatasetError(_describe_empty_folder(scan))
    log.info(
        "Decoding %d images from %s at %dx%d, channels=%d",
        len(scan.images),
        root,
        image_size,
        image_size,
        channels,
    )
    result = decode_images(scan.images, root, channels, image_size, max_workers, show_progress)
    if not result.paths:
        raise DatasetError(
            f"None of the {len(scan.images)} image files in {root} could be decoded, so there is nothing "
            f"to train on. {describe_skipped_files(result.skipped_files, root)}"
        )
    return result


def _describe_empty_folder(scan: FolderScan) -> str:
    suffixes = ", ".join(sorted(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES))
    if scan.ignored:
        examples = ", ".join(_relative_name(path, scan.root) for path in scan.ignored[:_MAX_NAMES_IN_WARNING])
        found = f"found only {len(scan.ignored)} files with other suffixes ({examples})"
    else:
        found = "found no files besides hidden ones"
    return (
        f"Image folder {scan.root} contains no images: {found}. Images must have one of the suffixes "
        f"{suffixes} (any letter case) and sit in the folder or in its class subfolders; hidden files and "
        "folders are ignored. Point data.source at a folder of images."
    )
