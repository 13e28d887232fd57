"""Versioned datasets: immutable versions stored as tar shards plus a manifest.

Layout below the store root:

    datasets/<name>/<N>/manifest.json     files (path, size, sha256, shard), shards (name, size, sha256)
    datasets/<name>/<N>/shard-00000.tar   uncompressed tar, about `shard_size_bytes` each

An upload claims version N by creating its manifest with `put_if_absent`, uploads the shards, and
then replaces the claim with the complete manifest. A pull downloads the shards in parallel,
checks each one's sha256, extracts them without letting any member leave the cache directory,
and records a completed marker so that the next pull of that version only re-reads the manifest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fashion_gan.errors import ChecksumError, DatasetError, UnsafeKeyError
from fashion_gan.storage.base import (
    TEMP_PREFIX,
    ObjectNotFoundError,
    ObjectStore,
    copy_stream,
    run_parallel,
    sha256_file,
)
from fashion_gan.storage.paths import safe_local_path

log = logging.getLogger(__name__)

DATASETS_PREFIX = "datasets"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
DEFAULT_SHARD_SIZE_BYTES = 64 * 1024 * 1024
STATE_UPLOADING = "uploading"
STATE_COMPLETE = "complete"
STATE_FAILED = "failed"
# A claim is written when a version is taken; retry with the next number after losing a race.
MAX_CLAIM_ATTEMPTS = 100

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class DatasetVersion:
    """One version of a dataset as listed by `list_versions`."""

    name: str
    version: int
    state: str
    file_count: int
    total_bytes: int
    created: str  # ISO 8601, UTC


# Upload -----------------------------------------------------------------------------------------


def upload_dataset(
    store: ObjectStore, local_dir: Path, name: str, shard_size_bytes: int = DEFAULT_SHARD_SIZE_BYTES
) -> int:
    """Upload every file below `local_dir` as the next version of dataset `name`; return it.

    Symbolic links to files are stored as the files they point to. Raises DatasetError for an
    invalid name, a missing or empty directory, or a non-positive shard size. A version whose
    shard upload fails stays listed with state "failed", and pulls reject it.
    """
    _check_name(name)
    local_dir = Path(local_dir)
    if shard_size_bytes <= 0:
        raise DatasetError(f"invalid shard_size_bytes {shard_size_bytes}: use a positive size, e.g. 67108864 (64 MiB)")
    if not local_dir.is_dir():
        raise DatasetError(f"dataset directory {local_dir} not found; pass an existing directory of images")
    files = _list_files(local_dir)
    if not files:
        raise DatasetError(f"dataset directory {local_dir} contains no files; add images, then upload again")

    # NOTE: all shards are written to the temporary directory before the upload starts, so it
    # needs free space equal to the dataset size (TMPDIR selects where it is).
    with tempfile.TemporaryDirectory(prefix="fashion-gan-shards-") as shard_dir:
        file_entries, shard_entries = _write_shards(local_dir, files, Path(shard_dir), shard_size_bytes)
        version, claim = _claim_next_version(store, name)
        version_prefix = f"{DATASETS_PREFIX}/{name}/{version}"
        manifest_key = f"{version_prefix}/{MANIFEST_NAME}"
        try:
            pairs = [(Path(shard_dir, shard["name"]), f"{version_prefix}/{shard['name']}") for shard in shard_entries]
            store.upload_many(pairs, description=f"upload {name}/{version}")
        except BaseException as err:
            failed = {**claim, "state": STATE_FAILED, "error": str(err)[:1000]}
            try:
                store.write_bytes(manifest_key, _encode(failed))
            except Exception as mark_err:  # the original error matters more
                log.warning("could not mark %s/%s as failed: %s", name, version, mark_err)
            raise

    manifest = {
        **claim,
        "state": STATE_COMPLETE,
        "file_count": len(file_entries),
        "total_bytes": sum(entry["size"] for entry in file_entries),
        "shard_size_bytes": shard_size_bytes,
        "shards": shard_entries,
        "files": file_entries,
    }
    store.write_bytes(manifest_key, _encode(manifest))
    log.info(
        "uploaded dataset %s/%d: %d files, %.1f MB in %d shards to %s",
        name, version, manifest["file_count"], manifest["total_bytes"] / 1e6, len(shard_entries),
        store.describe(version_prefix),
    )
    return version


def _list_files(local_dir: Path) -> list[str]:
    """Return the relative "/"-separated paths of the regular files below `local_dir`, sorted."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(local_dir, followlinks=False):
        dirnames.sort()
        for filename in filenames:
            path = Path(dirpath, filename)
            if path.is_file():
                paths.append(path.relative_to(local_dir).as_posix())
    return sorted(paths)


def _write_shards(
    local_dir: Path, files: list[str], shard_dir: Path, shard_size_bytes: int
) -> tuple[list[dict], list[dict]]:
    """Pack `files` into tar shards of about `shard_size_bytes`; return (file entries, shard entries)."""
    file_entries: list[dict] = []
    shard_entries: list[dict] = []
    tar: tarfile.TarFile | None = None
    shard_bytes = 0
    shard_files = 0

    def finish_shard() -> None:
        tar.close()
        shard_path = shard_dir / shard_entries[-1]["name"]
        shard_entries[-1].update(size=shard_path.stat().st_size, sha256=sha256_file(shard_path), file_count=shard_files)

    for relative_path in files:
        source = local_dir / relative_path
        size = source.stat().st_size
        if tar is not None and shard_bytes > 0 and shard_bytes + size > shard_size_bytes:
            finish_shard()
            tar = None
        if tar is None:
            shard_entries.append({"name": f"shard-{len(shard_entries):05d}.tar"})
            tar = tarfile.open(shard_dir / shard_entries[-1]["name"], "w", format=tarfile.PAX_FORMAT)
            shard_bytes = shard_files = 0
        member = tarfile.TarInfo(relative_path)
        member.size = size
        member.mtime = int(source.stat().st_mtime)
        member.mode = 0o644
        with open(source, "rb") as file:
            digest = hashlib.sha256()
            while chunk := file.read(1024 * 1024):
                digest.update(chunk)
            file.seek(0)
            tar.addfile(member, file)
        file_entries.append(
            {"path": relative_path, "size": size, "sha256": digest.hexdigest(), "shard": shard_entries[-1]["name"]}
        )
        shard_bytes += size
        shard_files += 1
    finish_shard()
    return file_entries, shard_entries


def _claim_next_version(store: ObjectStore, name: str) -> tuple[int, dict]:
    """Create the claim manifest of the next free version number; return (version, claim)."""
    version = max(_version_numbers(store, name), default=0) + 1
    for _ in range(MAX_CLAIM_ATTEMPTS):
        claim = {
            "format": MANIFEST_FORMAT,
            "name": name,
            "version": version,
            "state": STATE_UPLOADING,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "claim_id": uuid.uuid4().hex,
        }
        key = f"{DATASETS_PREFIX}/{name}/{version}/{MANIFEST_NAME}"
        store.put_if_absent(key, _encode(claim))
        # The claim is read back whatever put_if_absent returned. That covers a create whose reply
        # was lost (the retry then reports "exists") and a server whose conditional write is not
        # atomic (of two writers that both got "created", only the one whose claim is stored keeps it).
        if json.loads(store.read_bytes(key)).get("claim_id") == claim["claim_id"]:
            log.info("claimed dataset version %s/%d", name, version)
            return version, claim
        log.debug("dataset version %s/%d is taken, trying the next one", name, version)
        version += 1
    raise DatasetError(f"could not claim a new version of dataset {name!r} after {MAX_CLAIM_ATTEMPTS} attempts; retry")


# Listing and resolving --------------------------------------------------------------------------


def _version_numbers(store: ObjectStore, name: str) -> list[int]:
    numbers = set()
    for info in store.list(f"{DATASETS_PREFIX}/{name}/"):
        parts = info.key.split("/")
        if len(parts) == 4 and parts[3] == MANIFEST_NAME and parts[2].isdigit():
            numbers.add(int(parts[2]))
    return sorted(numbers)


def list_versions(store: ObjectStore, name: str | None = None) -> list[DatasetVersion]:
    """Return every version of dataset `name` (of all datasets when None), sorted by name and version."""
    prefix = f"{DATASETS_PREFIX}/{name}/" if name else f"{DATASETS_PREFIX}/"
    manifest_keys = []
    for info in store.list(prefix):
        parts = info.key.split("/")
        if len(parts) == 4 and parts[3] == MANIFEST_NAME and parts[2].isdigit():
            manifest_keys.append((parts[1], int(parts[2]), info.key))
    versions = []
    for dataset_name, number, key in sorted(manifest_keys):
        manifest = json.loads(store.read_bytes(key))
        versions.append(
            DatasetVersion(
                name=dataset_name,
                version=number,
                state=manifest.get("state", STATE_COMPLETE),
                file_count=manifest.get("file_count", 0),
                total_bytes=manifest.get("total_bytes", 0),
                created=manifest.get("created", ""),
            )
        )
    return versions


def resolve_version(store: ObjectStore, spec: str) -> tuple[str, int]:
    """Resolve "name" (latest complete version) or "name/N" (optionally "dataset:"-prefixed)."""
    text = spec.removeprefix("dataset:")
    name, _, version_text = text.partition("/")
    _check_name(name)
    versions = list_versions(store, name)
    complete = [entry.version for entry in versions if entry.state == STATE_COMPLETE]
    if not versions:
        known = sorted({entry.name for entry in list_versions(store)})
        raise DatasetError(
            f"dataset {name!r} not found in {store.describe(DATASETS_PREFIX)}; existing datasets: "
            f"{', '.join(known) or 'none'}. Upload it with `fashion-gan data upload DIR --name {name}`"
        )
    if not version_text:
        if not complete:
            raise DatasetError(f"dataset {name!r} has no complete version yet; wait for its upload or upload it again")
        return name, max(complete)
    if not version_text.isdigit() or int(version_text) not in complete:
        raise DatasetError(
            f"dataset version {name}/{version_text} not found or not complete in {store.describe(DATASETS_PREFIX)}; "
            f"complete versions: {', '.join(map(str, complete)) or 'none'}"
        )
    return name, int(version_text)


# Pull -------------------------------------------------------------------------------------------


def pull_dataset(store: ObjectStore, name: str, version: int, cache_dir: Path) -> Path:
    """Download and extract version `version` of dataset `name`; return the directory of its files.

    The files land in `cache_dir/<name>/<version>/`. A version pulled before is reused after
    comparing its manifest with the one in the store, without downloading any shard.
    """
    _check_name(name)
    manifest_key = f"{DATASETS_PREFIX}/{name}/{version}/{MANIFEST_NAME}"
    try:
        manifest_bytes = store.read_bytes(manifest_key)
    except ObjectNotFoundError as err:
        resolve_version(store, f"{name}/{version}")  # raises DatasetError listing existing versions
        raise DatasetError(f"dataset version {name}/{version} has no manifest in {store.describe()}") from err
    manifest = _parse_manifest(manifest_bytes, name, version)
    manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()

    dataset_dir = safe_local_path(cache_dir, f"{name}/{version}")
    marker_path = dataset_dir.with_name(f"{version}.complete.json")
    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(dataset_dir.with_name(f".{version}.lock")):
        if _marker_matches(marker_path, manifest_sha256) and dataset_dir.is_dir():
            log.info("reusing dataset %s/%d cached at %s (manifest unchanged)", name, version, dataset_dir)
            return dataset_dir
        marker_path.unlink(missing_ok=True)
        staging_dir = dataset_dir.with_name(f"{TEMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}")
        try:
            _download_and_extract(store, manifest, staging_dir)
            if dataset_dir.exists():
                shutil.rmtree(dataset_dir)
            os.replace(staging_dir, dataset_dir)
        finally:
            shutil.rmtree(staging_dir, ignore_errors=True)
        marker = {"manifest_sha256": manifest_sha256, "pulled": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        marker_path.write_text(json.dumps(marker))
    log.info("pulled dataset %s/%d: %d files to %s", name, version, manifest["file_count"], dataset_dir)
    return dataset_dir


def _download_and_extract(store: ObjectStore, manifest: dict, staging_dir: Path) -> None:
    """Download every shard in parallel, verify it, extract it into `staging_dir`, delete it."""
    name, version = manifest["name"], manifest["version"]
    shard_download_dir = staging_dir / f"{TEMP_PREFIX}shards"
    shard_download_dir.mkdir(parents=True)
    files_by_shard: dict[str, dict[str, dict]] = {}
    for entry in manifest["files"]:
        files_by_shard.setdefault(entry["shard"], {})[entry["path"]] = entry
    shards = manifest["shards"]

    def pull_shard(index: int) -> int:
        shard = shards[index]
        key = f"{DATASETS_PREFIX}/{name}/{version}/{shard['name']}"
        shard_path = safe_local_path(shard_download_dir, shard["name"])
        store.download_file(key, shard_path, expected_size=shard["size"], expected_sha256=shard["sha256"])
        extract_shard(shard_path, staging_dir, files_by_shard.get(shard["name"], {}))
        shard_path.unlink()
        return shard["size"]

    total_bytes = sum(shard["size"] for shard in shards)
    run_parallel(pull_shard, len(shards), total_bytes, f"pull {name}/{version}", store.max_concurrency)
    shard_download_dir.rmdir()
    _check_extracted_files(manifest, staging_dir)


def extract_shard(shard_path: Path, dest_dir: Path, expected_files: dict[str, dict]) -> None:
    """Extract the regular files of one tar shard into `dest_dir`, checking each against the manifest.

    Raises UnsafeKeyError for a member that is a link, device or FIFO, or whose name is absolute or
    contains "..", and DatasetError or ChecksumError for a member the manifest does not list or
    whose size or sha256 differs. Nothing is written outside `dest_dir`.
    """
    with tarfile.open(shard_path, "r:") as tar:
        # Every member is checked before the first one is written.
        members = [member for member in _checked_members(tar, shard_path.name, dest_dir) if member.isfile()]
        unlisted = [member.name for member in members if member.name not in expected_files]
        if unlisted:
            raise DatasetError(
                f"shard {shard_path.name} contains {unlisted[0]!r}, which its manifest does not list; "
                "upload the dataset again"
            )
        for member in members:
            entry = expected_files[member.name]
            target = safe_local_path(dest_dir, member.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            with source, open(target, "wb") as sink:
                size, digest = copy_stream(source, sink)
            if size != entry["size"] or digest != entry["sha256"]:
                raise ChecksumError(
                    f"{member.name} in shard {shard_path.name} has size {size} and sha256 {digest}, "
                    f"but the manifest lists {entry['size']} and {entry['sha256']}; upload the dataset again"
                )
            os.utime(target, (member.mtime, member.mtime))


def _checked_members(tar: tarfile.TarFile, shard_name: str, dest_dir: Path) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        if not (member.isfile() or member.isdir()):
            kind = "link" if member.issym() or member.islnk() else "special file"
            raise UnsafeKeyError(
                f"shard {shard_name} contains the {kind} {member.name!r}; dataset shards may contain only "
                "regular files and directories, so nothing was extracted from it. Upload the dataset again"
            )
        try:
            safe_local_path(dest_dir, member.name.rstrip("/") if member.isdir() else member.name)
        except UnsafeKeyError as err:
            raise UnsafeKeyError(f"shard {shard_name}: {err}") from err
        yield member


def _check_extracted_files(manifest: dict, staging_dir: Path) -> None:
    missing = [entry["path"] for entry in manifest["files"] if not (staging_dir / entry["path"]).is_file()]
    if missing:
        raise DatasetError(
            f"dataset {manifest['name']}/{manifest['version']}: {len(missing)} files listed in the manifest "
            f"are missing from its shards (first: {missing[0]!r}); upload the dataset again"
        )


def _parse_manifest(manifest_bytes: bytes, name: str, version: int) -> dict:
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as err:
        raise DatasetError(f"manifest of dataset {name}/{version} is not valid JSON ({err}); upload it again") from err
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DatasetError(
            f"manifest of dataset {name}/{version} has format {manifest.get('format')!r}; this version of "
            f"fashion-gan reads format {MANIFEST_FORMAT}. Upgrade fashion-gan or upload the dataset again"
        )
    state = manifest.get("state")
    if state != STATE_COMPLETE:
        raise DatasetError(
            f"dataset version {name}/{version} is {state!r}, not complete: its upload is still running or "
            "was interrupted. Use another version or upload the dataset again"
        )
    if manifest.get("name") != name or manifest.get("version") != version:
        raise DatasetError(
            f"manifest at {name}/{version} describes {manifest.get('name')}/{manifest.get('version')}; "
            "the dataset was copied by hand. Upload it again"
        )
    return manifest


def _marker_matches(marker_path: Path, manifest_sha256: str) -> bool:
    try:
        return json.loads(marker_path.read_text()).get("manifest_sha256") == manifest_sha256
    except (OSError, ValueError):
        return False


@contextmanager
def _exclusive_lock(lock_path: Path):
    """Hold an exclusive advisory lock, so concurrent pulls of one version (e.g. one per GPU) do
    the work once."""
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name or ""):
        raise DatasetError(
            f"invalid dataset name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )


def _encode(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8") + b"\n"
