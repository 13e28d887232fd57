"""Docker backend: run a job as a detached container on a local or remote Docker engine.

The engine is the one `docker.from_env()` finds (`DOCKER_HOST`, including `ssh://user@host`, TLS
variables, the CLI context), or the `host` option. Each job is one container named after the job
id and labelled `fashion-gan.job-id=<id>`. The container is kept after it exits, so its exit code
and logs stay readable; remove finished ones with `docker container prune --filter label=fashion-gan.job-id`.

`max_runtime_s` is enforced inside the engine: the command runs under GNU `timeout`, which sends
SIGTERM at the limit, SIGKILL `TIMEOUT_KILL_AFTER_S` later, and exits with 124. So the limit applies
even when no client polls the job, but the image needs `timeout` (coreutils). As a backstop,
`status()` stops a container that still runs past the recorded deadline plus that grace period.

Pass-through variables (`env_vars` in floyd.yml) are read from this shell at submit and handed to
the engine only. The job record stores their names. Anyone with access to the engine can still
read the values with `docker inspect <container>`, as for any container environment.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

import docker
import docker.errors
import docker.types

from fashion_gan.errors import ConfigError, RunnerError
from fashion_gan.redaction import is_secret_name, redact_text, secret_values
from fashion_gan.runner.backend import Backend, JobSpec, JobState, JobStatus, MachineSpec, resolve_environment
from fashion_gan.runner.jobs import create_record, load_record, record_path, update_handle

log = logging.getLogger(__name__)

JOB_ID_LABEL = "fashion-gan.job-id"
DEFAULT_NETWORK_MODE = "host"
# Seconds between SIGTERM and SIGKILL when max_runtime_s expires: time to save and upload a checkpoint.
TIMEOUT_KILL_AFTER_S = 60
# Exit status of GNU `timeout` when the time limit expired (coreutils documents 124).
TIMEOUT_EXIT_CODE = 124
# Exit status of a process killed with SIGKILL (128 + 9).
SIGKILL_EXIT_CODE = 137
PREEMPTED_EXIT_CODE = 75
# Engine states of a container whose process has started and not yet exited.
_ACTIVE_CONTAINER_STATES = ("running", "paused", "restarting")
FAILURE_LOG_LINES = 20
# Shorter pass-through values are not masked in failure reasons, because they would mask ordinary words.
MIN_REDACTED_LENGTH = 6
_OPTION_TYPES: dict[str, type] = {
    "build": bool,
    "build_args": dict,
    "context": str,
    "dockerfile": str,
    "host": str,
    "network_mode": str,
    "use_ssh_client": bool,
    "user": str,
}


class DockerBackend(Backend):
    """Backend that runs each job as a container on a Docker engine.

    Options (the `docker:` block of floyd.yml):
      build: rebuild the image from the Dockerfile even if it exists (default false). Without it,
        a missing image is built when the context has a Dockerfile and pulled otherwise.
      context: build context folder (default: the current folder). In floyd.yml a relative path
        is relative to the folder of floyd.yml.
      dockerfile: Dockerfile path inside the context (default "Dockerfile").
      build_args: build arguments, which must not be secrets because the image stores them.
      host: engine URL such as ssh://user@gpu-box or tcp://host:2376 (default: DOCKER_HOST).
      use_ssh_client: reach ssh:// engines through the `ssh` program instead of paramiko.
      network_mode: container network (default "host").
      user: user[:group] the job runs as (default: the image's USER).
    """

    name: ClassVar[str] = "docker"
    known_options: ClassVar[frozenset[str]] = frozenset(_OPTION_TYPES)

    def __init__(self, options: dict[str, Any], jobs_dir: Path) -> None:
        super().__init__(options, jobs_dir)
        _validate_options(self.options)
        self._client: docker.DockerClient | None = None

    # Engine and image

    @property
    def engine_address(self) -> str:
        """URL of the engine this backend connects to, for messages."""
        return self.options.get("host") or os.environ.get("DOCKER_HOST") or "the default local socket"

    def client(self) -> docker.DockerClient:
        """Return a connected Docker client, connecting on first use."""
        if self._client is not None:
            return self._client
        use_ssh_client = self.options.get("use_ssh_client", False)
        try:
            if "host" in self.options:
                client = docker.DockerClient(base_url=self.options["host"], use_ssh_client=use_ssh_client)
            else:
                client = docker.from_env(use_ssh_client=use_ssh_client)
            client.ping()
        except _connection_errors() as err:
            # The Docker SDK 7.2 imports paramiko for every ssh:// engine, also with use_ssh_client.
            ssh_hint = (" ssh:// engines need the paramiko package, a pinned dependency of fashion-gan; reinstall "
                        "fashion-gan to get it." if "paramiko" in str(err) else "")
            raise RunnerError(
                f"cannot reach the Docker engine at {self.engine_address}: {err}.{ssh_hint} Start the engine "
                "(scripts/start-dockerd.sh on this machine) or point DOCKER_HOST or the docker `host` option at one"
            ) from err
        log.debug("connected to the Docker engine at %s", self.engine_address)
        self._client = client
        return client

    def check_gpu_support(self, machine: MachineSpec) -> None:
        """Raise RunnerError when `machine` requests GPUs and the engine has no NVIDIA runtime."""
        if machine.gpu_count == 0:
            return
        runtimes = self.client().info().get("Runtimes") or {}
        if "nvidia" not in runtimes:
            raise RunnerError(
                f"machine {machine.name!r} requests {machine.gpu_count} GPU(s), but the Docker engine at "
                f"{self.engine_address} has no NVIDIA runtime (runtimes: {', '.join(sorted(runtimes)) or 'none'}). "
                "Install the NVIDIA Container Toolkit on that host and run "
                "`nvidia-ctk runtime configure --runtime=docker`, or use machine: cpu"
            )

    def ensure_image(self, tag: str) -> docker.models.images.Image:
        """Return the image `tag`: reuse it, build it from the Dockerfile, or pull it.

        It is built when the `build` option is true, or when it is missing and the build context
        has a Dockerfile. A missing image without a Dockerfile is pulled.
        """
        client = self.client()
        context_dir = Path(self.options.get("context", ".")).expanduser().resolve()
        dockerfile = self.options.get("dockerfile", "Dockerfile")
        has_dockerfile = (context_dir / dockerfile).is_file()
        try:
            image = client.images.get(tag)
        except docker.errors.ImageNotFound:
            image = None

        if self.options.get("build", False):
            if not has_dockerfile:
                raise RunnerError(
                    f"the docker option build is true, but {context_dir / dockerfile} does not exist; "
                    "set the `context` and `dockerfile` options to the folder and file to build"
                )
            return self._build_image(tag, context_dir, dockerfile)
        if image is not None:
            log.info("reusing image %s (%s)", tag, image.short_id)
            return image
        if has_dockerfile:
            return self._build_image(tag, context_dir, dockerfile)
        log.info("image %s not found on the engine and no Dockerfile in %s; pulling it", tag, context_dir)
        try:
            return client.images.pull(tag)
        except docker.errors.APIError as err:
            raise RunnerError(
                f"image {tag} is not on the engine at {self.engine_address} and pulling it failed: {err}. "
                "Build it (put a Dockerfile in the context folder or set the docker `context` option) or fix the name"
            ) from err

    def _build_image(self, tag: str, context_dir: Path, dockerfile: str) -> docker.models.images.Image:
        build_args = {str(name): str(value) for name, value in self.options.get("build_args", {}).items()}
        log.info("building image %s from %s in %s (build arguments: %s)", tag, dockerfile, context_dir,
                 ", ".join(sorted(build_args)) or "none")
        started = time.monotonic()
        try:
            image, build_log = self.client().images.build(
                path=str(context_dir),
                dockerfile=dockerfile,
                tag=tag,
                buildargs=build_args,
                network_mode=self.options.get("network_mode", DEFAULT_NETWORK_MODE),
                rm=True,
                forcerm=True,
            )
        except docker.errors.BuildError as err:
            output = "".join(str(chunk.get("stream") or chunk.get("error") or "") for chunk in err.build_log)
            last_lines = "\n".join(output.splitlines()[-FAILURE_LOG_LINES:])
            raise RunnerError(f"building image {tag} from {context_dir / dockerfile} failed: {err.msg}\n{last_lines}") from err
        except docker.errors.APIError as err:
            raise RunnerError(f"building image {tag} from {context_dir / dockerfile} failed: {err}") from err
        for chunk in build_log:
            if chunk.get("stream", "").strip():
                log.debug("docker build: %s", chunk["stream"].rstrip())
        log.info("built image %s (%s) in %.0f s", tag, image.short_id, time.monotonic() - started)
        return image

    # Job lifecycle

    def submit(self, spec: JobSpec) -> None:
        if spec.instance_count != 1:
            raise RunnerError(
                f"the docker backend runs one container per job, but instance_count is {spec.instance_count}; "
                "set instance_count: 1 or use the sagemaker backend"
            )
        if spec.spot:
            log.warning("spot: true has no effect on the docker backend; job %s runs on the engine's host", spec.job_id)
        if not spec.command:
            raise RunnerError(f"job {spec.job_id} has an empty command")
        self.check_gpu_support(spec.machine)
        image = self.ensure_image(spec.image)

        if not record_path(self.jobs_dir, spec.job_id).exists():
            create_record(self.jobs_dir, spec, self.name)
        self._run_container(spec, image)

    def restart(self, job_id: str) -> None:
        """Run a finished job again in a new container with the same job id and container name.

        The stored spec is reused, so the command keeps `run.id=<job id>` and train.py resumes the run
        from its latest checkpoint. The image is the one the spec's tag names now, and pass-through
        variables are read from this shell again. The old container is removed first, with its logs.
        """
        record = load_record(self.jobs_dir, job_id)
        spec = record.spec
        self._remove_finished_container(job_id)
        self.check_gpu_support(spec.machine)
        image = self.ensure_image(spec.image)
        create_record(self.jobs_dir, spec, self.name, replace=True)
        log.info("restarting job %s in a new container", job_id)
        self._run_container(spec, image)

    def _run_container(self, spec: JobSpec, image: docker.models.images.Image) -> None:
        """Start the job's container from `image` and store its handle in the job record."""
        entrypoint, command = _wrap_command(spec.command, spec.max_runtime_s)
        run_arguments: dict[str, Any] = {
            "image": image.id,
            "entrypoint": entrypoint,
            "command": command,
            "name": spec.job_id,
            "detach": True,
            # Values of pass-through variables go to the engine only, never to the job record.
            "environment": resolve_environment(spec),
            "labels": {JOB_ID_LABEL: spec.job_id},
            "network_mode": self.options.get("network_mode", DEFAULT_NETWORK_MODE),
            "shm_size": f"{max(1, round(spec.shm_size_gb * 1024))}m",
            "mounts": _local_mounts(spec),
        }
        if spec.machine.gpu_count:
            run_arguments["device_requests"] = [
                docker.types.DeviceRequest(count=spec.machine.gpu_count, capabilities=[["gpu"]])
            ]
        if "user" in self.options:
            run_arguments["user"] = self.options["user"]
        log.debug("starting container for job %s: image %s, entrypoint %s, command %s", spec.job_id, spec.image,
                  entrypoint, command)
        try:
            container = self.client().containers.run(**run_arguments)
        except docker.errors.DockerException as err:
            # A container that was created but failed to start still contains the environment, secrets included.
            self._remove_container_quietly(spec.job_id)
            update_handle(self.jobs_dir, spec.job_id, submit_error=str(err))
            raise RunnerError(f"starting the container of job {spec.job_id} on {self.engine_address} failed: {err}") from err

        deadline = None
        if spec.max_runtime_s is not None:
            deadline = (datetime.now(UTC) + timedelta(seconds=spec.max_runtime_s)).isoformat()
        update_handle(
            self.jobs_dir,
            spec.job_id,
            container_id=container.id,
            image_id=image.id,
            engine=self.engine_address,
            deadline=deadline,
        )
        log.info("job %s started in container %s on %s (image %s)", spec.job_id, container.short_id,
                 self.engine_address, spec.image)

    def status(self, job_id: str) -> JobStatus:
        record = load_record(self.jobs_dir, job_id)
        handle = record.handle
        status = JobStatus(
            job_id=job_id,
            backend=self.name,
            state=JobState.QUEUED,
            created_at=record.created_at,
            started_at=None,
            finished_at=None,
            machine=record.spec.machine.name,
            description=record.spec.description,
        )
        if "final" in handle:
            return _apply_final(status, handle["final"])
        if "container_id" not in handle:
            status.state = JobState.FAILED
            status.failure_reason = f"the container was not started: {handle.get('submit_error', 'unknown error')}"
            return status

        container = self._container(job_id, handle)
        container_state = container.attrs["State"]
        status.started_at = _parse_docker_time(container_state.get("StartedAt"))
        status.finished_at = _parse_docker_time(container_state.get("FinishedAt"))
        engine_status = container_state.get("Status")
        if engine_status == "created":
            return status
        if engine_status in (*_ACTIVE_CONTAINER_STATES, "removing"):
            status.state = JobState.RUNNING
            self._stop_if_past_deadline(job_id, handle, container)
            return status

        exit_code = int(container_state.get("ExitCode", -1))
        state, reason = _classify_exit(exit_code, handle, record.spec.max_runtime_s, container_state)
        if state is JobState.FAILED:
            # The reason is stored in the job record, so secrets the job printed are masked.
            log_tail = redact_text(self._log_tail(container), _secret_values_for(record.spec))
            reason = f"{reason}; last log lines:\n{log_tail}"
        status.state, status.failure_reason, status.exit_code = state, reason, exit_code
        final = {
            "state": state.value,
            "failure_reason": reason,
            "exit_code": exit_code,
            "started_at": status.started_at.isoformat() if status.started_at else None,
            "finished_at": status.finished_at.isoformat() if status.finished_at else None,
        }
        update_handle(self.jobs_dir, job_id, final=final)
        return status

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        record = load_record(self.jobs_dir, job_id)
        if "container_id" not in record.handle:
            raise RunnerError(f"job {job_id} has no container, so no logs: {record.handle.get('submit_error')}")
        container = self._container(job_id, record.handle)
        if not follow:
            yield from container.logs(stdout=True, stderr=True).decode("utf-8", "replace").splitlines()
            return
        # The stream yields chunks as the engine sends them, which need not end at a line break.
        pending = ""
        for chunk in container.logs(stdout=True, stderr=True, stream=True, follow=True):
            pending += chunk.decode("utf-8", "replace")
            *lines, pending = pending.split("\n")
            for line in lines:
                yield line.rstrip("\r")
        if pending:
            yield pending

    def stop(self, job_id: str, grace_period_s: float = 30.0) -> None:
        record = load_record(self.jobs_dir, job_id)
        if "container_id" not in record.handle:
            log.info("job %s has no container to stop", job_id)
            return
        container = self._container(job_id, record.handle)
        if container.status not in ("created", *_ACTIVE_CONTAINER_STATES):
            log.info("job %s already finished (container %s)", job_id, container.status)
            return
        update_handle(self.jobs_dir, job_id, stop_requested=True)
        grace_s = max(0, math.ceil(grace_period_s))
        log.info("stopping job %s: SIGTERM now, SIGKILL after %d s", job_id, grace_s)
        try:
            container.stop(timeout=grace_s)
        except docker.errors.APIError as err:
            raise RunnerError(f"stopping container {container.short_id} of job {job_id} failed: {err}") from err

    # Helpers

    def _container(self, job_id: str, handle: dict[str, Any]) -> docker.models.containers.Container:
        try:
            return self.client().containers.get(handle["container_id"])
        except docker.errors.NotFound:
            raise RunnerError(
                f"container {handle['container_id'][:12]} of job {job_id} no longer exists on "
                f"{handle.get('engine', self.engine_address)}; it was removed before its final state was read"
            ) from None
        except docker.errors.APIError as err:
            raise RunnerError(f"reading container of job {job_id} failed: {err}") from err

    def _remove_finished_container(self, job_id: str) -> None:
        """Remove the container named `job_id`, so a new one can take its name; reject a running one."""
        try:
            container = self.client().containers.get(job_id)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as err:
            raise RunnerError(f"reading container of job {job_id} failed: {err}") from err
        if container.labels.get(JOB_ID_LABEL) != job_id:
            raise RunnerError(
                f"container {job_id} on {self.engine_address} is not labelled {JOB_ID_LABEL}={job_id}, so it "
                "belongs to something else; rename or remove it, then restart the job"
            )
        if container.status in _ACTIVE_CONTAINER_STATES:
            raise RunnerError(f"job {job_id} is still {container.status}; stop it first with `fashion-gan stop {job_id}`")
        log.info("removing the %s container %s of job %s", container.status, container.short_id, job_id)
        try:
            container.remove()
        except docker.errors.APIError as err:
            raise RunnerError(f"removing container {container.short_id} of job {job_id} failed: {err}") from err

    def _remove_container_quietly(self, name: str) -> None:
        try:
            self.client().containers.get(name).remove(force=True)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as err:
            log.warning("removing container %s after a failed start failed: %s", name, err)

    def _log_tail(self, container: docker.models.containers.Container) -> str:
        try:
            return container.logs(stdout=True, stderr=True, tail=FAILURE_LOG_LINES).decode("utf-8", "replace").rstrip()
        except docker.errors.APIError as err:
            return f"(logs unavailable: {err})"

    def _stop_if_past_deadline(self, job_id: str, handle: dict[str, Any],
                               container: docker.models.containers.Container) -> None:
        """Stop a container that outlived max_runtime_s plus the kill grace period.

        This is a backstop: `timeout` inside the container normally ends the job at the deadline.
        """
        if not handle.get("deadline"):
            return
        hard_deadline = datetime.fromisoformat(handle["deadline"]) + timedelta(seconds=TIMEOUT_KILL_AFTER_S + 30)
        if datetime.now(UTC) < hard_deadline:
            return
        log.warning("job %s is still running past its max_runtime deadline %s; stopping it", job_id, handle["deadline"])
        update_handle(self.jobs_dir, job_id, timed_out=True)
        container.stop(timeout=TIMEOUT_KILL_AFTER_S)


def _connection_errors() -> tuple[type[Exception], ...]:
    """Return the exceptions that connecting to an engine raises.

    Besides DockerException, an ssh:// engine reached through paramiko raises paramiko's own errors:
    NoValidConnectionsError (an OSError) for a refused connection and SSHException for a rejected
    host key or failed authentication.
    """
    errors: tuple[type[Exception], ...] = (docker.errors.DockerException, OSError)
    try:
        import paramiko
    except ImportError:
        return errors
    return (*errors, paramiko.SSHException)


def _validate_options(options: dict[str, Any]) -> None:
    for key, value in options.items():
        expected = _OPTION_TYPES[key]
        if not isinstance(value, expected):
            raise ConfigError(f"invalid docker option {key}={value!r}: expected {expected.__name__}")
    for name in options.get("build_args", {}):
        # Rejected because the image stores its build arguments in its metadata.
        if is_secret_name(str(name)):
            raise ConfigError(
                f"invalid docker build argument {name!r}: build arguments are stored in the image, so they "
                "must not carry secrets; list the variable under env_vars to pass it to the job at run time"
            )


def _secret_values_for(spec: JobSpec) -> list[str]:
    """Return the secret values of this shell plus the job's pass-through values, longest first."""
    values = set(secret_values())
    values.update(os.environ[name] for name in spec.env_passthrough
                  if len(os.environ.get(name, "")) >= MIN_REDACTED_LENGTH)
    return sorted(values, key=len, reverse=True)


def _wrap_command(command: list[str], max_runtime_s: int | None) -> tuple[list[str], list[str]]:
    """Split the job command into the container entrypoint and arguments.

    The entrypoint is always set, so the command runs the same with any image ENTRYPOINT.
    With a runtime limit, GNU `timeout` becomes PID 1 and forwards `docker stop`'s SIGTERM to the job.
    """
    if max_runtime_s is None:
        return [command[0]], list(command[1:])
    limit = ["timeout", "--signal=TERM", f"--kill-after={TIMEOUT_KILL_AFTER_S}", str(int(max_runtime_s))]
    return [*limit, command[0]], list(command[1:])


def _local_path(text: str) -> str | None:
    """Return the absolute local path of a plain path or file:// URI, else None."""
    if text.startswith("file://"):
        path = urlparse(text).path
        return path if path.startswith("/") else None
    if text.startswith("/"):
        return text
    return None


def _local_mounts(spec: JobSpec) -> list[docker.types.Mount]:
    """Bind-mount local output and input folders at the same path, so the command's paths stay valid.

    The paths are on the engine's host, so they only make sense for a local engine.
    """
    mounts = []
    output_path = _local_path(spec.output_uri) if spec.output_uri else None
    if output_path:
        Path(output_path).mkdir(parents=True, exist_ok=True)
        mounts.append(docker.types.Mount(target=output_path, source=output_path, type="bind"))
    for mount in spec.inputs:
        input_path = _local_path(mount.source)
        if input_path and input_path != output_path:
            mounts.append(docker.types.Mount(target=input_path, source=input_path, type="bind", read_only=True))
        elif not input_path and mount.source.startswith((".", "~")):
            # NOTE: relative input paths are not mounted; train.py still gets them through data.source.
            log.warning("input %s is a relative path and is not mounted into the container; use an absolute path",
                        mount.source)
    return mounts


_FRACTION_PATTERN = re.compile(r"\.(\d{6})\d+")


def _parse_docker_time(text: str | None) -> datetime | None:
    """Parse an engine timestamp (RFC 3339 with nanoseconds). The zero time means "never" and gives None."""
    if not text or text.startswith("0001-01-01"):
        return None
    return datetime.fromisoformat(_FRACTION_PATTERN.sub(r".\1", text).replace("Z", "+00:00"))


def _classify_exit(exit_code: int, handle: dict[str, Any], max_runtime_s: int | None,
                   container_state: dict[str, Any]) -> tuple[JobState, str | None]:
    """Map a finished container's exit code to a job state and a reason."""
    if exit_code == 0:
        return JobState.SUCCEEDED, None
    if handle.get("timed_out") or (max_runtime_s is not None and exit_code == TIMEOUT_EXIT_CODE):
        return JobState.TIMED_OUT, f"exceeded max_runtime of {max_runtime_s} s (exit code {exit_code})"
    if exit_code == PREEMPTED_EXIT_CODE:
        return JobState.STOPPED, None
    if handle.get("stop_requested"):
        return JobState.STOPPED, (
            f"stopped on request, but the job exited with {exit_code} instead of {PREEMPTED_EXIT_CODE}, "
            "so it may not have saved a checkpoint"
        )
    if container_state.get("OOMKilled"):
        return JobState.FAILED, f"killed for running out of memory (exit code {exit_code})"
    return JobState.FAILED, f"exited with code {exit_code}"


def _apply_final(status: JobStatus, final: dict[str, Any]) -> JobStatus:
    status.state = JobState(final["state"])
    status.failure_reason = final.get("failure_reason")
    status.exit_code = final.get("exit_code")
    status.started_at = datetime.fromisoformat(final["started_at"]) if final.get("started_at") else None
    status.finished_at = datetime.fromisoformat(final["finished_at"]) if final.get("finished_at") else None
    return status
