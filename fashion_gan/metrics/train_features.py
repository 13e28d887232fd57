"""Training of the Fashion-MNIST feature classifier whose weights the package ships."""

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional

from fashion_gan.data.fashion_mnist import find_fashion_mnist_dir, load_idx
from fashion_gan.metrics.classifier import (
    WEIGHTS_FILENAME,
    FashionMnistClassifier,
    prepare_images,
    uint8_to_unit_range,
    write_digest_file,
)

log = logging.getLogger(__name__)


def read_fashion_mnist(split: str, directory: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return writable (images uint8 (N, 28, 28), labels uint8 (N,)) of the "train" or "test" split.

    The folder is `directory`, else the one `find_fashion_mnist_dir` finds (FASHION_MNIST_DIR,
    /usr/share/datasets/fashion-mnist, or a torchvision download when online).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = load_idx(find_fashion_mnist_dir(directory), split)
    # Copies, because torch.from_numpy warns about the read-only arrays that load_idx returns.
    return images.copy(), labels.copy()


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
    images = uint8_to_unit_range(torch.from_numpy(train_images).unsqueeze(1))  # (N, 1, 28, 28)
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
