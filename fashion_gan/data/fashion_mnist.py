"""Locate and read the Fashion-MNIST idx files, and resize its 28x28 images to the training size."""

from __future__ import annotations

import gzip
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from fashion_gan.errors import DatasetError

log = logging.getLogger(__name__)

FASHION_MNIST_ENV_VAR = "FASHION_MNIST_DIR"
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""The folder into which Debian's dataset-fashion-mnist package installs the four idx files."""

DEFAULT_DOWNLOAD_DIR = Path.home() / ".cache" / "fashion-gan" / "fashion-mnist"

SPLITS = ("train", "test")
_FILE_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 0x00000803  # unsigned byte data, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned byte data, 1 dimension
_REACHABILITY_TIMEOUT_S = 3.0
_RESIZE_CHUNK = 4096  # images per interpolation call, bounds the float32 working memory


def idx_file_names(split: str) -> tuple[str, str]:
    """Return the base names (without .gz) of the image and label idx files of `split`."""
    if split not in SPLITS:
        raise DatasetError(f"Fashion-MNIST split {split!r} is invalid; use one of {', '.join(SPLITS)}.")
    prefix = _FILE_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def find_idx_file(directory: Path, base_name: str) -> Path | None:
    """Return `directory/base_name` or `directory/base_name.gz`, whichever exists (raw first)."""
    for name in (base_name, base_name + ".gz"):
        path = directory / name
        if path.is_file():
            return path
    return None


def idx_files(directory: Path | str, split: str = "train") -> list[Path]:
    """Return the image and label idx files of `split` in `directory`, or raise DatasetError."""
    directory = Path(directory)
    paths = []
    for base_name in idx_file_names(split):
        path = find_idx_file(directory, base_name)
        if path is None:
            raise DatasetError(
                f"Fashion-MNIST file {base_name} (or {base_name}.gz) not found in {directory}. "
                "Point data.source or FASHION_MNIST_DIR at the folder with the four idx files."
            )
        paths.append(path)
    return paths


def has_idx_files(directory: Path) -> bool:
    """Return whether `directory` contains the Fashion-MNIST train image and label idx files."""
    return directory.is_dir() and all(
        find_idx_file(directory, base_name) is not None for base_name in idx_file_names("train")
    )


def find_fashion_mnist_dir(
    explicit: Path | str | None = None,
    *,
    allow_download: bool = True,
    download_dir: Path | str | None = None,
) -> Path:
    """Return a folder with the Fashion-MNIST train idx files.

    Order: `explicit`, then the FASHION_MNIST_DIR environment variable, then
    /usr/share/datasets/fashion-mnist, then a torchvision download into `download_dir` when the
    download mirror accepts a TCP connection within 3 s. An explicit folder or FASHION_MNIST_DIR
    without the files raises DatasetError rather than falling back, because the caller chose it.
    """
    if explicit is not None:
        return _require_idx_dir(Path(explicit), "the folder given")
    from_env = os.environ.get(FASHION_MNIST_ENV_VAR)
    if from_env:
        return _require_idx_dir(Path(from_env), f"{FASHION_MNIST_ENV_VAR}={from_env}")
    if has_idx_files(SYSTEM_FASHION_MNIST_DIR):
        return SYSTEM_FASHION_MNIST_DIR

    download_dir = Path(download_dir) if download_dir is not None else DEFAULT_DOWNLOAD_DIR
    download_failure = _try_download(download_dir, allow_download)
    if download_failure is None:
        return download_dir / "FashionMNIST" / "raw"
    raise DatasetError(
        "Fashion-MNIST not found. Looked for the idx files in an explicit data.source folder (none given), "
        f"in ${FASHION_MNIST_ENV_VAR} (not set) and in {SYSTEM_FASHION_MNIST_DIR} (missing), and the "
        f"torchvision download into {download_dir} {download_failure}. Install Debian's "
        f"dataset-fashion-mnist package, or set {FASHION_MNIST_ENV_VAR} to a folder with the four idx files."
    )


def _require_idx_dir(directory: Path, described_as: str) -> Path:
    if not has_idx_files(directory):
        names = ", ".join(idx_file_names("train"))
        raise DatasetError(
            f"Fashion-MNIST idx files ({names}, raw or .gz) not found in {directory} ({described_as}). "
            "Point it at the folder that contains them."
        )
    return directory


def _try_download(download_dir: Path, allow_download: bool) -> str | None:
    """Download Fashion-MNIST with torchvision; return None on success or why it did not happen."""
    if has_idx_files(download_dir / "FashionMNIST" / "raw"):
        return None
    if not allow_download:
        return "was not allowed (allow_download=False)"
    from torchvision.datasets import FashionMNIST

    mirror = FashionMNIST.mirrors[0]
    if not _is_reachable(mirror):
        return f"was skipped because {mirror} did not answer within {_REACHABILITY_TIMEOUT_S:.0f} s"
    log.info("Downloading Fashion-MNIST from %s into %s", mirror, download_dir)
    try:
        FashionMNIST(root=str(download_dir), train=True, download=True)
        FashionMNIST(root=str(download_dir), train=False, download=True)
    except (RuntimeError, OSError) as err:
        log.warning("Fashion-MNIST download into %s failed: %s", download_dir, err)
        return f"failed: {err}"
    return None


def _is_reachable(url: str) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=_REACHABILITY_TIMEOUT_S):
            return True
    except OSError:
        return False


def _read_idx(path: Path, magic: int, expected_ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as err:
        raise DatasetError(f"Cannot read Fashion-MNIST file {path}: {err}. Replace the file.") from err

    header_size = 4 + 4 * expected_ndim
    if len(data) < header_size:
        raise DatasetError(f"Fashion-MNIST file {path} is truncated ({len(data)} bytes). Replace the file.")
    found_magic = int.from_bytes(data[:4], "big")
    if found_magic != magic:
        raise DatasetError(
            f"{path} is not an idx file of the expected kind: magic number {found_magic:#010x}, "
            f"expected {magic:#010x}. Check that the image and label files are not swapped or corrupt."
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_ndim))
    expected_bytes = header_size + int(np.prod(shape))
    if len(data) != expected_bytes:
        raise DatasetError(
            f"Fashion-MNIST file {path} has {len(data)} bytes, expected {expected_bytes} for shape {shape}. "
            "The file is truncated or corrupt; replace it."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def load_idx(directory: Path | str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Read images uint8 (N, 28, 28) and labels uint8 (N,) of `split` from raw or .gz idx files."""
    image_path, label_path = idx_files(directory, split)
    images = _read_idx(image_path, _IMAGES_MAGIC, expected_ndim=3)
    labels = _read_idx(label_path, _LABELS_MAGIC, expected_ndim=1)
    if len(images) != len(labels):
        raise DatasetError(
            f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels. "
            "Use files from the same Fashion-MNIST split."
        )
    return images, labels


def resize_square_images(images: np.ndarray, channels: int, image_size: int) -> np.ndarray:
    """Resize uint8 (N, H, H) grayscale images to uint8 (N, channels, image_size, image_size).

    Uses bicubic interpolation with antialiasing, so downscaling does not alias. With channels=3
    the gray channel is replicated.
    """
    # torch is imported here so that finding and reading the idx files does not load it.
    import torch
    import torch.nn.functional as F

    count, height, width = images.shape
    resized = np.empty((count, 1, image_size, image_size), dtype=np.uint8)
    for start in range(0, count, _RESIZE_CHUNK):
        # np.array copies, because the idx arrays are read-only views of the file bytes.
        chunk = torch.from_numpy(np.array(images[start : start + _RESIZE_CHUNK]))
        chunk = chunk.unsqueeze(1)
        if (height, width) != (image_size, image_size):
            chunk = F.interpolate(
                chunk.float(),
                size=(image_size, image_size),
                mode="bicubic",
                antialias=True,
                align_corners=False,
            )
            # Bicubic overshoots at sharp edges, so clamp before converting back to uint8.
            chunk = chunk.round_().clamp_(0, 255).to(torch.uint8)
        resized[start : start + len(chunk)] = chunk.numpy()
    if channels == 3:
        return np.repeat(resized, 3, axis=1)
    return resized
