"""The layout of a run's outputs in storage, its lock, and its "latest checkpoint" pointer.

A run lives under `runs/<id>/` of the output store:

    config.yaml                 the resolved config, secrets redacted
    lock.json                   held while a job trains this run id
    checkpoints/step_NNNNNN.ckpt
    checkpoints/last.ckpt       a copy of the newest verified checkpoint
    checkpoints/latest.json     {"key", "step", "sha256", "size"}: written only after the upload is verified
    samples/real.png, samples/step_NNNNNN.png, samples/timelapse.gif
    metrics.csv, summary.json, job.log
"""

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from fashion_gan.errors import RunConflictError, StorageError
from fashion_gan.storage.base import ObjectStore

log = logging.getLogger(__name__)

LATEST_POINTER = "checkpoints/latest.json"
LOCK_NAME = "lock.json"
LOCK_HEARTBEAT_S = 20.0


def run_prefix(run_id: str) -> str:
    """Return the key prefix of a run in the output store."""
    return f"runs/{run_id}"


def checkpoint_name(step: int) -> str:
    """Return the file name of the checkpoint saved after `step` training steps."""
    return f"step_{step:06d}.ckpt"


def sample_name(step: int) -> str:
    """Return the file name of the sample grid drawn after `step` training steps."""
    return f"step_{step:06d}.png"


@dataclass
class CheckpointPointer:
    """Location of the run's newest verified checkpoint, relative to the run prefix."""

    key: str
    step: int
    sha256: str
    size: int

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=2).encode()


def read_latest_pointer(store: ObjectStore, run_id: str) -> Optional[CheckpointPointer]:
    """Return the run's latest-checkpoint pointer, or None when the run has no checkpoint."""
    key = f"{run_prefix(run_id)}/{LATEST_POINTER}"
    if not store.exists(key):
        return None
    try:
        return CheckpointPointer(**json.loads(store.read_bytes(key)))
    except (ValueError, TypeError) as error:
        raise StorageError(
            f"The checkpoint pointer '{key}' in {store.root} is not valid JSON with key, step, sha256 and size. "
            f"Delete it to restart the run from scratch, or restore it from a backup."
        ) from error


def read_run_config(store: ObjectStore, run_id: str) -> Optional[dict[str, Any]]:
    """Return the stored config.yaml of a run as a dict, or None when the run does not exist."""
    import yaml

    key = f"{run_prefix(run_id)}/config.yaml"
    if not store.exists(key):
        return None
    return yaml.safe_load(store.read_bytes(key))


# Keys whose change makes a run a different experiment. Schedules, logging, max_steps and paths may
# change between a run and its resumption.
_IDENTITY_SECTIONS = {
    "data": ("kind", "channels", "image_size", "batch_size", "augment_flip"),
    "model": ("latent_dim", "generator_features", "discriminator_features", "dropout", "lr", "beta1", "beta2",
              "label_smoothing", "sample_count"),
    "run": ("seed",),
}


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """List 'key: stored -> current' for the keys that define what a run trains."""
    differences = []
    for section, keys in _IDENTITY_SECTIONS.items():
        for key in keys:
            before = (stored.get(section) or {}).get(key)
            after = (current.get(section) or {}).get(key)
            if before != after:
                differences.append(f"{section}.{key}: {before!r} -> {after!r}")
    return differences


class RunLock:
    """An exclusive lock on a run id in the output store, so two jobs never train the same run.

    The lock is `runs/<id>/lock.json`, created with an atomic put-if-absent. Its holder rewrites it every
    20 s as a heartbeat. A lock is stale, and is taken over, when its process is gone (same host and pid
    namespace; a pid now used by a process with another start time counts as gone) or its heartbeat is
    older than `stale_after_s` (another host or container, such as a preempted cloud machine).
    """

    def __init__(self, store: ObjectStore, run_id: str, stale_after_s: float) -> None:
        self.store = store
        self.run_id = run_id
        self.key = f"{run_prefix(run_id)}/{LOCK_NAME}"
        self.stale_after_s = stale_after_s
        self._owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(8).hex(),
                       "pid_namespace": _pid_namespace(), "process_start": _process_start_ticks(os.getpid())}
        self._stop = threading.Event()
        self._heartbeat: Optional[threading.Thread] = None
        self.held = False

    def acquire(self) -> None:
        """Take the lock, or raise RunConflictError naming the job that holds it."""
        for _ in range(2):
            if self.store.put_if_absent(self.key, self._payload()):
                self.held = True
                self._start_heartbeat()
                log.info("Locked run %s (%s)", self.run_id, self.key)
                return
            holder = self._read_holder()
            if holder is not None and not self._is_stale(holder):
                raise RunConflictError(
                    f"Run id '{self.run_id}' is being trained by another job (host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, heartbeat {time.time() - holder.get('heartbeat', 0):.0f} s ago). "
                    f"This job refuses to start. Wait for that job to finish or stop it, or choose another run.id. "
                    f"A lock without a heartbeat for {self.stale_after_s:.0f} s is taken over."
                )
            log.warning("Taking over the stale lock of run %s held by host %s, pid %s", self.run_id, holder.get("host"),
                        holder.get("pid"))
            self.store.delete(self.key)
        raise RunConflictError(
            f"Run id '{self.run_id}' was locked by another job while this one took over a stale lock. "
            f"Check which job trains it with `fashion-gan status`."
        )

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if this job still holds it."""
        self._stop.set()
        self.held = False
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        holder = self._read_holder()
        if holder is not None and holder.get("token") == self._owner["token"]:
            self.store.delete(self.key)
            log.info("Released the lock of run %s", self.run_id)

    def _payload(self) -> bytes:
        return json.dumps({**self._owner, "heartbeat": time.time()}).encode()

    def _read_holder(self) -> Optional[dict[str, Any]]:
        try:
            return json.loads(self.store.read_bytes(self.key))
        except (StorageError, ValueError, FileNotFoundError):
            return None

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        # A pid identifies the holder only in the same pid namespace: Docker job containers share the
        # host name under host networking, but each numbers its processes from 1.
        same_namespace = holder.get("pid_namespace") == self._owner["pid_namespace"]
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and same_namespace:
            if not _process_is_running(holder["pid"], holder.get("process_start")):
                return True
        return time.time() - float(holder.get("heartbeat", 0)) > self.stale_after_s

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(LOCK_HEARTBEAT_S):
                try:
                    self.store.write_bytes(self.key, self._payload())
                except StorageError as error:
                    log.warning("Run lock heartbeat for %s failed: %s", self.run_id, error)

        self._heartbeat = threading.Thread(target=beat, name=f"run-lock-{self.run_id}", daemon=True)
        self._heartbeat.start()


def _pid_namespace() -> Optional[str]:
    """Return this process's pid namespace, such as "pid:[4026531836]", or None without /proc."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_start_ticks(pid: int) -> Optional[int]:
    """Return the start time of process `pid` in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    # Fields after the parenthesised command name start at field 3; starttime is field 22.
    return int(text[text.rindex(")") + 2:].split()[19])


def _process_is_running(pid: int, process_start: Optional[int]) -> bool:
    """Return whether `pid` runs and, when `process_start` is known, is still the same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    current_start = _process_start_ticks(pid)
    return process_start is None or current_start is None or current_start == process_start
