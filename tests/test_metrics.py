"""Tests of the quality metrics: shipped classifier, Fréchet distance, class coverage, extractors."""

import gzip
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from fashion_gan.errors import ChecksumError, ConfigError
from fashion_gan.metrics import (
    FeatureStatistics,
    FidEvaluator,
    MetricUnavailable,
    create_extractor,
    feature_statistics,
    frechet_distance,
)
from fashion_gan.metrics.classifier import (
    CLASS_NAMES,
    SHIPPED_WEIGHTS_PATH,
    digest_path_for,
    file_sha256,
    load_classifier,
    prepare_images,
    uint8_to_unit_range,
)
from fashion_gan.metrics.coverage import class_shares, normalized_entropy
from fashion_gan.metrics.train_features import evaluate_accuracy, read_fashion_mnist, train_feature_classifier

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason=f"Fashion-MNIST not installed at {FASHION_MNIST_DIR}"
)


@pytest.fixture(scope="module")
def train_split() -> tuple[np.ndarray, np.ndarray]:
    return read_fashion_mnist("train", FASHION_MNIST_DIR)


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    return read_fashion_mnist("test", FASHION_MNIST_DIR)


@pytest.fixture(scope="module")
def evaluator_with_train_statistics(train_split, tmp_path_factory) -> FidEvaluator:
    """A classifier FID evaluator on 2,000 samples whose real statistics come from the training set."""
    evaluator = FidEvaluator("fashion_mnist_classifier", num_samples=2000, batch_size=500)
    cache_path = tmp_path_factory.mktemp("fid") / "train.fid-stats.npz"
    evaluator.real_statistics(train_split[0], cache_path)
    return evaluator


def _generator_from_array(images_uint8: np.ndarray):
    """Return a generator_fn that yields the given (N, 28, 28) images in order, as the generator would."""
    position = 0

    def generate(count: int) -> torch.Tensor:
        nonlocal position
        batch = torch.from_numpy(images_uint8[position : position + count]).unsqueeze(1)
        position += count
        return uint8_to_unit_range(batch)

    return generate


def test_shipped_weights_match_digest():
    expected = digest_path_for(SHIPPED_WEIGHTS_PATH).read_text().split()[0]
    assert file_sha256(SHIPPED_WEIGHTS_PATH) == expected
    assert SHIPPED_WEIGHTS_PATH.stat().st_size < 1_000_000


def test_tampered_weights_are_rejected(tmp_path):
    weights = tmp_path / "classifier.pt"
    weights.write_bytes(SHIPPED_WEIGHTS_PATH.read_bytes() + b"x")
    digest_path_for(weights).write_text(digest_path_for(SHIPPED_WEIGHTS_PATH).read_text())
    with pytest.raises(ChecksumError, match="sha256"):
        load_classifier(weights)
    with pytest.raises(MetricUnavailable, match="cannot load its weights"):
        create_extractor("fashion_mnist_classifier", weights_path=weights)


@needs_fashion_mnist
def test_classifier_predicts_first_test_image(test_split):
    images, labels = test_split
    model = load_classifier()
    batch = uint8_to_unit_range(torch.from_numpy(images[:1]).unsqueeze(1))
    predicted = int(model(prepare_images(batch)).argmax(dim=1))
    assert labels[0] == 9
    assert CLASS_NAMES[predicted] == "Ankle boot"


@needs_fashion_mnist
def test_classifier_test_accuracy(test_split):
    images, labels = test_split
    accuracy = evaluate_accuracy(load_classifier(), images[:2000], labels[:2000])
    assert accuracy >= 0.90


def _write_idx_gz(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@needs_fashion_mnist
def test_train_feature_classifier_small(tmp_path, train_split, test_split):
    # A 512-image copy of Fashion-MNIST keeps the run to a second; accuracy is not checked here.
    data_dir = tmp_path / "fashion-mnist"
    data_dir.mkdir()
    _write_idx_gz(data_dir / "train-images-idx3-ubyte.gz", 0x803, train_split[0][:512])
    _write_idx_gz(data_dir / "train-labels-idx1-ubyte.gz", 0x801, train_split[1][:512])
    _write_idx_gz(data_dir / "t10k-images-idx3-ubyte.gz", 0x803, test_split[0][:256])
    _write_idx_gz(data_dir / "t10k-labels-idx1-ubyte.gz", 0x801, test_split[1][:256])
    global_rng_state = torch.random.get_rng_state()

    first_path, first_accuracy = train_feature_classifier(tmp_path / "first", epochs=1, seed=3, data_dir=data_dir)
    second_path, second_accuracy = train_feature_classifier(tmp_path / "second", epochs=1, seed=3, data_dir=data_dir)

    assert first_path == tmp_path / "first" / SHIPPED_WEIGHTS_PATH.name
    assert file_sha256(first_path) == digest_path_for(first_path).read_text().split()[0]
    assert file_sha256(first_path) == file_sha256(second_path)
    assert first_accuracy == second_accuracy
    assert 0.0 <= first_accuracy <= 1.0
    assert torch.equal(torch.random.get_rng_state(), global_rng_state)
    assert load_classifier(first_path).head.out_features == 10


def test_prepare_images_gray_and_resize():
    rgb = torch.zeros(2, 3, 64, 64)
    rgb[:, 0] = 1.0  # red channel at the maximum, the others at 0: gray is 1/3
    prepared = prepare_images(rgb)
    assert prepared.shape == (2, 1, 28, 28)
    assert torch.allclose(prepared, torch.full_like(prepared, 1 / 3))
    with pytest.raises(ValueError, match="expected images"):
        prepare_images(torch.zeros(2, 4, 28, 28))


def test_frechet_distance_identical_is_zero():
    features = torch.randn(500, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    statistics = feature_statistics(features)
    assert frechet_distance(statistics, statistics) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_known_gaussians():
    # Diagonal covariances: d = |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2.
    first = FeatureStatistics(np.zeros(3), np.diag([1.0, 4.0, 9.0]), 100)
    second = FeatureStatistics(np.array([1.0, 2.0, 0.0]), np.diag([4.0, 4.0, 1.0]), 100)
    expected = (1 + 4 + 0) + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert frechet_distance(first, second) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_singular_covariance():
    # Rank-deficient covariances (more dimensions than samples) must still give a finite distance.
    generator = torch.Generator().manual_seed(1)
    first = feature_statistics(torch.randn(10, 50, generator=generator, dtype=torch.float64))
    second = feature_statistics(torch.randn(10, 50, generator=generator, dtype=torch.float64))
    distance = frechet_distance(first, second)
    assert np.isfinite(distance)
    assert distance > 0


def test_class_coverage_entropy_bounds():
    uniform = class_shares(torch.arange(1000) % 10, 10)
    assert np.allclose(uniform, 0.1)
    assert normalized_entropy(uniform) == pytest.approx(1.0)
    single = class_shares(torch.full((100,), 3), 10)
    assert single[3] == 1.0
    assert normalized_entropy(single) == 0.0
    assert math.copysign(1.0, normalized_entropy(single)) == 1.0  # 0.0, not -0.0, in logs
    two_classes = class_shares(torch.tensor([0, 1] * 50), 10)
    assert normalized_entropy(two_classes) == pytest.approx(np.log(2) / np.log(10))


@needs_fashion_mnist
def test_real_test_images_score_low(evaluator_with_train_statistics, test_split):
    scores = evaluator_with_train_statistics.score(_generator_from_array(test_split[0]))
    # Measured about 0.13 on 5,000 vs 5,000 images; mode collapse scores above 300.
    assert scores["fid"] < 1.0
    assert scores["class_coverage_entropy"] > 0.99
    assert len(scores["class_shares"]) == 10
    assert sum(scores["class_shares"]) == pytest.approx(1.0)


@needs_fashion_mnist
def test_mode_collapse_scores_high(evaluator_with_train_statistics, test_split):
    real_scores = evaluator_with_train_statistics.score(_generator_from_array(test_split[0]))
    collapsed = np.repeat(test_split[0][:1], 2000, axis=0)
    collapsed_scores = evaluator_with_train_statistics.score(_generator_from_array(collapsed))
    assert collapsed_scores["class_coverage_entropy"] < 0.05
    assert collapsed_scores["class_shares"][9] == 1.0
    assert collapsed_scores["fid"] > 5 * real_scores["fid"]
    assert evaluator_with_train_statistics.best_fid == pytest.approx(real_scores["fid"])


@needs_fashion_mnist
def test_log_values_keys(evaluator_with_train_statistics, test_split):
    evaluator = evaluator_with_train_statistics
    values = evaluator.log_values(evaluator.score(_generator_from_array(test_split[0])))
    assert values["val/fid"] >= values["val/fid_best"]
    assert 0.99 < values["val/class_coverage"] <= 1.0
    assert "val/class_share/ankle_boot" in values
    assert "val/class_share/t-shirt_top" in values


@needs_fashion_mnist
def test_real_statistics_cache_reused(tmp_path, train_split, caplog):
    images = train_split[0][:300]
    cache_path = tmp_path / "real.npz"
    evaluator = FidEvaluator("fashion_mnist_classifier", num_samples=200, batch_size=100)
    first = evaluator.real_statistics(images, cache_path)
    assert cache_path.is_file()
    assert first.num_samples == 200

    with caplog.at_level("INFO", logger="fashion_gan.metrics.fid"):
        second = evaluator.real_statistics(images, cache_path)
    assert "reusing real FID statistics" in caplog.text
    assert np.array_equal(first.covariance, second.covariance)

    # Another sample count is another cache key: the statistics are recomputed over 250 images.
    other = FidEvaluator("fashion_mnist_classifier", num_samples=250, batch_size=100)
    assert other.real_statistics(images, cache_path).num_samples == 250


def test_rgb_real_array_accepted(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(40, 3, 32, 32), dtype=np.uint8)
    evaluator = FidEvaluator("fashion_mnist_classifier", num_samples=40, batch_size=16)
    statistics = evaluator.real_statistics(images, tmp_path / "rgb.npz")
    assert statistics.mean.shape == (128,)
    assert statistics.num_samples == 40


def test_score_without_real_statistics_fails():
    evaluator = FidEvaluator("fashion_mnist_classifier", num_samples=10, batch_size=10)
    with pytest.raises(RuntimeError, match="real_statistics first"):
        evaluator.score(lambda count: torch.zeros(count, 1, 28, 28))


def test_unknown_extractor_lists_known_names():
    with pytest.raises(ConfigError, match="fashion_mnist_classifier, inception"):
        FidEvaluator("vgg", num_samples=10)


def test_inception_offline_raises_metric_unavailable(tmp_path, monkeypatch):
    # An empty torch hub cache and no network: whether or not torch-fidelity is installed, the
    # Inception weights cannot be obtained and no download reaches the internet.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def refuse_connection(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse_connection)
    with pytest.raises(MetricUnavailable, match="cannot be downloaded"):
        FidEvaluator("inception", num_samples=10)
