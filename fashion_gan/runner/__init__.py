"""Job runner: floyd.yml → `JobSpec` → a backend (local process, Docker, SageMaker).

This module must not import a backend module: `python -m fashion_gan.runner.local` runs the
local job wrapper, and backends are imported only when they are asked for.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fashion_gan.errors import RunnerError
from fashion_gan.runner.backend import Backend, JobSpec, JobState, JobStatus, get_backend
from fashion_gan.runner.jobs import default_jobs_dir, list_records, load_record, new_job_id
from fashion_gan.runner.spec import RunOptions, load_floyd_config, resolve_job

log = logging.getLogger(__name__)

__all__ = [
    "Backend", "JobSpec", "JobState", "JobStatus", "RunOptions", "backend_for_job", "get_backend",
    "list_records", "submit_job",
]


def _earlier_job_output(jobs_dir: Path):
    def lookup(job_id: str) -> str | None:
        try:
            return load_record(jobs_dir, job_id).spec.output_uri
        except RunnerError:
            log.warning("input jobs/%s: no job record in %s; assuming this job's output root", job_id, jobs_dir)
            return None

    return lookup


def submit_job(floyd_file: Path | str, options: RunOptions, jobs_dir: Path | None = None,
               job_id: str | None = None) -> tuple[Backend, JobSpec]:
    """Resolve floyd.yml with the command-line `options`, submit the job and return (backend, spec)."""
    jobs_dir = Path(jobs_dir) if jobs_dir is not None else default_jobs_dir()
    config = load_floyd_config(floyd_file)
    resolved = resolve_job(config, options, job_id or new_job_id(), _earlier_job_output(jobs_dir))
    backend = get_backend(resolved.backend, resolved.spec.backend_options, jobs_dir)
    backend.submit(resolved.spec)
    log.info("submitted job %s to the %s backend", resolved.spec.job_id, resolved.backend)
    return backend, resolved.spec


def backend_for_job(job_id: str, jobs_dir: Path | None = None) -> Backend:
    """Return the backend that runs `job_id`, configured with the options stored in its record."""
    jobs_dir = Path(jobs_dir) if jobs_dir is not None else default_jobs_dir()
    record = load_record(jobs_dir, job_id)
    return get_backend(record.backend, record.spec.backend_options, jobs_dir)
