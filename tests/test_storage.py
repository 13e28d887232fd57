"""Tests of fashion_gan.storage against a local directory and a moto S3 server on loopback."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path

import boto3
import pytest

from fashion_gan.errors import ChecksumError, ConfigError, StorageError, UnsafeKeyError
from fashion_gan.storage import LocalStore, ObjectNotFoundError, StorageUri, open_store, parse_uri, safe_local_path
from fashion_gan.storage import s3
from fashion_gan.storage.s3 import resolve_endpoint_url
from fashion_gan.storage.uploader import BackgroundUploader
from faultproxy import FaultProxy

# URIs -------------------------------------------------------------------------------------------


def test_parse_s3_uri_with_prefix():
    uri = parse_uri("s3://my-bucket/runs/exp1/")
    assert uri == StorageUri("s3", "my-bucket", "runs/exp1")
    assert str(uri) == "s3://my-bucket/runs/exp1"


def test_parse_s3_uri_bucket_only():
    uri = parse_uri("s3://my-bucket")
    assert uri.path == ""
    assert str(uri) == "s3://my-bucket"
    assert str(uri.join("datasets", "a/1")) == "s3://my-bucket/datasets/a/1"


@pytest.mark.parametrize("text", ["s3://", "s3://UPPER/x", "s3://ab", "s3://b_ad/x"])
def test_parse_s3_uri_rejects_bad_bucket(text):
    with pytest.raises(ConfigError, match="bucket"):
        parse_uri(text)


def test_parse_s3_uri_rejects_dot_segments():
    with pytest.raises(ConfigError, match="'..'"):
        parse_uri("s3://my-bucket/a/../b")


def test_parse_file_uris(tmp_path):
    assert parse_uri(f"file://{tmp_path}") == StorageUri("file", None, str(tmp_path.resolve()))
    assert parse_uri("file://out/runs", base_dir=tmp_path).path == str(tmp_path.resolve() / "out/runs")
    assert parse_uri("out", base_dir=tmp_path).path == str(tmp_path.resolve() / "out")
    assert parse_uri(str(tmp_path)).path == str(tmp_path.resolve())
    assert str(parse_uri(str(tmp_path))) == tmp_path.resolve().as_uri()


def test_parse_uri_rejects_other_schemes():
    with pytest.raises(ConfigError, match="gs"):
        parse_uri("gs://bucket/x")


def test_uri_join_rejects_parent_segment():
    with pytest.raises(ConfigError):
        parse_uri("s3://my-bucket/x").join("../y")


# Safe local paths -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["../x.jpg", "a/../../x.jpg", "/abs.jpg", "", "a\\..\\x.jpg", "a\x00b.jpg", "C:/x.jpg", "a//b.jpg", "a/./b"]
)
def test_safe_local_path_rejects(tmp_path, key):
    cache_dir = tmp_path / "cache"
    with pytest.raises(UnsafeKeyError) as excinfo:
        safe_local_path(cache_dir, key)
    assert repr(key) in str(excinfo.value)


def test_safe_local_path_accepts_nested_key(tmp_path):
    assert safe_local_path(tmp_path, "a/b/c.jpg") == tmp_path.resolve() / "a" / "b" / "c.jpg"


def test_safe_local_path_rejects_symlink_escape(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "link").symlink_to(outside)
    with pytest.raises(UnsafeKeyError, match="link/x.jpg"):
        safe_local_path(cache_dir, "link/x.jpg")


# Stores: the same behaviour for a directory and for S3 -------------------------------------------


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/root/prefix", max_concurrency=4)


def write_files(directory: Path, count: int, size_bytes: int = 2000) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = directory / f"file-{index:03d}.bin"
        path.write_bytes(os.urandom(size_bytes + index))
        paths.append(path)
    return paths


def test_store_write_read_exists(store):
    store.write_bytes("a/b.txt", b"hello")
    assert store.read_bytes("a/b.txt") == b"hello"
    assert store.exists("a/b.txt")
    assert not store.exists("a/missing.txt")


def test_store_read_missing_raises_not_found(store):
    with pytest.raises(ObjectNotFoundError, match="missing.txt"):
        store.read_bytes("missing.txt")


def test_store_list_with_prefix(store):
    for key in ["x/1.txt", "x/2.txt", "xy/3.txt", "y/4.txt"]:
        store.write_bytes(key, key.encode())
    listed = {info.key: info.size for info in store.list("x/")}
    assert listed == {"x/1.txt": 7, "x/2.txt": 7}
    assert {info.key for info in store.list("x")} == {"x/1.txt", "x/2.txt", "xy/3.txt"}
    assert len(list(store.list())) == 4


def test_s3_list_follows_pagination(s3_bucket):
    store = open_store(f"s3://{s3_bucket}/paged")
    store.list_page_size = 7
    keys = {f"k/{index:02d}" for index in range(23)}
    for key in keys:
        store.write_bytes(key, b"x")
    assert {info.key for info in store.list("k/")} == keys


def test_store_put_if_absent(store):
    assert store.put_if_absent("claim.json", b"first")
    assert not store.put_if_absent("claim.json", b"second")
    assert store.read_bytes("claim.json") == b"first"


def test_local_put_if_absent_one_winner_among_threads(tmp_path):
    store = open_store(tmp_path)
    barrier = threading.Barrier(8)
    results = []

    def claim(index: int) -> None:
        barrier.wait()
        results.append(store.put_if_absent("claim", str(index).encode()))

    threads = [threading.Thread(target=claim, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1
    assert not [path for path in tmp_path.iterdir() if path.name != "claim"]


def test_store_copy_and_delete(store):
    store.write_bytes("src.txt", b"payload")
    store.copy("src.txt", "dst/copy.txt")
    assert store.read_bytes("dst/copy.txt") == b"payload"
    store.delete("src.txt")
    store.delete("src.txt")  # deleting a missing object is not an error
    assert not store.exists("src.txt")


def test_store_upload_and_download_file(store, tmp_path):
    source = tmp_path / "model.ckpt"
    source.write_bytes(os.urandom(300_000))
    digest = store.upload_file(source, "checkpoints/model.ckpt")
    assert digest == hashlib.sha256(source.read_bytes()).hexdigest()

    target = tmp_path / "down" / "model.ckpt"
    store.download_file("checkpoints/model.ckpt", target, expected_size=300_000, expected_sha256=digest)
    assert target.read_bytes() == source.read_bytes()


def test_s3_multipart_upload_verified(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD_BYTES", 5 * 1024 * 1024)
    source = tmp_path / "big.ckpt"
    source.write_bytes(os.urandom(6 * 1024 * 1024))
    store = open_store(f"s3://{s3_bucket}")
    digest = store.upload_file(source, "big.ckpt")
    assert digest == hashlib.sha256(source.read_bytes()).hexdigest()

    target = store.download_file("big.ckpt", tmp_path / "back.ckpt", expected_sha256=digest)
    assert target.read_bytes() == source.read_bytes()


def _upload_then_copy(bucket: str, tmp_path: Path) -> tuple[bytes, str, dict, bytes]:
    """Upload 9 MiB to `src.ckpt`, copy it to `copy.ckpt`; return the bytes, their sha256, the copy's head and bytes."""
    source = tmp_path / "src.ckpt"
    source.write_bytes(os.urandom(9 * 1024 * 1024))
    store = open_store(f"s3://{bucket}")
    digest = store.upload_file(source, "src.ckpt")

    store.copy("src.ckpt", "copy.ckpt")

    head = boto3.client("s3").head_object(Bucket=bucket, Key="copy.ckpt")
    return source.read_bytes(), digest, head, store.read_bytes("copy.ckpt")


def test_s3_copy_9_mib_single_request(s3_bucket, tmp_path):
    # s3transfer's default copies anything over 8 MiB part by part. A copy made of parts gets an ETag
    # of the form "<md5>-<parts>", and one made by a single CopyObject request keeps the plain MD5.
    original, digest, head, copied = _upload_then_copy(s3_bucket, tmp_path)
    assert head["ETag"].strip('"') == hashlib.md5(original).hexdigest()
    assert head["Metadata"] == {"sha256": digest}
    assert copied == original


def test_s3_copy_above_limit_multipart(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(s3, "SINGLE_COPY_MAX_BYTES", 5 * 1024 * 1024)
    original, digest, head, copied = _upload_then_copy(s3_bucket, tmp_path)
    assert head["ETag"].strip('"').endswith("-2")  # two parts of s3transfer's default 8 MiB
    assert head["Metadata"] == {"sha256": digest}
    assert copied == original


def test_download_wrong_sha256_keeps_nothing(store, tmp_path):
    store.write_bytes("data.bin", b"content")
    target = tmp_path / "down" / "data.bin"
    with pytest.raises(ChecksumError, match="data.bin"):
        store.download_file("data.bin", target, expected_sha256="0" * 64)
    assert list(target.parent.iterdir()) == []


def test_download_wrong_size_raises(store, tmp_path):
    store.write_bytes("data.bin", b"content")
    with pytest.raises(ChecksumError, match="size 7 bytes, expected 8"):
        store.download_file("data.bin", tmp_path / "data.bin", expected_size=8)


def test_download_many_and_upload_many(store, tmp_path):
    sources = write_files(tmp_path / "src", 12)
    digests = store.upload_many([(path, f"batch/{path.name}") for path in sources])
    assert digests == {f"batch/{path.name}": hashlib.sha256(path.read_bytes()).hexdigest() for path in sources}

    downloaded = store.download_many(list(store.list("batch/")), tmp_path / "dest")
    assert len(downloaded) == 12
    for path in sources:
        assert (tmp_path / "dest" / "batch" / path.name).read_bytes() == path.read_bytes()


def test_download_many_rejects_unsafe_key_before_download(store, tmp_path):
    store.write_bytes("ok.txt", b"ok")
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeKeyError, match=r"'\.\./escape\.txt'"):
        store.download_many(["ok.txt", "../escape.txt"], dest)
    assert not (dest / "ok.txt").exists()
    assert not (tmp_path / "escape.txt").exists()


# S3 specifics: endpoint, region, errors ---------------------------------------------------------


def test_endpoint_precedence(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    assert resolve_endpoint_url("http://explicit:3/") == "http://explicit:3"
    assert resolve_endpoint_url() == "http://s3-specific:2"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert resolve_endpoint_url() == "http://generic:1"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert resolve_endpoint_url() is None


def test_s3_works_without_region(s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    store = open_store(f"s3://{s3_bucket}")
    assert store.region == "us-east-1"
    store.write_bytes("k", b"v")
    assert store.read_bytes("k") == b"v"


def test_s3_explicit_endpoint_overrides_env(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    store = open_store(f"s3://{s3_bucket}", endpoint_url=s3_server)
    assert store.endpoint == s3_server


def test_s3_missing_bucket_names_it(s3_server):
    with pytest.raises(StorageError) as excinfo:
        open_store("s3://no-such-bucket-here/x")
    message = str(excinfo.value)
    assert "no-such-bucket-here" in message
    assert "create it" in message


def test_s3_unreachable_endpoint_names_it(s3_server):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(StorageError) as excinfo:
        open_store("s3://some-bucket", endpoint_url=closed_endpoint)
    assert closed_endpoint in str(excinfo.value)
    assert "unreachable" in str(excinfo.value)


def test_s3_open_time_limit_below_30_s():
    worst_case_s = s3.PROBE_MAX_ATTEMPTS * (s3.CONNECT_TIMEOUT_S + s3.PROBE_READ_TIMEOUT_S) + 1
    assert worst_case_s < 30


@pytest.mark.slow
def test_s3_silent_endpoint_times_out(s3_server):
    # A socket that accepts connections (kernel backlog) but never responds, so the read timeout fires.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(StorageError, match="unreachable") as excinfo:
            open_store("s3://some-bucket", endpoint_url=endpoint)
    assert endpoint in str(excinfo.value)


def test_s3_missing_credentials_lists_sources(s3_server, monkeypatch):
    for name in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("BOTO_CONFIG", os.devnull)
    with pytest.raises(StorageError) as excinfo:
        open_store("s3://any-bucket")
    message = str(excinfo.value)
    assert s3_server in message
    assert "credentials" in message
    assert "env" in message
    assert "iam-role" in message
    assert "shared-credentials-file" in message


# Faults between client and server ---------------------------------------------------------------


@pytest.mark.slow
def test_transfers_survive_injected_faults(s3_server, s3_bucket, tmp_path):
    sources = write_files(tmp_path / "src", 200, size_bytes=3000)
    with FaultProxy(s3_server, every_n=4) as proxy:
        store = open_store(f"s3://{s3_bucket}/faulty", endpoint_url=proxy.endpoint, max_concurrency=8)
        digests = store.upload_many([(path, path.name) for path in sources], description="upload via proxy")
        downloaded = store.download_many(list(store.list()), tmp_path / "dest", description="download via proxy")

    assert len(digests) == 200
    assert len(downloaded) == 200
    for path in sources:
        assert (tmp_path / "dest" / path.name).read_bytes() == path.read_bytes()
    for kind in ("slowdown", "error500", "reset", "truncate"):
        assert proxy.injected[kind] > 0, f"no {kind} fault was injected"


def test_permanently_corrupted_object_raises(s3_server, s3_bucket, tmp_path):
    direct = open_store(f"s3://{s3_bucket}")
    direct.write_bytes("good.bin", os.urandom(5000))
    direct.write_bytes("bad.bin", os.urandom(5000))
    with FaultProxy(s3_server, corrupt_key="bad.bin") as proxy:
        store = open_store(f"s3://{s3_bucket}", endpoint_url=proxy.endpoint)
        with pytest.raises(ChecksumError, match="bad.bin"):
            store.download_many(["good.bin", "bad.bin"], tmp_path / "dest")
    assert proxy.injected["corrupt"] == 2  # downloaded once more before giving up
    assert not (tmp_path / "dest" / "bad.bin").exists()


# Background uploads -----------------------------------------------------------------------------


class GatedStore(LocalStore):
    """A local store whose uploads wait until the test opens the gate."""

    def __init__(self, root_dir: Path) -> None:
        super().__init__(parse_uri(str(root_dir)))
        self.gate = threading.Event()

    def upload_file(self, local_path, key):
        self.gate.wait()
        return super().upload_file(local_path, key)


def test_uploader_submit_does_not_wait_for_upload(tmp_path):
    store = GatedStore(tmp_path / "store")
    source = write_files(tmp_path / "src", 1)[0]
    with BackgroundUploader(store) as uploader:
        future = uploader.submit(source, "a.bin")
        assert not future.done()
        store.gate.set()
        uploader.wait()
    assert future.result() == hashlib.sha256(source.read_bytes()).hexdigest()
    assert store.read_bytes("a.bin") == source.read_bytes()


def test_uploader_submit_then_runs_after_upload(store, tmp_path):
    sources = write_files(tmp_path / "src", 5)
    seen_at_callback = []
    uploader = BackgroundUploader(store, max_workers=2)
    for path in sources:
        key = f"ckpt/{path.name}"
        expected_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        uploader.submit_then(path, key, lambda sha256, key=key, expected=expected_sha256:
                             seen_at_callback.append((store.exists(key), sha256 == expected)))
    uploader.close()
    assert seen_at_callback == [(True, True)] * 5


def test_uploader_failure_skips_callback_and_raises(store, tmp_path):
    called = []
    uploader = BackgroundUploader(store)
    uploader.submit_then(tmp_path / "missing.ckpt", "ckpt/missing.ckpt", lambda sha256: called.append(1))
    with pytest.raises(StorageError, match="missing.ckpt"):
        uploader.wait()
    uploader.close()
    assert called == []


def test_uploader_rejects_submit_after_close(tmp_path):
    uploader = BackgroundUploader(open_store(tmp_path))
    uploader.close()
    with pytest.raises(StorageError, match="closed"):
        uploader.submit(tmp_path / "x", "x")


def test_s3_bucket_fixture_sets_environment(s3_server, s3_bucket):
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server
    client = boto3.client("s3")
    assert s3_bucket in [bucket["Name"] for bucket in client.list_buckets()["Buckets"]]


def test_latest_pointer_only_moves_forward(store, tmp_path):
    from fashion_gan.callbacks.pusher import OutputPusher
    from fashion_gan.run_outputs import CheckpointPointer, read_latest_pointer

    run_dir = tmp_path / "run"
    checkpoint_dir = run_dir / "checkpoints"
    checkpoint_dir.mkdir(parents=True)
    for step in (2, 8):
        (checkpoint_dir / f"step_{step:06d}.ckpt").write_bytes(f"weights of step {step}".encode())
        store.write_bytes(f"runs/ordered/checkpoints/step_{step:06d}.ckpt", f"weights of step {step}".encode())
    pusher = OutputPusher(store, "ordered", run_dir)

    # Step 8's upload finished first; step 2's, retried, finishes after it.
    pusher.point_latest_at(CheckpointPointer("checkpoints/step_000008.ckpt", 8, "8" * 64, 17))
    pusher.point_latest_at(CheckpointPointer("checkpoints/step_000002.ckpt", 2, "2" * 64, 17))
    pusher.close()

    assert read_latest_pointer(store, "ordered").step == 8
    assert store.read_bytes("runs/ordered/checkpoints/last.ckpt") == b"weights of step 8"
