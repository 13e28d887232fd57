"""Tests of versioned datasets (fashion_gan.storage.datasets) on S3 (moto) and local stores."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest

from fashion_gan.errors import ChecksumError, DatasetError, StorageError, UnsafeKeyError
from fashion_gan.storage import LocalStore, open_store, parse_uri
from fashion_gan.storage.base import sha256_file
from fashion_gan.storage.datasets import (
    extract_shard,
    list_versions,
    pull_dataset,
    resolve_version,
    upload_dataset,
)
from faultproxy import FaultProxy

SMALL_SHARD_BYTES = 20_000
CLOTHING_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/clothing-small/train"


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """A few dozen small files in nested class folders, like an image-folder dataset."""
    root = tmp_path / "images"
    for class_index, class_name in enumerate(["dress", "hat", "shirt with space"]):
        (root / class_name).mkdir(parents=True)
        for index in range(12):
            (root / class_name / f"img-{index:02d}.jpg").write_bytes(os.urandom(1500 + 97 * index + class_index))
    return root


@pytest.fixture(params=["s3", "local"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(tmp_path / "store")
    return open_store(f"s3://{request.getfixturevalue('s3_bucket')}/team", max_concurrency=4)


@pytest.fixture
def s3_store(s3_bucket):
    return open_store(f"s3://{s3_bucket}/team", max_concurrency=4)


def read_tree(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_upload_and_pull_round_trip(store, image_dir, tmp_path):
    version = upload_dataset(store, image_dir, "clothes", shard_size_bytes=SMALL_SHARD_BYTES)
    assert version == 1

    manifest = json.loads(store.read_bytes("datasets/clothes/1/manifest.json"))
    assert manifest["state"] == "complete"
    assert manifest["file_count"] == 36
    assert manifest["total_bytes"] == sum(len(data) for data in read_tree(image_dir).values())
    assert len(manifest["shards"]) > 1
    assert {entry["path"] for entry in manifest["files"]} == set(read_tree(image_dir))
    assert {info.key.rpartition("/")[2] for info in store.list("datasets/clothes/1/")} == {
        "manifest.json", *(shard["name"] for shard in manifest["shards"])
    }

    pulled = pull_dataset(store, "clothes", 1, tmp_path / "cache")
    assert pulled == (tmp_path / "cache" / "clothes" / "1").resolve()
    assert read_tree(pulled) == read_tree(image_dir)


def test_versions_are_numbered_and_listed(store, image_dir):
    upload_dataset(store, image_dir, "clothes", shard_size_bytes=SMALL_SHARD_BYTES)
    (image_dir / "dress" / "extra.jpg").write_bytes(b"x" * 100)
    assert upload_dataset(store, image_dir, "clothes") == 2
    upload_dataset(store, image_dir / "hat", "hats")

    versions = list_versions(store, "clothes")
    assert [(entry.version, entry.file_count, entry.state) for entry in versions] == [
        (1, 36, "complete"), (2, 37, "complete")
    ]
    assert versions[1].total_bytes == versions[0].total_bytes + 100
    assert versions[0].created.startswith("20")
    assert [(entry.name, entry.version) for entry in list_versions(store)] == [
        ("clothes", 1), ("clothes", 2), ("hats", 1)
    ]


def test_concurrent_uploads_get_distinct_versions(store, image_dir):
    barrier = threading.Barrier(2)
    versions: list[int] = []
    errors: list[BaseException] = []

    def upload() -> None:
        barrier.wait()
        try:
            versions.append(upload_dataset(store, image_dir, "clothes", shard_size_bytes=SMALL_SHARD_BYTES))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=upload) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(versions) == [1, 2]
    assert [entry.state for entry in list_versions(store, "clothes")] == ["complete", "complete"]


def test_resolve_version(store, image_dir):
    upload_dataset(store, image_dir, "clothes")
    upload_dataset(store, image_dir, "clothes")
    assert resolve_version(store, "clothes") == ("clothes", 2)
    assert resolve_version(store, "clothes/1") == ("clothes", 1)
    assert resolve_version(store, "dataset:clothes/2") == ("clothes", 2)


def test_resolve_missing_version_lists_existing(store, image_dir):
    upload_dataset(store, image_dir, "clothes")
    upload_dataset(store, image_dir, "clothes")
    with pytest.raises(DatasetError) as excinfo:
        resolve_version(store, "clothes/7")
    assert "clothes/7" in str(excinfo.value)
    assert "complete versions: 1, 2" in str(excinfo.value)


def test_resolve_missing_dataset_names_it(store, image_dir):
    upload_dataset(store, image_dir, "clothes")
    with pytest.raises(DatasetError) as excinfo:
        resolve_version(store, "shoes")
    message = str(excinfo.value)
    assert "'shoes' not found" in message
    assert "existing datasets: clothes" in message
    assert "fashion-gan data upload" in message


def test_pull_missing_version_lists_existing(store, image_dir, tmp_path):
    upload_dataset(store, image_dir, "clothes")
    with pytest.raises(DatasetError, match="complete versions: 1"):
        pull_dataset(store, "clothes", 3, tmp_path / "cache")


@pytest.mark.parametrize("name", ["", "../up", "a/b", ".hidden", "x" * 101])
def test_upload_rejects_invalid_name(store, image_dir, name):
    with pytest.raises(DatasetError, match="invalid dataset name"):
        upload_dataset(store, image_dir, name)


class FailingShardStore(LocalStore):
    """A local store whose file uploads fail, like a network that drops during shard uploads."""

    def upload_file(self, local_path, key):
        raise StorageError(f"simulated failure uploading {key}")


def test_failed_upload_marks_version_failed(tmp_path, image_dir):
    store = FailingShardStore(parse_uri(str(tmp_path / "store")))
    with pytest.raises(StorageError, match="simulated failure"):
        upload_dataset(store, image_dir, "clothes")
    assert [(entry.version, entry.state) for entry in list_versions(store, "clothes")] == [(1, "failed")]
    with pytest.raises(DatasetError, match="'failed'"):
        pull_dataset(store, "clothes", 1, tmp_path / "cache")


def test_upload_rejects_empty_or_missing_dir(store, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="contains no files"):
        upload_dataset(store, tmp_path / "empty", "clothes")
    with pytest.raises(DatasetError, match="not found"):
        upload_dataset(store, tmp_path / "missing", "clothes")


def test_second_pull_checks_only_manifest(s3_store, image_dir, tmp_path):
    upload_dataset(s3_store, image_dir, "clothes", shard_size_bytes=SMALL_SHARD_BYTES)
    first = pull_dataset(s3_store, "clothes", 1, tmp_path / "cache")
    shard_keys = [info.key for info in s3_store.list("datasets/clothes/1/shard-")]
    assert shard_keys
    for key in shard_keys:
        s3_store.delete(key)

    second = pull_dataset(s3_store, "clothes", 1, tmp_path / "cache")
    assert second == first
    assert read_tree(second) == read_tree(image_dir)


def test_pull_after_changed_manifest_downloads_again(s3_store, image_dir, tmp_path):
    upload_dataset(s3_store, image_dir, "clothes", shard_size_bytes=SMALL_SHARD_BYTES)
    pulled = pull_dataset(s3_store, "clothes", 1, tmp_path / "cache")
    (pulled / "dress" / "img-00.jpg").unlink()
    manifest = json.loads(s3_store.read_bytes("datasets/clothes/1/manifest.json"))
    manifest["note"] = "edited"
    s3_store.write_bytes("datasets/clothes/1/manifest.json", json.dumps(manifest).encode())

    pulled = pull_dataset(s3_store, "clothes", 1, tmp_path / "cache")
    assert read_tree(pulled) == read_tree(image_dir)


def test_pull_altered_shard_names_it(s3_store, image_dir, tmp_path):
    upload_dataset(s3_store, image_dir, "clothes", shard_size_bytes=SMALL_SHARD_BYTES)
    key = "datasets/clothes/1/shard-00001.tar"
    altered = bytearray(s3_store.read_bytes(key))
    altered[len(altered) // 2] ^= 0x01
    s3_store.write_bytes(key, bytes(altered))

    with pytest.raises(ChecksumError, match="shard-00001.tar"):
        pull_dataset(s3_store, "clothes", 1, tmp_path / "cache")
    assert not (tmp_path / "cache" / "clothes" / "1").exists()
    assert not (tmp_path / "cache" / "clothes" / "1.complete.json").exists()


def test_pull_rejects_unfinished_upload(store, tmp_path):
    claim = {"format": 1, "name": "clothes", "version": 1, "state": "uploading", "created": "2026-01-01T00:00:00+00:00"}
    store.write_bytes("datasets/clothes/1/manifest.json", json.dumps(claim).encode())
    with pytest.raises(DatasetError, match="'uploading'"):
        pull_dataset(store, "clothes", 1, tmp_path / "cache")
    assert [(entry.version, entry.state) for entry in list_versions(store, "clothes")] == [(1, "uploading")]
    with pytest.raises(DatasetError, match="no complete version"):
        resolve_version(store, "clothes")


# Unsafe shards ----------------------------------------------------------------------------------


def build_tar(path: Path, members: list[tuple[str, str, bytes]]) -> None:
    """Write a tar whose members are (name, kind ("file" | "symlink" | "hardlink"), data or target)."""
    with tarfile.open(path, "w") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = payload.decode()
                tar.addfile(info)


@pytest.mark.parametrize(
    ("member", "kind", "payload"),
    [
        ("../evil.txt", "file", b"evil"),
        ("a/../../evil.txt", "file", b"evil"),
        ("/tmp/evil-absolute.txt", "file", b"evil"),
        ("link", "symlink", b"/etc/passwd"),
        ("hard", "hardlink", b"ok.txt"),
    ],
)
def test_extract_rejects_unsafe_member(tmp_path, member, kind, payload):
    shard = tmp_path / "shard-00000.tar"
    build_tar(shard, [("ok.txt", "file", b"fine"), (member, kind, payload)])
    dest = tmp_path / "cache" / "dest"
    dest.mkdir(parents=True)
    fine_sha256 = hashlib.sha256(b"fine").hexdigest()
    expected = {"ok.txt": {"path": "ok.txt", "size": 4, "sha256": fine_sha256, "shard": shard.name}}

    with pytest.raises(UnsafeKeyError) as excinfo:
        extract_shard(shard, dest, expected)
    assert repr(member) in str(excinfo.value)
    assert "shard-00000.tar" in str(excinfo.value)
    assert list(dest.iterdir()) == []  # members are checked before anything is written
    assert not (tmp_path / "cache" / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/evil-absolute.txt").exists()


def test_pull_rejects_shard_with_symlink(store, tmp_path):
    shard = tmp_path / "shard-00000.tar"
    build_tar(shard, [("escape", "symlink", b"../../..")])
    manifest = {
        "format": 1, "name": "evil", "version": 1, "state": "complete", "created": "2026-01-01T00:00:00+00:00",
        "file_count": 0, "total_bytes": 0, "files": [],
        "shards": [{"name": shard.name, "size": shard.stat().st_size, "sha256": sha256_file(shard), "file_count": 0}],
    }
    store.upload_file(shard, "datasets/evil/1/shard-00000.tar")
    store.write_bytes("datasets/evil/1/manifest.json", json.dumps(manifest).encode())

    with pytest.raises(UnsafeKeyError, match="'escape'"):
        pull_dataset(store, "evil", 1, tmp_path / "cache")
    assert not (tmp_path / "cache" / "evil" / "1").exists()


def test_extract_rejects_member_missing_from_manifest(tmp_path):
    shard = tmp_path / "shard-00000.tar"
    build_tar(shard, [("surprise.txt", "file", b"?")])
    with pytest.raises(DatasetError, match="surprise.txt"):
        extract_shard(shard, tmp_path / "dest", {})


# Faults and a real photo set --------------------------------------------------------------------


@pytest.mark.slow
def test_pull_through_faulty_connection(s3_server, s3_bucket, image_dir, tmp_path):
    direct = open_store(f"s3://{s3_bucket}/team")
    upload_dataset(direct, image_dir, "clothes", shard_size_bytes=4_000)
    with FaultProxy(s3_server, every_n=3) as proxy:
        store = open_store(f"s3://{s3_bucket}/team", endpoint_url=proxy.endpoint, max_concurrency=8)
        pulled = pull_dataset(store, "clothes", 1, tmp_path / "cache")
    assert read_tree(pulled) == read_tree(image_dir)
    assert sum(proxy.injected.values()) > 0


@pytest.mark.slow
def test_photo_dataset_round_trip(s3_store, tmp_path):
    if not CLOTHING_DIR.is_dir():
        pytest.skip(f"clothing photos not found at {CLOTHING_DIR}")
    subset = tmp_path / "photos"
    photos = sorted(CLOTHING_DIR.rglob("*.jpg"))[:300]
    for photo in photos:
        target = subset / photo.relative_to(CLOTHING_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(photo.read_bytes())

    version = upload_dataset(s3_store, subset, "clothing", shard_size_bytes=2 * 1024 * 1024)
    pulled = pull_dataset(s3_store, "clothing", version, tmp_path / "cache")
    assert len(list(pulled.rglob("*.jpg"))) == len(photos)
    assert read_tree(pulled) == read_tree(subset)
