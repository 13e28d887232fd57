"""The local backend: real detached processes running small Python commands."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fashion_gan.errors import ConfigError, RunnerError
from fashion_gan.runner.backend import JobSpec, JobState, get_backend, parse_machine
from fashion_gan.runner.jobs import new_job_id

WAIT_TIMEOUT_S = 30.0
FAKE_SECRET = "fake-secret-value-7f3a9c"

# Prints three lines, creates a "ready" file, then waits for a "go" file. SIGTERM makes it exit 75,
# as train.py does after saving a checkpoint.
WAITING_JOB = """
import os, signal, sys, time
from pathlib import Path
def on_sigterm(signum, frame):
    print("got SIGTERM", flush=True)
    sys.exit(75)
signal.signal(signal.SIGTERM, on_sigterm)
for index in range(3):
    print(f"line {index}", flush=True)
Path("ready").touch()
while not Path("go").exists():
    time.sleep(0.05)
print("done", flush=True)
"""

IGNORES_SIGTERM_JOB = """
import signal, time
from pathlib import Path
signal.signal(signal.SIGTERM, signal.SIG_IGN)
Path("ready").touch()
while True:
    time.sleep(0.05)
"""


def wait_for(condition, timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """Poll `condition` until it is true; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s")
        time.sleep(0.05)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work dir with 'quotes'"
    path.mkdir()
    return path


@pytest.fixture
def backend(tmp_path: Path, workdir: Path):
    return get_backend("local", {"workdir": str(workdir), "grace_period_s": 5}, tmp_path / "jobs")


def make_spec(code: str, **fields) -> JobSpec:
    return JobSpec(job_id=new_job_id(), image="unused", command=["python", "-c", code],
                   machine=parse_machine("cpu"), env={"FASHION_GAN_RUN_ID": "x"}, **fields)


def test_job_runs_then_succeeds_with_logs(backend, workdir):
    spec = make_spec(WAITING_JOB, description="lifecycle")
    backend.submit(spec)
    wait_for(lambda: (workdir / "ready").exists())

    running = backend.status(spec.job_id)
    assert running.state is JobState.RUNNING
    assert running.started_at is not None
    assert running.finished_at is None
    assert running.description == "lifecycle"
    assert running.machine == "cpu"

    (workdir / "go").touch()
    lines = list(backend.logs(spec.job_id, follow=True))
    assert lines == ["line 0", "line 1", "line 2", "done"]

    finished = backend.status(spec.job_id)
    assert finished.state is JobState.SUCCEEDED
    assert finished.exit_code == 0
    assert finished.failure_reason is None
    assert finished.finished_at >= finished.started_at
    assert list(backend.logs(spec.job_id)) == lines


def test_stop_sends_sigterm_and_job_stops(backend, workdir):
    spec = make_spec(WAITING_JOB)
    backend.submit(spec)
    wait_for(lambda: (workdir / "ready").exists())

    backend.stop(spec.job_id, grace_period_s=10)

    status = backend.status(spec.job_id)
    assert status.state is JobState.STOPPED
    assert status.exit_code == 75
    assert "checkpoint" in status.failure_reason
    assert list(backend.logs(spec.job_id))[-1] == "got SIGTERM"


def test_stop_kills_after_grace_period(backend, workdir):
    spec = make_spec(IGNORES_SIGTERM_JOB)
    backend.submit(spec)
    wait_for(lambda: (workdir / "ready").exists())

    backend.stop(spec.job_id, grace_period_s=0.5)
    wait_for(lambda: backend.status(spec.job_id).state.is_finished)

    status = backend.status(spec.job_id)
    assert status.state is JobState.STOPPED
    assert "grace period" in status.failure_reason


def test_max_runtime_times_out(backend):
    spec = make_spec(WAITING_JOB, max_runtime_s=1)
    backend.submit(spec)

    lines = list(backend.logs(spec.job_id, follow=True))

    status = backend.status(spec.job_id)
    assert status.state is JobState.TIMED_OUT
    assert "max_runtime" in status.failure_reason
    assert lines[-1] == "got SIGTERM"
    assert any("max_runtime of 1 s reached" in line for line in lines)


def test_failed_job_reports_exit_code_and_last_line(backend):
    spec = make_spec("import sys; print('loss is nan at step 7', flush=True); sys.exit(6)")
    backend.submit(spec)
    list(backend.logs(spec.job_id, follow=True))

    status = backend.status(spec.job_id)
    assert status.state is JobState.FAILED
    assert status.exit_code == 6
    assert status.failure_reason == "exited with code 6: loss is nan at step 7"


def test_stop_of_finished_job_is_noop(backend):
    spec = make_spec("print('quick')")
    backend.submit(spec)
    list(backend.logs(spec.job_id, follow=True))

    backend.stop(spec.job_id, grace_period_s=1)

    assert backend.status(spec.job_id).state is JobState.SUCCEEDED


def test_passthrough_variable_reaches_job_but_no_file(backend, workdir, monkeypatch):
    monkeypatch.setenv("FASHION_GAN_TEST_TOKEN", FAKE_SECRET)
    monkeypatch.setenv("FASHION_GAN_TEST_UNLISTED", "unlisted-value")
    # The job prints a digest of the value, so the secret itself appears in neither command nor log.
    code = ("import hashlib, os; print('token', hashlib.sha256(os.environ['FASHION_GAN_TEST_TOKEN'].encode()).hexdigest()); "
            "print('unlisted', os.environ.get('FASHION_GAN_TEST_UNLISTED')); "
            "print('run id', os.environ['FASHION_GAN_RUN_ID'])")
    spec = make_spec(code, env_passthrough=["FASHION_GAN_TEST_TOKEN"])
    backend.submit(spec)

    lines = list(backend.logs(spec.job_id, follow=True))

    assert lines == [f"token {hashlib.sha256(FAKE_SECRET.encode()).hexdigest()}", "unlisted None", "run id x"]
    record = json.loads((backend.jobs_dir / f"{spec.job_id}.json").read_text())
    assert record["spec"]["env_passthrough"] == ["FASHION_GAN_TEST_TOKEN"]
    for path in backend.jobs_dir.rglob("*"):
        if path.is_file():
            assert FAKE_SECRET not in path.read_text(errors="replace"), path


def test_job_runs_in_workdir(backend, workdir):
    spec = make_spec("import os; print(os.getcwd())")
    backend.submit(spec)
    assert list(backend.logs(spec.job_id, follow=True)) == [str(workdir)]


def test_missing_command_fails_with_reason(backend):
    spec = JobSpec(job_id=new_job_id(), image="", command=["/nonexistent/tool"], machine=parse_machine("cpu"))
    backend.submit(spec)
    list(backend.logs(spec.job_id, follow=True))

    status = backend.status(spec.job_id)
    assert status.state is JobState.FAILED
    assert status.exit_code == 127
    assert "/nonexistent/tool" in status.failure_reason


def test_duplicate_job_id_rejected(backend):
    spec = make_spec("print(1)")
    backend.submit(spec)
    with pytest.raises(RunnerError, match="already exists"):
        backend.submit(spec)


def test_unknown_job_rejected(backend):
    with pytest.raises(RunnerError, match="job fg-zzzzzzzzzz not found"):
        backend.status("fg-zzzzzzzzzz")


def test_unknown_option_lists_known(tmp_path):
    with pytest.raises(ConfigError, match="unknown option.*workdr.*known options: grace_period_s, workdir"):
        get_backend("local", {"workdr": "."}, tmp_path)


def test_local_backend_imports_neither_docker_nor_boto3():
    code = ("import sys; from fashion_gan.runner.backend import get_backend; get_backend('local', {}, '.'); "
            "print('fashion_gan.runner.docker' in sys.modules, 'docker' in sys.modules, 'boto3' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False", "False"]
