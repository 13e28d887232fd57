"""DCGAN networks and the LightningModule that trains them."""

from fashion_gan.models.blocks import ALLOWED_CHANNELS, ALLOWED_IMAGE_SIZES
from fashion_gan.models.dcgan import DCGAN
from fashion_gan.models.discriminator import Discriminator
from fashion_gan.models.generator import Generator

__all__ = ["ALLOWED_CHANNELS", "ALLOWED_IMAGE_SIZES", "DCGAN", "Discriminator", "Generator"]
