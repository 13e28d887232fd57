"""The `local` backend: the job runs as a detached process group on this machine.

Layout under `<jobs_dir>/<job_id>/`: `job.log` (stdout and stderr of the command) and
`exit.json`, written by a small wrapper (this module run with `python -m`) when the command
ends. The wrapper is the leader of a new session, so `stop` can signal the whole process group,
and it enforces `max_runtime` itself, so a timeout applies even when no command polls the job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from fashion_gan.errors import ExitCode, RunnerError
from fashion_gan.runner.backend import Backend, JobSpec, JobState, JobStatus, resolve_environment
from fashion_gan.runner.jobs import create_record, job_work_dir, load_record, update_handle, utc_now

log = logging.getLogger(__name__)

LOG_FILE_NAME = "job.log"
EXIT_FILE_NAME = "exit.json"
DEFAULT_GRACE_PERIOD_S = 30.0
_POLL_INTERVAL_S = 0.2
# Variables a local process inherits from the submitting shell even without `env_vars`, so that
# `python`, the home folder and the locale resolve as in that shell. Anything else (credentials
# included) reaches the job only when floyd.yml lists its name under `env_vars`.
INHERITED_VARIABLES = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ",
                       "VIRTUAL_ENV", "FASHION_GAN_HOME")


class LocalBackend(Backend):
    """Runs jobs as local processes; `workdir` is the folder the command runs in."""

    name = "local"
    known_options = frozenset({"workdir", "grace_period_s"})

    def submit(self, spec: JobSpec) -> None:
        workdir = Path(self.options.get("workdir") or Path.cwd())
        self._start(spec, workdir, restart=False)

    def restart(self, job_id: str) -> None:
        record = load_record(self.jobs_dir, job_id)
        state = self.status(job_id).state
        if state in (JobState.QUEUED, JobState.RUNNING):
            raise RunnerError(f"Job {job_id} is {state.value}; stop it first with `fashion-gan stop {job_id}`.")
        (job_work_dir(self.jobs_dir, job_id) / EXIT_FILE_NAME).unlink(missing_ok=True)
        workdir = Path(record.handle.get("workdir") or self.options.get("workdir") or Path.cwd())
        self._start(record.spec, workdir, restart=True)

    def _start(self, spec: JobSpec, workdir: Path, restart: bool) -> None:
        if spec.instance_count > 1:
            raise RunnerError(
                f"instance_count={spec.instance_count} needs several machines, but the local backend runs one "
                f"process on this machine. Set instance_count: 1, or use backend: sagemaker for multi-node jobs."
            )
        if not workdir.is_dir():
            raise RunnerError(f"working folder {workdir} of local job {spec.job_id} not found; "
                              "fix `local: {workdir: …}` in floyd.yml")
        record = create_record(self.jobs_dir, spec, self.name, replace=restart)
        work_dir = job_work_dir(self.jobs_dir, spec.job_id)
        environment = {name: os.environ[name] for name in INHERITED_VARIABLES if name in os.environ}
        environment.update(resolve_environment(spec))

        wrapper = [sys.executable, "-m", "fashion_gan.runner.local",
                   "--exit-file", str(work_dir / EXIT_FILE_NAME),
                   "--grace-period-s", str(self.grace_period_s)]
        if spec.max_runtime_s is not None:
            wrapper += ["--max-runtime-s", str(spec.max_runtime_s)]
        wrapper += ["--", *self._command_for(spec)]
        log.debug("starting local job %s: %s (cwd %s)", spec.job_id, wrapper, workdir)
        try:
            with open(work_dir / LOG_FILE_NAME, "ab") as log_file:
                process = subprocess.Popen(
                    wrapper, cwd=workdir, env=environment, stdin=subprocess.DEVNULL,
                    stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                )
        except OSError as err:
            # The record stays, without a pid, so `status` reports the job as failed to start.
            raise RunnerError(f"failed to start local job {spec.job_id}: {err}") from err
        update_handle(self.jobs_dir, spec.job_id, pid=process.pid, workdir=str(workdir),
                      started_at=record.created_at.isoformat())
        log.info("started local job %s as process group %d; log at %s", spec.job_id, process.pid,
                 work_dir / LOG_FILE_NAME)

    @property
    def grace_period_s(self) -> float:
        return float(self.options.get("grace_period_s", DEFAULT_GRACE_PERIOD_S))

    @staticmethod
    def _command_for(spec: JobSpec) -> list[str]:
        # `python` means the interpreter running fashion-gan, so a local job uses the same virtualenv
        # even when the shell has not activated it.
        if spec.command and spec.command[0] in ("python", "python3"):
            return [sys.executable, *spec.command[1:]]
        return list(spec.command)

    def status(self, job_id: str) -> JobStatus:
        record = load_record(self.jobs_dir, job_id)
        handle = record.handle
        started_at = _parse_time(handle.get("started_at"))
        status = JobStatus(
            job_id=job_id, backend=self.name, state=JobState.RUNNING, created_at=record.created_at,
            started_at=started_at, finished_at=None, machine=record.spec.machine.name,
            description=record.spec.description,
        )
        pid = handle.get("pid")
        if pid is None:
            status.state = JobState.FAILED
            status.failure_reason = "the job process was never started (submit failed)"
            return status

        exit_info = _read_exit_file(job_work_dir(self.jobs_dir, job_id) / EXIT_FILE_NAME)
        if exit_info is None and _process_alive(pid):
            return status
        if exit_info is None:
            # The wrapper died without writing exit.json: SIGKILL after a stop, or killed from outside.
            status.finished_at = _parse_time(handle.get("stop_requested_at"))
            if handle.get("stop_requested_at"):
                status.state = JobState.STOPPED
                status.failure_reason = "killed after the stop grace period"
            else:
                status.state = JobState.FAILED
                status.failure_reason = "the job process ended without recording an exit code (killed?)"
            return status
        return _status_from_exit(status, exit_info, stop_requested=bool(handle.get("stop_requested_at")),
                                 log_path=job_work_dir(self.jobs_dir, job_id) / LOG_FILE_NAME)

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        load_record(self.jobs_dir, job_id)  # raises for an unknown job
        log_path = job_work_dir(self.jobs_dir, job_id) / LOG_FILE_NAME
        with open(log_path, "a+b") as log_file:
            log_file.seek(0)
            pending = b""
            while True:
                chunk = log_file.read()
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        yield line.decode("utf-8", errors="replace")
                    continue
                if not follow or self.status(job_id).state.is_finished:
                    # One more read: the job may have written its last lines just before it ended.
                    pending += log_file.read()
                    lines = pending.split(b"\n")
                    for line in lines:
                        if line:
                            yield line.decode("utf-8", errors="replace")
                    return
                time.sleep(_POLL_INTERVAL_S)

    def stop(self, job_id: str, grace_period_s: float = DEFAULT_GRACE_PERIOD_S) -> None:
        if self.status(job_id).state.is_finished:
            log.info("local job %s has already finished; nothing to stop", job_id)
            return
        record = update_handle(self.jobs_dir, job_id, stop_requested_at=utc_now().isoformat())
        pid = record.handle["pid"]
        log.info("sending SIGTERM to local job %s (process group %d)", job_id, pid)
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_period_s
        while time.monotonic() < deadline:
            if not _process_alive(pid):
                return
            time.sleep(_POLL_INTERVAL_S)
        log.warning("local job %s still runs %.0f s after SIGTERM; sending SIGKILL", job_id, grace_period_s)
        _signal_group(pid, signal.SIGKILL)


def _status_from_exit(status: JobStatus, exit_info: dict[str, Any], stop_requested: bool,
                      log_path: Path) -> JobStatus:
    exit_code = exit_info.get("exit_code")
    status.exit_code = exit_code
    status.finished_at = _parse_time(exit_info.get("finished_at"))
    if exit_info.get("timed_out"):
        status.state = JobState.TIMED_OUT
        status.failure_reason = f"exceeded max_runtime of {exit_info.get('max_runtime_s')} s"
    elif exit_code == ExitCode.SUCCESS:
        status.state = JobState.SUCCEEDED
    elif exit_code == ExitCode.PREEMPTED:
        status.state = JobState.STOPPED
        status.failure_reason = "stopped after saving a checkpoint (exit code 75); rerun to resume"
    elif stop_requested:
        status.state = JobState.STOPPED
        status.failure_reason = f"stopped on request (exit code {exit_code})"
    else:
        status.state = JobState.FAILED
        last_line = _last_log_line(log_path)
        status.failure_reason = f"exited with code {exit_code}" + (f": {last_line}" if last_line else "")
    return status


def _last_log_line(log_path: Path, tail_bytes: int = 4096) -> str | None:
    try:
        with open(log_path, "rb") as log_file:
            log_file.seek(max(0, log_path.stat().st_size - tail_bytes))
            lines = [line.strip() for line in log_file.read().decode("utf-8", errors="replace").splitlines()]
    except OSError:
        return None
    lines = [line for line in lines if line]
    return lines[-1] if lines else None


def _parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _read_exit_file(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise RunnerError(f"failed to read exit record {path}: {err}") from err


def _process_alive(pid: int) -> bool:
    """Return whether `pid` runs; a zombie child of this process is reaped and counts as ended."""
    try:
        reaped_pid, _ = os.waitpid(pid, os.WNOHANG)
        if reaped_pid == pid:
            return False
    except ChildProcessError:
        pass  # not our child (a later CLI call): fall through to the signal-0 check
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # NOTE: a new process could reuse the pid of an ended wrapper. Callers check exit.json first,
    # so this matters only for a wrapper killed before it wrote that file.
    return True


def _signal_group(pid: int, signal_number: int) -> None:
    try:
        os.killpg(pid, signal_number)
    except ProcessLookupError:
        pass  # already gone


def _write_exit_file(path: Path, values: dict[str, Any]) -> None:
    temp_path = path.with_name(path.name + ".tmp")
    temp_path.write_text(json.dumps(values) + "\n")
    os.replace(temp_path, path)


def _run_wrapper(arguments: list[str] | None = None) -> int:
    """Run the job command, enforce max_runtime and record the exit code in the exit file."""
    parser = argparse.ArgumentParser(prog="python -m fashion_gan.runner.local")
    parser.add_argument("--exit-file", type=Path, required=True)
    parser.add_argument("--max-runtime-s", type=float, default=None)
    parser.add_argument("--grace-period-s", type=float, default=DEFAULT_GRACE_PERIOD_S)
    parser.add_argument("command", nargs="+")
    options = parser.parse_args(arguments)

    # `stop` signals the whole process group, so the command receives SIGTERM directly. The wrapper
    # catches it with a no-op handler to outlive the command and record how it ended. Unlike SIG_IGN,
    # a handler is reset to the default by exec, so the command still receives SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        child = subprocess.Popen(options.command)
    except OSError as err:
        print(f"[fashion-gan] failed to start {options.command[0]!r}: {err}", flush=True)
        _write_exit_file(options.exit_file, {"exit_code": 127, "timed_out": False,
                                             "finished_at": utc_now().isoformat()})
        return 127
    child_pid = child.pid
    try:
        exit_code = child.wait(timeout=options.max_runtime_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        print(f"[fashion-gan] max_runtime of {options.max_runtime_s:g} s reached; sending SIGTERM", flush=True)
        child.send_signal(signal.SIGTERM)
        try:
            exit_code = child.wait(timeout=options.grace_period_s)
        except subprocess.TimeoutExpired:
            _write_exit_file(options.exit_file, {"exit_code": None, "timed_out": True,
                                                 "max_runtime_s": options.max_runtime_s,
                                                 "finished_at": utc_now().isoformat()})
            print(f"[fashion-gan] process {child_pid} ignored SIGTERM; killing the process group", flush=True)
            os.killpg(os.getpgid(0), signal.SIGKILL)
            return ExitCode.RUNNER  # not reached: SIGKILL ends this process too
    _write_exit_file(options.exit_file, {"exit_code": exit_code, "timed_out": timed_out,
                                         "max_runtime_s": options.max_runtime_s,
                                         "finished_at": utc_now().isoformat()})
    return 0


if __name__ == "__main__":
    sys.exit(_run_wrapper())
