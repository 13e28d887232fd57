"""Shared pytest fixtures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

# S3 fixtures ------------------------------------------------------------------------------------

S3_SERVER_START_TIMEOUT_S = 30.0
_DIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignores *_proxy variables


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    """Return the environment variables that point boto3 at the test S3 server with fake keys.

    Subprocess tests merge these into the child's environment. Instance metadata lookups are
    disabled so that boto3 never contacts a metadata address, and loopback bypasses any HTTP proxy.
    """
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def _wait_until_answering(process: subprocess.Popen, endpoint: str) -> None:
    deadline = time.monotonic() + S3_SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with code {process.returncode} before answering at {endpoint}")
        try:
            with _DIRECT_OPENER.open(endpoint + "/", timeout=1):
                return
        except urllib.error.HTTPError:
            return  # any HTTP status means the server is up
        except OSError:
            time.sleep(0.1)  # poll interval while the server starts
    raise RuntimeError(f"moto server did not answer at {endpoint} within {S3_SERVER_START_TIMEOUT_S} s")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's standalone S3 server on loopback and yield its endpoint URL.

    While it runs, os.environ carries `s3_env(endpoint)`; the previous values come back afterwards.
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {name: os.environ.get(name) for name in s3_env(endpoint)}
    try:
        _wait_until_answering(process, endpoint)
        os.environ.update(s3_env(endpoint))
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """Create a fresh, uniquely named bucket on the test S3 server and return its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name
