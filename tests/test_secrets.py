"""Secrets never reach a file, object, log or job record: fake secrets through every route a job takes."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from fashion_gan.redaction import REDACTED, redact
from fashion_gan.runner.backend import JobSpec, parse_machine
from fashion_gan.runner.jobs import new_job_id
from fashion_gan.runner.sagemaker import SageMakerBackend, redacted_request
from reliability_helpers import TINY_JOB, TRAIN_SCRIPT, child_environment, require_fashion_mnist
from wandb_files import run_files

# Distinctive fake values, so a match can only be a leak. W&B expects a 40-character API key.
FAKE_SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "fgFakeSecretAccessKey7f3a9c1e5b2d8f4a6c",
    "AWS_SESSION_TOKEN": "fgFakeSessionToken4e8a2c6f1b9d3e7a5c0f",
    "WANDB_API_KEY": "fakewandbkey0123456789abcdef0123456789ab",
}
PASSED_VARIABLES = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                    "AWS_ENDPOINT_URL", "AWS_EC2_METADATA_DISABLED", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
                    "NO_PROXY", "WANDB_API_KEY", "WANDB_MODE", "WANDB_SILENT", "FASHION_GAN_LOG_LEVEL"]


def files_containing_secrets(root: Path) -> list[str]:
    """Return 'path: VARIABLE' for every file under `root` that contains a fake secret value."""
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        found += [f"{path}: {name}" for name, value in FAKE_SECRETS.items() if value.encode() in data]
    return found


def texts_containing_secrets(texts: dict[str, str | bytes]) -> list[str]:
    found = []
    for where, text in texts.items():
        data = text.encode() if isinstance(text, str) else text
        found += [f"{where}: {name}" for name, value in FAKE_SECRETS.items() if value.encode() in data]
    return found


@pytest.mark.slow
def test_full_run_through_runner_leaks_nothing(s3_bucket, tmp_path, monkeypatch):
    require_fashion_mnist()
    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    project = tmp_path / "project"
    project.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    (project / "floyd.yml").write_text(
        "backend: local\n"
        "machine: cpu\n"
        f"command: python {TRAIN_SCRIPT} {' '.join(TINY_JOB)} logger=wandb trainer.max_steps=4 "
        "run.checkpoint_every_n_steps=2 run.sample_every_n_steps=2 trainer.log_every_n_steps=1\n"
        f"output: s3://{s3_bucket}/jobs\n"
        "env_vars:\n" + "".join(f"  - {name}\n" for name in PASSED_VARIABLES)
    )
    env = child_environment({**FAKE_SECRETS, "HOME": str(home), "FASHION_GAN_HOME": str(tmp_path / "fg-home"),
                             "WANDB_MODE": "offline", "FASHION_GAN_LOG_LEVEL": "DEBUG"})

    result = subprocess.run([sys.executable, "-m", "fashion_gan.cli", "run", "--follow"], cwd=project, env=env,
                            capture_output=True, text=True, timeout=600)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = result.stdout.splitlines()[0]
    client = boto3.client("s3")
    keys = [entry["Key"] for entry in client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert f"jobs/runs/{job_id}/checkpoints/step_000004.ckpt" in keys
    assert run_files(home / ".cache/fashion-gan/runs" / job_id), "the job wrote no W&B offline run"
    assert (tmp_path / "fg-home/jobs" / f"{job_id}.json").is_file()
    assert files_containing_secrets(tmp_path) == []
    objects = {key: client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() for key in keys}
    assert texts_containing_secrets(objects) == []
    assert texts_containing_secrets({"stdout": result.stdout, "stderr": result.stderr}) == []


def test_sagemaker_submit_leaks_nothing(tmp_path, monkeypatch, caplog):
    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    requests = []

    class RecordingSageMakerClient:
        """Stands in for the boto3 SageMaker client: records each CreateTrainingJob request."""

        def create_training_job(self, **request):
            requests.append(request)
            return {"TrainingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{request['TrainingJobName']}"}

    spec = JobSpec(job_id=new_job_id(), image="123456789012.dkr.ecr.us-east-1.amazonaws.com/fashion-gan:latest",
                   command=["python", "train.py", "trainer.max_steps=4"], machine=parse_machine("gpu"),
                   env={"FASHION_GAN_RUN_ID": "x"}, env_passthrough=sorted(FAKE_SECRETS),
                   output_uri="s3://bucket/jobs")
    backend = SageMakerBackend({"role_arn": "arn:aws:iam::123456789012:role/fashion-gan"}, tmp_path / "jobs",
                               sagemaker_client=RecordingSageMakerClient())
    caplog.set_level(logging.DEBUG)

    backend.submit(spec)

    assert len(requests) == 1
    assert requests[0]["Environment"] == {"FASHION_GAN_RUN_ID": "x", **FAKE_SECRETS}
    assert texts_containing_secrets({"log": caplog.text}) == []
    assert "create_training_job request" in caplog.text
    assert texts_containing_secrets({"redacted request": json.dumps(redacted_request(requests[0]))}) == []
    assert files_containing_secrets(tmp_path) == []
    assert json.loads((tmp_path / "jobs" / f"{spec.job_id}.json").read_text())["spec"]["env_passthrough"] == \
        sorted(FAKE_SECRETS)


def test_secret_named_keys_are_redacted_by_name():
    value = "fgFakeConfigPassword9b1d"

    redacted = redact({"logger": {"api_key": value, "project": "fashion-gan"}, "db": {"password": value},
                       "model": {"latent_dim": 100}, "monkey": "visible"}, values=[])

    assert redacted == {"logger": {"api_key": REDACTED, "project": "fashion-gan"}, "db": {"password": REDACTED},
                        "model": {"latent_dim": 100}, "monkey": "visible"}


def test_secret_override_of_unknown_key_is_not_echoed(tmp_path):
    # The schema has no secret-named key, so such an override is rejected; the message must not echo it.
    value = "fgFakeCommandLineToken5c2e8a"

    result = subprocess.run([sys.executable, str(TRAIN_SCRIPT), f"+logger.api_key={value}"], cwd=tmp_path,
                            env=child_environment(), capture_output=True, text=True, timeout=120)

    assert result.returncode == 2
    assert "Unknown config key 'logger.api_key'" in result.stderr
    assert value not in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []
