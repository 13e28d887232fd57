"""The job backend interface, the job spec and status types, and the backend registry.

A backend runs one resolved `JobSpec` somewhere (a local process, a Docker container, a
SageMaker training job) and reports its `JobStatus`. Backends keep their own handle (pid,
container id, SageMaker job name) in the job record that `fashion_gan.runner.jobs` stores
under `<jobs_dir>/<job_id>.json`.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from fashion_gan.errors import ConfigError, RunnerError

log = logging.getLogger(__name__)


class JobState(str, Enum):
    """Lifecycle state of a job; the value is the text shown to users."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    TIMED_OUT = "timed out"

    @property
    def is_finished(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


_MACHINE_PATTERN = re.compile(r"^(cpu|gpu)(\d*)$")


@dataclass(frozen=True)
class MachineSpec:
    """Machine class of a job: `cpu`, `gpu` (one GPU) or `gpuN` (N GPUs)."""

    name: str
    gpu_count: int


def parse_machine(text: str) -> MachineSpec:
    """Parse a FloydHub machine name (`cpu`, `gpu`, `gpu2`, …) into a `MachineSpec`."""
    match = _MACHINE_PATTERN.match(str(text).strip().lower())
    if match is None or (match.group(1) == "cpu" and match.group(2)):
        raise ConfigError(
            f"invalid machine {text!r}: expected 'cpu', 'gpu' or 'gpuN' with N GPUs (for example 'gpu2')"
        )
    kind, count_text = match.groups()
    if kind == "cpu":
        return MachineSpec("cpu", 0)
    gpu_count = int(count_text) if count_text else 1
    if gpu_count < 1:
        raise ConfigError(f"invalid machine {text!r}: the GPU count must be at least 1")
    name = "gpu" if gpu_count == 1 else f"gpu{gpu_count}"
    return MachineSpec(name, gpu_count)


@dataclass(frozen=True)
class InputMount:
    """One job input: a dataset (`NAME/N`, `NAME`), an earlier job's output (`jobs/<id>`) or a URI,
    made available to the job at `destination`."""

    source: str
    destination: str


@dataclass
class JobSpec:
    """A fully resolved job, ready for a backend.

    `env` contains non-secret values set by the runner and written to the job record.
    `env_passthrough` contains only variable NAMES: their values are read from `os.environ` when the
    job is submitted (see `resolve_environment`) and never written to any file.
    """

    job_id: str
    image: str
    command: list[str]
    machine: MachineSpec
    env: dict[str, str] = field(default_factory=dict)
    env_passthrough: list[str] = field(default_factory=list)
    inputs: list[InputMount] = field(default_factory=list)
    output_uri: str = ""
    description: str = ""
    max_runtime_s: int | None = None
    spot: bool = False
    shm_size_gb: float = 1.0
    instance_count: int = 1
    backend_options: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable copy (pass-through names only, never their values)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        values = dict(data)
        values["machine"] = MachineSpec(**values["machine"])
        values["inputs"] = [InputMount(**item) for item in values.get("inputs", [])]
        return cls(**values)


@dataclass
class JobStatus:
    """State of one job as its backend reports it. Times are timezone-aware UTC datetimes."""

    job_id: str
    backend: str
    state: JobState
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    machine: str
    description: str
    failure_reason: str | None = None
    exit_code: int | None = None


def resolve_environment(spec: JobSpec) -> dict[str, str]:
    """Return the job's environment: `spec.env` plus the pass-through variables' current values.

    Call this only at submit time and hand the result straight to the backend API; never store it.
    A pass-through name that is not set in this shell is skipped with a warning.
    """
    environment = dict(spec.env)
    for name in spec.env_passthrough:
        value = os.environ.get(name)
        if value is None:
            log.warning("pass-through variable %s is not set in this shell; the job runs without it", name)
            continue
        environment[name] = value
    return environment


class Backend(ABC):
    """A place that runs jobs. Subclasses set `name` and `known_options` and live in their own module."""

    name: ClassVar[str]
    known_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, options: dict[str, Any], jobs_dir: Path) -> None:
        unknown = sorted(set(options) - self.known_options)
        if unknown:
            known = ", ".join(sorted(self.known_options)) or "none"
            closest = difflib.get_close_matches(unknown[0], sorted(self.known_options), n=1)
            hint = f" (did you mean {closest[0]!r}?)" if closest else ""
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)}{hint} for backend {self.name!r}; known options: {known}"
            )
        self.options = dict(options)
        self.jobs_dir = Path(jobs_dir)

    @abstractmethod
    def submit(self, spec: JobSpec) -> None:
        """Start the job and store the backend's handle in the job record."""

    @abstractmethod
    def status(self, job_id: str) -> JobStatus:
        """Return the job's current state."""

    @abstractmethod
    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        """Yield the job's log lines (without trailing newlines); with `follow`, until the job ends."""

    @abstractmethod
    def stop(self, job_id: str, grace_period_s: float = 30.0) -> None:
        """Ask the job to stop (SIGTERM or the platform's equivalent), forcing it after the grace period."""

    def restart(self, job_id: str) -> None:
        """Run a finished job again under the same id, so training resumes from its latest checkpoint."""
        raise RunnerError(
            f"The {self.name} backend cannot restart job {job_id}. Submit a new job with "
            f"`fashion-gan run -- run.id={job_id}` to resume the same run."
        )

    def outputs(self, job_id: str, dest_dir: Path) -> Path:
        """Download `<output_uri>/runs/<job_id>/` into `dest_dir/<job_id>` and return that folder."""
        from fashion_gan.runner.jobs import load_record
        from fashion_gan.storage import open_store

        record = load_record(self.jobs_dir, job_id)
        if not record.spec.output_uri:
            raise RunnerError(f"job {job_id} has no output URI; set `output:` in floyd.yml")
        run_uri = record.spec.output_uri.rstrip("/") + f"/runs/{job_id}"
        store = open_store(run_uri)
        keys = [info.key for info in store.list()]
        if not keys:
            raise RunnerError(f"no outputs found at {run_uri}; check `fashion-gan status {job_id}`")
        target = Path(dest_dir) / job_id
        store.download_many(keys, target, f"outputs of {job_id}")
        return target


# Registry of backend names to modules, imported only when asked for, so that `fashion-gan --help`
# and the local backend need neither boto3 nor the Docker SDK.
BACKEND_MODULES: dict[str, str] = {
    "local": "fashion_gan.runner.local",
    "docker": "fashion_gan.runner.docker",
    "sagemaker": "fashion_gan.runner.sagemaker",
}


def backend_class(name: str) -> type[Backend]:
    """Import and return the backend class registered under `name`."""
    module_name = BACKEND_MODULES.get(name)
    if module_name is None:
        raise ConfigError(f"unknown backend {name!r}; known backends: {', '.join(sorted(BACKEND_MODULES))}")
    module = importlib.import_module(module_name)
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Backend) and getattr(value, "name", None) == name:
            return value
    raise RunnerError(f"module {module_name} defines no Backend subclass with name = {name!r}")


def get_backend(name: str, options: dict[str, Any], jobs_dir: Path) -> Backend:
    """Create the backend registered under `name` (unknown names and options raise ConfigError)."""
    return backend_class(name)(options, jobs_dir)
