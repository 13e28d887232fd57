"""Turn a job's `data.source` into a local folder: use it in place, pull an S3 prefix, or pull a dataset version."""

import logging
from dataclasses import dataclass
from pathlib import Path

from fashion_gan.config import TrainConfig
from fashion_gan.errors import DatasetError

log = logging.getLogger(__name__)

DATASET_SCHEME = "dataset:"


@dataclass
class PulledSource:
    """A dataset available on local disk, and how it was named."""

    local_dir: Path
    description: str  # the source as the user gave it, for summaries and W&B
    version: str | None = None  # "NAME/N" for a versioned dataset


def pull_source(config: TrainConfig, cache_dir: Path) -> PulledSource:
    """Make the configured dataset available locally and return its folder."""
    source = config.data.source
    if source is None:
        from fashion_gan.data.fashion_mnist import find_fashion_mnist_dir

        local_dir = find_fashion_mnist_dir(None)
        return PulledSource(local_dir=local_dir, description=str(local_dir))

    if source.startswith(DATASET_SCHEME):
        return _pull_dataset_version(config, source[len(DATASET_SCHEME):].strip("/"), cache_dir)

    from fashion_gan.storage import parse_uri

    uri = parse_uri(source)
    if uri.scheme == "file":
        local_dir = Path(uri.path)
        if not local_dir.is_dir():
            raise DatasetError(
                f"Dataset source {source} does not exist or is not a folder. Check data.source: give a folder "
                f"of images (or of Fashion-MNIST idx files), a file:// or s3:// URI, or dataset:NAME[/VERSION]."
            )
        return PulledSource(local_dir=local_dir, description=source)
    return _pull_prefix(config, source, cache_dir)


def _pull_prefix(config: TrainConfig, source: str, cache_dir: Path) -> PulledSource:
    from fashion_gan.storage import open_store

    store = open_store(source, endpoint_url=config.storage.endpoint_url,
                       max_concurrency=config.storage.max_concurrency)
    local_dir = cache_dir / "downloads" / store.root.scheme / (store.root.bucket or "") / store.root.path
    objects = [item for item in store.list("") if not item.key.endswith("/")]
    if not objects:
        raise DatasetError(
            f"Dataset source {source} contains no objects. Check the bucket and prefix in data.source, or "
            f"upload the images first (`fashion-gan data upload DIR --name NAME`)."
        )

    # NOTE: a plain prefix has no manifest, so an object already in the cache is reused when its size
    # matches. Versioned datasets (dataset:NAME/N) verify the sha256 of every shard instead.
    missing = [item for item in objects if not _cached_with_size(local_dir / item.key, item.size)]
    log.info("Pulling %s: %d objects, %d already cached in %s", source, len(objects), len(objects) - len(missing),
             local_dir)
    if missing:
        store.download_many(missing, local_dir, description=f"pull {source}")
    return PulledSource(local_dir=local_dir, description=source)


def _pull_dataset_version(config: TrainConfig, reference: str, cache_dir: Path) -> PulledSource:
    from fashion_gan.storage import open_store
    from fashion_gan.storage.datasets import pull_dataset, resolve_version

    datasets_uri = config.data.datasets_uri or config.run.output
    store = open_store(datasets_uri, endpoint_url=config.storage.endpoint_url,
                       max_concurrency=config.storage.max_concurrency)
    name, version = resolve_version(store, reference)
    local_dir = pull_dataset(store, name, version, cache_dir / "datasets")
    return PulledSource(local_dir=local_dir, description=f"dataset:{name}/{version}", version=f"{name}/{version}")


def _cached_with_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False
