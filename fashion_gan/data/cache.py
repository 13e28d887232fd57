"""Decode a dataset once into a uint8 (N, C, H, W) .npy cache and reuse it on later runs.

A cache entry is `<cache_dir>/decoded/<kind>-<C>x<S>-<key>.npy` plus a JSON sidecar of the same
name with the content digest, the skipped files and the shape. The key is a sha256 over the format
version, the preprocessing settings and the content digest. The content digest is a sha256 over
the sorted (relative path, size, sha256 of the bytes) of every source file, so editing any file's
bytes, adding, removing or renaming one yields a new entry. Hashing every byte is cheap: 0.1-0.4 s
(warm or cold page cache) for 3,068 JPEGs of 90 MB on one core of a 2-core VM, against about 2 s
to decode them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from fashion_gan.data.fashion_mnist import (
    find_fashion_mnist_dir,
    has_idx_files,
    idx_files,
    load_idx,
    resize_square_images,
)
from fashion_gan.data.images import (
    FolderScan,
    check_decode_settings,
    decode_image_folder,
    describe_skipped_files,
    scan_image_folder,
    usable_cpu_count,
)
from fashion_gan.errors import DatasetError, StorageError

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
"""Raise this when decoding changes in a way that makes older cache entries wrong."""

KINDS = ("image_folder", "fashion_mnist")

# Recorded in the cache key so that a change of resampling method invalidates old entries.
_PREPROCESSING = {
    "image_folder": "exif_transpose, shorter side to image_size with Lanczos, centre crop, alpha over white",
    "fashion_mnist": "bicubic antialiased resize from 28x28",
}


@dataclass
class DecodedArray:
    """A decoded dataset: `array` is uint8 (N, C, H, W), memory-mapped from the cache file.

    `skipped_files` contains (relative name, reason) for each source file that failed to decode.
    `labels` is uint8 (N,) for Fashion-MNIST and None for image folders.
    """

    array: np.ndarray
    content_digest: str
    skipped_files: list[tuple[str, str]]
    cache_path: Path
    reused: bool
    labels: np.ndarray | None = None
    upscaled_count: int = 0

    def __len__(self) -> int:
        return len(self.array)


def _size_and_sha256(path: Path) -> tuple[int, str]:
    try:
        with path.open("rb") as file:
            return os.fstat(file.fileno()).st_size, hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as err:
        raise DatasetError(
            f"Cannot read {path} to hash the dataset: {err}. Check the file's permissions."
        ) from err


def content_digest(paths: Sequence[Path], root: Path | str) -> str:
    """Hash the sorted (relative path, size, sha256 of bytes) of `paths` into one sha256 hex digest."""
    root = Path(root)
    entries = sorted((path.relative_to(root).as_posix(), path) for path in paths)
    # hashlib releases the GIL while hashing large buffers, so threads hash files in parallel.
    with ThreadPoolExecutor(max_workers=usable_cpu_count(), thread_name_prefix="hash") as pool:
        hashed = pool.map(_size_and_sha256, [path for _, path in entries])
        digest = hashlib.sha256()
        for (relative, _), (size, file_digest) in zip(entries, hashed):
            digest.update(f"{relative}\0{size}\0{file_digest}\n".encode("utf-8"))
    return digest.hexdigest()


def detect_kind(source_dir: Path | str) -> str:
    """Return "fashion_mnist" if `source_dir` has the Fashion-MNIST train idx files, else "image_folder"."""
    return "fashion_mnist" if has_idx_files(Path(source_dir)) else "image_folder"


def load_decoded_array(
    source_dir: Path | str | None,
    kind: str,
    channels: int,
    image_size: int,
    cache_dir: Path | str,
    *,
    show_progress: bool = True,
    max_workers: int | None = None,
) -> DecodedArray:
    """Return the decoded training images of `source_dir`, decoding only when no cache entry matches.

    `kind` is "image_folder" (JPEG/PNG/WebP/BMP, flat or in class subfolders) or "fashion_mnist"
    (the train idx files; `source_dir` None searches the default places). Concurrent callers on one
    machine, such as the ranks of a multi-GPU run, wait on a file lock, so only the first decodes.
    """
    if kind not in KINDS:
        raise DatasetError(f"Dataset kind {kind!r} is invalid; use one of {', '.join(KINDS)}.")
    check_decode_settings(channels, image_size)
    scan = None
    if kind == "fashion_mnist":
        source_dir = find_fashion_mnist_dir(source_dir)
        source_files = idx_files(source_dir, "train")
    elif source_dir is None:
        raise DatasetError("An image_folder dataset needs a source folder; set data.source.")
    else:
        source_dir = Path(source_dir)
        # The same scan feeds the digest and the decoder, so both see the same files.
        scan = scan_image_folder(source_dir)
        source_files = scan.images

    digest = content_digest(source_files, source_dir)
    settings = {
        "format_version": CACHE_FORMAT_VERSION,
        "kind": kind,
        "channels": channels,
        "image_size": image_size,
        "preprocessing": _PREPROCESSING[kind],
        "content_digest": digest,
    }
    cache_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()
    entry_dir = Path(cache_dir) / "decoded"
    stem = f"{kind}-{channels}x{image_size}-{cache_key[:24]}"
    array_path = entry_dir / f"{stem}.npy"

    _make_dirs(entry_dir)
    with _exclusive_lock(entry_dir / f"{stem}.lock"):
        cached = _open_entry(array_path, cache_key, channels, image_size)
        if cached is not None:
            log.info("Reusing decoded array cache at %s (%d images)", array_path, len(cached))
            if cached.skipped_files:
                log.warning("%s", describe_skipped_files(cached.skipped_files, source_dir))
            return cached
        return _build_entry(
            source_dir,
            kind,
            scan,
            channels,
            image_size,
            settings,
            cache_key,
            array_path,
            show_progress=show_progress,
            max_workers=max_workers,
        )


def _build_entry(
    source_dir: Path,
    kind: str,
    scan: FolderScan | None,
    channels: int,
    image_size: int,
    settings: dict,
    cache_key: str,
    array_path: Path,
    *,
    show_progress: bool,
    max_workers: int | None,
) -> DecodedArray:
    started = time.perf_counter()
    labels = None
    skipped_files: list[tuple[str, str]] = []
    upscaled_count = 0
    if kind == "fashion_mnist":
        images, labels = load_idx(source_dir, "train")
        if len(images) == 0:
            raise DatasetError(
                f"The Fashion-MNIST train files in {source_dir} contain no images. Replace them."
            )
        array = resize_square_images(images, channels, image_size)
    else:
        decoded = decode_image_folder(source_dir, channels, image_size, max_workers, show_progress, scan)
        array = decoded.array
        skipped_files = decoded.skipped_files
        upscaled_count = decoded.upscaled_count

    if labels is not None:
        _atomic_write(_labels_path(array_path), lambda file: np.save(file, labels))
    _atomic_write(array_path, lambda file: np.save(file, array))
    metadata = {
        **settings,
        "cache_key": cache_key,
        "source_dir": str(source_dir),
        "shape": list(array.shape),
        "skipped_files": [list(item) for item in skipped_files],
        "upscaled_count": upscaled_count,
        "has_labels": labels is not None,
        "created_unix_s": time.time(),
    }
    # The sidecar is written last: an entry without it is incomplete and is rebuilt.
    metadata_bytes = json.dumps(metadata, indent=2).encode("utf-8")
    _atomic_write(_metadata_path(array_path), lambda file: file.write(metadata_bytes))
    log.info(
        "Decoded %d images from %s into %s in %.1f s",
        len(array),
        source_dir,
        array_path,
        time.perf_counter() - started,
    )
    return DecodedArray(
        array=np.load(array_path, mmap_mode="r"),
        content_digest=settings["content_digest"],
        skipped_files=skipped_files,
        cache_path=array_path,
        reused=False,
        labels=labels,
        upscaled_count=upscaled_count,
    )


def _open_entry(array_path: Path, cache_key: str, channels: int, image_size: int) -> DecodedArray | None:
    """Return the cache entry at `array_path` if it is complete and matches `cache_key`, else None."""
    metadata_path = _metadata_path(array_path)
    if not metadata_path.is_file():
        return None
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
        array = np.load(array_path, mmap_mode="r")
        labels = np.load(_labels_path(array_path)) if metadata.get("has_labels") else None
    except (OSError, ValueError) as err:
        log.warning("Decoded array cache at %s is unreadable (%s); decoding again", array_path, err)
        return None

    expected_shape = (metadata.get("shape") or [0])[0], channels, image_size, image_size
    if metadata.get("cache_key") != cache_key or array.shape != expected_shape or array.dtype != np.uint8:
        log.warning(
            "Decoded array cache at %s does not match its metadata (shape %s, expected %s); decoding again",
            array_path,
            array.shape,
            expected_shape,
        )
        return None
    return DecodedArray(
        array=array,
        content_digest=metadata["content_digest"],
        skipped_files=[(name, reason) for name, reason in metadata["skipped_files"]],
        cache_path=array_path,
        reused=True,
        labels=labels,
        upscaled_count=metadata.get("upscaled_count", 0),
    )


def _metadata_path(array_path: Path) -> Path:
    return array_path.with_suffix(".json")


def _labels_path(array_path: Path) -> Path:
    return array_path.with_name(array_path.stem + ".labels.npy")


def _make_dirs(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(
            f"Cannot create the decoded array cache folder {directory}: {err}. Set a writable cache_dir."
        ) from err


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    try:
        lock_file = lock_path.open("a")
    except OSError as err:
        raise StorageError(f"Cannot open lock file {lock_path}: {err}. Set a writable cache_dir.") from err
    with lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write `path` through a temporary file in the same folder and rename it into place."""
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except OSError as err:
        Path(temp_name).unlink(missing_ok=True)
        raise StorageError(
            f"Cannot write the decoded array cache file {path}: {err}. "
            "Free disk space or set another cache_dir."
        ) from err
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
