"""Helpers of the reliability tests: tiny deterministic jobs, bounded polling, checkpoint comparison."""

import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training_helpers import FASHION_MNIST_DIR, PROJECT_DIR, TINY_MODEL

TRAIN_SCRIPT = PROJECT_DIR / "train.py"
# A 16x16 Fashion-MNIST DCGAN small enough for hundreds of steps in a test. Deterministic
# algorithms make a resumed run bitwise equal to an uninterrupted one.
TINY_JOB = ["experiment=fashion_mnist", "data.image_size=16", "trainer.deterministic=true", *TINY_MODEL]
POLL_INTERVAL_S = 0.05


def require_fashion_mnist() -> None:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")


def wait_until(condition, timeout_s: float, description: str, process: subprocess.Popen | None = None) -> None:
    """Poll `condition` until it returns true; fail with `description` after `timeout_s` or when `process` ends."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"the job exited with code {process.returncode} before {description}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {description}")
        time.sleep(POLL_INTERVAL_S)


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "WANDB_SILENT": "true", **(extra or {})}


def start_train(arguments: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start `python train.py ARGUMENTS` with stdout and stderr going to `log_path`."""
    with open(log_path, "wb") as log_file:
        return subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *arguments], cwd=cwd or PROJECT_DIR,
                                env=child_environment(env), stdout=log_file, stderr=subprocess.STDOUT)


def metrics_steps(path: Path) -> list[int]:
    """Return the step column of a metrics.csv, or [] while the file has no rows."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        return []
    return [int(row[0]) for row in rows[1:] if row and row[0].isdigit()]


def metrics_csv_steps_from_text(text: str) -> list[int]:
    return [int(line.split(",")[0]) for line in text.splitlines()[1:] if line]


def last_logged_step(path: Path) -> int:
    steps = metrics_steps(path)
    return steps[-1] if steps else 0


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_checkpoint_bytes(data: bytes, tmp_path: Path, name: str = "checkpoint.ckpt") -> dict:
    path = tmp_path / name
    path.write_bytes(data)
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_training_state(first: dict, second: dict) -> None:
    """Assert equal weights, buffers and optimizer states, tensor by tensor and bit by bit."""
    assert first["global_step"] == second["global_step"]
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for name, tensor in first["state_dict"].items():
        assert torch.equal(tensor, second["state_dict"][name]), f"weights differ: {name}"
    assert len(first["optimizer_states"]) == len(second["optimizer_states"]) == 2
    for index, (state_a, state_b) in enumerate(zip(first["optimizer_states"], second["optimizer_states"])):
        assert state_a["state"].keys() == state_b["state"].keys()
        for parameter, values in state_a["state"].items():
            for key, value in values.items():
                other = state_b["state"][parameter][key]
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), \
                    f"optimizer {index} state {key} of parameter {parameter} differs"


def read_bucket_json(client, bucket: str, key: str) -> dict:
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def bucket_keys(client, bucket: str, prefix: str = "") -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(entry["Key"] for entry in page.get("Contents", []))
    return keys


def stop_process(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Kill a test's own job process if it still runs (cleanup after a failed assertion)."""
    if process.poll() is None:
        process.kill()
        process.wait(timeout=timeout_s)
