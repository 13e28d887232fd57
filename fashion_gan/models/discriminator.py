"""DCGAN discriminator: images to real/fake logits."""

import torch
from torch import nn

from fashion_gan.errors import ConfigError
from fashion_gan.models.blocks import (
    BASE_RESOLUTION,
    check_channels,
    check_positive,
    count_resampling_blocks,
    downsample_block,
    features_at,
    init_dcgan_weights,
)


class Discriminator(nn.Module):
    """Map images of shape (B, channels, image_size, image_size) in [-1, 1] to logits of shape (B,).

    Each block halves the resolution down to 4x4, and a final 4x4 convolution gives one logit
    per image. A positive logit means the discriminator scores the image as real. `dropout` is
    the drop probability after every LeakyReLU; 0 disables it.
    """

    def __init__(self, discriminator_features: int, channels: int, image_size: int, dropout: float) -> None:
        super().__init__()
        check_positive("discriminator_features", discriminator_features)
        check_channels(channels)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout={dropout!r} is invalid: use a probability in [0, 1); 0 disables dropout.")
        halvings = count_resampling_blocks(image_size)
        self.channels = channels
        self.image_size = image_size

        blocks: list[nn.Module] = [
            downsample_block(channels, discriminator_features, batch_norm=False, dropout=dropout)
        ]
        # (B, features_at(1), image_size / 2, image_size / 2)
        for halving in range(2, halvings + 1):
            in_features = features_at(discriminator_features, halving - 1)
            out_features = features_at(discriminator_features, halving)
            blocks.append(downsample_block(in_features, out_features, batch_norm=True, dropout=dropout))
            # (B, features_at(halving), image_size / 2**halving, image_size / 2**halving)
        last_features = features_at(discriminator_features, halvings)
        blocks.append(nn.Conv2d(last_features, 1, BASE_RESOLUTION, stride=1, padding=0, bias=False))
        # (B, 1, 1, 1)
        self.net = nn.Sequential(*blocks)
        self.apply(init_dcgan_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return one logit per image, shape (B,)."""
        return self.net(images).flatten()
