"""Image decoding, the decoded-array cache and the Lightning data module that serves batches from it.

The names below are imported on first use, so that `fashion_gan.data.images` and friends load
without importing torch and Lightning.
"""

from importlib import import_module

_EXPORTS = {
    "IMAGE_SUFFIXES": "fashion_gan.data.images",
    "BadImageError": "fashion_gan.data.images",
    "decode_image": "fashion_gan.data.images",
    "list_image_files": "fashion_gan.data.images",
    "find_fashion_mnist_dir": "fashion_gan.data.fashion_mnist",
    "load_idx": "fashion_gan.data.fashion_mnist",
    "DecodedArray": "fashion_gan.data.cache",
    "content_digest": "fashion_gan.data.cache",
    "detect_kind": "fashion_gan.data.cache",
    "load_decoded_array": "fashion_gan.data.cache",
    "DecodedArrayDataModule": "fashion_gan.data.datamodule",
    "batch_indices": "fashion_gan.data.datamodule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
