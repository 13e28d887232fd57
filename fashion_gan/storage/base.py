"""The object store interface shared by the S3 and local-directory stores.

Keys are "/"-separated and relative to the store's root location. Every download goes to a
temporary file that is renamed into place only after its size and sha256 check out, so a partial
or corrupted download is never left at the destination.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from fashion_gan.errors import ChecksumError, StorageError
from fashion_gan.storage.paths import safe_local_path
from fashion_gan.storage.uri import StorageUri

log = logging.getLogger(__name__)

CHUNK_SIZE_BYTES = 1024 * 1024
# Without a terminal for the progress bar, long transfers log their progress this often instead.
PROGRESS_LOG_INTERVAL_S = 30.0
# Prefix of temporary files written next to their destination; listings skip them.
TEMP_PREFIX = ".fg-tmp-"


class ObjectNotFoundError(StorageError):
    """The requested object does not exist in the store."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object in a listing: its key relative to the store root, size and modification time."""

    key: str
    size: int
    last_modified: datetime


@dataclass(frozen=True)
class FetchResult:
    """Result of one download attempt: byte count, sha256 of those bytes, and the sha256 that the
    store recorded at upload time (None when the object has none)."""

    size: int
    sha256: str
    stored_sha256: str | None


class ContentMismatch(Exception):
    """Raised by a fetch when the transport itself detected corrupted content (e.g. a CRC)."""


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a local file."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_SIZE_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def copy_stream(source: BinaryIO, sink: BinaryIO) -> tuple[int, str]:
    """Copy `source` to `sink` and return (byte count, hex sha256) of what was copied."""
    digest = hashlib.sha256()
    size = 0
    while chunk := source.read(CHUNK_SIZE_BYTES):
        sink.write(chunk)
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def temp_path_for(path: Path) -> Path:
    """Return a unique temporary path in the directory of `path`, so a rename is atomic."""
    return path.with_name(f"{TEMP_PREFIX}{path.name}.{uuid.uuid4().hex[:12]}")


class ObjectStore(ABC):
    """Objects below one root location (an S3 prefix or a local directory)."""

    root: StorageUri
    max_concurrency: int

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield every object whose key starts with `prefix`, following pagination."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Return whether an object exists at `key`."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """Return the object's bytes; ObjectNotFoundError when it is missing."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Create or replace the object at `key` with `data`."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create the object only when no object exists at `key`; return whether it was created.

        The check and the write are one atomic step, so of several concurrent callers exactly one
        gets True.
        """

    @abstractmethod
    def copy(self, src_key: str, dst_key: str) -> None:
        """Copy one object to another key inside this store."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object at `key`; deleting a missing object is not an error."""

    @abstractmethod
    def upload_file(self, local_path: Path, key: str) -> str:
        """Upload a local file, check that the store received all of it, and return its sha256."""

    @abstractmethod
    def _fetch(self, key: str, temp_path: Path) -> FetchResult:
        """Write the object at `key` to `temp_path` (one attempt, transport retries included)."""

    def describe(self, key: str = "") -> str:
        """Return the full URI of `key`, for messages."""
        return f"{self.root}/{key}" if key else str(self.root)

    def download_file(
        self,
        key: str,
        local_path: Path,
        expected_size: int | None = None,
        expected_sha256: str | None = None,
    ) -> Path:
        """Download `key` to `local_path` and verify it.

        The bytes are checked against `expected_size` and `expected_sha256` when given, otherwise
        against the sha256 recorded at upload time when the object has one. A mismatch is downloaded
        once more; a second mismatch raises ChecksumError naming the key. Only a verified file is
        renamed to `local_path`.
        """
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        problem = ""
        for attempt in (1, 2):
            temp_path = temp_path_for(local_path)
            try:
                result = self._fetch(key, temp_path)
                problem = _verification_problem(result, expected_size, expected_sha256)
            except ContentMismatch as err:
                problem = str(err)
            except BaseException:
                temp_path.unlink(missing_ok=True)
                raise
            if not problem:
                os.replace(temp_path, local_path)
                return local_path
            temp_path.unlink(missing_ok=True)
            log.warning("download %d of %s failed verification: %s", attempt, self.describe(key), problem)
        raise ChecksumError(
            f"{self.describe(key)} failed verification twice ({problem}); the stored object is "
            "corrupted or was replaced, or the network corrupts it. Upload it again, or check the network"
        )

    def download_many(
        self,
        keys: Iterable[str | ObjectInfo],
        dest_dir: Path,
        description: str = "download",
    ) -> list[Path]:
        """Download objects in parallel to `dest_dir/<key>` with a progress bar.

        For an ObjectInfo its size is verified. Keys that would land outside `dest_dir` raise
        UnsafeKeyError before anything is downloaded. Returns the local paths in input order.
        """
        items = [item if isinstance(item, ObjectInfo) else ObjectInfo(item, -1, datetime.min) for item in keys]
        targets = [safe_local_path(dest_dir, item.key) for item in items]
        total_bytes = sum(max(item.size, 0) for item in items)

        def download_one(index: int) -> int:
            item = items[index]
            expected_size = item.size if item.size >= 0 else None
            self.download_file(item.key, targets[index], expected_size=expected_size)
            return targets[index].stat().st_size

        run_parallel(download_one, len(items), total_bytes, description, self.max_concurrency)
        return targets

    def upload_many(self, pairs: Iterable[tuple[Path, str]], description: str = "upload") -> dict[str, str]:
        """Upload (local path, key) pairs in parallel with a progress bar; return {key: sha256}."""
        pairs = [(Path(local_path), key) for local_path, key in pairs]
        total_bytes = sum(local_path.stat().st_size for local_path, _ in pairs)
        digests: dict[str, str] = {}

        def upload_one(index: int) -> int:
            local_path, key = pairs[index]
            digests[key] = self.upload_file(local_path, key)
            return local_path.stat().st_size

        run_parallel(upload_one, len(pairs), total_bytes, description, self.max_concurrency)
        return digests


def run_parallel(
    task: Callable[[int], int], count: int, total_bytes: int, description: str, max_workers: int
) -> None:
    """Run task(i) for i < count on `max_workers` threads with a byte progress bar.

    Each task returns the number of bytes it moved. The first error cancels the tasks that have
    not started and is raised once the running ones finish.
    """
    if count == 0:
        return
    started = time.monotonic()
    log.info("%s: %d objects, %.1f MB", description, count, total_bytes / 1e6)
    lock = threading.Lock()
    finished = {"objects": 0, "bytes": 0, "logged_at": started}
    # disable=None turns the bar off when stderr is not a terminal (batch jobs, CI logs). Then
    # progress is logged every PROGRESS_LOG_INTERVAL_S seconds instead.
    with (
        tqdm(total=total_bytes, desc=description, unit="B", unit_scale=True, disable=None) as progress,
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="storage") as pool,
    ):

        def advance(done: Future) -> None:
            if done.cancelled() or done.exception() is not None:
                return
            progress.update(done.result())
            with lock:
                finished["objects"] += 1
                finished["bytes"] += done.result()
                now = time.monotonic()
                if not progress.disable or now - finished["logged_at"] < PROGRESS_LOG_INTERVAL_S:
                    return
                finished["logged_at"] = now
            log.info(
                "%s: %d of %d objects, %.1f of %.1f MB",
                description, finished["objects"], count, finished["bytes"] / 1e6, total_bytes / 1e6,
            )

        futures = [pool.submit(task, index) for index in range(count)]
        for future in futures:
            future.add_done_callback(advance)
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = [future for future in futures if future.done() and not future.cancelled() and future.exception()]
        if failed:
            for future in futures:
                future.cancel()
            raise failed[0].exception()
    elapsed_s = max(time.monotonic() - started, 1e-9)
    log.info(
        "%s: done, %d objects, %.1f MB in %.1f s (%.1f MB/s)",
        description, count, total_bytes / 1e6, elapsed_s, total_bytes / 1e6 / elapsed_s,
    )


def _verification_problem(result: FetchResult, expected_size: int | None, expected_sha256: str | None) -> str:
    """Return why a fetched file fails verification, or "" when it passes."""
    if expected_size is not None and result.size != expected_size:
        return f"size {result.size} bytes, expected {expected_size}"
    reference_sha256 = expected_sha256 or result.stored_sha256
    if reference_sha256 and result.sha256 != reference_sha256.lower():
        return f"sha256 {result.sha256}, expected {reference_sha256}"
    return ""
