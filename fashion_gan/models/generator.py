"""DCGAN generator: latent vectors to images in [-1, 1]."""

import torch
from torch import nn

from fashion_gan.models.blocks import (
    check_channels,
    check_positive,
    count_resampling_blocks,
    features_at,
    init_dcgan_weights,
    projection_block,
    upsample_block,
)


class Generator(nn.Module):
    """Map noise z of shape (B, latent_dim) to images of shape (B, channels, image_size, image_size) in [-1, 1].

    A transposed convolution projects z to a 4x4 map, and each following block doubles the
    resolution until the last one reaches image_size and applies tanh.
    """

    def __init__(self, latent_dim: int, generator_features: int, channels: int, image_size: int) -> None:
        super().__init__()
        check_positive("latent_dim", latent_dim)
        check_positive("generator_features", generator_features)
        check_channels(channels)
        doublings = count_resampling_blocks(image_size)
        self.latent_dim = latent_dim
        self.channels = channels
        self.image_size = image_size

        blocks: list[nn.Module] = [projection_block(latent_dim, features_at(generator_features, doublings))]
        # (B, features_at(doublings), 4, 4)
        for halvings in range(doublings - 1, 0, -1):
            in_features = features_at(generator_features, halvings + 1)
            blocks.append(upsample_block(in_features, features_at(generator_features, halvings)))
            # (B, features_at(halvings), image_size / 2**halvings, image_size / 2**halvings)
        last_features = features_at(generator_features, 1)
        blocks.append(nn.ConvTranspose2d(last_features, channels, 4, stride=2, padding=1, bias=False))
        blocks.append(nn.Tanh())
        # (B, channels, image_size, image_size)
        self.net = nn.Sequential(*blocks)
        self.apply(init_dcgan_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Generate images from z of shape (B, latent_dim) or (B, latent_dim, 1, 1)."""
        return self.net(z.reshape(z.shape[0], self.latent_dim, 1, 1))
