"""Fréchet distance between real and generated images in the feature space of a network.

Two feature extractors are chosen by name: `fashion_mnist_classifier` (the small CNN shipped in
`weights/`, which also yields the class coverage of generated images) and `inception` (the
standard Inception-v3 pool features through torchmetrics, which needs torch-fidelity and its
downloaded weights).
"""

import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from fashion_gan.errors import ChecksumError, ConfigError, ExitCode, FashionGanError
from fashion_gan.metrics.classifier import (
    CLASS_NAMES,
    NUM_CLASSES,
    SHIPPED_WEIGHTS_PATH,
    file_sha256,
    load_classifier,
    prepare_images,
    uint8_to_unit_range,
)
from fashion_gan.metrics.coverage import class_shares, normalized_entropy

log = logging.getLogger(__name__)

# Bump when the statistics or their selection of real images change, so old caches are recomputed.
STATISTICS_FORMAT_VERSION = 1
REAL_SELECTION_SEED = 0


class MetricUnavailable(FashionGanError):
    """A quality metric cannot run here because a package or weights are missing. Training continues without it."""

    # NOTE: belongs in fashion_gan/errors.py beside the other error classes.
    exit_code = ExitCode.CONFIG


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean (D,) and covariance (D, D) of features in float64, and the number of images behind them."""

    mean: np.ndarray
    covariance: np.ndarray
    num_samples: int


def feature_statistics(features: torch.Tensor) -> FeatureStatistics:
    """Return the mean and the unbiased covariance of `features` (N, D), computed in float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"feature statistics need a (N, D) tensor with N >= 2, got {tuple(features.shape)}")
    features = features.detach().to("cpu", torch.float64)
    mean = features.mean(dim=0)
    centered = features - mean
    covariance = centered.T @ centered / (features.shape[0] - 1)
    return FeatureStatistics(mean.numpy(), covariance.numpy(), features.shape[0])


def _symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Return the square root of a symmetric positive semi-definite matrix via its eigendecomposition."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    # Rounding can leave eigenvalues of a PSD matrix slightly below zero, where the exact value is zero.
    roots = eigenvalues.clamp(min=0).sqrt()
    return (eigenvectors * roots) @ eigenvectors.T


def frechet_distance(first: FeatureStatistics, second: FeatureStatistics) -> float:
    """Return the Fréchet distance of two Gaussians, |m1 - m2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Computed in float64. tr((S1 S2)^(1/2)) equals tr((A S2 A)^(1/2)) with A = S1^(1/2), and
    A S2 A is symmetric, so both roots come from `eigh` and stay real: there is no imaginary
    part to discard, unlike the general `sqrtm` of the non-symmetric product S1 S2.
    """
    if first.mean.shape != second.mean.shape:
        raise ValueError(f"feature dimensions differ: {first.mean.shape} vs {second.mean.shape}")
    mean_first = torch.from_numpy(first.mean).double()
    mean_second = torch.from_numpy(second.mean).double()
    covariance_first = torch.from_numpy(first.covariance).double()
    covariance_second = torch.from_numpy(second.covariance).double()

    root_first = _symmetric_sqrt(covariance_first)
    product = root_first @ covariance_second @ root_first
    eigenvalues = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0)
    trace_of_root = eigenvalues.sqrt().sum()

    distance = (
        (mean_first - mean_second).square().sum()
        + covariance_first.trace()
        + covariance_second.trace()
        - 2 * trace_of_root
    )
    # The exact value is a squared distance, so a negative result is float64 rounding of zero.
    return max(float(distance), 0.0)


class FeatureExtractor(ABC):
    """Maps images in [-1, 1] of shape (B, 1 or 3, H, W) to features (B, D) and optional class logits."""

    name: ClassVar[str]
    has_classes: ClassVar[bool]

    @property
    @abstractmethod
    def identity(self) -> str:
        """Return a string that changes whenever the features would change, used in the cache key of real statistics."""

    @abstractmethod
    def extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (features (B, D), class logits (B, NUM_CLASSES) or None) of `images`."""


class ClassifierExtractor(FeatureExtractor):
    """The penultimate layer of the shipped Fashion-MNIST classifier (128 features)."""

    name = "fashion_mnist_classifier"
    has_classes = True

    def __init__(self, device: str | torch.device, weights_path: Path | None = None) -> None:
        self.device = torch.device(device)
        weights_path = Path(weights_path) if weights_path is not None else SHIPPED_WEIGHTS_PATH
        try:
            self.model = load_classifier(weights_path, self.device)
        except ChecksumError as err:
            raise MetricUnavailable(f"the {self.name} feature extractor cannot load its weights: {err}") from err
        self._identity = f"{self.name}:{file_sha256(weights_path)}"

    @property
    def identity(self) -> str:
        return self._identity

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model.features_and_logits(prepare_images(images.to(self.device)))


class InceptionExtractor(FeatureExtractor):
    """Inception-v3 pool features (2048) as in the standard FID, through torchmetrics and torch-fidelity."""

    name = "inception"
    has_classes = False

    def __init__(self, device: str | torch.device, weights_path: Path | None = None) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.device = torch.device(device)
        try:
            metric = FrechetInceptionDistance(
                feature=2048,
                feature_extractor_weights_path=str(weights_path) if weights_path is not None else None,
            )
        except ModuleNotFoundError as err:
            raise MetricUnavailable(
                "the inception FID extractor needs the torch-fidelity package, which is not installed, and its "
                "Inception-v3 weights, which cannot be downloaded without internet access. Install "
                "torch-fidelity and run once online (or pass a local weights file), or set "
                f"metrics.fid_extractor=fashion_mnist_classifier. Import error: {err}"
            ) from err
        except (OSError, RuntimeError) as err:
            # torch.hub raises URLError (an OSError) offline and RuntimeError for a corrupt download.
            # NOTE: not yet run, because the development venv lacks torch-fidelity and tests reach only
            # the branch above. The offline test blocks sockets so that it would cover this one too.
            raise MetricUnavailable(
                "the Inception-v3 weights of the inception FID extractor cannot be downloaded or loaded "
                f"({type(err).__name__}: {err}). Run once with internet access to fill the torch hub cache "
                f"({torch.hub.get_dir()}), pass a local weights file, or set metrics.fid_extractor=fashion_mnist_classifier."
            ) from err
        self.model = metric.inception.to(self.device)
        self._identity = f"{self.name}:{weights_path or 'torch-fidelity default'}"

    @property
    def identity(self) -> str:
        return self._identity

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The torchmetrics network takes uint8 RGB of any size and resizes to 299 itself.
        pixels = ((images.to(self.device).float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return self.model(pixels), None


_EXTRACTORS: dict[str, type[FeatureExtractor]] = {
    ClassifierExtractor.name: ClassifierExtractor,
    InceptionExtractor.name: InceptionExtractor,
}
EXTRACTOR_NAMES = tuple(_EXTRACTORS)


def create_extractor(name: str, device: str | torch.device = "cpu", weights_path: Path | None = None) -> FeatureExtractor:
    """Create the feature extractor `name`. Raises MetricUnavailable when it cannot run here."""
    if name not in _EXTRACTORS:
        raise ConfigError(f"unknown FID feature extractor {name!r}. Choose one of {', '.join(EXTRACTOR_NAMES)}.")
    return _EXTRACTORS[name](device, weights_path)


def _class_slug(class_name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "_", class_name.lower())


class FidEvaluator:
    """Scores a generator against fixed real statistics: FID and, with the classifier, class coverage.

    Creating it raises MetricUnavailable when the extractor cannot run here; callers log a
    WARNING and train without the metric. `best_fid` is the lowest FID seen by `score`; a resumed
    run restores it from its own state.
    """

    def __init__(
        self,
        extractor_name: str,
        num_samples: int = 5000,
        batch_size: int = 250,
        device: str | torch.device = "cpu",
        weights_path: Path | None = None,
    ) -> None:
        if num_samples < 2:
            raise ConfigError(f"metrics num_samples must be at least 2 for a covariance, got {num_samples}.")
        if batch_size < 1:
            raise ConfigError(f"metrics batch_size must be at least 1, got {batch_size}.")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.extractor = create_extractor(extractor_name, device, weights_path)
        self.best_fid: float | None = None
        self._real: FeatureStatistics | None = None

    def real_statistics(self, real_uint8_array: np.ndarray, cache_path: Path) -> FeatureStatistics:
        """Compute (or load from `cache_path`, an .npz) the statistics of up to `num_samples` real images.

        `real_uint8_array` is (N, C, H, W) or (N, H, W) uint8, possibly a memory map. With more than
        `num_samples` images a fixed, seeded subset is used. The cache is reused when the extractor,
        the sample count and the array shape match. The pixels are not hashed, so the caller names
        the cache after the array contents, as the decoded-array cache does.
        """
        cache_path = Path(cache_path)
        indices = self._select_real_indices(len(real_uint8_array))
        cache_key = self._real_cache_key(real_uint8_array.shape, len(indices))
        cached = _load_cached_statistics(cache_path, cache_key)
        if cached is not None:
            log.info("reusing real FID statistics at %s", cache_path)
            self._real = cached
            return cached

        log.info("computing real FID statistics of %d images with %s", len(indices), self.extractor.name)
        features = []
        for start in range(0, len(indices), self.batch_size):
            batch = np.asarray(real_uint8_array[indices[start : start + self.batch_size]])
            if batch.ndim == 3:
                batch = batch[:, None]
            images = uint8_to_unit_range(torch.from_numpy(batch))
            features.append(self.extractor.extract(images)[0].cpu())
        statistics = feature_statistics(torch.cat(features))
        _save_statistics(cache_path, cache_key, statistics)
        self._real = statistics
        return statistics

    def score(self, generator_fn: Callable[[int], torch.Tensor]) -> dict[str, float | list[float] | None]:
        """Score `num_samples` images from `generator_fn` against the real statistics.

        `generator_fn(count)` returns `count` images in [-1, 1] of shape (count, C, H, W). Scores
        are comparable across steps only when it draws from a fixed noise seed with the generator
        in eval mode. Returns fid, class_coverage_entropy and class_shares (the last two None for
        extractors without classes).
        """
        if self._real is None:
            raise RuntimeError("FidEvaluator.score needs real statistics: call real_statistics first")
        features = []
        predicted_classes = []
        remaining = self.num_samples
        with torch.no_grad():
            while remaining > 0:
                count = min(self.batch_size, remaining)
                images = generator_fn(count)
                if images.shape[0] != count:
                    raise ValueError(f"generator_fn({count}) returned {images.shape[0]} images")
                batch_features, logits = self.extractor.extract(images)
                features.append(batch_features.cpu())
                if logits is not None:
                    predicted_classes.append(logits.argmax(dim=1).cpu())
                remaining -= count

        fid = frechet_distance(feature_statistics(torch.cat(features)), self._real)
        if self.best_fid is None or fid < self.best_fid:
            self.best_fid = fid
        scores: dict[str, float | list[float] | None] = {"fid": fid, "class_coverage_entropy": None, "class_shares": None}
        if predicted_classes:
            shares = class_shares(torch.cat(predicted_classes), NUM_CLASSES)
            scores["class_coverage_entropy"] = normalized_entropy(shares)
            scores["class_shares"] = shares.tolist()
        return scores

    def log_values(self, scores: dict[str, float | list[float] | None]) -> dict[str, float]:
        """Return the metric keys to log for `scores`: val/fid, val/fid_best, val/class_coverage, val/class_share/<class>."""
        values = {"val/fid": float(scores["fid"])}
        if self.best_fid is not None:
            values["val/fid_best"] = self.best_fid
        if scores.get("class_coverage_entropy") is not None:
            values["val/class_coverage"] = float(scores["class_coverage_entropy"])
            for class_name, share in zip(CLASS_NAMES, scores["class_shares"], strict=True):
                values[f"val/class_share/{_class_slug(class_name)}"] = float(share)
        return values

    def _select_real_indices(self, num_real: int) -> np.ndarray:
        if num_real < 2:
            raise ValueError(f"real FID statistics need at least 2 images, got {num_real}")
        if num_real <= self.num_samples:
            if num_real < self.num_samples:
                log.warning("only %d real images for FID statistics, fewer than num_samples=%d", num_real, self.num_samples)
            return np.arange(num_real)
        chosen = np.random.default_rng(REAL_SELECTION_SEED).permutation(num_real)[: self.num_samples]
        # Sorted indices read a memory-mapped array front to back.
        return np.sort(chosen)

    def _real_cache_key(self, shape: tuple[int, ...], num_selected: int) -> str:
        return (
            f"v{STATISTICS_FORMAT_VERSION};{self.extractor.identity};shape={tuple(shape)};"
            f"samples={num_selected};seed={REAL_SELECTION_SEED}"
        )


def _load_cached_statistics(cache_path: Path, cache_key: str) -> FeatureStatistics | None:
    if not cache_path.is_file():
        return None
    try:
        with np.load(cache_path, allow_pickle=False) as cached:
            if str(cached["cache_key"]) != cache_key:
                log.info("real FID statistics at %s were computed with other settings, recomputing them", cache_path)
                return None
            return FeatureStatistics(cached["mean"], cached["covariance"], int(cached["num_samples"]))
    except (OSError, ValueError, KeyError) as err:
        log.warning("cannot read real FID statistics at %s (%s), recomputing them", cache_path, err)
        return None


def _save_statistics(cache_path: Path, cache_key: str, statistics: FeatureStatistics) -> None:
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    # np.savez appends ".npz" to names without it, so the temporary name keeps that suffix.
    temporary_path = cache_path.with_name(f".{cache_path.stem}.{os.getpid()}.tmp.npz")
    np.savez(
        temporary_path,
        cache_key=np.array(cache_key),
        mean=statistics.mean,
        covariance=statistics.covariance,
        num_samples=np.array(statistics.num_samples),
    )
    temporary_path.replace(cache_path)

