"""Tests of the Docker backend against a real local engine, and of the project image.

The engine tests skip with the reason when no engine can be started. The lifecycle tests run
tiny shell commands in the local Debian base image. The image test builds the project image
offline from the wheelhouse, and tests/docker_helpers.py caches it between runs.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
from pathlib import Path

import docker
import docker.errors
import docker.utils.build
import pytest

from fashion_gan.errors import ConfigError, RunnerError
from fashion_gan.runner.backend import JobSpec, JobState, MachineSpec, get_backend
from fashion_gan.runner.docker import JOB_ID_LABEL, TIMEOUT_EXIT_CODE, DockerBackend
from fashion_gan.runner.jobs import load_record, new_job_id, record_path
from docker_helpers import REPO_ROOT, ensure_base_image, ensure_engine, ensure_project_image

CONTAINER_WAIT_TIMEOUT_S = 120
CPU = MachineSpec("cpu", 0)


@pytest.fixture(scope="module")
def engine() -> docker.DockerClient:
    return ensure_engine()


@pytest.fixture(scope="module")
def base_image(engine: docker.DockerClient) -> str:
    return ensure_base_image(engine)


@pytest.fixture
def backend(tmp_path: Path, engine: docker.DockerClient) -> DockerBackend:
    # An empty build context, so submit() reuses existing images and never builds by accident.
    context_dir = tmp_path / "context"
    context_dir.mkdir()
    created = get_backend("docker", {"context": str(context_dir)}, tmp_path / "jobs")
    assert isinstance(created, DockerBackend)
    return created


@pytest.fixture
def job_ids(engine: docker.DockerClient):
    """Hand out job ids and remove their containers after the test."""
    issued: list[str] = []

    def issue() -> str:
        issued.append(new_job_id())
        return issued[-1]

    yield issue
    for job_id in issued:
        for container in engine.containers.list(all=True, filters={"label": f"{JOB_ID_LABEL}={job_id}"}):
            container.remove(force=True)


def make_spec(job_id: str, image: str, script: str, **fields) -> JobSpec:
    return JobSpec(job_id=job_id, image=image, command=["sh", "-c", script], machine=CPU, **fields)


def wait_for_exit(engine: docker.DockerClient, backend: DockerBackend, job_id: str) -> int:
    container_id = load_record(backend.jobs_dir, job_id).handle["container_id"]
    return engine.containers.get(container_id).wait(timeout=CONTAINER_WAIT_TIMEOUT_S)["StatusCode"]


def closed_local_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


# Option checks need no engine.


def test_unknown_option_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="known options: .*network_mode"):
        DockerBackend({"netwrok_mode": "host"}, tmp_path)


def test_secret_build_argument_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        DockerBackend({"build_args": {"WANDB_API_KEY": "x"}}, tmp_path)


def test_unreachable_engine_names_address(tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{closed_local_port()}"
    backend = DockerBackend({"host": address}, tmp_path)
    spec = make_spec(new_job_id(), "unused:latest", "true")
    with pytest.raises(RunnerError, match="cannot reach the Docker engine at tcp://127.0.0.1"):
        backend.submit(spec)
    assert not record_path(tmp_path, spec.job_id).exists()


def test_unreachable_ssh_engine_names_address(tmp_path: Path) -> None:
    address = f"ssh://nobody@127.0.0.1:{closed_local_port()}"
    backend = DockerBackend({"host": address, "use_ssh_client": True}, tmp_path)
    with pytest.raises(RunnerError, match="cannot reach the Docker engine at ssh://nobody@127.0.0.1"):
        backend.client()


def test_unreachable_ssh_docker_host_through_paramiko(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("paramiko", reason="paramiko is a pinned dependency; reinstall the package")
    address = f"ssh://nobody@127.0.0.1:{closed_local_port()}"
    monkeypatch.setenv("DOCKER_HOST", address)
    backend = DockerBackend({}, tmp_path)

    with pytest.raises(RunnerError) as raised:
        backend.client()

    message = str(raised.value)
    assert f"cannot reach the Docker engine at {address}" in message
    assert "Unable to connect" in message
    assert "needs the paramiko package" not in message


def test_dockerignore_keeps_secrets_out(tmp_path: Path) -> None:
    """Apply .dockerignore with the Docker SDK's own matcher to a context full of things to keep out."""
    kept_out = [
        ".env", ".env.local", ".aws/credentials", ".netrc", "deploy.pem", "fashion_gan/server.key",
        ".git/config", ".venv/bin/python", "data/train/a.png", "runs/fg-x/last.ckpt", "outputs/a.txt",
        "multirun/0/a.txt", "wandb/run/a.txt", ".cache/pip/a.whl", "tests/test_a.py",
    ]
    kept_in = ["Dockerfile", "pyproject.toml", "train.py", "conf/config.yaml", "fashion_gan/__init__.py",
               ".cache/wheelhouse/torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl"]
    for relative in kept_out + kept_in:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x")
    patterns = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in patterns if line and not line.startswith("#")]

    included = set(docker.utils.build.exclude_paths(str(tmp_path), patterns))

    for relative in kept_out:
        assert relative not in included, relative
    for relative in kept_in:
        assert relative in included, relative


# Engine tests with tiny commands in the base image.


@pytest.mark.docker
@pytest.mark.slow
def test_lifecycle_running_then_succeeded(engine, base_image, backend, job_ids) -> None:
    job_id = job_ids()
    script = "echo started; while [ ! -e /tmp/finish ]; do sleep 0.1; done; echo finished"
    backend.submit(make_spec(job_id, base_image, script, shm_size_gb=0.25))

    running = backend.status(job_id)
    assert running.state is JobState.RUNNING
    assert running.started_at is not None
    assert running.finished_at is None

    container = engine.containers.get(load_record(backend.jobs_dir, job_id).handle["container_id"])
    assert container.labels[JOB_ID_LABEL] == job_id
    assert container.name == job_id
    assert container.attrs["HostConfig"]["NetworkMode"] == "host"
    assert container.attrs["HostConfig"]["ShmSize"] == 256 * 1024 * 1024

    container.exec_run(["touch", "/tmp/finish"])
    assert wait_for_exit(engine, backend, job_id) == 0

    finished = backend.status(job_id)
    assert finished.state is JobState.SUCCEEDED
    assert finished.exit_code == 0
    assert finished.failure_reason is None
    assert finished.finished_at >= finished.started_at
    assert list(backend.logs(job_id)) == ["started", "finished"]
    assert list(backend.logs(job_id, follow=True)) == ["started", "finished"]


@pytest.mark.docker
@pytest.mark.slow
def test_status_survives_container_removal(engine, base_image, backend, job_ids) -> None:
    job_id = job_ids()
    backend.submit(make_spec(job_id, base_image, "exit 0"))
    wait_for_exit(engine, backend, job_id)
    assert backend.status(job_id).state is JobState.SUCCEEDED

    engine.containers.get(job_id).remove()
    assert backend.status(job_id).state is JobState.SUCCEEDED


@pytest.mark.docker
@pytest.mark.slow
def test_failed_job_reports_last_log_lines(engine, base_image, backend, job_ids) -> None:
    job_id = job_ids()
    backend.submit(make_spec(job_id, base_image, "echo loading data; echo 'no such file: x.png' >&2; exit 3"))
    assert wait_for_exit(engine, backend, job_id) == 3

    status = backend.status(job_id)
    assert status.state is JobState.FAILED
    assert status.exit_code == 3
    assert "exited with code 3" in status.failure_reason
    assert "no such file: x.png" in status.failure_reason


@pytest.mark.docker
@pytest.mark.slow
def test_failure_reason_masks_passthrough_secret(engine, base_image, backend, job_ids, monkeypatch) -> None:
    secret = f"fake-secret-{secrets.token_hex(16)}"
    monkeypatch.setenv("FASHION_GAN_FAKE_PASSTHROUGH", secret)
    job_id = job_ids()
    script = 'echo "connecting with $FASHION_GAN_FAKE_PASSTHROUGH"; exit 4'
    backend.submit(make_spec(job_id, base_image, script, env_passthrough=["FASHION_GAN_FAKE_PASSTHROUGH"]))
    assert wait_for_exit(engine, backend, job_id) == 4

    status = backend.status(job_id)
    assert status.state is JobState.FAILED
    assert "connecting with ***redacted***" in status.failure_reason
    assert secret not in status.failure_reason
    assert secret not in record_path(backend.jobs_dir, job_id).read_text()


@pytest.mark.docker
def test_failed_start_removes_container(engine, base_image, backend, job_ids) -> None:
    job_id = job_ids()
    spec = JobSpec(job_id=job_id, image=base_image, command=["/no/such/program"], machine=CPU)

    with pytest.raises(RunnerError, match=f"starting the container of job {job_id}"):
        backend.submit(spec)
    assert engine.containers.list(all=True, filters={"label": f"{JOB_ID_LABEL}={job_id}"}) == []
    status = backend.status(job_id)
    assert status.state is JobState.FAILED
    assert "the container was not started" in status.failure_reason


@pytest.mark.docker
@pytest.mark.slow
def test_stop_sends_sigterm_then_stopped(engine, base_image, backend, job_ids) -> None:
    job_id = job_ids()
    # `wait` returns as soon as the trap runs, unlike a foreground sleep.
    script = 'trap "echo saving checkpoint; exit 75" TERM; echo ready; while :; do sleep 1 & wait $!; done'
    backend.submit(make_spec(job_id, base_image, script))
    next(line for line in backend.logs(job_id, follow=True) if line == "ready")

    backend.stop(job_id, grace_period_s=30)

    status = backend.status(job_id)
    assert status.state is JobState.STOPPED
    assert status.exit_code == 75
    assert "saving checkpoint" in list(backend.logs(job_id))


@pytest.mark.docker
@pytest.mark.slow
def test_restart_replaces_finished_container(engine, base_image, backend, job_ids) -> None:
    job_id = job_ids()
    spec = make_spec(job_id, base_image, 'echo "run in $HOSTNAME"; exit 75')
    backend.submit(spec)
    assert wait_for_exit(engine, backend, job_id) == 75
    assert backend.status(job_id).state is JobState.STOPPED
    first_container_id = load_record(backend.jobs_dir, job_id).handle["container_id"]

    backend.restart(job_id)

    record = load_record(backend.jobs_dir, job_id)
    assert record.spec == spec
    assert record.handle["container_id"] != first_container_id
    assert "final" not in record.handle
    assert wait_for_exit(engine, backend, job_id) == 75
    containers = engine.containers.list(all=True, filters={"label": f"{JOB_ID_LABEL}={job_id}"})
    assert [container.id for container in containers] == [record.handle["container_id"]]
    assert containers[0].name == job_id
    status = backend.status(job_id)
    assert status.state is JobState.STOPPED
    assert status.exit_code == 75


@pytest.mark.docker
@pytest.mark.slow
def test_restart_of_running_job_rejected(engine, base_image, backend, job_ids) -> None:
    job_id = job_ids()
    script = 'trap "exit 75" TERM; echo ready; while :; do sleep 1 & wait $!; done'
    backend.submit(make_spec(job_id, base_image, script))
    next(line for line in backend.logs(job_id, follow=True) if line == "ready")

    with pytest.raises(RunnerError, match=f"job {job_id} is still running; stop it first"):
        backend.restart(job_id)
    assert backend.status(job_id).state is JobState.RUNNING

    backend.stop(job_id, grace_period_s=30)
    assert backend.status(job_id).state is JobState.STOPPED


@pytest.mark.docker
@pytest.mark.slow
def test_stop_under_max_runtime_limit(engine, base_image, backend, job_ids) -> None:
    # With max_runtime_s, GNU timeout is PID 1 and must pass docker stop's SIGTERM on to the job.
    job_id = job_ids()
    script = 'trap "echo saving checkpoint; exit 75" TERM; echo ready; while :; do sleep 1 & wait $!; done'
    backend.submit(make_spec(job_id, base_image, script, max_runtime_s=600))
    next(line for line in backend.logs(job_id, follow=True) if line == "ready")

    backend.stop(job_id, grace_period_s=30)

    status = backend.status(job_id)
    assert status.state is JobState.STOPPED
    assert status.exit_code == 75


@pytest.mark.docker
@pytest.mark.slow
def test_build_option_rebuilds_image(engine, base_image, tmp_path, job_ids) -> None:
    context_dir = tmp_path / "context"
    context_dir.mkdir()
    image_tag = f"fashion-gan-build-test:{secrets.token_hex(4)}"
    backend = DockerBackend({"context": str(context_dir), "build": True}, tmp_path / "jobs")
    built_ids: list[str] = []
    try:
        (context_dir / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo first > /version.txt\n")
        built_ids.append(backend.ensure_image(image_tag).id)
        (context_dir / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo second > /version.txt\n")
        built_ids.append(backend.ensure_image(image_tag).id)
        assert built_ids[1] != built_ids[0]

        job_id = job_ids()
        backend.submit(make_spec(job_id, image_tag, "cat /version.txt"))
        assert wait_for_exit(engine, backend, job_id) == 0
        assert list(backend.logs(job_id)) == ["second"]
    finally:
        for container in engine.containers.list(all=True, filters={"ancestor": image_tag}):
            container.remove(force=True)
        for image_id in built_ids:
            engine.images.remove(image_id, force=True)


@pytest.mark.docker
@pytest.mark.slow
def test_stop_of_job_ignoring_sigterm(engine, base_image, backend, job_ids) -> None:
    job_id = job_ids()
    script = 'trap "" TERM; echo ready; while :; do sleep 1; done'
    backend.submit(make_spec(job_id, base_image, script))
    next(line for line in backend.logs(job_id, follow=True) if line == "ready")

    backend.stop(job_id, grace_period_s=1)

    status = backend.status(job_id)
    assert status.state is JobState.STOPPED
    assert status.exit_code == 137
    assert "may not have saved a checkpoint" in status.failure_reason


@pytest.mark.docker
@pytest.mark.slow
def test_max_runtime_times_out(engine, base_image, backend, job_ids) -> None:
    job_id = job_ids()
    script = 'trap "echo saving checkpoint; exit 75" TERM; while :; do sleep 1 & wait $!; done'
    backend.submit(make_spec(job_id, base_image, script, max_runtime_s=1))
    assert load_record(backend.jobs_dir, job_id).handle["deadline"] is not None

    assert wait_for_exit(engine, backend, job_id) == TIMEOUT_EXIT_CODE
    status = backend.status(job_id)
    assert status.state is JobState.TIMED_OUT
    assert "max_runtime of 1 s" in status.failure_reason
    assert "saving checkpoint" in list(backend.logs(job_id))


@pytest.mark.docker
def test_gpu_job_without_nvidia_runtime(engine, base_image, backend, job_ids) -> None:
    if "nvidia" in (engine.info().get("Runtimes") or {}):
        pytest.skip("this engine has the NVIDIA runtime, so a GPU job would start")
    job_id = job_ids()
    spec = make_spec(job_id, base_image, "true")
    spec.machine = MachineSpec("gpu2", 2)

    with pytest.raises(RunnerError, match="no NVIDIA runtime") as raised:
        backend.submit(spec)
    assert "requests 2 GPU(s)" in str(raised.value)
    assert not record_path(backend.jobs_dir, job_id).exists()
    assert engine.containers.list(all=True, filters={"label": f"{JOB_ID_LABEL}={job_id}"}) == []


@pytest.mark.docker
@pytest.mark.slow
def test_secret_not_in_record_or_image(engine, base_image, tmp_path, job_ids, monkeypatch) -> None:
    """A pass-through secret reaches the job but no file or image layer.

    The backend builds a small image from the base image (it is missing and the context has a
    Dockerfile) while the secret is set, then the whole image is read with `docker save` and searched,
    layers included. The lifecycle tests check the project image's metadata and history, the job
    records and the run outputs of a real training job.
    """
    secret = f"fake-secret-{secrets.token_hex(16)}"
    monkeypatch.setenv("FASHION_GAN_FAKE_SECRET", secret)
    context_dir = tmp_path / "context"
    context_dir.mkdir()
    # The marker is a positive control that shows the search reads file contents in the layers. It is
    # joined only inside the RUN step, so the image history contains its two halves but not the marker.
    marker_suffix = secrets.token_hex(16)
    layer_marker = f"layer-marker-{marker_suffix}"
    (context_dir / "Dockerfile").write_text(
        f"FROM {base_image}\nRUN printf '%s-%s' layer-marker {marker_suffix} > /marker.txt\n"
    )
    image_tag = f"fashion-gan-secret-test:{secrets.token_hex(4)}"
    backend = DockerBackend({"context": str(context_dir)}, tmp_path / "jobs")
    job_id = job_ids()
    script = 'printf %s "$FASHION_GAN_FAKE_SECRET" | sha256sum | cut -d " " -f 1'
    try:
        backend.submit(make_spec(job_id, image_tag, script, env_passthrough=["FASHION_GAN_FAKE_SECRET"]))
        assert wait_for_exit(engine, backend, job_id) == 0
        assert list(backend.logs(job_id)) == [hashlib.sha256(secret.encode()).hexdigest()]
        backend.status(job_id)

        record_text = record_path(backend.jobs_dir, job_id).read_text()
        assert "FASHION_GAN_FAKE_SECRET" in json.loads(record_text)["spec"]["env_passthrough"]
        for path in backend.jobs_dir.rglob("*"):
            if path.is_file():
                assert secret not in path.read_text(errors="replace"), path

        image = engine.images.get(image_tag)
        assert image.labels is None or secret not in json.dumps(image.labels)
        assert secret not in json.dumps(image.attrs)
        assert secret not in json.dumps(image.history())
        assert layer_marker not in json.dumps(image.history())
        assert saved_image_contains(image, layer_marker.encode())
        assert not saved_image_contains(image, secret.encode())
    finally:
        for container in engine.containers.list(all=True, filters={"label": f"{JOB_ID_LABEL}={job_id}"}):
            container.remove(force=True)
        engine.images.remove(image_tag, force=True)


def saved_image_contains(image, needle: bytes) -> bool:
    """Search the `docker save` stream of `image` (config, history and uncompressed layer tars)."""
    tail = b""
    for chunk in image.save(named=True):
        window = tail + chunk
        if needle in window:
            return True
        tail = window[-(len(needle) - 1):]
    return False


# The project image, built offline from the wheelhouse.


@pytest.mark.docker
@pytest.mark.slow
def test_project_image_runs_as_non_root(engine, tmp_path, job_ids) -> None:
    image_tag = ensure_project_image()
    image = engine.images.get(image_tag)
    assert image.attrs["Config"]["User"] == "app"
    assert image.attrs["Config"]["Entrypoint"] == ["python", "train.py"]
    assert image.attrs["Config"]["WorkingDir"] == "/app"

    backend = DockerBackend({"context": str(tmp_path)}, tmp_path / "jobs")
    job_id = job_ids()
    script = (
        "id -u; touch /app/probe && echo workdir writable; "
        "python -c 'import torch, torchvision, pytorch_lightning, hydra, boto3, wandb, docker, fashion_gan; "
        "print(torch.__version__)'"
    )
    backend.submit(make_spec(job_id, image_tag, script))
    assert wait_for_exit(engine, backend, job_id) == 0

    uid_line, workdir_line, torch_line = list(backend.logs(job_id))[-3:]
    assert uid_line.isdigit()
    assert int(uid_line) != 0
    assert workdir_line == "workdir writable"
    assert torch_line.startswith("2.14.1")
