"""The project's exception hierarchy and the process exit code of each kind of failure.

Every error a user can cause derives from `FashionGanError`. Entry points catch it, print its
message without a traceback and exit with its `exit_code`. Anything else is a bug and keeps
its traceback (exit code 1).
"""


class ExitCode:
    """Process exit codes of `train.py` and `fashion-gan`, documented in the README."""

    SUCCESS = 0
    BUG = 1  # an unexpected exception: a traceback is printed
    CONFIG = 2  # invalid configuration, floyd.yml or command-line usage
    DATASET = 3  # the dataset is missing, empty or unreadable
    STORAGE = 4  # object storage or the local disk failed (endpoint, bucket, credentials, checksum, disk full)
    RUNNER = 5  # a backend could not submit, query or stop a job
    DIVERGED = 6  # a loss became NaN or infinite; the last good checkpoint is kept
    RUN_CONFLICT = 7  # the run id is in use by another job, or exists with a different config
    PREEMPTED = 75  # stopped by SIGTERM after saving and pushing a checkpoint; rerun to resume


class FashionGanError(Exception):
    """Base class of every error a user can cause. The message names the next step."""

    exit_code = ExitCode.BUG


class ConfigError(FashionGanError):
    """A configuration value, floyd.yml entry or command-line argument is invalid."""

    exit_code = ExitCode.CONFIG


class DatasetError(FashionGanError):
    """A dataset is missing, empty, unreadable or fails verification."""

    exit_code = ExitCode.DATASET


class StorageError(FashionGanError):
    """Object storage or the local disk failed."""

    exit_code = ExitCode.STORAGE


class UnsafeKeyError(StorageError):
    """An object key or archive member would resolve outside the local cache directory."""


class ChecksumError(StorageError):
    """A downloaded object does not match its expected size or sha256."""


class RunnerError(FashionGanError):
    """A job backend failed to submit, query, stop or fetch a job."""

    exit_code = ExitCode.RUNNER


class TrainingDivergedError(FashionGanError):
    """A loss became NaN or infinite."""

    exit_code = ExitCode.DIVERGED


class RunConflictError(FashionGanError):
    """The run id is locked by another job, or exists with a different configuration."""

    exit_code = ExitCode.RUN_CONFLICT
