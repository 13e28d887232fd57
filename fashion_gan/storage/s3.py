"""An object store in an S3 bucket, for AWS S3 and S3-compatible servers (MinIO, R2, moto).

Credentials come only from boto3's default chain. Requests use path-style addressing, which works
for S3-compatible servers that have no per-bucket DNS names and with no region configured.
"""

from __future__ import annotations

import base64
import hashlib
import contextlib
import io
import logging
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore.session
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectionError as BotocoreConnectionError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from urllib3.exceptions import ProtocolError

from fashion_gan.errors import ChecksumError, StorageError
from fashion_gan.storage.base import (
    ContentMismatch,
    FetchResult,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStore,
    copy_stream,
    sha256_file,
)
from fashion_gan.storage.uri import StorageUri

log = logging.getLogger(__name__)

# boto3 would otherwise fail with NoRegionError when no region is configured (typical for MinIO).
DEFAULT_REGION = "us-east-1"
# Data requests: botocore "standard" retries cover 5xx, throttling (503 SlowDown) and dropped
# connections, with exponential backoff, up to this many attempts in total.
MAX_ATTEMPTS = 8
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
# The bucket check at open time uses fewer attempts and a shorter read timeout, so an unreachable
# or silent endpoint fails within 2 * (5 + 8) s plus one backoff of at most 1 s, under 30 s.
PROBE_MAX_ATTEMPTS = 2
PROBE_READ_TIMEOUT_S = 8
# Attempts to read a response body that breaks off midway (botocore does not retry those).
BODY_READ_ATTEMPTS = 5
# Larger files go through s3transfer's multipart upload (a single PUT is limited to 5 GiB).
MULTIPART_THRESHOLD_BYTES = 256 * 1024 * 1024
# Objects up to this size (S3's CopyObject limit) are copied with one request, and larger ones part
# by part. s3transfer's default threshold of 8 MiB copied a 90 MB checkpoint in 11 parts (14
# requests), which cost the loopback moto server 1 s of CPU instead of 0.2 s.
SINGLE_COPY_MAX_BYTES = 5 * 1024**3
# Files up to this size are read into memory before their upload (see S3Store.upload_file).
SNAPSHOT_UPLOAD_MAX_BYTES = 32 * 1024 * 1024
# Metadata entry (x-amz-meta-sha256) holding the hex sha256 of the object's bytes. A multipart
# ETag is not an MD5 of the content, so the ETag is never used for verification.
SHA256_METADATA = "sha256"

_BODY_READ_ERRORS = (IncompleteReadError, HTTPClientError)
_UNREACHABLE_ERRORS = (BotocoreConnectionError, ConnectionClosedError, ReadTimeoutError, HTTPClientError)
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_ACCESS_DENIED_CODES = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}


def resolve_endpoint_url(explicit: str | None = None) -> str | None:
    """Return the endpoint: `explicit` > AWS_ENDPOINT_URL_S3 > AWS_ENDPOINT_URL > None (AWS)."""
    sources = (("storage.endpoint_url", explicit), ("AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL_S3")),
               ("AWS_ENDPOINT_URL", os.environ.get("AWS_ENDPOINT_URL")))
    for source, candidate in sources:
        if candidate:
            if not candidate.startswith(("http://", "https://")):
                raise StorageError(
                    f"Invalid S3 endpoint {candidate!r} from {source}: it must be a URL starting with http:// or "
                    f"https://, such as http://127.0.0.1:9000. Fix or unset {source}."
                )
            return candidate.rstrip("/")
    return None


class S3Store(ObjectStore):
    """Objects below `s3://bucket/prefix`. Opening it checks that the bucket is reachable."""

    list_page_size = 1000  # keys per ListObjectsV2 request; 1000 is the S3 maximum

    def __init__(self, root: StorageUri, endpoint_url: str | None = None, max_concurrency: int = 16) -> None:
        self.root = root
        self.bucket = root.bucket
        self.max_concurrency = max_concurrency
        self._botocore_session = botocore.session.get_session()
        self._session = boto3.Session(botocore_session=self._botocore_session)
        self.region = self._session.region_name or DEFAULT_REGION
        self.endpoint_url = resolve_endpoint_url(endpoint_url)
        self.client = self._make_client(MAX_ATTEMPTS, READ_TIMEOUT_S, max_concurrency + 4)
        self.endpoint = self.client.meta.endpoint_url
        self._check_bucket()

    def _make_client(self, max_attempts: int, read_timeout_s: float, max_pool_connections: int):
        # Every request with a body carries the body's checksum in a signed x-amz-checksum-* header,
        # which the server checks, so the signature need not hash the body again. By default botocore
        # does that on plain-HTTP endpoints, where it cost 40 ms of CPU per 90 MB checkpoint.
        config = Config(
            region_name=self.region,
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=read_timeout_s,
            max_pool_connections=max_pool_connections,
        )
        return self._session.client("s3", endpoint_url=self.endpoint_url, config=config)

    def _check_bucket(self) -> None:
        probe = self._make_client(PROBE_MAX_ATTEMPTS, PROBE_READ_TIMEOUT_S, 1)
        log.debug("head_bucket(Bucket=%r) at %s", self.bucket, self.endpoint)
        with self._translate_errors("open", ""):
            probe.head_bucket(Bucket=self.bucket)
        log.info("opened %s at %s", self.root, self.endpoint)

    # Keys ---------------------------------------------------------------------------------------

    def _full_key(self, key: str) -> str:
        if not key or key.startswith("/"):
            raise StorageError(f"invalid object key {key!r}: use a non-empty key relative to {self.root}")
        return f"{self.root.path}/{key}" if self.root.path else key

    def _relative_key(self, full_key: str) -> str:
        return full_key[len(self.root.path) + 1 :] if self.root.path else full_key

    # Listing and small objects ------------------------------------------------------------------

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full_prefix = f"{self.root.path}/{prefix}" if self.root.path else prefix
        paginator = self.client.get_paginator("list_objects_v2")
        with self._translate_errors("list", prefix):
            pages = paginator.paginate(
                Bucket=self.bucket, Prefix=full_prefix, PaginationConfig={"PageSize": self.list_page_size}
            )
            for page in pages:
                for entry in page.get("Contents", []):
                    yield ObjectInfo(self._relative_key(entry["Key"]), entry["Size"], entry["LastModified"])

    def exists(self, key: str) -> bool:
        try:
            with self._translate_errors("check", key):
                self.client.head_object(Bucket=self.bucket, Key=self._full_key(key))
        except ObjectNotFoundError:
            return False
        return True

    def read_bytes(self, key: str) -> bytes:
        problem = ""
        for attempt in (1, 2):
            buffer = io.BytesIO()
            try:
                result = self._stream_object(key, buffer)
            except ContentMismatch as err:
                problem = str(err)
            else:
                if not result.stored_sha256 or result.stored_sha256 == result.sha256:
                    return buffer.getvalue()
                problem = f"sha256 {result.sha256}, expected {result.stored_sha256}"
            log.warning("read %d of %s failed verification: %s", attempt, self.describe(key), problem)
        raise ChecksumError(f"{self.describe(key)} failed verification twice ({problem}); upload it again")

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._translate_errors("write", key):
            self.client.put_object(**self._put_arguments(key, data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        for attempt in range(1, BODY_READ_ATTEMPTS + 1):
            try:
                self.client.put_object(**self._put_arguments(key, data), IfNoneMatch="*")
                return True
            except ClientError as err:
                code = err.response.get("Error", {}).get("Code", "")
                if code == "PreconditionFailed":
                    return False
                # 409 ConditionalRequestConflict: another conditional write to the key is in flight, retry.
                if code != "ConditionalRequestConflict" or attempt == BODY_READ_ATTEMPTS:
                    raise self._storage_error(err, "create", key) from err
                time.sleep(random.uniform(0, 0.1 * 2**attempt))
            except BotoCoreError as err:
                raise self._storage_error(err, "create", key) from err
        return False

    def copy(self, src_key: str, dst_key: str) -> None:
        with self._translate_errors("copy", src_key):
            # Managed copy: one request up to 5 GiB and a multipart copy above, both keeping the metadata.
            self.client.copy(
                {"Bucket": self.bucket, "Key": self._full_key(src_key)}, self.bucket, self._full_key(dst_key),
                Config=TransferConfig(multipart_threshold=SINGLE_COPY_MAX_BYTES + 1),
            )

    def delete(self, key: str) -> None:
        with self._translate_errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._full_key(key))

    # Files --------------------------------------------------------------------------------------

    def upload_file(self, local_path: Path, key: str) -> str:
        local_path = Path(local_path)
        size = local_path.stat().st_size
        # A small file is read once, so the bytes sent are the bytes hashed even when the file grows
        # meanwhile (a job appends to metrics.csv and job.log while they upload). Larger files must
        # stay unchanged during the upload.
        snapshot = local_path.read_bytes() if size <= SNAPSHOT_UPLOAD_MAX_BYTES else None
        if snapshot is not None:
            size, digest = len(snapshot), hashlib.sha256(snapshot).hexdigest()
        else:
            digest = sha256_file(local_path)
        full_key = self._full_key(key)
        with self._translate_errors("upload", key):
            if snapshot is not None:
                self.client.put_object(**self._put_arguments(key, snapshot))
            elif size <= MULTIPART_THRESHOLD_BYTES:
                with open(local_path, "rb") as file:
                    self.client.put_object(
                        Bucket=self.bucket,
                        Key=full_key,
                        Body=file,
                        ChecksumSHA256=_base64_sha256(digest),
                        Metadata={SHA256_METADATA: digest},
                    )
            else:
                transfer_config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD_BYTES, max_concurrency=4)
                self.client.upload_file(
                    str(local_path),
                    self.bucket,
                    full_key,
                    ExtraArgs={"Metadata": {SHA256_METADATA: digest}, "ChecksumAlgorithm": "SHA256"},
                    Config=transfer_config,
                )
            head = self.client.head_object(Bucket=self.bucket, Key=full_key)
        stored_digest = head.get("Metadata", {}).get(SHA256_METADATA)
        if head["ContentLength"] != size or stored_digest != digest:
            raise ChecksumError(
                f"upload of {local_path} to {self.describe(key)} did not verify: stored size "
                f"{head['ContentLength']} (expected {size}), sha256 {stored_digest} (expected {digest}); "
                "the file may have changed during the upload, retry it"
            )
        log.debug("uploaded %s to %s (%d bytes, sha256 %s)", local_path, self.describe(key), size, digest)
        return digest

    def _fetch(self, key: str, temp_path: Path) -> FetchResult:
        with open(temp_path, "wb") as sink:
            return self._stream_object(key, sink)

    def _stream_object(self, key: str, sink) -> FetchResult:
        """GET the object into `sink`, starting over when the body breaks off midway."""
        full_key = self._full_key(key)
        for attempt in range(1, BODY_READ_ATTEMPTS + 1):
            sink.seek(0)
            sink.truncate()
            with self._translate_errors("download", key):
                response = self.client.get_object(Bucket=self.bucket, Key=full_key)
            body = response["Body"]
            try:
                size, digest = copy_stream(body, sink)
            except FlexibleChecksumError as err:
                raise ContentMismatch(f"the response checksum did not match: {err}") from err
            except _BODY_READ_ERRORS as err:
                if attempt == BODY_READ_ATTEMPTS:
                    raise StorageError(
                        f"download of {self.describe(key)} from {self.endpoint} broke off {attempt} times "
                        f"({err}); check the network or the server, then retry"
                    ) from err
                log.warning("download of %s broke off (%s), attempt %d, retrying", self.describe(key), err, attempt)
                time.sleep(random.uniform(0, 0.05 * 2**attempt))
                continue
            finally:
                body.close()
            stored = response.get("Metadata", {}).get(SHA256_METADATA)
            return FetchResult(size, digest, stored)
        raise AssertionError("unreachable")

    def _put_arguments(self, key: str, data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        return {
            "Bucket": self.bucket,
            "Key": self._full_key(key),
            "Body": data,
            "ChecksumSHA256": _base64_sha256(digest),
            "Metadata": {SHA256_METADATA: digest},
        }

    # Errors -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _translate_errors(self, action: str, key: str):
        try:
            yield
        except (ClientError, BotoCoreError) as err:
            raise self._storage_error(err, action, key) from err
        except ProtocolError as err:
            # NOTE: botocore 1.44.8 reads non-streaming response bodies (listings, errors) outside
            # its retry handler, so a connection dropped inside such a body ends here unretried.
            raise StorageError(
                f"cannot {action} {self.describe(key)}: the connection to {self.endpoint} broke off ({err}); retry"
            ) from err

    def _storage_error(self, err: Exception, action: str, key: str) -> StorageError:
        """Turn a botocore error into a StorageError that names the object, endpoint and next step."""
        location = self.describe(key)
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(
                f"cannot {action} {location} at {self.endpoint}: no usable AWS credentials ({err}). "
                "boto3 tried, in order: "
                f"{', '.join(self._credential_sources())}. Set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, choose a profile with AWS_PROFILE, or attach a role"
            )
        if isinstance(err, _UNREACHABLE_ERRORS):
            return StorageError(
                f"cannot {action} {location}: the S3 endpoint {self.endpoint} is unreachable ({err}). "
                "Check AWS_ENDPOINT_URL / storage.endpoint_url and that the server is running"
            )
        if not isinstance(err, ClientError):
            return StorageError(f"cannot {action} {location} at {self.endpoint}: {err}")

        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket" or (action == "open" and code in _NOT_FOUND_CODES):
            return StorageError(
                f"bucket {self.bucket!r} not found at {self.endpoint}; create it "
                f"(aws s3 mb s3://{self.bucket}) or fix the storage location {self.root}"
            )
        if code in _NOT_FOUND_CODES:
            return ObjectNotFoundError(f"{location} not found")
        if code in _ACCESS_DENIED_CODES or status == 403:
            return StorageError(
                f"cannot {action} {location}: access denied at {self.endpoint} ({code}). Check that the "
                "credentials from boto3's default chain are valid and allowed to use this bucket"
            )
        return StorageError(f"cannot {action} {location} at {self.endpoint}: {code} {error.get('Message', '')}".rstrip())

    def _credential_sources(self) -> list[str]:
        resolver = self._botocore_session.get_component("credential_provider")
        return [provider.METHOD for provider in resolver.providers]


def _base64_sha256(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")
