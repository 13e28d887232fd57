"""Quality metrics of generated images: FID in a chosen feature space and class coverage."""

from fashion_gan.metrics.fid import (
    EXTRACTOR_NAMES,
    FeatureStatistics,
    FidEvaluator,
    MetricUnavailable,
    create_extractor,
    feature_statistics,
    frechet_distance,
)
from fashion_gan.metrics.train_features import train_feature_classifier

__all__ = [
    "EXTRACTOR_NAMES",
    "FeatureStatistics",
    "FidEvaluator",
    "MetricUnavailable",
    "create_extractor",
    "feature_statistics",
    "frechet_distance",
    "train_feature_classifier",
]
