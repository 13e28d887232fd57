"""A small CNN classifier of Fashion-MNIST whose penultimate layer is the feature space of the FID.

The shipped weights live in `weights/` beside this file, together with a `.sha256` file that
`load_classifier` checks before it loads them. `train_features.train_feature_classifier`
produces both files.
"""

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

from fashion_gan.errors import ChecksumError

log = logging.getLogger(__name__)

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
INPUT_SIZE = 28  # Fashion-MNIST resolution; other sizes are resized to it in `prepare_images`
FEATURE_DIM = 128
WEIGHTS_FILENAME = "fashion_mnist_classifier.pt"
SHIPPED_WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / WEIGHTS_FILENAME


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FashionMnistClassifier(nn.Module):
    """Three conv blocks, global average pooling, one hidden layer (the features) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_block(1, 32),  # (B, 32, 14, 14)
            _conv_block(32, 64),  # (B, 64, 7, 7)
            _conv_block(64, 128),  # (B, 128, 3, 3)
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 128)
        )
        self.embedding = nn.Sequential(nn.Linear(128, FEATURE_DIM), nn.ReLU(inplace=True))  # (B, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)  # (B, NUM_CLASSES)

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the penultimate-layer features and the class logits of prepared images (B, 1, 28, 28)."""
        features = self.embedding(self.body(images))
        return features, self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[1]


def prepare_images(images: torch.Tensor) -> torch.Tensor:
    """Convert images in [-1, 1] of shape (B, C, H, W) with C = 1 or 3 to (B, 1, 28, 28) float32.

    RGB images become gray by averaging the channels, and other sizes are resized with
    antialiased bilinear interpolation.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
    images = images.float()
    if images.shape[1] == 3:
        images = images.mean(dim=1, keepdim=True)
    if images.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        images = functional.interpolate(
            images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True
        )
    return images


def uint8_to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixel values 0..255 to float32 in [-1, 1], the range of the generator output."""
    return images.float() / 127.5 - 1.0


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def digest_path_for(weights_path: Path) -> Path:
    """Return the path of the `.sha256` file that stores the digest of `weights_path`."""
    return weights_path.with_name(weights_path.name + ".sha256")


def write_digest_file(weights_path: Path) -> str:
    """Write `<weights>.sha256` in the `sha256sum` format and return the digest."""
    digest = file_sha256(weights_path)
    digest_path_for(weights_path).write_text(f"{digest}  {weights_path.name}\n")
    return digest


def read_expected_sha256(weights_path: Path) -> str:
    """Return the digest stored in the `.sha256` file beside `weights_path`."""
    digest_path = digest_path_for(weights_path)
    try:
        text = digest_path.read_text()
    except FileNotFoundError as err:
        raise ChecksumError(
            f"digest file {digest_path} not found, so the classifier weights {weights_path} cannot be verified. "
            "Run `fashion-gan metrics train-features` to produce both files."
        ) from err
    return text.split()[0].strip().lower()


def load_classifier(weights_path: Path | None = None, device: str | torch.device = "cpu") -> FashionMnistClassifier:
    """Load the classifier in eval mode after checking its weights against their `.sha256` file.

    `weights_path` defaults to the weights shipped with the package. Raises ChecksumError when
    the digest file is missing or does not match.
    """
    weights_path = Path(weights_path) if weights_path is not None else SHIPPED_WEIGHTS_PATH
    if not weights_path.is_file():
        raise ChecksumError(
            f"classifier weights {weights_path} not found. "
            "Reinstall the package or run `fashion-gan metrics train-features`."
        )
    expected = read_expected_sha256(weights_path)
    actual = file_sha256(weights_path)
    if actual != expected:
        raise ChecksumError(
            f"classifier weights {weights_path} have sha256 {actual}, but {digest_path_for(weights_path).name} "
            f"expects {expected}. Reinstall the package or retrain with `fashion-gan metrics train-features`."
        )

    model = FashionMnistClassifier()
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    log.debug("loaded feature classifier %s (sha256 %s)", weights_path, actual)
    return model.to(device)
