"""Map object keys and archive member names to local paths without leaving a directory."""

from __future__ import annotations

import re
from pathlib import Path

from fashion_gan.errors import UnsafeKeyError

_WINDOWS_DRIVE_RE = re.compile(r"^[A-Za-z]:")


def safe_local_path(cache_dir: Path, key: str) -> Path:
    """Return the path of `key` ("/"-separated) inside `cache_dir`.

    Raises UnsafeKeyError for an empty key, an absolute key, a Windows drive, a NUL or backslash,
    an empty, "." or ".." segment, or a key whose resolved path (following symlinks already in
    `cache_dir`) lies outside `cache_dir`.
    """
    reason = _unsafe_reason(key)
    if reason is None:
        root = Path(cache_dir).resolve()
        path = root.joinpath(*key.split("/"))
        if not path.resolve().is_relative_to(root):
            reason = "it resolves outside the directory through a symbolic link"
        else:
            return path
    raise UnsafeKeyError(
        f"unsafe object key {key!r}: {reason}; nothing was written. Keys must be relative paths "
        f"below {cache_dir}; remove or rename that object"
    )


def _unsafe_reason(key: str) -> str | None:
    if not isinstance(key, str) or not key:
        return "it is empty"
    if "\x00" in key:
        return "it contains a NUL character"
    if "\\" in key:
        return "it contains a backslash"
    if key.startswith("/"):
        return "it is an absolute path"
    if _WINDOWS_DRIVE_RE.match(key):
        return "it starts with a drive letter"
    segments = key.split("/")
    if ".." in segments:
        return "it contains a '..' segment"
    if "" in segments or "." in segments:
        return "it contains an empty or '.' segment"
    return None
