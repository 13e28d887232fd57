"""Docker engine and image fixtures shared by the tests that run containers.

`ensure_engine()` returns a client of a running engine, starting one with scripts/start-dockerd.sh
when none responds. `ensure_project_image()` builds the project image offline, from the local
Debian base image and the wheelhouse, and tags it with a digest of everything the image is made
of, so a later test run with the same files reuses it. Each helper skips the calling test, with
the reason, when the machine cannot provide what it needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from pathlib import Path

import docker
import docker.errors
import pytest

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = REPO_ROOT / "scripts"
BASE_IMAGE_TAG = "fashion-gan-base:bookworm"
PROJECT_IMAGE_REPOSITORY = "fashion-gan"
PROJECT_IMAGE_TAG_PREFIX = "test-"
# Files and folders copied into the image; a change to any of them gives a new image tag.
IMAGE_INPUTS = ("Dockerfile", ".dockerignore", "pyproject.toml", "train.py", "conf", "fashion_gan")
ENGINE_START_TIMEOUT_S = 120
BASE_IMAGE_TIMEOUT_S = 900
WHEELHOUSE_TIMEOUT_S = 1800


def _run_script(name: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPTS_DIR / name)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


def _connect() -> docker.DockerClient | None:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException:
        return None
    return client


def ensure_engine() -> docker.DockerClient:
    """Return a client of a running Docker engine, starting a local one if needed, or skip."""
    client = _connect()
    if client is not None:
        return client
    try:
        result = _run_script("start-dockerd.sh", ENGINE_START_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"no Docker engine responds and scripts/start-dockerd.sh failed: {err}")
    client = _connect()
    if client is None:
        pytest.skip(f"no Docker engine responds and scripts/start-dockerd.sh could not start one: "
                    f"{(result.stderr or result.stdout).strip()[-500:]}")
    return client


def ensure_base_image(client: docker.DockerClient) -> str:
    """Return the tag of the local Debian base image, building it with debootstrap if needed, or skip."""
    try:
        client.images.get(BASE_IMAGE_TAG)
        return BASE_IMAGE_TAG
    except docker.errors.ImageNotFound:
        pass
    result = _run_script("build-base-image.sh", BASE_IMAGE_TIMEOUT_S)
    if result.returncode != 0:
        pytest.skip(f"cannot build the base image {BASE_IMAGE_TAG} (needs root, debootstrap and the Debian "
                    f"mirror): {(result.stderr or result.stdout).strip()[-500:]}")
    return BASE_IMAGE_TAG


def ensure_wheelhouse() -> Path:
    """Return the wheelhouse folder, filling it with scripts/build-wheelhouse.sh if it is empty, or skip."""
    wheelhouse_dir = REPO_ROOT / ".cache" / "wheelhouse"
    if not any(wheelhouse_dir.glob("torch-*.whl")):
        result = _run_script("build-wheelhouse.sh", WHEELHOUSE_TIMEOUT_S)
        if result.returncode != 0:
            pytest.skip(f"cannot fill the wheelhouse {wheelhouse_dir} (needs the package index): "
                        f"{(result.stderr or result.stdout).strip()[-500:]}")
    return wheelhouse_dir


def image_inputs_digest() -> str:
    """Return a sha256 of the relative paths and contents of every file in IMAGE_INPUTS."""
    digest = hashlib.sha256()
    for name in IMAGE_INPUTS:
        top = REPO_ROOT / name
        files = sorted(top.rglob("*")) if top.is_dir() else [top]
        for path in files:
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


# Tag returned by the first ensure_project_image() call of this test session.
_session_image_tag: str | None = None


def ensure_project_image() -> str:
    """Return the tag of the project image built from the current files, building it if needed, or skip.

    The image is built from the local base image with WHEELHOUSE=1, so the build needs no network.
    Older test tags that no container uses are removed after a build; their layers stay in the build
    cache while shared. Later calls in the same test session return the first call's tag while that
    image exists. So all jobs of one session, such as a stopped job and the job that resumes it, run
    the same code even when the files change during the session.
    """
    global _session_image_tag
    client = ensure_engine()
    tags = [_session_image_tag] if _session_image_tag else []
    tags.append(f"{PROJECT_IMAGE_REPOSITORY}:{PROJECT_IMAGE_TAG_PREFIX}{image_inputs_digest()[:12]}")
    for tag in tags:
        try:
            client.images.get(tag)
        except docker.errors.ImageNotFound:
            continue
        _session_image_tag = tag
        return tag
    tag = tags[-1]
    base_tag = ensure_base_image(client)
    ensure_wheelhouse()

    started = time.monotonic()
    try:
        image, _ = client.images.build(
            path=str(REPO_ROOT),
            tag=tag,
            buildargs={"BASE_IMAGE": base_tag, "WHEELHOUSE": "1"},
            network_mode="host",
            rm=True,
            forcerm=True,
        )
    except docker.errors.BuildError as err:
        output = "".join(str(chunk.get("stream") or chunk.get("error") or "") for chunk in err.build_log)
        pytest.fail(f"building {tag} failed: {err.msg}\n{output[-3000:]}")
    log.info("built %s (%s, %.1f GB) in %.0f s", tag, image.short_id, image.attrs["Size"] / 1e9,
             time.monotonic() - started)

    for old_image in client.images.list(name=PROJECT_IMAGE_REPOSITORY):
        for old_tag in old_image.tags:
            if old_tag.startswith(f"{PROJECT_IMAGE_REPOSITORY}:{PROJECT_IMAGE_TAG_PREFIX}") and old_tag != tag:
                _remove_unused_tag(client, old_tag)
    _session_image_tag = tag
    return tag


def _remove_unused_tag(client: docker.DockerClient, tag: str) -> None:
    # The engine rejects the removal with 409 Conflict while a container, even an exited one, uses the image.
    try:
        client.images.remove(tag)
    except docker.errors.APIError as err:
        log.info("keeping image %s: %s", tag, err)


def remove_job_containers(jobs_dir: Path) -> None:
    """Remove the containers of the docker jobs recorded in `jobs_dir` (test cleanup)."""
    job_ids = []
    for record_path in Path(jobs_dir).glob("fg-*.json"):
        if json.loads(record_path.read_text()).get("backend") == "docker":
            job_ids.append(record_path.stem)
    client = _connect() if job_ids else None
    if client is None:
        return
    for job_id in job_ids:
        for container in client.containers.list(all=True, filters={"label": f"fashion-gan.job-id={job_id}"}):
            container.remove(force=True)
