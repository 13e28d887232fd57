"""The job lifecycle through the `fashion-gan` CLI with the real train.py: submit, follow, stop, restart, fetch.

Each test runs once per backend: `local` (a process on this machine) and `docker` (a container of
the project image, built by tests/docker_helpers.py). The docker case skips when no Docker engine can be
started. Containers use host networking, so they reach the loopback S3 server of the tests.
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import docker
import pytest
import torch
import yaml
from PIL import Image

from docker_helpers import ensure_project_image, remove_job_containers
from training_helpers import CLOTHING_DIR, PROJECT_DIR

pytestmark = pytest.mark.slow

FASHION_GAN = [sys.executable, "-c", "from fashion_gan.cli import main; main()"]
# A made-up credential that every job receives through env_vars and that no file may contain.
FAKE_SECRET_NAME = "FASHION_GAN_TEST_SECRET"
PASSED_VARIABLES = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
                    "FASHION_GAN_CACHE", "WANDB_MODE", FAKE_SECRET_NAME]
BACKENDS = ["local", pytest.param("docker", marks=pytest.mark.docker)]


def cli(arguments: list[str], env: dict[str, str], timeout_s: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*FASHION_GAN, *arguments], cwd=PROJECT_DIR, env=env, capture_output=True, text=True,
                          timeout=timeout_s)


def write_floyd_file(path: Path, bucket: str, backend: str = "local", image: str = "fashion-gan:test") -> Path:
    spec = {
        "env": image,
        "machine": "cpu",
        "backend": backend,
        "output": f"s3://{bucket}/store",
        "input": ["clothing/1:photos"],
        "env_vars": PASSED_VARIABLES,
        "description": "lifecycle test",
        "command": "python train.py experiment=fashion_photos",
        "task": {
            "smoke": {
                "command": "python train.py experiment=fashion_photos debug=smoke data.image_size=32 "
                           "trainer.precision=32-true",
            },
        },
    }
    if backend == "local":
        spec["local"] = {"workdir": str(PROJECT_DIR)}
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(params=BACKENDS)
def job_environment(request, s3_bucket, tmp_path):
    if not CLOTHING_DIR.is_dir():
        pytest.skip(f"clothing photos not found at {CLOTHING_DIR}")
    backend = request.param
    # The docker case uses the project image built from the current files (and skips without an engine).
    image = ensure_project_image() if backend == "docker" else "fashion-gan:test"
    photos = tmp_path / "photos"
    for class_dir in sorted(CLOTHING_DIR.iterdir())[:4]:
        (photos / class_dir.name).mkdir(parents=True)
        for image_path in sorted(class_dir.iterdir())[:10]:
            shutil.copy(image_path, photos / class_dir.name / image_path.name)
    secret = f"fake-secret-{secrets.token_hex(16)}"
    env = {**os.environ, "FASHION_GAN_HOME": str(tmp_path / "home"), "FASHION_GAN_CACHE": str(tmp_path / "cache"),
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", FAKE_SECRET_NAME: secret}
    upload = cli(["data", "upload", str(photos), "--name", "clothing", "--storage", f"s3://{s3_bucket}/store"], env)
    assert upload.returncode == 0, upload.stderr
    yield {"env": env, "bucket": s3_bucket, "backend": backend, "image": image, "secret": secret,
           "floyd": write_floyd_file(tmp_path / "floyd.yml", s3_bucket, backend, image), "tmp": tmp_path}
    remove_job_containers(tmp_path / "home" / "jobs")


def submit(job_environment, *arguments: str) -> str:
    result = cli(["run", "-f", str(job_environment["floyd"]), *arguments], job_environment["env"])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def job_state(job_environment, job_id: str) -> str:
    result = cli(["status", job_id], job_environment["env"])
    assert result.returncode == 0, result.stderr
    return result.stdout


def stored_json(bucket: str, key: str) -> dict:
    return json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())


def job_container(job_id: str):
    """Return the container of a docker job: the docker backend names it after the job id."""
    return docker.from_env().containers.get(job_id)


def files_containing(folder: Path, needle: str) -> list[Path]:
    return [path for path in sorted(folder.rglob("*"))
            if path.is_file() and needle.encode() in path.read_bytes()]


def test_job_lifecycle(job_environment):
    job_id = submit(job_environment, "--task", "smoke")

    assert "running" in job_state(job_environment, job_id)
    followed = cli(["logs", job_id, "--follow"], job_environment["env"])
    assert "step 6/6" in followed.stdout
    assert "succeeded" in job_state(job_environment, job_id)

    download = job_environment["tmp"] / "download"
    fetched = cli(["output", job_id, "--dest", str(download)], job_environment["env"])
    assert fetched.returncode == 0, fetched.stderr
    checkpoint = torch.load(download / job_id / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 6
    with Image.open(download / job_id / "samples" / "step_000006.png") as grid:
        assert grid.size == (4 * 34 + 2, 4 * 34 + 2)
    summary = json.loads((download / job_id / "summary.json").read_text())
    assert summary["dataset_source"] == "dataset:clothing/1"
    assert summary["dataset_images"] == 40

    # The pass-through secret reaches no job record, floyd.yml, or output of the run.
    secret = job_environment["secret"]
    assert files_containing(job_environment["tmp"] / "home", secret) == []
    assert files_containing(download, secret) == []
    assert secret not in job_environment["floyd"].read_text()
    if job_environment["backend"] == "docker":
        container = job_container(job_id)
        # The image's USER, which tests/test_docker_backend.py shows has a non-zero uid.
        assert container.attrs["Config"]["User"] == "app"
        assert container.attrs["State"]["ExitCode"] == 0
        # Positive control: the engine did receive the value, which `docker inspect` shows by design.
        assert f"{FAKE_SECRET_NAME}={secret}" in container.attrs["Config"]["Env"]
        image = container.client.images.get(job_environment["image"])
        assert secret not in json.dumps(image.attrs)
        assert secret not in json.dumps(image.history())


def test_job_stop_and_restart(job_environment):
    job_id = submit(job_environment, "--task", "smoke", "--", "trainer.max_steps=300", "trainer.log_every_n_steps=1",
                    "run.checkpoint_every_n_steps=1000", "run.sample_every_n_steps=1000", "data.image_size=16")

    follower = subprocess.Popen([*FASHION_GAN, "logs", job_id, "--follow"], cwd=PROJECT_DIR,
                                env=job_environment["env"], stdout=subprocess.PIPE, text=True)
    for line in follower.stdout:
        if "step 10/300" in line:
            break
    stopped = cli(["stop", job_id], job_environment["env"])
    follower.kill()
    follower.wait()

    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    prefix = f"store/runs/{job_id}"
    summary = stored_json(job_environment["bucket"], f"{prefix}/summary.json")
    assert summary["state"] == "stopped"
    stopped_step = summary["steps"]
    assert 10 <= stopped_step < 300
    assert stored_json(job_environment["bucket"], f"{prefix}/checkpoints/latest.json")["step"] == stopped_step

    stopped_log = cli(["logs", job_id], job_environment["env"]).stdout
    assert f"Stopping after step {stopped_step} because of SIGTERM" in stopped_log
    if job_environment["backend"] == "docker":
        first_container_id = job_container(job_id).id

    restarted = cli(["restart", job_id, "--follow"], job_environment["env"])

    assert restarted.returncode == 0, restarted.stderr
    assert f"Resuming run {job_id} from step {stopped_step}" in restarted.stdout
    if job_environment["backend"] == "docker":
        assert job_container(job_id).id != first_container_id
    assert "succeeded" in job_state(job_environment, job_id)
    summary = stored_json(job_environment["bucket"], f"{prefix}/summary.json")
    assert summary["resumed_from_step"] == stopped_step
    assert summary["steps"] == 300
