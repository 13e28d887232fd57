"""Concurrent jobs on one bucket: separate run ids stay apart, and one run id has one trainer at a time."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from fashion_gan.errors import RunConflictError
from fashion_gan.run_outputs import RunLock, _pid_namespace, _process_start_ticks
from fashion_gan.storage import open_store

from reliability_helpers import (
    TINY_JOB,
    bucket_keys,
    last_logged_step,
    load_checkpoint_bytes,
    read_bucket_json,
    require_fashion_mnist,
    sha256_bytes,
    start_train,
    stop_process,
    wait_until,
)
from training_helpers import run_train

JOB_TIMEOUT_S = 600


@pytest.mark.slow
def test_two_run_ids_keep_to_their_own_objects(s3_bucket, tmp_path):
    require_fashion_mnist()
    client = boto3.client("s3")
    common = [*TINY_JOB, "logger=csv", f"run.output=s3://{s3_bucket}/jobs", "trainer.max_steps=6",
              "run.checkpoint_every_n_steps=2", "run.sample_every_n_steps=2", "trainer.log_every_n_steps=1"]
    caches = {"left": tmp_path / "cache-left", "right": tmp_path / "cache-right"}
    seeds = {"left": 1, "right": 2}
    processes = {
        name: start_train([*common, f"run.id={name}", f"run.seed={seeds[name]}"],
                          {"FASHION_GAN_CACHE": str(caches[name])}, tmp_path / f"{name}.log")
        for name in caches
    }
    try:
        for name, process in processes.items():
            assert process.wait(timeout=JOB_TIMEOUT_S) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        for process in processes.values():
            stop_process(process)

    keys = bucket_keys(client, s3_bucket)
    assert keys, "the jobs pushed nothing"
    assert [key for key in keys if not key.startswith(("jobs/runs/left/", "jobs/runs/right/"))] == []
    for name, cache_dir in caches.items():
        prefix = f"jobs/runs/{name}"
        run_keys = [key for key in keys if key.startswith(f"{prefix}/")]
        assert f"{prefix}/lock.json" not in run_keys  # released at the end
        summary = read_bucket_json(client, s3_bucket, f"{prefix}/summary.json")
        assert summary["run_id"] == name
        assert summary["steps"] == 6
        for step in (2, 4, 6):
            key = f"{prefix}/checkpoints/step_{step:06d}.ckpt"
            data = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
            local = cache_dir / "runs" / name / "checkpoints" / f"step_{step:06d}.ckpt"
            assert sha256_bytes(data) == sha256_bytes(local.read_bytes()), key
            assert load_checkpoint_bytes(data, tmp_path)["hyper_parameters"]["seed"] == seeds[name]


@pytest.mark.slow
def test_second_job_on_same_run_id_is_rejected(s3_bucket, tmp_path):
    require_fashion_mnist()
    client = boto3.client("s3")
    run_id = "contested"
    arguments = [*TINY_JOB, "logger=csv", f"run.output=s3://{s3_bucket}/jobs", f"run.id={run_id}",
                 "trainer.max_steps=100000", "trainer.log_every_n_steps=1", "run.checkpoint_every_n_steps=1000"]
    env = {"FASHION_GAN_CACHE": str(tmp_path / "cache")}
    holder = start_train(arguments, env, tmp_path / "holder.log")
    try:
        wait_until(lambda: last_logged_step(tmp_path / "cache/runs" / run_id / "metrics.csv") >= 1, JOB_TIMEOUT_S,
                   "the first job's first step", holder)
        lock = read_bucket_json(client, s3_bucket, f"jobs/runs/{run_id}/lock.json")
        assert lock["pid"] == holder.pid

        second = run_train(arguments, env={"FASHION_GAN_CACHE": str(tmp_path / "cache-second")}, timeout_s=JOB_TIMEOUT_S)

        assert second.returncode == 7, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        assert f"Run id '{run_id}' is being trained by another job (host {socket.gethostname()}, pid {holder.pid}" \
            in second.stderr
        assert not (tmp_path / "cache-second/runs" / run_id / "metrics.csv").exists()
        assert holder.poll() is None, "the first job stopped while the second one was rejected"
        assert read_bucket_json(client, s3_bucket, f"jobs/runs/{run_id}/lock.json")["token"] == lock["token"]

        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=JOB_TIMEOUT_S) == 75, (tmp_path / "holder.log").read_text()[-3000:]
    finally:
        stop_process(holder)
    assert f"jobs/runs/{run_id}/lock.json" not in bucket_keys(client, s3_bucket)
    assert read_bucket_json(client, s3_bucket, f"jobs/runs/{run_id}/summary.json")["state"] == "stopped"


def write_forged_lock(store, run_id: str, **fields) -> None:
    """Write a lock as another job would have, with a fresh heartbeat."""
    holder = {"host": socket.gethostname(), "token": "forged", "heartbeat": time.time(), **fields}
    store.write_bytes(f"runs/{run_id}/lock.json", json.dumps(holder).encode())


needs_proc = pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(), reason="needs Linux /proc pid namespaces")


@needs_proc
def test_lock_of_reused_pid_is_taken_over(tmp_path):
    store = open_store(str(tmp_path / "out"))
    # The holder's pid now belongs to another process (this one), which started at a different time.
    write_forged_lock(store, "reused", pid=os.getpid(), pid_namespace=_pid_namespace(),
                      process_start=_process_start_ticks(os.getpid()) - 1)
    lock = RunLock(store, "reused", stale_after_s=120)

    lock.acquire()

    try:
        assert lock.held
        assert json.loads(store.read_bytes("runs/reused/lock.json"))["token"] != "forged"
    finally:
        lock.release()


@needs_proc
def test_lock_from_other_pid_namespace_is_kept(tmp_path):
    store = open_store(str(tmp_path / "out"))
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    # A job container under host networking has this host name but its own pid numbering, so a pid that
    # ended here does not show that the holder is gone. Only its fresh heartbeat counts.
    write_forged_lock(store, "container", pid=ended.pid, pid_namespace="pid:[1]", process_start=5)
    lock = RunLock(store, "container", stale_after_s=120)

    with pytest.raises(RunConflictError, match=f"pid {ended.pid}, heartbeat 0 s ago"):
        lock.acquire()

    assert not lock.held
    assert json.loads(store.read_bytes("runs/container/lock.json"))["token"] == "forged"
