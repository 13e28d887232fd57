"""Tests for the decoded-array cache and the Fashion-MNIST reader, on real photos and idx files."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashion_gan.data import fashion_mnist
from fashion_gan.data.cache import content_digest, detect_kind, load_decoded_array
from fashion_gan.data.fashion_mnist import find_fashion_mnist_dir, load_idx
from fashion_gan.data.images import list_image_files
from fashion_gan.errors import DatasetError

CLOTHING_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/clothing-small/train"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MISSING = (
    f"Fashion-MNIST not installed at {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)"
)


@pytest.fixture
def clothing_60(tmp_path: Path) -> Path:
    """Copy 6 photos from each of the 10 class folders, so a test may edit them."""
    if not CLOTHING_DIR.is_dir():
        pytest.skip(f"clothing photos not found at {CLOTHING_DIR}")
    destination = tmp_path / "clothing"
    for class_dir in sorted(path for path in CLOTHING_DIR.iterdir() if path.is_dir())[:10]:
        (destination / class_dir.name).mkdir(parents=True)
        for photo in sorted(class_dir.glob("*.jpg"))[:6]:
            shutil.copy2(photo, destination / class_dir.name / photo.name)
    return destination


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "small"
    folder.mkdir()
    for index in range(4):
        color = (index * 60, 100, 200 - index * 40)
        Image.new("RGB", (48, 40), color).save(folder / f"image_{index}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return folder


def write_idx(directory: Path, prefix: str, images: np.ndarray, labels: np.ndarray, compress: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    image_header = (0x803).to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in images.shape)
    label_header = (0x801).to_bytes(4, "big") + len(labels).to_bytes(4, "big")
    files = {
        f"{prefix}-images-idx3-ubyte": image_header + images.tobytes(),
        f"{prefix}-labels-idx1-ubyte": label_header + labels.tobytes(),
    }
    for name, data in files.items():
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)


def tiny_idx_dataset(
    directory: Path, count: int = 12, compress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, count, dtype=np.uint8)
    write_idx(directory, "train", images, labels, compress)
    return images, labels


def test_clothing_photos_decode_then_reuse(
    clothing_60: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fashion_gan.data.cache")
    cache_dir = tmp_path / "cache"

    first = load_decoded_array(clothing_60, "image_folder", 3, 64, cache_dir, show_progress=False)
    second = load_decoded_array(clothing_60, "image_folder", 3, 64, cache_dir, show_progress=False)

    assert first.array.shape == (60, 3, 64, 64)
    assert len(first) == 60
    assert first.reused is False
    assert first.skipped_files == []
    assert second.reused is True
    assert second.cache_path == first.cache_path
    assert second.content_digest == first.content_digest
    np.testing.assert_array_equal(second.array, first.array)
    assert f"Reusing decoded array cache at {first.cache_path}" in caplog.text
    # Real photos are not blank: every decoded image has some contrast.
    assert (first.array.reshape(60, -1).std(axis=1) > 5).all()


def test_changed_bytes_change_digest(clothing_60: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    before = load_decoded_array(clothing_60, "image_folder", 3, 64, cache_dir, show_progress=False)

    # Same name and nearly the same size: only the bytes differ.
    photo = sorted(clothing_60.rglob("*.jpg"))[7]
    data = bytearray(photo.read_bytes())
    data[-3] ^= 0xFF
    photo.write_bytes(bytes(data))
    after = load_decoded_array(clothing_60, "image_folder", 3, 64, cache_dir, show_progress=False)

    assert after.content_digest != before.content_digest
    assert after.reused is False
    assert after.cache_path != before.cache_path


def test_digest_tracks_names_not_order(small_folder: Path) -> None:
    paths = list_image_files(small_folder)
    original = content_digest(paths, small_folder)

    renamed = small_folder / "image_0.png"
    renamed.rename(small_folder / "renamed.png")
    after_rename = content_digest(list_image_files(small_folder), small_folder)

    assert content_digest(list(reversed(list_image_files(small_folder))), small_folder) == after_rename
    assert after_rename != original


def test_skipped_files_persist_in_sidecar(
    small_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = tmp_path / "cache"
    first = load_decoded_array(small_folder, "image_folder", 1, 16, cache_dir, show_progress=False)
    caplog.clear()
    second = load_decoded_array(small_folder, "image_folder", 1, 16, cache_dir, show_progress=False)

    assert first.array.shape == (4, 1, 16, 16)
    assert [name for name, _ in first.skipped_files] == ["broken.jpg"]
    assert second.reused is True
    assert second.skipped_files == first.skipped_files
    # The reused run still reports the skipped file once.
    assert sum("broken.jpg" in record.getMessage() for record in caplog.records) == 1

    sidecar = json.loads(first.cache_path.with_suffix(".json").read_text())
    assert sidecar["content_digest"] == first.content_digest
    assert sidecar["skipped_files"][0][0] == "broken.jpg"
    assert sidecar["shape"] == [4, 1, 16, 16]


def test_concurrent_loads_decode_once(small_folder: Path, tmp_path: Path) -> None:
    # Two callers at once, like two ranks on one machine: the file lock lets only one decode.
    def load() -> bool:
        decoded = load_decoded_array(small_folder, "image_folder", 3, 16, tmp_path / "cache", show_progress=False)
        return decoded.reused

    with ThreadPoolExecutor(max_workers=2) as pool:
        reused = sorted(pool.map(lambda _: load(), range(2)))

    assert reused == [False, True]


def test_settings_get_separate_entries(small_folder: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    gray = load_decoded_array(small_folder, "image_folder", 1, 16, cache_dir, show_progress=False)
    rgb = load_decoded_array(small_folder, "image_folder", 3, 16, cache_dir, show_progress=False)
    larger = load_decoded_array(small_folder, "image_folder", 3, 32, cache_dir, show_progress=False)

    assert len({gray.cache_path, rgb.cache_path, larger.cache_path}) == 3
    assert rgb.reused is False
    assert larger.array.shape == (4, 3, 32, 32)


def test_damaged_entry_is_rebuilt(small_folder: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    first = load_decoded_array(small_folder, "image_folder", 3, 16, cache_dir, show_progress=False)
    first.cache_path.write_bytes(b"not a numpy file")

    second = load_decoded_array(small_folder, "image_folder", 3, 16, cache_dir, show_progress=False)

    assert second.reused is False
    assert second.array.shape == (4, 3, 16, 16)
    assert not list(first.cache_path.parent.glob("*.tmp"))


def test_empty_folder_raises_dataset_error(tmp_path: Path) -> None:
    source = tmp_path / "empty"
    source.mkdir()

    with pytest.raises(DatasetError, match="contains no images"):
        load_decoded_array(source, "image_folder", 3, 16, tmp_path / "cache", show_progress=False)


def test_unknown_kind_raises_dataset_error(small_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="image_folder, fashion_mnist"):
        load_decoded_array(small_folder, "tfrecord", 3, 16, tmp_path / "cache")


@pytest.mark.parametrize("compress", [True, False])
def test_load_idx_reads_gz_and_raw(tmp_path: Path, compress: bool) -> None:
    images, labels = tiny_idx_dataset(tmp_path, compress=compress)

    loaded_images, loaded_labels = load_idx(tmp_path, "train")

    np.testing.assert_array_equal(loaded_images, images)
    np.testing.assert_array_equal(loaded_labels, labels)


def test_load_idx_rejects_swapped_files(tmp_path: Path) -> None:
    tiny_idx_dataset(tmp_path, compress=False)
    images_file = tmp_path / "train-images-idx3-ubyte"
    labels_file = tmp_path / "train-labels-idx1-ubyte"
    images_bytes = images_file.read_bytes()
    images_file.write_bytes(labels_file.read_bytes())
    labels_file.write_bytes(images_bytes)

    with pytest.raises(DatasetError, match="magic number"):
        load_idx(tmp_path, "train")


def test_load_idx_rejects_truncated_file(tmp_path: Path) -> None:
    tiny_idx_dataset(tmp_path, compress=False)
    images_file = tmp_path / "train-images-idx3-ubyte"
    images_file.write_bytes(images_file.read_bytes()[:-100])

    with pytest.raises(DatasetError, match="truncated or corrupt"):
        load_idx(tmp_path, "train")


def test_load_idx_reads_installed_test_split() -> None:
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(FASHION_MNIST_MISSING)

    images, labels = load_idx(FASHION_MNIST_DIR, "test")

    assert images.shape == (10_000, 28, 28)
    assert labels.shape == (10_000,)
    assert set(np.unique(labels)) == set(range(10))


@pytest.mark.parametrize("channels", [1, 3])
def test_fashion_mnist_cache_resizes(tmp_path: Path, channels: int) -> None:
    source = tmp_path / "idx"
    images, labels = tiny_idx_dataset(source)

    decoded = load_decoded_array(source, "fashion_mnist", channels, 32, tmp_path / "cache")
    again = load_decoded_array(source, "fashion_mnist", channels, 32, tmp_path / "cache")

    assert decoded.array.shape == (12, channels, 32, 32)
    np.testing.assert_array_equal(decoded.labels, labels)
    np.testing.assert_array_equal(again.labels, labels)
    assert again.reused is True
    # Resizing keeps the brightness of each image (within rounding and bicubic overshoot).
    np.testing.assert_allclose(decoded.array[:, 0].mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=3)
    if channels == 3:
        np.testing.assert_array_equal(decoded.array[:, 0], decoded.array[:, 2])


@pytest.mark.slow
def test_fashion_mnist_train_loads_60000(tmp_path: Path) -> None:
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(FASHION_MNIST_MISSING)

    decoded = load_decoded_array(FASHION_MNIST_DIR, "fashion_mnist", 1, 32, tmp_path / "cache")

    assert decoded.array.shape == (60_000, 1, 32, 32)
    assert decoded.labels.shape == (60_000,)
    assert decoded.skipped_files == []
    assert decoded.array.max() == 255


def test_find_dir_prefers_explicit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = tmp_path / "explicit"
    from_env = tmp_path / "env"
    tiny_idx_dataset(explicit)
    tiny_idx_dataset(from_env)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(from_env))

    assert find_fashion_mnist_dir(explicit, allow_download=False) == explicit
    assert find_fashion_mnist_dir(allow_download=False) == from_env


def test_find_dir_rejects_env_without_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))

    with pytest.raises(DatasetError, match="FASHION_MNIST_DIR="):
        find_fashion_mnist_dir(allow_download=False)


def test_find_dir_falls_back_to_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    tiny_idx_dataset(tmp_path)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_FASHION_MNIST_DIR", tmp_path)

    assert find_fashion_mnist_dir(allow_download=False) == tmp_path


def test_find_dir_names_every_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "absent")
    # Reports the mirror as unreachable, so no connection is attempted.
    monkeypatch.setattr(fashion_mnist, "_is_reachable", lambda url: False)

    with pytest.raises(DatasetError) as caught:
        find_fashion_mnist_dir(download_dir=tmp_path / "download")

    message = str(caught.value)
    assert "data.source" in message
    assert "FASHION_MNIST_DIR" in message
    assert str(tmp_path / "absent") in message
    assert "did not answer" in message
    assert not (tmp_path / "download").exists()


def test_detect_kind_by_idx_files(tmp_path: Path, small_folder: Path) -> None:
    idx_dir = tmp_path / "idx"
    tiny_idx_dataset(idx_dir, compress=False)

    assert detect_kind(idx_dir) == "fashion_mnist"
    assert detect_kind(small_folder) == "image_folder"
