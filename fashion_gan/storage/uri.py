"""Storage locations: `s3://bucket/prefix`, `file:///abs/dir` or a plain local path."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fashion_gan.errors import ConfigError

SCHEMES = ("s3", "file")

# S3 bucket naming rules: 3-63 characters, lowercase letters, digits, dots and hyphens,
# starting and ending with a letter or digit.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class StorageUri:
    """A storage root: an S3 bucket plus key prefix, or an absolute local directory.

    For "s3", `path` is the key prefix without leading or trailing slash ("" for the bucket root).
    For "file", `path` is the absolute local directory and `bucket` is None.
    """

    scheme: str
    bucket: str | None
    path: str

    def join(self, *parts: str) -> StorageUri:
        """Return the location of `parts` below this one ("/"-separated; ".." is rejected)."""
        segments = [segment for part in parts for segment in str(part).split("/") if segment]
        if ".." in segments:
            raise ConfigError(
                f"invalid storage path {'/'.join(parts)!r}: '..' is not allowed; "
                "use a path below the storage root"
            )
        if self.scheme == "file":
            return StorageUri("file", None, str(Path(self.path, *segments)))
        prefix = "/".join([self.path, *segments] if self.path else segments)
        return StorageUri("s3", self.bucket, prefix)

    def __str__(self) -> str:
        if self.scheme == "file":
            return Path(self.path).as_uri()
        return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"


def parse_uri(text: str, base_dir: Path | None = None) -> StorageUri:
    """Parse `s3://bucket/prefix`, `file:///abs`, `file://rel` or a plain path.

    Relative local paths resolve against `base_dir` (default: the current directory).
    """
    text = str(text).strip()
    if not text:
        raise ConfigError("empty storage location; use s3://bucket/prefix, file:///abs/dir or a local path")

    scheme, separator, rest = text.partition("://")
    if not separator:
        return _local_uri(text, base_dir)
    scheme = scheme.lower()
    if scheme == "file":
        return _local_uri(rest or ".", base_dir)
    if scheme == "s3":
        return _s3_uri(text, rest)
    raise ConfigError(
        f"unsupported storage scheme {scheme!r} in {text!r}; allowed: s3://bucket/prefix, "
        "file:///abs/dir or a plain local path"
    )


def _local_uri(path_text: str, base_dir: Path | None) -> StorageUri:
    if "\x00" in path_text:
        raise ConfigError(f"invalid local path {path_text!r}: it contains a NUL character")
    path = Path(path_text).expanduser()
    if not path.is_absolute():
        path = Path(base_dir or Path.cwd()) / path
    return StorageUri("file", None, str(path.resolve()))


def _s3_uri(text: str, rest: str) -> StorageUri:
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_RE.match(bucket):
        raise ConfigError(
            f"invalid S3 bucket name {bucket!r} in {text!r}: use 3-63 lowercase letters, digits, "
            "dots or hyphens, e.g. s3://my-bucket/fashion-gan"
        )
    segments = [segment for segment in PurePosixPath(prefix).parts if segment != "/"]
    if ".." in segments or "." in segments:
        raise ConfigError(f"invalid S3 prefix in {text!r}: '.' and '..' segments are not allowed")
    return StorageUri("s3", bucket, "/".join(segments))
