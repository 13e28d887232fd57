"""Preemption, hard kills and divergence: what a run keeps, and how it resumes, against real processes."""

import io
import json
import random
import re
import tarfile
from pathlib import Path

import boto3
import docker
import pytest
import torch

from conftest import s3_env
from docker_helpers import ensure_project_image, remove_job_containers
from fashion_gan.runner.backend import InputMount, JobSpec, JobState, get_backend, parse_machine
from fashion_gan.runner.jobs import new_job_id
from reliability_helpers import (
    TINY_JOB,
    TRAIN_SCRIPT,
    assert_same_training_state,
    last_logged_step,
    load_checkpoint_bytes,
    metrics_csv_steps_from_text,
    read_bucket_json,
    require_fashion_mnist,
    sha256_bytes,
    start_train,
    stop_process,
    wait_until,
)
from training_helpers import FASHION_MNIST_DIR, run_train
from wandb_files import history_rows, run_files, run_info

JOB_TIMEOUT_S = 600
# Options of each backend that `submit_training_job` can use.
BACKEND_OPTIONS = {
    "local": lambda workdir: {"workdir": str(workdir)},
    # An empty build context, so that submit() runs the existing project image and never builds one.
    "docker": lambda workdir: {"context": str(workdir)},
}
_PROGRESS_LINE = re.compile(r"step (\d+)/\d+")


def submit_training_job(backend_name: str, tmp_path: Path, run_id: str, arguments: list[str],
                        env: dict[str, str]):
    """Submit `train.py ARGUMENTS run.id=RUN_ID` as a new job; return (backend, job id)."""
    workdir = tmp_path / "workdir"
    workdir.mkdir(exist_ok=True)
    backend = get_backend(backend_name, BACKEND_OPTIONS[backend_name](workdir), tmp_path / "jobs")
    job_id = new_job_id()
    image, script, inputs = "fashion-gan:latest", str(TRAIN_SCRIPT), []
    if backend_name == "docker":
        # The image runs train.py from its WORKDIR. The backend bind-mounts an input with an absolute
        # path read-only at the same path, where train.py looks for Fashion-MNIST by default.
        image, script = ensure_project_image(), "train.py"
        inputs = [InputMount(source=str(FASHION_MNIST_DIR), destination="data")]
    spec = JobSpec(
        job_id=job_id,
        image=image,
        command=["python", script, *arguments, f"run.id={run_id}"],
        machine=parse_machine("cpu"),
        env={"FASHION_GAN_RUN_ID": run_id, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **env},
        env_passthrough=sorted(s3_env("unused")),
        inputs=inputs,
    )
    backend.submit(spec)
    return backend, job_id


def wait_for_logged_step(backend, job_id: str, step: int) -> None:
    """Follow the job's log until it reports training step `step` or later; fail if the job ends first."""
    for line in backend.logs(job_id, follow=True):
        match = _PROGRESS_LINE.search(line)
        if match and int(match.group(1)) >= step:
            return
    pytest.fail(f"job {job_id} ended before step {step}: {backend.status(job_id).failure_reason}")


def copy_from_containers(job_ids: list[str], folder: str, dest_dir: Path) -> None:
    """Copy `folder` out of each job's container (exited ones too) into `dest_dir`, merging the copies."""
    client = docker.from_env()
    for job_id in job_ids:
        chunks, _ = client.containers.get(job_id).get_archive(folder)
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as archive:
            archive.extractall(dest_dir, filter=_files_and_folders_only)


def _files_and_folders_only(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
    # W&B links its debug logs with absolute symlinks, which the "data" filter rejects; they are skipped.
    if not (member.isfile() or member.isdir()):
        return None
    return tarfile.data_filter(member, path)


@pytest.fixture
def job_containers_removed(tmp_path):
    """Remove the containers of the test's docker jobs after the test."""
    yield
    remove_job_containers(tmp_path / "jobs")


def checkpoint_from_bucket(client, bucket: str, key: str, tmp_path: Path) -> dict:
    data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return load_checkpoint_bytes(data, tmp_path, name=key.replace("/", "_"))


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["local", pytest.param("docker", marks=pytest.mark.docker)])
def test_sigterm_stops_then_resumes_bitwise(backend_name, s3_bucket, tmp_path, job_containers_removed):
    require_fashion_mnist()
    client = boto3.client("s3")
    cache_dir = tmp_path / "cache"
    env = {"FASHION_GAN_CACHE": str(cache_dir), "WANDB_MODE": "offline"}
    common = [*TINY_JOB, f"run.output=s3://{s3_bucket}/jobs", "trainer.max_steps=300",
              "trainer.log_every_n_steps=1", "run.checkpoint_every_n_steps=100", "run.sample_every_n_steps=100"]
    straight = start_train([*common, "logger=none", "run.id=straight"], env, tmp_path / "straight.log")
    try:
        run_id = new_job_id()
        backend, first_job = submit_training_job(backend_name, tmp_path, run_id, [*common, "logger=wandb"], env)
        if backend_name == "docker":
            # The container's staging folder is not visible here, so the job's log shows its progress.
            wait_for_logged_step(backend, first_job, 150)
        else:
            wait_until(lambda: last_logged_step(cache_dir / "runs" / run_id / "metrics.csv") >= 150, JOB_TIMEOUT_S,
                       "step 150 of the first job")

        backend.stop(first_job, grace_period_s=30)

        stopped = backend.status(first_job)
        first_log = "\n".join(backend.logs(first_job))
        assert stopped.state is JobState.STOPPED, first_log[-3000:]
        assert stopped.exit_code == 75, first_log[-3000:]
        prefix = f"jobs/runs/{run_id}"
        stopped_summary = read_bucket_json(client, s3_bucket, f"{prefix}/summary.json")
        stopped_step = stopped_summary["steps"]
        assert stopped_summary["state"] == "stopped"
        assert stopped_summary["exit_code"] == 75
        assert 150 <= stopped_step < 300
        assert f"Stopping after step {stopped_step} because of SIGTERM" in first_log
        pointer = read_bucket_json(client, s3_bucket, f"{prefix}/checkpoints/latest.json")
        assert pointer["step"] == stopped_step
        checkpoint_bytes = client.get_object(Bucket=s3_bucket, Key=f"{prefix}/{pointer['key']}")["Body"].read()
        assert sha256_bytes(checkpoint_bytes) == pointer["sha256"]

        backend, second_job = submit_training_job(backend_name, tmp_path, run_id, [*common, "logger=wandb"], env)
        second_log = "\n".join(backend.logs(second_job, follow=True))
        finished = backend.status(second_job)
        assert finished.state is JobState.SUCCEEDED, second_log[-3000:]
        assert f"Resuming run {run_id} from step {stopped_step}" in second_log
        assert straight.wait(timeout=JOB_TIMEOUT_S) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    finally:
        stop_process(straight)

    summary = read_bucket_json(client, s3_bucket, f"{prefix}/summary.json")
    assert summary["state"] == "succeeded"
    assert summary["steps"] == 300
    assert summary["resumed_from_step"] == stopped_step
    resumed = checkpoint_from_bucket(client, s3_bucket, f"{prefix}/checkpoints/step_000300.ckpt", tmp_path)
    uninterrupted = checkpoint_from_bucket(client, s3_bucket, "jobs/runs/straight/checkpoints/step_000300.ckpt",
                                           tmp_path)
    assert resumed["global_step"] == 300
    assert_same_training_state(resumed, uninterrupted)

    metrics_text = client.get_object(Bucket=s3_bucket, Key=f"{prefix}/metrics.csv")["Body"].read().decode()
    assert metrics_csv_steps_from_text(metrics_text) == list(range(1, 301))

    run_dir = cache_dir / "runs" / run_id
    if backend_name == "docker":
        # Each job staged its W&B files in its own container, at the FASHION_GAN_CACHE path.
        copy_from_containers([first_job, second_job], str(run_dir), tmp_path / "from-containers")
        run_dir = tmp_path / "from-containers" / run_id
    wandb_files = run_files(run_dir)
    assert len(wandb_files) == 2
    assert [run_info(path)["id"] for path in wandb_files] == [run_id, run_id]
    metric_steps = [[row["trainer/global_step"] for row in history_rows(path) if "train/d_loss" in row]
                    for path in wandb_files]
    assert metric_steps[0] == list(range(1, stopped_step + 1))
    assert metric_steps[1] == list(range(stopped_step + 1, 301))
    sample_steps = [row["trainer/global_step"] for path in wandb_files for row in history_rows(path)
                    if any(key.startswith("samples/") for key in row)]
    assert len(sample_steps) == len(set(sample_steps))
    assert {100, 200, 300} <= set(sample_steps)


@pytest.mark.slow
def test_sigkill_at_ten_points_keeps_latest_loadable(s3_bucket, tmp_path):
    require_fashion_mnist()
    client = boto3.client("s3")
    cache_dir = tmp_path / "cache"
    run_id = "killed-repeatedly"
    prefix = f"jobs/runs/{run_id}"
    every_n_steps, max_steps = 3, 60
    arguments = [*TINY_JOB, "logger=csv", f"run.output=s3://{s3_bucket}/jobs", f"run.id={run_id}",
                 f"trainer.max_steps={max_steps}", "trainer.log_every_n_steps=1",
                 f"run.checkpoint_every_n_steps={every_n_steps}", "run.sample_every_n_steps=1000"]
    env = {"FASHION_GAN_CACHE": str(cache_dir)}
    local_metrics = cache_dir / "runs" / run_id / "metrics.csv"
    seed = 20261204
    kill_steps = sorted(random.Random(seed).sample(range(2, max_steps - 2), 10))

    expected_resume_step = None
    last_step_before = 0
    for attempt, kill_step in enumerate(kill_steps):
        # metrics.csv still contains the previous attempt's rows until this attempt truncates it at its
        # resume step, and the previous attempt may have logged past kill_step before SIGKILL landed.
        # Only a row past every earlier one shows that this attempt has trained.
        kill_step = max(kill_step, last_step_before + 1)
        if kill_step >= max_steps:
            break
        log_path = tmp_path / f"attempt-{attempt}.log"
        process = start_train(arguments, env, log_path)
        try:
            wait_until(lambda: last_logged_step(local_metrics) >= kill_step, JOB_TIMEOUT_S,
                       f"step {kill_step} (kill steps {kill_steps}, seed {seed})", process)
            process.kill()
            process.wait(timeout=60)
        finally:
            stop_process(process)
        log_text = log_path.read_text()
        last_step_before = last_logged_step(local_metrics)
        if expected_resume_step is not None:
            assert f"Resuming run {run_id} from step {expected_resume_step}" in log_text

        keys = {entry["Key"] for entry in client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix).get("Contents", [])}
        if f"{prefix}/checkpoints/latest.json" not in keys:
            # Killed before the first checkpoint upload was verified: the next start begins at step 0.
            assert expected_resume_step is None, f"the pointer disappeared after attempt {attempt}"
            continue
        pointer = read_bucket_json(client, s3_bucket, f"{prefix}/checkpoints/latest.json")
        data = client.get_object(Bucket=s3_bucket, Key=f"{prefix}/{pointer['key']}")["Body"].read()
        assert sha256_bytes(data) == pointer["sha256"]
        assert len(data) == pointer["size"]
        checkpoint = load_checkpoint_bytes(data, tmp_path)
        assert checkpoint["global_step"] == pointer["step"]
        assert pointer["step"] % every_n_steps == 0
        assert pointer["step"] <= last_logged_step(local_metrics)
        assert expected_resume_step is None or pointer["step"] >= expected_resume_step
        expected_resume_step = pointer["step"]

    final = run_train(arguments, env=env, timeout_s=JOB_TIMEOUT_S)
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"Resuming run {run_id} from step {expected_resume_step}" in final.stderr
    summary = read_bucket_json(client, s3_bucket, f"{prefix}/summary.json")
    assert summary["state"] == "succeeded"
    assert summary["steps"] == max_steps
    metrics_text = client.get_object(Bucket=s3_bucket, Key=f"{prefix}/metrics.csv")["Body"].read().decode()
    assert metrics_csv_steps_from_text(metrics_text) == list(range(1, max_steps + 1))
    pointer = read_bucket_json(client, s3_bucket, f"{prefix}/checkpoints/latest.json")
    assert pointer["step"] == max_steps


@pytest.mark.slow
def test_nan_loss_keeps_last_good_checkpoint(tmp_path):
    require_fashion_mnist()
    run_dir = tmp_path / "out" / "runs" / "diverges"

    result = run_train([*TINY_JOB, "logger=none", f"run.output={tmp_path}/out", "run.id=diverges",
                        "trainer.max_steps=60", "run.checkpoint_every_n_steps=10", "trainer.inject_nan_at_step=40"],
                       env={"FASHION_GAN_CACHE": str(tmp_path / "cache")}, timeout_s=JOB_TIMEOUT_S)

    assert result.returncode == 6, result.stderr[-3000:]
    assert "Training diverged at step 40" in result.stderr
    assert "Traceback" not in result.stderr
    # The NaN comes in the update after 40 finite ones, so the checkpoint of step 40 is the last good one.
    pointer = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert pointer["step"] == 40
    assert pointer["key"] == "checkpoints/step_000040.ckpt"
    assert sorted(path.name for path in (run_dir / "checkpoints").glob("step_*")) == [
        f"step_{step:06d}.ckpt" for step in (10, 20, 30, 40)]
    checkpoint = torch.load(run_dir / pointer["key"], map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 40
    for name, tensor in checkpoint["state_dict"].items():
        assert torch.isfinite(tensor.float()).all(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "failed"
    assert summary["exit_code"] == 6
    assert summary["steps"] == 40
    assert "step 40" in summary["failure_reason"]
