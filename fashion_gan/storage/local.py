"""An object store backed by a local directory (`file://` locations)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from fashion_gan.errors import StorageError
from fashion_gan.storage.base import (
    TEMP_PREFIX,
    FetchResult,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStore,
    copy_stream,
    temp_path_for,
)
from fashion_gan.storage.paths import safe_local_path
from fashion_gan.storage.uri import StorageUri

log = logging.getLogger(__name__)


class LocalStore(ObjectStore):
    """Objects as files below `root.path`; every write is a temporary file plus an atomic rename."""

    def __init__(self, root: StorageUri, max_concurrency: int = 4) -> None:
        self.root = root
        self.directory = Path(root.path)
        self.max_concurrency = max_concurrency

    def _path(self, key: str) -> Path:
        return safe_local_path(self.directory, key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        parent_key = prefix.rpartition("/")[0]
        start_dir = self._path(parent_key) if parent_key else self.directory
        if not start_dir.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(start_dir):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.startswith(TEMP_PREFIX):
                    continue
                path = Path(dirpath, filename)
                key = path.relative_to(self.directory).as_posix()
                if key.startswith(prefix):
                    stat = path.stat()
                    modified = datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc)
                    yield ObjectInfo(key, stat.st_size, modified)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as err:
            raise ObjectNotFoundError(f"{self.describe(key)} not found") from err
        except OSError as err:
            raise StorageError(f"failed to read {self.describe(key)}: {err}") from err

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        temp_path = self._write_temp(path, data)
        os.replace(temp_path, path)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        temp_path = self._write_temp(path, data)
        try:
            # link() fails with EEXIST when the target exists, so the check and the create are one
            # step, and readers never see a partly written file.
            os.link(temp_path, path)
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise StorageError(f"failed to create {self.describe(key)}: {err}") from err
            # File systems without hard links: O_EXCL is atomic too, but the content follows later.
            return self._create_exclusive(path, data)
        finally:
            temp_path.unlink(missing_ok=True)
        return True

    def copy(self, src_key: str, dst_key: str) -> None:
        source, target = self._path(src_key), self._path(dst_key)
        if not source.is_file():
            raise ObjectNotFoundError(f"cannot copy {self.describe(src_key)}: not found")
        target.parent.mkdir(parents=True, exist_ok=True)
        temp_path = temp_path_for(target)
        shutil.copyfile(source, temp_path)
        os.replace(temp_path, target)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def upload_file(self, local_path: Path, key: str) -> str:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp_path = temp_path_for(target)
        try:
            with open(local_path, "rb") as source, open(temp_path, "wb") as sink:
                size, digest = copy_stream(source, sink)
            os.replace(temp_path, target)
        except OSError as err:
            raise StorageError(f"failed to write {self.describe(key)} from {local_path}: {err}") from err
        finally:
            temp_path.unlink(missing_ok=True)
        log.debug("copied %s to %s (%d bytes)", local_path, target, size)
        return digest

    def _fetch(self, key: str, temp_path: Path) -> FetchResult:
        source = self._path(key)
        try:
            with open(source, "rb") as source_file, open(temp_path, "wb") as sink:
                size, digest = copy_stream(source_file, sink)
        except FileNotFoundError as err:
            raise ObjectNotFoundError(f"{self.describe(key)} not found") from err
        return FetchResult(size, digest, None)

    def _write_temp(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp_path = temp_path_for(path)
        with open(temp_path, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        return temp_path

    def _create_exclusive(self, path: Path, data: bytes) -> bool:
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        return True
