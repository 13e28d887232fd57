"""Distributed training: two CPU processes (gloo) through train.py, and the multi-node environment."""

import re
import subprocess
import sys
from collections import defaultdict

import boto3
import numpy as np
import pytest
import torch

from fashion_gan import train as train_module
from fashion_gan.config import TrainConfig
from fashion_gan.data.datamodule import batch_indices
from fashion_gan.errors import ConfigError
from training_helpers import FASHION_MNIST_DIR, PROJECT_DIR, TINY_MODEL, run_train
from wandb_files import run_files, run_info

MAX_STEPS = 4
BATCH_SIZE = 16  # TINY_MODEL's data.batch_size
SEED = 42  # conf/config.yaml run.seed
FASHION_MNIST_IMAGES = 60000
INDEX_LINE = re.compile(r"rank (\d+) of (\d+), step (\d+): image indices ([\d,]+)")

DDP_OVERRIDES = [
    "experiment=fashion_mnist", "data.image_size=16", f"trainer.max_steps={MAX_STEPS}",
    "run.checkpoint_every_n_steps=2", "run.sample_every_n_steps=2", "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", *TINY_MODEL,
]


def require_fashion_mnist() -> None:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


def indices_by_rank(stderr: str) -> dict[int, dict[int, list[int]]]:
    """Return {rank: {step: image indices}} from the data module's DEBUG lines, checking world size 2."""
    seen: dict[int, dict[int, list[int]]] = defaultdict(dict)
    for rank, world_size, step, indices in INDEX_LINE.findall(stderr):
        assert world_size == "2"
        seen[int(rank)][int(step)] = [int(index) for index in indices.split(",")]
    return seen


def assert_disjoint_rank_shards(stderr: str) -> None:
    seen = indices_by_rank(stderr)
    assert sorted(seen) == [0, 1]
    for step in range(MAX_STEPS):
        rank0, rank1 = seen[0][step], seen[1][step]
        assert len(rank0) == BATCH_SIZE
        assert len(rank1) == BATCH_SIZE
        assert not set(rank0) & set(rank1), f"ranks shared images at step {step}"
        for rank, indices in ((0, rank0), (1, rank1)):
            expected = batch_indices(step, seed=SEED, num_items=FASHION_MNIST_IMAGES, batch_size=BATCH_SIZE,
                                     rank=rank, world_size=2)
            assert indices == expected.tolist()


def assert_one_run_in_bucket(client, bucket: str) -> str:
    """Return the run id after checking the bucket contains exactly one run with a final checkpoint."""
    keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="jobs/runs/")
            for item in page.get("Contents", [])]
    run_ids = {key.split("/")[2] for key in keys}
    assert len(run_ids) == 1, run_ids
    run_id = run_ids.pop()
    prefix = f"jobs/runs/{run_id}"
    assert f"{prefix}/checkpoints/step_{MAX_STEPS:06d}.ckpt" in keys
    assert f"{prefix}/samples/step_{MAX_STEPS:06d}.png" in keys
    assert f"{prefix}/summary.json" in keys
    return run_id


def assert_final_checkpoint(client, bucket: str, run_id: str, tmp_path) -> None:
    local_path = tmp_path / "last.ckpt"
    client.download_file(bucket, f"jobs/runs/{run_id}/checkpoints/last.ckpt", str(local_path))
    checkpoint = torch.load(local_path, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == MAX_STEPS


def read_summary(client, bucket: str, run_id: str) -> dict:
    import json

    return json.loads(client.get_object(Bucket=bucket, Key=f"jobs/runs/{run_id}/summary.json")["Body"].read())


@pytest.mark.slow
def test_two_processes_lightning_launcher(s3_bucket, tmp_path):
    require_fashion_mnist()
    cache_dir = tmp_path / "cache"

    # No run.id: the first process generates one and the process Lightning launches must reuse it.
    result = run_train(["storage=s3", f"run.output=s3://{s3_bucket}/jobs", *DDP_OVERRIDES],
                       env={"FASHION_GAN_CACHE": str(cache_dir), "WANDB_MODE": "offline",
                            "FASHION_GAN_LOG_LEVEL": "DEBUG"})

    assert result.returncode == 0, result.stderr[-4000:]
    client = boto3.client("s3")
    run_id = assert_one_run_in_bucket(client, s3_bucket)
    assert_final_checkpoint(client, s3_bucket, run_id, tmp_path)
    summary = read_summary(client, s3_bucket, run_id)
    assert summary["steps"] == MAX_STEPS
    assert summary["images_seen"] == MAX_STEPS * BATCH_SIZE * 2
    assert [path.name for path in (cache_dir / "runs").iterdir()] == [run_id]
    wandb_runs = run_files(cache_dir / "runs" / run_id)
    assert len(wandb_runs) == 1
    assert run_info(wandb_runs[0])["id"] == run_id
    assert_disjoint_rank_shards(result.stderr)


@pytest.mark.slow
def test_two_processes_torchrun(tmp_path):
    require_fashion_mnist()
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(PROJECT_DIR / "train.py"), "logger=csv", f"run.output={output_dir}", *DDP_OVERRIDES]
    import os

    env = {**os.environ, "FASHION_GAN_CACHE": str(tmp_path / "cache"), "FASHION_GAN_LOG_LEVEL": "DEBUG",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=600)

    assert result.returncode == 0, result.stderr[-4000:]
    run_dirs = list((output_dir / "runs").iterdir())
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    assert re.fullmatch(r"fg-[0-9a-z]{10}", run_dir.name)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == MAX_STEPS
    steps = [line.split(",")[0] for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [str(step) for step in range(1, MAX_STEPS + 1)]
    assert_disjoint_rank_shards(result.stderr)


def test_strategy_for_several_processes():
    config = TrainConfig()
    config.trainer.accelerator = "cpu"
    assert train_module._training_strategy(config) == "auto"
    config.trainer.devices = 2
    assert train_module._training_strategy(config) == "ddp_find_unused_parameters_true"
    config.trainer.devices = 1
    config.trainer.strategy = "ddp"
    assert train_module._training_strategy(config) == "ddp_find_unused_parameters_true"


def test_sagemaker_hosts_set_torch_distributed_env(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "WORLD_SIZE"):
        # setenv first, so that monkeypatch restores "unset" even for a variable that is not set now:
        # a bare delenv(raising=False) records nothing, and the values set below would leak into
        # every later test and the train.py processes they start.
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    monkeypatch.setenv("SM_HOSTS", '["algo-1", "algo-2"]')
    monkeypatch.setenv("SM_CURRENT_HOST", "algo-2")
    monkeypatch.setenv("SM_NUM_GPUS", "4")
    config = TrainConfig()

    train_module._apply_sagemaker_distributed_env(config)

    import os

    assert os.environ["MASTER_ADDR"] == "algo-1"
    assert os.environ["NODE_RANK"] == "1"
    assert os.environ["WORLD_SIZE"] == "8"
    assert config.trainer.num_nodes == 2


def test_sagemaker_hosts_conflicting_num_nodes(monkeypatch):
    monkeypatch.setenv("SM_HOSTS", '["algo-1", "algo-2"]')
    monkeypatch.setenv("SM_CURRENT_HOST", "algo-1")
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(name, "0")  # keep the test from changing the real environment
    config = TrainConfig()
    config.trainer.num_nodes = 3

    with pytest.raises(ConfigError, match="trainer.num_nodes=3"):
        train_module._apply_sagemaker_distributed_env(config)


def test_torchrun_run_id_from_rendezvous(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "3f2a")
    first = train_module._external_launch_run_id()
    assert re.fullmatch(r"fg-[0-9a-z]{10}", first)
    assert train_module._external_launch_run_id() == first

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(ConfigError, match="run.id"):
        train_module._external_launch_run_id()


def test_rank_shards_cover_the_global_batch():
    rank0 = batch_indices(5, seed=SEED, num_items=100, batch_size=8, rank=0, world_size=2)
    rank1 = batch_indices(5, seed=SEED, num_items=100, batch_size=8, rank=1, world_size=2)
    assert not set(rank0.tolist()) & set(rank1.tolist())
    assert np.unique(np.concatenate([rank0, rank1])).size == 16
