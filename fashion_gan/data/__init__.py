"""Image decoding, the decoded-array cache and the Lightning data module that serves batches from it."""

from fashion_gan.data.cache import DecodedArray, content_digest, load_decoded_array
from fashion_gan.data.datamodule import DecodedArrayDataModule, batch_indices
from fashion_gan.data.fashion_mnist import find_fashion_mnist_dir, load_idx
from fashion_gan.data.images import IMAGE_SUFFIXES, BadImageError, decode_image, list_image_files

__all__ = [
    "IMAGE_SUFFIXES",
    "BadImageError",
    "DecodedArray",
    "DecodedArrayDataModule",
    "batch_indices",
    "content_digest",
    "decode_image",
    "find_fashion_mnist_dir",
    "list_image_files",
    "load_decoded_array",
    "load_idx",
]
