"""Storage faults: 503 SlowDown, 500, connection resets and truncated bodies through tests/faultproxy.py,
a corrupted object, an unreachable endpoint and missing credentials."""

import hashlib
import os
import threading
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from conftest import free_port
from faultproxy import FAULT_KINDS, FaultProxy
from fashion_gan.errors import StorageError
from fashion_gan.storage import open_store
from fashion_gan.storage.datasets import pull_dataset, upload_dataset
from reliability_helpers import (
    TINY_JOB,
    bucket_keys,
    metrics_csv_steps_from_text,
    read_bucket_json,
    require_fashion_mnist,
    sha256_bytes,
)
from training_helpers import CLOTHING_DIR, run_train

DATASET_IMAGES = 3000
# Small shards, so that the dataset takes many requests and each fault kind hits some of them.
SHARD_SIZE_BYTES = 2 * 1024 * 1024
# Open-time bound of an unreachable endpoint or missing credentials, from the storage contract.
FAIL_FAST_TIMEOUT_S = 30.0
JOB_TIMEOUT_S = 600


def file_digests(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def dataset_folder(tmp_root: Path) -> Path:
    """Return 3,000 clothing photos (linked), or 3,000 generated 16x16 PNGs when the photos are absent."""
    folder = tmp_root / "images"
    photos = sorted(path for path in CLOTHING_DIR.rglob("*") if path.is_file()) if CLOTHING_DIR.is_dir() else []
    if len(photos) >= DATASET_IMAGES:
        for photo in photos[:DATASET_IMAGES]:
            target = folder / photo.relative_to(CLOTHING_DIR)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(photo)
        return folder
    rng = np.random.default_rng(0)
    for index in range(DATASET_IMAGES):
        target = folder / f"class_{index % 10}" / f"image_{index:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(target)
    return folder


@pytest.fixture(scope="module")
def faulty_upload(s3_server, tmp_path_factory):
    """Upload the 3,000-image dataset through a proxy that injects a fault into every third request."""
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    source = dataset_folder(tmp_path_factory.mktemp("dataset"))
    with FaultProxy(s3_server, every_n=3) as proxy:
        store = open_store(f"s3://{bucket}/store", endpoint_url=proxy.endpoint)
        version = upload_dataset(store, source, "clothes", shard_size_bytes=SHARD_SIZE_BYTES)
        injected = dict(proxy.injected)
    return {"bucket": bucket, "source": source, "version": version, "injected": injected}


@pytest.mark.slow
def test_dataset_upload_and_pull_survive_faults(faulty_upload, s3_server, tmp_path):
    assert faulty_upload["version"] == 1
    assert set(faulty_upload["injected"]) >= {"slowdown", "error500", "reset"}

    with FaultProxy(s3_server, every_n=3) as proxy:
        store = open_store(f"s3://{faulty_upload['bucket']}/store", endpoint_url=proxy.endpoint)
        pulled = pull_dataset(store, "clothes", 1, tmp_path / "cache")
        injected = dict(proxy.injected)

    assert set(injected) == set(FAULT_KINDS)
    expected = file_digests(faulty_upload["source"])
    assert len(expected) == DATASET_IMAGES
    assert file_digests(pulled) == expected


@pytest.mark.slow
def test_corrupted_shard_stops_job_naming_key(faulty_upload, s3_server, tmp_path):
    corrupt_key = "datasets/clothes/1/shard-00001.tar"
    with FaultProxy(s3_server, corrupt_key=corrupt_key) as proxy:
        result = run_train([
            *TINY_JOB, "logger=none", "data.kind=image_folder", "data.channels=3", "data.source=dataset:clothes/1",
            f"data.datasets_uri=s3://{faulty_upload['bucket']}/store", f"run.output={tmp_path}/out",
            "run.id=corrupted",
        ], env={"AWS_ENDPOINT_URL": proxy.endpoint, "FASHION_GAN_CACHE": str(tmp_path / "cache")},
            timeout_s=JOB_TIMEOUT_S)

    assert result.returncode == 4, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"s3://{faulty_upload['bucket']}/store/{corrupt_key} failed verification twice" in result.stderr
    assert proxy.injected["corrupt"] >= 2
    assert not list((tmp_path / "cache" / "datasets").glob("clothes/1/*"))


@pytest.mark.slow
def test_run_pushes_verified_through_faults(s3_bucket, s3_server, tmp_path):
    require_fashion_mnist()
    client = boto3.client("s3")
    run_id = "pushed-through-faults"
    cache_dir = tmp_path / "cache"
    with FaultProxy(s3_server, every_n=4) as proxy:
        result = run_train([
            *TINY_JOB, "logger=csv", f"run.output=s3://{s3_bucket}/jobs", f"run.id={run_id}", "trainer.max_steps=8",
            "run.checkpoint_every_n_steps=2", "run.sample_every_n_steps=2", "trainer.log_every_n_steps=1",
        ], env={"AWS_ENDPOINT_URL": proxy.endpoint, "FASHION_GAN_CACHE": str(cache_dir)}, timeout_s=JOB_TIMEOUT_S)
        injected = dict(proxy.injected)

    assert result.returncode == 0, result.stderr[-3000:]
    assert set(injected) >= {"slowdown", "error500", "reset"}
    local_run_dir = cache_dir / "runs" / run_id
    keys = bucket_keys(client, s3_bucket, f"jobs/runs/{run_id}/")
    for step in (2, 4, 6, 8):
        assert f"jobs/runs/{run_id}/checkpoints/step_{step:06d}.ckpt" in keys
        assert f"jobs/runs/{run_id}/samples/step_{step:06d}.png" in keys
    for key in keys:
        response = client.get_object(Bucket=s3_bucket, Key=key)
        data = response["Body"].read()
        assert response["Metadata"].get("sha256") == sha256_bytes(data), key
        relative = key.removeprefix(f"jobs/runs/{run_id}/")
        if relative.startswith(("checkpoints/step_", "samples/")):
            assert sha256_bytes(data) == sha256_bytes((local_run_dir / relative).read_bytes()), key
    pointer = read_bucket_json(client, s3_bucket, f"jobs/runs/{run_id}/checkpoints/latest.json")
    assert pointer["step"] == 8
    last = client.get_object(Bucket=s3_bucket, Key=f"jobs/runs/{run_id}/checkpoints/last.ckpt")["Body"].read()
    assert sha256_bytes(last) == pointer["sha256"]
    assert read_bucket_json(client, s3_bucket, f"jobs/runs/{run_id}/summary.json")["state"] == "succeeded"
    # metrics.csv is pushed with every checkpoint and at the end: the last push is the one that stays.
    metrics = client.get_object(Bucket=s3_bucket, Key=f"jobs/runs/{run_id}/metrics.csv")["Body"].read()
    assert metrics == (local_run_dir / "metrics.csv").read_bytes()
    assert metrics_csv_steps_from_text(metrics.decode()) == list(range(1, 9))


def open_within_bound(uri: str, endpoint_url: str | None = None) -> BaseException | None:
    """Open a store on a thread and return its error; fail the test if it takes longer than the bound."""
    outcome: dict[str, BaseException | None] = {"error": None}

    def attempt() -> None:
        try:
            open_store(uri, endpoint_url=endpoint_url)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=FAIL_FAST_TIMEOUT_S)
    if thread.is_alive():
        pytest.fail(f"opening {uri} did not fail within {FAIL_FAST_TIMEOUT_S} s")
    return outcome["error"]


@pytest.mark.slow
def test_unreachable_endpoint_fails_fast_naming_it(s3_server, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    error = open_within_bound("s3://some-bucket/jobs", endpoint_url=endpoint)

    assert isinstance(error, StorageError)
    assert f"the S3 endpoint {endpoint} is unreachable" in str(error)
    result = run_train([*TINY_JOB, "logger=none", "run.output=s3://some-bucket/jobs", "run.id=unreachable"],
                       env={"AWS_ENDPOINT_URL": endpoint, "FASHION_GAN_CACHE": str(tmp_path / "cache")},
                       timeout_s=JOB_TIMEOUT_S)
    assert result.returncode == 4, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"the S3 endpoint {endpoint} is unreachable" in result.stderr


@pytest.mark.slow
def test_missing_credentials_fail_fast_naming_sources(s3_server, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    # conftest's s3_env already points the shared credentials and config files at /dev/null and
    # turns off the instance metadata lookup, so no provider finds anything and nothing leaves loopback.
    assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"
    expected = ["no usable AWS credentials", f"at {s3_server}", "env", "shared-credentials-file", "config-file",
                "iam-role"]

    error = open_within_bound("s3://some-bucket/jobs")

    assert isinstance(error, StorageError)
    for fragment in expected:
        assert fragment in str(error)
    result = run_train([*TINY_JOB, "logger=none", "run.output=s3://some-bucket/jobs", "run.id=no-credentials"],
                       env={"FASHION_GAN_CACHE": str(tmp_path / "cache")}, timeout_s=JOB_TIMEOUT_S)
    assert result.returncode == 4, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for fragment in expected:
        assert fragment in result.stderr
