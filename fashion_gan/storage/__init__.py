"""Object storage: S3 and local directories behind one interface, plus versioned datasets."""

from __future__ import annotations


from fashion_gan.storage.base import ObjectInfo, ObjectNotFoundError, ObjectStore
from fashion_gan.storage.local import LocalStore
from fashion_gan.storage.paths import safe_local_path
from fashion_gan.storage.uri import StorageUri, parse_uri

__all__ = [
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectStore",
    "StorageUri",
    "open_store",
    "parse_uri",
    "safe_local_path",
]


def open_store(uri: str | StorageUri, endpoint_url: str | None = None, max_concurrency: int = 16) -> ObjectStore:
    """Open the store at `uri` (`s3://bucket/prefix`, `file:///dir` or a local path).

    For S3 the endpoint is `endpoint_url`, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else
    AWS itself, and the bucket is checked at once (StorageError when it is missing or unreachable).
    """
    root = uri if isinstance(uri, StorageUri) else parse_uri(str(uri))
    if root.scheme == "file":
        return LocalStore(root, max_concurrency=max_concurrency)
    # Imported here so that local-only use does not pay for importing boto3.
    from fashion_gan.storage.s3 import S3Store

    return S3Store(root, endpoint_url=endpoint_url, max_concurrency=max_concurrency)
