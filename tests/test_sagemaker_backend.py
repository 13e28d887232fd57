"""The sagemaker backend: request building, moto's SageMaker server and stubbed responses."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import boto3
import botocore.session
import pytest
from botocore.stub import Stubber
from botocore.validate import validate_parameters

from fashion_gan.errors import ConfigError, RunnerError
from fashion_gan.runner.backend import InputMount, JobSpec, JobState, get_backend, parse_machine
from fashion_gan.runner.jobs import create_record, new_job_id
from fashion_gan.runner.sagemaker import LOG_GROUP, SageMakerBackend, build_training_job_request

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
GOLDEN_REQUEST = GOLDEN_DIR / "sagemaker_create_training_job.json"
# Set UPDATE_GOLDEN=1 to rewrite the golden files after an intended change, then review the diff.
UPDATE_GOLDEN = os.environ.get("UPDATE_GOLDEN") == "1"
PLACEHOLDER_KEY = "fake-placeholder-wandb-key"
FAKE_SECRET = "fake-secret-value-51c0d2"
ROLE_ARN = "arn:aws:iam::123456789012:role/fashion-gan-training"
OPTIONS = {"role_arn": ROLE_ARN, "region": "us-east-1", "max_wait": 7200,
           "instance_types": {"gpu2": "ml.g4dn.12xlarge"}}
CREATED = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)


def golden_spec(**changes) -> JobSpec:
    values = dict(
        job_id="fg-golden0001",
        image="123456789012.dkr.ecr.us-east-1.amazonaws.com/fashion-gan:latest",
        command=["python", "train.py", "experiment=fashion_photos", "run.id=fg-golden0001",
                 "run.output=s3://fashion-gan-runs/team", "data.source=dataset:clothing/2"],
        machine=parse_machine("gpu"),
        env={"FASHION_GAN_RUN_ID": "fg-golden0001", "PYTHONUNBUFFERED": "1"},
        env_passthrough=["WANDB_API_KEY"],
        inputs=[InputMount("clothing/2", "photos")],
        output_uri="s3://fashion-gan-runs/team",
        description="golden request",
        max_runtime_s=3600,
        spot=True,
        shm_size_gb=2.0,
        instance_count=2,
        backend_options=OPTIONS,
        tags=["dcgan", "owner=ml-team"],
    )
    values.update(changes)
    return JobSpec(**values)


def create_training_job_shape():
    model = botocore.session.get_session().get_service_model("sagemaker")
    return model.operation_model("CreateTrainingJob").input_shape


def stubbed_backend(tmp_path: Path):
    session = botocore.session.get_session()
    credentials = {"region_name": "us-east-1", "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    sagemaker = session.create_client("sagemaker", **credentials)
    logs = session.create_client("logs", **credentials)
    backend = SageMakerBackend(OPTIONS, tmp_path / "jobs", sagemaker_client=sagemaker, logs_client=logs)
    return backend, Stubber(sagemaker), Stubber(logs)


def description(job_id: str, status: str, secondary: str, **extra) -> dict:
    """A DescribeTrainingJob response with the fields SageMaker returns for a GPU job."""
    response = {
        "TrainingJobName": job_id,
        "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{job_id}",
        "ModelArtifacts": {"S3ModelArtifacts": f"s3://fashion-gan-runs/team/runs/{job_id}/sagemaker-output/model.tar.gz"},
        "TrainingJobStatus": status,
        "SecondaryStatus": secondary,
        "AlgorithmSpecification": {"TrainingImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/fashion-gan:latest",
                                   "TrainingInputMode": "File"},
        "RoleArn": ROLE_ARN,
        "ResourceConfig": {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
        "CreationTime": CREATED,
        "TrainingStartTime": CREATED,
        "LastModifiedTime": CREATED,
    }
    response.update(extra)
    return response


def recorded_job(backend: SageMakerBackend) -> JobSpec:
    spec = golden_spec(job_id=new_job_id())
    create_record(backend.jobs_dir, spec, "sagemaker")
    return spec


def test_request_matches_golden_file(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", PLACEHOLDER_KEY)
    from fashion_gan.runner.backend import resolve_environment

    spec = golden_spec()
    request = build_training_job_request(spec, OPTIONS, resolve_environment(spec))

    text = json.dumps(request, indent=2, sort_keys=True) + "\n"
    if UPDATE_GOLDEN:
        GOLDEN_DIR.mkdir(exist_ok=True)
        GOLDEN_REQUEST.write_text(text)
    assert text == GOLDEN_REQUEST.read_text()
    assert PLACEHOLDER_KEY in text
    assert FAKE_SECRET not in text


def test_request_passes_botocore_validation(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", PLACEHOLDER_KEY)
    request = build_training_job_request(golden_spec(), OPTIONS, {"WANDB_API_KEY": PLACEHOLDER_KEY})
    validate_parameters(request, create_training_job_shape())  # raises ParamValidationError when invalid


def test_request_fields():
    request = build_training_job_request(golden_spec(), OPTIONS, {})
    assert request["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"
    assert request["ResourceConfig"]["InstanceCount"] == 2
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert request["EnableManagedSpotTraining"] is True
    assert request["CheckpointConfig"]["S3Uri"] == "s3://fashion-gan-runs/team/runs/fg-golden0001/checkpoints-sagemaker/"
    assert request["AlgorithmSpecification"]["ContainerEntrypoint"] == ["python"]
    assert request["AlgorithmSpecification"]["ContainerArguments"][0] == "train.py"


def test_request_instance_type_from_configured_table():
    request = build_training_job_request(golden_spec(machine=parse_machine("gpu2")), OPTIONS, {})
    assert request["ResourceConfig"]["InstanceType"] == "ml.g4dn.12xlarge"


def test_request_without_spot_has_no_max_wait():
    request = build_training_job_request(golden_spec(spot=False), OPTIONS, {})
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600}
    assert request["EnableManagedSpotTraining"] is False


@pytest.mark.parametrize(
    ("changes", "options", "message"),
    [
        ({"machine": parse_machine("gpu16")}, OPTIONS, "no SageMaker instance type for machine 'gpu16'"),
        ({"output_uri": "/local/outputs"}, OPTIONS, "expected an s3:// URI"),
        ({}, {**OPTIONS, "role_arn": None}, "missing sagemaker role_arn"),
        ({}, {**OPTIONS, "max_wait": 60}, "invalid sagemaker max_wait 60 s"),
    ],
)
def test_request_invalid_settings_rejected(changes, options, message):
    with pytest.raises(ConfigError, match=message):
        build_training_job_request(golden_spec(**changes), options, {})


def test_unknown_option_lists_known(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option\(s\) instance_type \(did you mean 'instance_types'\?\).*known options: instance_types"):
        get_backend("sagemaker", {"instance_type": "ml.m5.large"}, tmp_path)


def test_submit_and_status_on_moto_server(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_SECRET)
    backend = get_backend("sagemaker", OPTIONS, tmp_path / "jobs")
    spec = golden_spec(job_id=new_job_id())

    backend.submit(spec)
    status = backend.status(spec.job_id)

    described = boto3.client("sagemaker", region_name="us-east-1").describe_training_job(TrainingJobName=spec.job_id)
    assert described["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"
    assert described["StoppingCondition"]["MaxWaitTimeInSeconds"] == 7200
    # moto completes training jobs as soon as they are created.
    assert status.state is JobState.SUCCEEDED
    assert status.backend == "sagemaker"
    assert status.machine == "gpu"
    record_text = (backend.jobs_dir / f"{spec.job_id}.json").read_text()
    assert spec.job_id in json.loads(record_text)["handle"]["training_job_arn"]
    assert "WANDB_API_KEY" in record_text  # the name is recorded …
    assert FAKE_SECRET not in record_text  # … its value never is


def test_outputs_downloads_run_prefix(s3_server, s3_bucket, tmp_path):
    job_id = new_job_id()
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.put_object(Bucket=s3_bucket, Key=f"team/runs/{job_id}/summary.json", Body=b'{"step": 6}')
    s3.put_object(Bucket=s3_bucket, Key=f"team/runs/{job_id}/samples/step_000006.png", Body=b"png")
    backend = get_backend("sagemaker", OPTIONS, tmp_path / "jobs")
    create_record(backend.jobs_dir, golden_spec(job_id=job_id, output_uri=f"s3://{s3_bucket}/team"), "sagemaker")

    target = backend.outputs(job_id, tmp_path / "download")

    assert target == tmp_path / "download" / job_id
    assert (target / "summary.json").read_bytes() == b'{"step": 6}'
    assert (target / "samples" / "step_000006.png").read_bytes() == b"png"


def test_submit_failure_raises_runner_error_and_removes_record(tmp_path):
    backend, sagemaker_stub, _ = stubbed_backend(tmp_path)
    spec = golden_spec(job_id=new_job_id())
    sagemaker_stub.add_client_error("create_training_job", service_error_code="ResourceLimitExceeded",
                                    service_message="The account-level service limit for ml.g5.xlarge is 0")
    with sagemaker_stub, pytest.raises(RunnerError, match="ResourceLimitExceeded"):
        backend.submit(spec)
    assert not (backend.jobs_dir / f"{spec.job_id}.json").exists()


@pytest.mark.parametrize(
    ("status", "secondary", "reason", "expected_state", "expected_reason"),
    [
        ("InProgress", "Starting", None, JobState.QUEUED, None),
        ("InProgress", "Training", None, JobState.RUNNING, None),
        ("Completed", "Completed", None, JobState.SUCCEEDED, None),
        ("Failed", "Failed", "AlgorithmError: exit code 6: loss is nan", JobState.FAILED,
         "AlgorithmError: exit code 6: loss is nan"),
        ("Stopped", "Stopped", None, JobState.STOPPED, "stopped on request"),
        ("Stopped", "MaxRuntimeExceeded", "Training job reached its maximum runtime", JobState.TIMED_OUT,
         "Training job reached its maximum runtime"),
    ],
)
def test_status_maps_sagemaker_states(tmp_path, status, secondary, reason, expected_state, expected_reason):
    backend, sagemaker_stub, _ = stubbed_backend(tmp_path)
    spec = recorded_job(backend)
    extra = {"FailureReason": reason} if reason else {}
    sagemaker_stub.add_response("describe_training_job", description(spec.job_id, status, secondary, **extra),
                                {"TrainingJobName": spec.job_id})
    with sagemaker_stub:
        result = backend.status(spec.job_id)
    assert result.state is expected_state
    assert result.failure_reason == expected_reason
    assert result.created_at == CREATED


def test_stop_calls_stop_training_job(tmp_path):
    backend, sagemaker_stub, _ = stubbed_backend(tmp_path)
    spec = recorded_job(backend)
    sagemaker_stub.add_response("describe_training_job", description(spec.job_id, "InProgress", "Training"),
                                {"TrainingJobName": spec.job_id})
    sagemaker_stub.add_response("stop_training_job", {}, {"TrainingJobName": spec.job_id})
    with sagemaker_stub:
        backend.stop(spec.job_id)
    sagemaker_stub.assert_no_pending_responses()


def test_stop_of_finished_job_sends_nothing(tmp_path):
    backend, sagemaker_stub, _ = stubbed_backend(tmp_path)
    spec = recorded_job(backend)
    sagemaker_stub.add_response("describe_training_job", description(spec.job_id, "Completed", "Completed"),
                                {"TrainingJobName": spec.job_id})
    with sagemaker_stub:
        backend.stop(spec.job_id)  # a stop_training_job call would fail: no response is queued for it
    sagemaker_stub.assert_no_pending_responses()


def _events(*messages: str) -> list[dict]:
    return [{"timestamp": 1764849600000 + index, "message": message, "ingestionTime": 1764849600500}
            for index, message in enumerate(messages)]


def test_logs_page_until_token_repeats(tmp_path):
    backend, _, logs_stub = stubbed_backend(tmp_path)
    spec = recorded_job(backend)
    stream = f"{spec.job_id}/algo-1-1764849600"
    logs_stub.add_response("describe_log_streams", {"logStreams": [{"logStreamName": stream}]},
                           {"logGroupName": LOG_GROUP, "logStreamNamePrefix": f"{spec.job_id}/"})
    pages = [
        (None, _events("step 1\n", "step 2\n"), "f/0001"),
        ("f/0001", _events("step 3\n"), "f/0002"),
        ("f/0002", [], "f/0002"),  # end of the stream: the same token comes back
    ]
    for token, events, next_token in pages:
        expected = {"logGroupName": LOG_GROUP, "logStreamName": stream, "startFromHead": True}
        if token:
            expected["nextToken"] = token
        logs_stub.add_response("get_log_events",
                               {"events": events, "nextForwardToken": next_token, "nextBackwardToken": "b/0000"},
                               expected)
    with logs_stub:
        lines = list(backend.logs(spec.job_id))
    assert lines == ["step 1", "step 2", "step 3"]
    logs_stub.assert_no_pending_responses()


def test_logs_of_two_hosts_are_prefixed(tmp_path):
    backend, _, logs_stub = stubbed_backend(tmp_path)
    spec = recorded_job(backend)
    streams = [f"{spec.job_id}/algo-1-1764849600", f"{spec.job_id}/algo-2-1764849600"]
    logs_stub.add_response("describe_log_streams", {"logStreams": [{"logStreamName": streams[0]}], "nextToken": "p2"},
                           {"logGroupName": LOG_GROUP, "logStreamNamePrefix": f"{spec.job_id}/"})
    logs_stub.add_response("describe_log_streams", {"logStreams": [{"logStreamName": streams[1]}]},
                           {"logGroupName": LOG_GROUP, "logStreamNamePrefix": f"{spec.job_id}/", "nextToken": "p2"})
    for stream, message in zip(streams, ("rank 0 ready", "rank 1 ready"), strict=True):
        base = {"logGroupName": LOG_GROUP, "logStreamName": stream, "startFromHead": True}
        logs_stub.add_response("get_log_events", {"events": _events(message), "nextForwardToken": "f/1"}, base)
        logs_stub.add_response("get_log_events", {"events": [], "nextForwardToken": "f/1"}, {**base, "nextToken": "f/1"})
    with logs_stub:
        lines = list(backend.logs(spec.job_id))
    assert lines == ["[algo-1-1764849600] rank 0 ready", "[algo-2-1764849600] rank 1 ready"]


def test_logs_before_log_group_exists_are_empty(tmp_path):
    backend, _, logs_stub = stubbed_backend(tmp_path)
    spec = recorded_job(backend)
    logs_stub.add_client_error("describe_log_streams", service_error_code="ResourceNotFoundException",
                               service_message="The specified log group does not exist.")
    with logs_stub:
        assert list(backend.logs(spec.job_id)) == []


def test_submit_from_floyd_file_keeps_secret_out_of_files(s3_server, tmp_path, monkeypatch):
    from fashion_gan.runner import RunOptions, submit_job

    monkeypatch.setenv("FASHION_GAN_TEST_TOKEN", FAKE_SECRET)
    floyd_file = tmp_path / "floyd.yml"
    floyd_file.write_text(
        "env: 123456789012.dkr.ecr.us-east-1.amazonaws.com/fashion-gan:latest\n"
        "machine: cpu\n"
        "output: s3://fashion-gan-runs/team\n"
        "env_vars: [FASHION_GAN_TEST_TOKEN]\n"
        f"sagemaker: {{role_arn: '{ROLE_ARN}', region: us-east-1}}\n"
    )
    jobs_dir = tmp_path / "jobs"

    backend, spec = submit_job(floyd_file, RunOptions(backend="sagemaker"), jobs_dir)

    assert backend.name == "sagemaker"
    assert backend.status(spec.job_id).state is JobState.SUCCEEDED
    described = boto3.client("sagemaker", region_name="us-east-1").describe_training_job(TrainingJobName=spec.job_id)
    assert described["ResourceConfig"]["InstanceType"] == "ml.m5.xlarge"
    for path in jobs_dir.rglob("*"):
        if path.is_file():
            assert FAKE_SECRET not in path.read_text(errors="replace"), path
