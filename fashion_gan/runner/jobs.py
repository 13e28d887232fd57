"""Job ids and job records.

A job record is one JSON file per job, `<jobs_dir>/<job_id>.json`, with the resolved spec
(pass-through variable names, never their values), the backend name, the backend's handle
(pid, container id, SageMaker job name …) and the creation time. `jobs_dir` defaults to
`$FASHION_GAN_HOME/jobs`, with `FASHION_GAN_HOME` defaulting to `~/.fashion-gan`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fashion_gan.errors import RunnerError
from fashion_gan.runner.backend import JobSpec

log = logging.getLogger(__name__)

RECORD_FORMAT_VERSION = 1
_BASE36_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_JOB_ID_SUFFIX_LENGTH = 10
# "fg-" + 10 base36 characters: a valid SageMaker job name ([a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}),
# W&B run id and Docker container name, and short enough to type.
JOB_ID_PATTERN = re.compile(r"^fg-[0-9a-z]{10}$")


def new_job_id() -> str:
    """Return a fresh random job id such as `fg-3k9x0q7a2m` (36**10, about 3.7e15, possible ids)."""
    suffix = "".join(secrets.choice(_BASE36_DIGITS) for _ in range(_JOB_ID_SUFFIX_LENGTH))
    return f"fg-{suffix}"


def fashion_gan_home() -> Path:
    """Return the runner's state folder: `$FASHION_GAN_HOME`, else `~/.fashion-gan`."""
    configured = os.environ.get("FASHION_GAN_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".fashion-gan"


def default_jobs_dir() -> Path:
    return fashion_gan_home() / "jobs"


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class JobRecord:
    """Stored record of a submitted job."""

    spec: JobSpec
    backend: str
    created_at: datetime
    handle: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": RECORD_FORMAT_VERSION,
            "job_id": self.spec.job_id,
            "backend": self.backend,
            "created_at": self.created_at.isoformat(),
            "handle": self.handle,
            "spec": self.spec.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        return cls(
            spec=JobSpec.from_dict(data["spec"]),
            backend=data["backend"],
            created_at=datetime.fromisoformat(data["created_at"]),
            handle=dict(data.get("handle", {})),
        )


def record_path(jobs_dir: Path, job_id: str) -> Path:
    if not JOB_ID_PATTERN.match(job_id):
        raise RunnerError(f"invalid job id {job_id!r}: expected 'fg-' followed by 10 characters 0-9 a-z")
    return Path(jobs_dir) / f"{job_id}.json"


def save_record(jobs_dir: Path, record: JobRecord) -> Path:
    """Write the record atomically (temp file + rename) and return its path."""
    path = record_path(jobs_dir, record.spec.job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n"
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
        temp_name = handle.name
    os.replace(temp_name, path)
    return path


def create_record(jobs_dir: Path, spec: JobSpec, backend: str, replace: bool = False) -> JobRecord:
    """Store a new record for `spec`; raise RunnerError if a job with this id exists, unless `replace`."""
    path = record_path(jobs_dir, spec.job_id)
    if path.exists() and not replace:
        raise RunnerError(f"job {spec.job_id} already exists at {path}; submit with a new job id")
    record = JobRecord(spec=spec, backend=backend, created_at=utc_now())
    save_record(jobs_dir, record)
    return record


def load_record(jobs_dir: Path, job_id: str) -> JobRecord:
    """Read the record of `job_id`; a missing job raises RunnerError naming the jobs folder."""
    path = record_path(jobs_dir, job_id)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunnerError(
            f"job {job_id} not found in {jobs_dir}; list jobs with `fashion-gan status`"
        ) from None
    except (OSError, json.JSONDecodeError) as err:
        raise RunnerError(f"failed to read job record {path}: {err}") from err
    return JobRecord.from_dict(data)


def update_handle(jobs_dir: Path, job_id: str, **values: Any) -> JobRecord:
    """Merge `values` into the record's backend handle and save it."""
    record = load_record(jobs_dir, job_id)
    record.handle.update(values)
    save_record(jobs_dir, record)
    return record


def list_records(jobs_dir: Path) -> Iterator[JobRecord]:
    """Yield every readable job record, newest first; unreadable files are skipped with a warning."""
    records = []
    for path in Path(jobs_dir).glob("fg-*.json"):
        try:
            records.append(JobRecord.from_dict(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("skipping unreadable job record %s: %s", path, err)
    yield from sorted(records, key=lambda record: record.created_at, reverse=True)


def job_work_dir(jobs_dir: Path, job_id: str) -> Path:
    """Return (and create) the per-job folder for logs and exit-code files of local backends."""
    record_path(jobs_dir, job_id)  # validates the id
    path = Path(jobs_dir) / job_id
    path.mkdir(parents=True, exist_ok=True)
    return path
