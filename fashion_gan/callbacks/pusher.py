"""Mirror the local run folder to the run's prefix in the output store, in the background."""

import hashlib
import logging
import threading
from pathlib import Path
from typing import Callable, Optional

from fashion_gan.run_outputs import LATEST_POINTER, CheckpointPointer, run_prefix
from fashion_gan.storage.base import ObjectStore
from fashion_gan.storage.uploader import BackgroundUploader

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class OutputPusher:
    """Upload files of the local run folder without blocking training.

    When the output store already is the local run folder (a `file://` output), nothing is copied and
    only the latest-checkpoint pointer is written. Non-zero ranks of a distributed job never push.
    Uploads run on one thread by default. On a CPU whose cores all train, each further runnable
    thread stalls the training threads, and a checkpoint step pushes only a few files.
    """

    def __init__(self, store: ObjectStore, run_id: str, local_run_dir: Path, enabled: bool = True,
                 max_workers: int = 1) -> None:
        self.store = store
        self.run_id = run_id
        self.local_run_dir = local_run_dir
        self.enabled = enabled
        self.needs_upload = enabled and not _is_same_folder(store, run_id, local_run_dir)
        self._uploader = BackgroundUploader(store, max_workers=max_workers) if self.needs_upload else None
        self._latest_lock = threading.Lock()
        self._latest_step = -1  # step of the latest pointer this pusher wrote

    def key_of(self, local_path: Path) -> str:
        return f"{run_prefix(self.run_id)}/{local_path.relative_to(self.local_run_dir).as_posix()}"

    def push(self, local_path: Path, then: Optional[Callable[[str], None]] = None) -> None:
        """Upload one file; run `then(sha256)` once the upload is verified (at once when nothing is uploaded)."""
        if not self.enabled:
            return
        if self._uploader is None:
            if then is not None:
                then(file_sha256(local_path))
            return
        log.debug("Queueing upload of %s to %s", local_path, self.key_of(local_path))
        if then is None:
            self._uploader.submit(local_path, self.key_of(local_path))
        else:
            self._uploader.submit_then(local_path, self.key_of(local_path), then)

    def push_checkpoint(self, local_path: Path, step: int) -> None:
        """Upload a checkpoint, then point "latest" and `last.ckpt` at it once its upload is verified.

        The pointer takes the sha256 that the upload computed on its worker thread, so the training
        thread does not read the checkpoint a second time.
        """
        if not self.enabled:
            return
        key = local_path.relative_to(self.local_run_dir).as_posix()
        size = local_path.stat().st_size
        self.push(local_path, then=lambda sha256: self.point_latest_at(CheckpointPointer(key, step, sha256, size)))

    def point_latest_at(self, pointer: CheckpointPointer) -> None:
        """Make `pointer` the run's latest checkpoint, unless a later step already is.

        With more than one upload thread, an earlier checkpoint's upload can finish after a later
        one's (after retries, say). The pointer only moves forward.
        """
        with self._latest_lock:
            if pointer.step <= self._latest_step:
                log.info("Checkpoint of step %d uploaded after step %d; the latest stays at step %d",
                         pointer.step, self._latest_step, self._latest_step)
                return
            prefix = run_prefix(self.run_id)
            if self.needs_upload:
                self.store.copy(f"{prefix}/{pointer.key}", f"{prefix}/checkpoints/last.ckpt")
            self.store.write_bytes(f"{prefix}/{LATEST_POINTER}", pointer.to_json())
            self._latest_step = pointer.step
        log.info("Checkpoint of step %d is now the run's latest (%s)", pointer.step, pointer.key)

    def wait(self, timeout_s: Optional[float] = None) -> None:
        """Block until every queued upload has finished; raise StorageError for a failed one."""
        if self._uploader is not None:
            self._uploader.wait(timeout_s=timeout_s)

    def close(self) -> None:
        if self._uploader is not None:
            self._uploader.close()


def _is_same_folder(store: ObjectStore, run_id: str, local_run_dir: Path) -> bool:
    root = store.root
    if root.scheme != "file":
        return False
    return (Path(root.path) / run_prefix(run_id)).resolve() == local_run_dir.resolve()
