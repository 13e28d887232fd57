"""Class coverage of generated images: a direct signal of mode collapse."""

import math

import numpy as np
import torch


def class_shares(predicted_classes: torch.Tensor, num_classes: int) -> np.ndarray:
    """Return the share of each class among `predicted_classes` (int tensor (N,)) as float64 (num_classes,)."""
    if predicted_classes.numel() == 0:
        raise ValueError("class shares need at least one predicted class, got none")
    counts = torch.bincount(predicted_classes.flatten().long().cpu(), minlength=num_classes)
    return counts.double().numpy() / predicted_classes.numel()


def normalized_entropy(shares: np.ndarray) -> float:
    """Return the entropy of a class distribution divided by its maximum, log(num_classes).

    1.0 means every class is equally frequent, 0.0 means one class only.
    """
    if len(shares) < 2:
        raise ValueError(f"normalized entropy needs at least 2 classes, got {len(shares)}")
    nonzero = shares[shares > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum())
    # Adding 0.0 turns the -0.0 of a single-class distribution into 0.0.
    return entropy / math.log(len(shares)) + 0.0
