"""Background uploads: `submit` returns at once, so the training loop does not wait on the network."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path

from fashion_gan.errors import StorageError
from fashion_gan.storage.base import ObjectStore

log = logging.getLogger(__name__)


class BackgroundUploader:
    """Upload files to a store on worker threads.

    A submitted file is read during the upload, so it must stay unchanged until its future
    completes. Callers that overwrite a file in place (like last.ckpt) submit a copy instead.
    """

    def __init__(self, store: ObjectStore, max_workers: int = 4) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="uploader")
        self._lock = threading.Lock()
        self._pending: list[Future] = []
        self._errors: list[BaseException] = []
        self._closed = False
        self._latest_by_key: dict[str, Future] = {}

    def submit(self, local_path: Path, key: str) -> Future:
        """Queue an upload and return a Future of the uploaded file's sha256."""
        return self.submit_then(local_path, key, None)

    def submit_then(self, local_path: Path, key: str, after: Callable[[str], object] | None) -> Future:
        """Queue an upload and run `after(sha256)` on the worker once the upload is verified.

        `after` receives the uploaded file's hex sha256 and does not run when the upload fails. The
        Future carries the sha256, or the error of the upload or of `after`.
        """
        with self._lock:
            if self._closed:
                raise StorageError(f"cannot upload {local_path} to {self.store.describe(key)}: the uploader is closed")
            future = self._pool.submit(self._upload, Path(local_path), key, after, self._latest_by_key.get(key))
            self._latest_by_key[key] = future
            self._pending.append(future)
        return future

    def wait(self, timeout_s: float | None = None) -> None:
        """Wait for every queued upload; re-raise the first failure as StorageError.

        Each failure is reported by one call only. Raises StorageError when uploads are still running after `timeout_s` seconds.
        """
        with self._lock:
            pending = list(self._pending)
        _, not_done = wait_futures(pending, timeout=timeout_s)
        with self._lock:
            self._pending = [future for future in self._pending if not future.done()]
            errors = list(self._errors)
            self._errors.clear()
        if errors:
            first = errors[0]
            if isinstance(first, StorageError):
                raise first
            raise StorageError(f"a background upload to {self.store.describe()} failed: {first}") from first
        if not_done:
            raise StorageError(
                f"{len(not_done)} uploads to {self.store.describe()} still running after {timeout_s} s; "
                "check the network or raise the timeout"
            )

    def close(self, timeout_s: float | None = None) -> None:
        """Wait for queued uploads (see `wait`) and stop the worker threads."""
        with self._lock:
            self._closed = True
        try:
            self.wait(timeout_s)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> BackgroundUploader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _upload(self, local_path: Path, key: str, after: Callable[[str], object] | None,
                previous: Future | None) -> str:
        # Uploads of one key (metrics.csv is pushed with every checkpoint) finish in the order they
        # were submitted, so the newest content is the one that stays. ThreadPoolExecutor's work queue
        # is FIFO (CPython 3.11), so `previous` is already running or done and this wait cannot deadlock.
        if previous is not None:
            wait_futures([previous])
        try:
            digest = self.store.upload_file(local_path, key)
            if after is not None:
                after(digest)
        except BaseException as err:
            log.error("background upload of %s to %s failed: %s", local_path, self.store.describe(key), err)
            with self._lock:
                self._errors.append(err)
            raise
        log.debug("background upload of %s to %s done", local_path, self.store.describe(key))
        return digest
