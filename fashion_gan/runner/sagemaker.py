"""The `sagemaker` backend: one SageMaker training job per job, created with boto3.

The training image runs the job's command through ContainerEntrypoint/ContainerArguments, so the
image needs no SageMaker-specific `train` script. Checkpoints go to
`<output>/runs/<id>/checkpoints-sagemaker/` (SageMaker syncs /opt/ml/checkpoints there, which lets
managed spot training resume after an interruption). Logs come from CloudWatch Logs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from fashion_gan.errors import ConfigError, RunnerError
from fashion_gan.runner.backend import Backend, JobSpec, JobState, JobStatus, resolve_environment
from fashion_gan.runner.jobs import create_record, load_record, record_path, update_handle

log = logging.getLogger(__name__)

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
DEFAULT_INSTANCE_TYPES: dict[str, str] = {
    "cpu": "ml.m5.xlarge",
    "gpu": "ml.g5.xlarge",  # 1 x NVIDIA A10G
    "gpu4": "ml.g5.12xlarge",  # 4 x NVIDIA A10G
    "gpu8": "ml.g5.48xlarge",  # 8 x NVIDIA A10G
}
DEFAULT_MAX_RUNTIME_S = 24 * 3600  # SageMaker's own default stopping condition is one day
DEFAULT_VOLUME_SIZE_GB = 30
_LOG_POLL_INTERVAL_S = 5.0
# Limits of the CreateTrainingJob API (botocore service model, sagemaker 2017-07-24).
_MAX_CONTAINER_ARGUMENTS = 100
_MAX_CONTAINER_ARGUMENT_LENGTH = 256
_MAX_ENVIRONMENT_ENTRIES = 100
_MAX_ENVIRONMENT_VALUE_LENGTH = 512
# SecondaryStatus values of an InProgress job that has not started running the command yet.
_QUEUED_SECONDARY_STATUSES = frozenset({"Starting", "Pending", "LaunchingMLInstances", "PreparingTrainingStack",
                                        "Interrupted", "Restarting"})
_TIMEOUT_SECONDARY_STATUSES = frozenset({"MaxRuntimeExceeded", "MaxWaitTimeExceeded"})


def _require_s3(uri: str) -> str:
    if not uri.startswith("s3://"):
        raise ConfigError(f"invalid output {uri!r} for the sagemaker backend: expected an s3:// URI; "
                          "set `output: s3://bucket/prefix` in floyd.yml")
    return uri.rstrip("/")


def _instance_type(spec: JobSpec, instance_types: dict[str, str]) -> str:
    instance_type = instance_types.get(spec.machine.name)
    if instance_type is None:
        known = ", ".join(f"{name}={value}" for name, value in sorted(instance_types.items()))
        raise ConfigError(
            f"no SageMaker instance type for machine {spec.machine.name!r} (known: {known}); add it under "
            f"`sagemaker: {{instance_types: {{{spec.machine.name}: ml.…}}}}` in floyd.yml"
        )
    return instance_type


def _container_command(command: list[str]) -> dict[str, list[str]]:
    if len(command) - 1 > _MAX_CONTAINER_ARGUMENTS:
        raise ConfigError(f"the command has {len(command) - 1} arguments; SageMaker accepts at most "
                          f"{_MAX_CONTAINER_ARGUMENTS}; move overrides into a Hydra experiment file")
    for argument in command:
        if len(argument) > _MAX_CONTAINER_ARGUMENT_LENGTH:
            raise ConfigError(f"command argument {argument[:40]!r}… is longer than SageMaker's limit of "
                              f"{_MAX_CONTAINER_ARGUMENT_LENGTH} characters")
    result = {"ContainerEntrypoint": command[:1]}
    if len(command) > 1:
        result["ContainerArguments"] = command[1:]
    return result


def _checked_environment(environment: dict[str, str]) -> dict[str, str]:
    if len(environment) > _MAX_ENVIRONMENT_ENTRIES:
        raise ConfigError(f"{len(environment)} environment variables; SageMaker accepts at most "
                          f"{_MAX_ENVIRONMENT_ENTRIES}")
    for name, value in environment.items():
        if len(value) > _MAX_ENVIRONMENT_VALUE_LENGTH:
            # The value may be a secret, so the message names only the variable.
            raise ConfigError(f"the value of {name} is longer than SageMaker's limit of "
                              f"{_MAX_ENVIRONMENT_VALUE_LENGTH} characters")
    return environment


def _tags(spec: JobSpec) -> list[dict[str, str]]:
    tags = [{"Key": "fashion-gan:job-id", "Value": spec.job_id}]
    for tag in spec.tags:
        key, _, value = tag.partition("=")
        tags.append({"Key": key, "Value": value})
    return tags


def build_training_job_request(spec: JobSpec, options: dict[str, Any], environment: dict[str, str]) -> dict[str, Any]:
    """Return the CreateTrainingJob parameters for `spec`.

    `environment` is the job's full environment (pass-through values included); it goes into the
    request only, never into the job record.
    """
    role_arn = options.get("role_arn")
    if not role_arn:
        raise ConfigError("missing sagemaker role_arn: set `sagemaker: {role_arn: arn:aws:iam::…:role/…}` "
                          "in floyd.yml (the IAM role SageMaker assumes to run the job)")
    instance_types = {**DEFAULT_INSTANCE_TYPES, **options.get("instance_types", {})}
    run_uri = f"{_require_s3(spec.output_uri)}/runs/{spec.job_id}"
    max_runtime_s = spec.max_runtime_s or DEFAULT_MAX_RUNTIME_S

    stopping_condition = {"MaxRuntimeInSeconds": max_runtime_s}
    if spec.spot:
        max_wait_s = int(options.get("max_wait", 2 * max_runtime_s))
        if max_wait_s < max_runtime_s:
            raise ConfigError(f"invalid sagemaker max_wait {max_wait_s} s: SageMaker requires it to be at least "
                              f"max_runtime ({max_runtime_s} s)")
        stopping_condition["MaxWaitTimeInSeconds"] = max_wait_s

    return {
        "TrainingJobName": spec.job_id,
        "AlgorithmSpecification": {
            "TrainingImage": spec.image,
            "TrainingInputMode": "File",
            **_container_command(spec.command),
        },
        "RoleArn": role_arn,
        "OutputDataConfig": {"S3OutputPath": f"{run_uri}/sagemaker-output/"},
        "ResourceConfig": {
            "InstanceType": _instance_type(spec, instance_types),
            "InstanceCount": spec.instance_count,
            "VolumeSizeInGB": DEFAULT_VOLUME_SIZE_GB,
        },
        "StoppingCondition": stopping_condition,
        "EnableManagedSpotTraining": spec.spot,
        "CheckpointConfig": {"S3Uri": f"{run_uri}/checkpoints-sagemaker/", "LocalPath": CHECKPOINT_LOCAL_PATH},
        "Environment": _checked_environment(environment),
        "Tags": _tags(spec),
    }


def redacted_request(request: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the request with every environment value replaced, for logging."""
    copy = dict(request)
    copy["Environment"] = {name: "<redacted>" for name in request.get("Environment", {})}
    return copy


def state_from_description(description: dict[str, Any]) -> tuple[JobState, str | None]:
    """Map a DescribeTrainingJob response to a job state and a failure reason."""
    status = description["TrainingJobStatus"]
    secondary = description.get("SecondaryStatus", "")
    reason = description.get("FailureReason")
    if secondary in _TIMEOUT_SECONDARY_STATUSES and status in ("Stopped", "Failed", "Stopping"):
        return JobState.TIMED_OUT, reason or f"SageMaker stopped the job: {secondary}"
    if status == "InProgress":
        return (JobState.QUEUED if secondary in _QUEUED_SECONDARY_STATUSES else JobState.RUNNING), None
    if status == "Stopping":
        return JobState.RUNNING, "stop requested; SageMaker is stopping the job"
    if status == "Completed":
        return JobState.SUCCEEDED, None
    if status == "Stopped":
        return JobState.STOPPED, reason or "stopped on request"
    if status == "Failed":
        return JobState.FAILED, reason or "SageMaker reported the job as failed without a reason"
    if status == "Deleting":
        return JobState.STOPPED, "SageMaker is deleting the job"
    raise RunnerError(f"unknown SageMaker TrainingJobStatus {status!r}; update fashion_gan.runner.sagemaker")


class SageMakerBackend(Backend):
    """Submits jobs as SageMaker training jobs. Endpoints and credentials follow boto3's defaults."""

    name = "sagemaker"
    known_options = frozenset({"role_arn", "instance_types", "region", "max_wait"})

    def __init__(self, options: dict[str, Any], jobs_dir, *, sagemaker_client: Any = None,
                 logs_client: Any = None) -> None:
        super().__init__(options, jobs_dir)
        self._sagemaker_client = sagemaker_client
        self._logs_client = logs_client

    def _client(self, service: str) -> Any:
        import boto3
        import botocore.exceptions

        try:
            return boto3.session.Session(region_name=self.options.get("region")).client(service)
        except botocore.exceptions.NoRegionError as err:
            raise ConfigError("no AWS region for the sagemaker backend: set `sagemaker: {region: …}` in "
                              "floyd.yml or AWS_DEFAULT_REGION") from err

    @property
    def sagemaker(self) -> Any:
        if self._sagemaker_client is None:
            self._sagemaker_client = self._client("sagemaker")
        return self._sagemaker_client

    @property
    def cloudwatch_logs(self) -> Any:
        if self._logs_client is None:
            self._logs_client = self._client("logs")
        return self._logs_client

    def _call(self, operation: str, job_id: str, **parameters: Any) -> dict[str, Any]:
        import botocore.exceptions

        log.debug("sagemaker %s for job %s", operation, job_id)
        try:
            return getattr(self.sagemaker, operation)(**parameters)
        except botocore.exceptions.ClientError as err:
            raise RunnerError(f"SageMaker {operation} failed for job {job_id}: {err}") from err
        except botocore.exceptions.BotoCoreError as err:
            raise RunnerError(f"SageMaker {operation} failed for job {job_id}: {err}; check the AWS "
                              "endpoint, region and credentials") from err

    def submit(self, spec: JobSpec) -> None:
        request = build_training_job_request(spec, self.options, resolve_environment(spec))
        create_record(self.jobs_dir, spec, self.name)
        log.debug("create_training_job request: %s", redacted_request(request))
        try:
            response = self._call("create_training_job", spec.job_id, **request)
        except RunnerError:
            record_path(self.jobs_dir, spec.job_id).unlink(missing_ok=True)
            raise
        update_handle(self.jobs_dir, spec.job_id, training_job_name=spec.job_id,
                      training_job_arn=response["TrainingJobArn"])
        log.info("created SageMaker training job %s", response["TrainingJobArn"])

    def _describe(self, job_id: str) -> dict[str, Any]:
        record = load_record(self.jobs_dir, job_id)
        name = record.handle.get("training_job_name", job_id)
        return self._call("describe_training_job", job_id, TrainingJobName=name)

    def status(self, job_id: str) -> JobStatus:
        record = load_record(self.jobs_dir, job_id)
        description = self._describe(job_id)
        state, reason = state_from_description(description)
        return JobStatus(
            job_id=job_id, backend=self.name, state=state,
            created_at=description.get("CreationTime", record.created_at),
            started_at=description.get("TrainingStartTime"), finished_at=description.get("TrainingEndTime"),
            machine=record.spec.machine.name, description=record.spec.description,
            failure_reason=reason, exit_code=None,
        )

    def stop(self, job_id: str, grace_period_s: float = 30.0) -> None:
        # SageMaker sends SIGTERM and ends the job 120 s later (StopTrainingJob documentation in the
        # botocore service model), so grace_period_s does not apply here.
        state = self.status(job_id).state
        if state.is_finished:
            log.info("SageMaker job %s has already finished (%s); nothing to stop", job_id, state.value)
            return
        self._call("stop_training_job", job_id, TrainingJobName=job_id)
        log.info("requested stop of SageMaker training job %s", job_id)

    def _log_streams(self, job_id: str) -> list[str]:
        import botocore.exceptions

        streams: list[str] = []
        parameters: dict[str, Any] = {"logGroupName": LOG_GROUP, "logStreamNamePrefix": f"{job_id}/"}
        try:
            while True:
                response = self.cloudwatch_logs.describe_log_streams(**parameters)
                streams += [stream["logStreamName"] for stream in response.get("logStreams", [])]
                if not response.get("nextToken"):
                    return sorted(streams)
                parameters["nextToken"] = response["nextToken"]
        except botocore.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                return []  # the log group appears only once the first job has started
            raise RunnerError(f"CloudWatch Logs describe_log_streams failed for job {job_id}: {err}") from err

    def _read_stream(self, stream: str, token: str | None) -> tuple[list[str], str | None]:
        """Read a log stream from `token` to its current end; return the messages and the next token.

        get_log_events returns the same nextForwardToken as the one sent once the end is reached.
        """
        import botocore.exceptions

        messages: list[str] = []
        while True:
            parameters: dict[str, Any] = {"logGroupName": LOG_GROUP, "logStreamName": stream, "startFromHead": True}
            if token:
                parameters["nextToken"] = token
            try:
                response = self.cloudwatch_logs.get_log_events(**parameters)
            except botocore.exceptions.ClientError as err:
                raise RunnerError(f"CloudWatch Logs get_log_events failed for stream {stream}: {err}") from err
            messages += [event["message"].rstrip("\n") for event in response.get("events", [])]
            next_token = response.get("nextForwardToken")
            if not next_token or next_token == token:
                return messages, next_token or token
            token = next_token

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        load_record(self.jobs_dir, job_id)  # raises for an unknown job
        tokens: dict[str, str | None] = {}
        while True:
            finished = follow and self.status(job_id).state.is_finished
            streams = self._log_streams(job_id)
            for stream in streams:
                messages, tokens[stream] = self._read_stream(stream, tokens.get(stream))
                # Streams are named `<job>/algo-N-<timestamp>`; prefix lines by host when there are several.
                prefix = f"[{stream.split('/', 1)[-1]}] " if len(streams) > 1 else ""
                for message in messages:
                    yield prefix + message
            if not follow or finished:
                return
            time.sleep(_LOG_POLL_INTERVAL_S)
