"""Training of the Fashion-MNIST feature classifier whose weights the package ships."""

import gzip
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional

from fashion_gan.errors import DatasetError
from fashion_gan.metrics.classifier import (
    WEIGHTS_FILENAME,
    FashionMnistClassifier,
    prepare_images,
    uint8_to_unit_range,
    write_digest_file,
)

log = logging.getLogger(__name__)

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILE_STEMS = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_IDX_MAGIC_IMAGES = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_MAGIC_LABELS = 0x00000801  # unsigned bytes, 1 dimension


def _read_idx_file(directory: Path, split: str, kind: str) -> np.ndarray:
    stem = _IDX_FILE_STEMS[(split, kind)]
    for path in (directory / f"{stem}.gz", directory / stem):
        if path.is_file():
            break
    else:
        raise DatasetError(f"Fashion-MNIST file {stem}(.gz) not found in {directory}; set FASHION_MNIST_DIR.")

    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    magic = int.from_bytes(data[0:4], "big")
    expected_magic = _IDX_MAGIC_IMAGES if kind == "images" else _IDX_MAGIC_LABELS
    if magic != expected_magic:
        raise DatasetError(f"{path} has idx magic number {magic:#010x}, expected {expected_magic:#010x}.")
    dimensions = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dimensions))
    header_size = 4 + 4 * dimensions
    if len(data) != header_size + math.prod(shape):
        raise DatasetError(f"{path} is truncated: its header announces shape {shape}.")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def read_fashion_mnist(split: str, directory: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 28, 28), labels uint8 (N,)) of the "train" or "test" split.

    The directory defaults to FASHION_MNIST_DIR, then /usr/share/datasets/fashion-mnist.
    """
    # NOTE: fashion_gan.data.fashion_mnist.load_idx does the same with more fallbacks; this copy keeps
    # the metrics package usable on its own.
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if directory is None:
        directory = Path(os.environ.get("FASHION_MNIST_DIR", DEFAULT_FASHION_MNIST_DIR))
    images = _read_idx_file(directory, split, "images")
    labels = _read_idx_file(directory, split, "labels")
    if len(images) != len(labels):
        raise DatasetError(f"Fashion-MNIST {split} split in {directory} has {len(images)} images but {len(labels)} labels.")
    return images, labels


@torch.no_grad()
def evaluate_accuracy(model: FashionMnistClassifier, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    """Return the share of `images` (uint8 (N, 28, 28)) that `model` assigns to their label."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).unsqueeze(1).to(device)
        logits = model(prepare_images(uint8_to_unit_range(batch)))
        predicted = logits.argmax(dim=1).cpu()
        correct += int((predicted == torch.from_numpy(labels[start : start + batch_size]).long()).sum())
    return correct / len(images)


def train_feature_classifier(
    out_dir: Path,
    epochs: int = 4,
    seed: int = 0,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    data_dir: Path | None = None,
) -> tuple[Path, float]:
    """Train the feature classifier on the Fashion-MNIST training set and save it under `out_dir`.

    Writes `fashion_mnist_classifier.pt` and its `.sha256` file and returns (weights path,
    accuracy on the 10,000 test images). The same seed gives the same weights for a given torch
    version, CPU kind and thread count; the result can differ across these.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    train_images, train_labels = read_fashion_mnist("train", data_dir)
    test_images, test_labels = read_fashion_mnist("test", data_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # A private RNG stream, so training neither reads nor moves the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FashionMnistClassifier()
    generator = torch.Generator().manual_seed(seed)
    images = uint8_to_unit_range(torch.from_numpy(train_images.copy()).unsqueeze(1))  # (N, 1, 28, 28)
    labels = torch.from_numpy(train_labels.astype(np.int64))

    steps_per_epoch = len(images) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch
    )
    for epoch in range(epochs):
        started = time.monotonic()
        loss_sum = _train_one_epoch(model, optimizer, scheduler, images, labels, batch_size, generator)
        log.info(
            "feature classifier epoch %d/%d: mean loss %.4f, %.0f s",
            epoch + 1,
            epochs,
            loss_sum / steps_per_epoch,
            time.monotonic() - started,
        )

    test_accuracy = evaluate_accuracy(model, test_images, test_labels)
    weights_path = out_dir / WEIGHTS_FILENAME
    temporary_path = weights_path.with_name(weights_path.name + ".tmp")
    torch.save(model.state_dict(), temporary_path)
    temporary_path.replace(weights_path)
    digest = write_digest_file(weights_path)
    log.info("feature classifier saved to %s (sha256 %s), test accuracy %.4f", weights_path, digest, test_accuracy)
    return weights_path, test_accuracy


def _train_one_epoch(
    model: FashionMnistClassifier,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    model.train()
    order = torch.randperm(len(images), generator=generator)
    loss_sum = 0.0
    for start in range(0, len(images) - batch_size + 1, batch_size):
        index = order[start : start + batch_size]
        batch = images[index]
        # Horizontal flips: every Fashion-MNIST class looks the same mirrored.
        flip = torch.rand(batch_size, generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        # Minimise the cross-entropy between predicted class probabilities and the labels.
        loss = functional.cross_entropy(model(batch), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += float(loss.detach())
    return loss_sum
