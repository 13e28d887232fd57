"""The training job end to end: train.py in a subprocess, data and outputs on the loopback S3 server."""

import json

import boto3
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from training_helpers import CLOTHING_DIR, FASHION_MNIST_DIR, TINY_MODEL, run_train
from wandb_files import history_rows, run_files, run_info

METRIC_KEYS = {"train/d_loss", "train/g_loss", "train/d_real", "train/d_fake", "perf/images_per_s"}


def grid_side(images_per_row: int, image_size: int, padding: int = 2) -> int:
    """Return the side in pixels of torchvision's make_grid output for a square grid."""
    return images_per_row * (image_size + padding) + padding


def upload_folder(client, bucket: str, folder, prefix: str, limit_per_class: int | None = None) -> int:
    count = 0
    for class_dir in sorted(path for path in folder.iterdir() if path.is_dir()):
        for image_path in sorted(class_dir.iterdir())[:limit_per_class]:
            client.upload_file(str(image_path), bucket, f"{prefix}/{class_dir.name}/{image_path.name}")
            count += 1
    return count


def read_json(client, bucket: str, key: str) -> dict:
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def assert_checkpoint_at_step(client, bucket: str, key: str, tmp_path, step: int) -> dict:
    local_path = tmp_path / "downloaded.ckpt"
    client.download_file(bucket, key, str(local_path))
    checkpoint = torch.load(local_path, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == step
    adam_steps = [float(state["step"]) for optimizer in checkpoint["optimizer_states"]
                  for state in optimizer["state"].values()][:1]
    assert adam_steps == [float(step)]
    return checkpoint


def assert_wandb_files(run_dir, run_id: str) -> None:
    files = run_files(run_dir)
    assert files, f"no offline W&B run under {run_dir}"
    rows = [row for path in files for row in history_rows(path)]
    logged_keys = set().union(*rows)
    assert METRIC_KEYS <= logged_keys
    assert any(key.startswith("samples/fixed_noise") for key in logged_keys)
    assert run_info(files[0])["id"] == run_id
    assert list(run_dir.glob("wandb/offline-run-*/files/media/images/**/*.png"))


@pytest.mark.slow
def test_fashion_mnist_from_s3_to_s3(s3_bucket, tmp_path):
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    client = boto3.client("s3")
    for path in sorted(FASHION_MNIST_DIR.glob("*-ubyte*")):
        client.upload_file(str(path), s3_bucket, f"fashion-mnist/{path.name}")
    cache_dir = tmp_path / "cache"
    run_id = "e2e-fashion-mnist"

    result = run_train([
        "experiment=fashion_mnist", "storage=s3", f"data.source=s3://{s3_bucket}/fashion-mnist",
        f"run.output=s3://{s3_bucket}/jobs", f"run.id={run_id}", "trainer.max_steps=8",
        "run.checkpoint_every_n_steps=4", "run.sample_every_n_steps=4", "trainer.log_every_n_steps=2",
        *TINY_MODEL,
    ], env={"FASHION_GAN_CACHE": str(cache_dir), "WANDB_MODE": "offline"})

    assert result.returncode == 0, result.stderr[-4000:]
    prefix = f"jobs/runs/{run_id}"
    pointer = read_json(client, s3_bucket, f"{prefix}/checkpoints/latest.json")
    assert pointer["step"] == 8
    assert_checkpoint_at_step(client, s3_bucket, f"{prefix}/checkpoints/last.ckpt", tmp_path, step=8)
    sample_bytes = client.get_object(Bucket=s3_bucket, Key=f"{prefix}/samples/step_000008.png")["Body"].read()
    (tmp_path / "grid.png").write_bytes(sample_bytes)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (grid_side(4, 32), grid_side(4, 32))
    summary = read_json(client, s3_bucket, f"{prefix}/summary.json")
    assert summary["state"] == "succeeded"
    assert summary["steps"] == 8
    assert summary["images_seen"] == 8 * 16
    assert summary["dataset_images"] == 60000
    assert summary["dataset_source"] == f"s3://{s3_bucket}/fashion-mnist"
    assert len(summary["dataset_digest"]) == 64
    assert summary["skipped_files"] == 0
    assert summary["images_per_s"] > 0
    assert summary["package_version"] == "0.1.0"
    assert set(summary["final_losses"]) == {"train/d_loss", "train/g_loss", "train/d_real", "train/d_fake"}
    metrics_csv = client.get_object(Bucket=s3_bucket, Key=f"{prefix}/metrics.csv")["Body"].read().decode()
    assert [line.split(",")[0] for line in metrics_csv.splitlines()[1:]] == ["2", "4", "6", "8"]
    stored_config = yaml.safe_load(client.get_object(Bucket=s3_bucket, Key=f"{prefix}/config.yaml")["Body"].read())
    assert stored_config["run"]["id"] == run_id
    assert_wandb_files(cache_dir / "runs" / run_id, run_id)


@pytest.mark.slow
def test_clothing_photos_from_s3(s3_bucket, tmp_path):
    if not CLOTHING_DIR.is_dir():
        pytest.skip(f"clothing photos not found at {CLOTHING_DIR}")
    client = boto3.client("s3")
    uploaded = upload_folder(client, s3_bucket, CLOTHING_DIR, "photos", limit_per_class=30)
    client.put_object(Bucket=s3_bucket, Key="photos/.DS_Store", Body=b"\x00\x01")
    client.put_object(Bucket=s3_bucket, Key="photos/notes.txt", Body=b"not an image")
    client.put_object(Bucket=s3_bucket, Key="photos/dress/broken.jpg", Body=b"not a jpeg at all")
    cache_dir = tmp_path / "cache"
    run_id = "e2e-photos"

    result = run_train([
        "experiment=fashion_photos", "storage=s3", f"data.source=s3://{s3_bucket}/photos",
        f"run.output=s3://{s3_bucket}/jobs", f"run.id={run_id}", "data.image_size=32", "trainer.max_steps=4",
        "run.checkpoint_every_n_steps=2", "run.sample_every_n_steps=2", "trainer.log_every_n_steps=2",
        *TINY_MODEL,
    ], env={"FASHION_GAN_CACHE": str(cache_dir), "WANDB_MODE": "offline"})

    assert result.returncode == 0, result.stderr[-4000:]
    prefix = f"jobs/runs/{run_id}"
    assert_checkpoint_at_step(client, s3_bucket, f"{prefix}/checkpoints/last.ckpt", tmp_path, step=4)
    summary = read_json(client, s3_bucket, f"{prefix}/summary.json")
    assert summary["dataset_images"] == uploaded
    assert summary["skipped_files"] == 1
    assert summary["skipped_file_names"] == ["dress/broken.jpg"]
    (tmp_path / "real.png").write_bytes(
        client.get_object(Bucket=s3_bucket, Key=f"{prefix}/samples/real.png")["Body"].read())
    with Image.open(tmp_path / "real.png") as grid:
        assert grid.mode == "RGB"
        assert grid.size == (grid_side(4, 32), grid_side(4, 32))
    assert_wandb_files(cache_dir / "runs" / run_id, run_id)


def final_state(run_dir, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step_{step:06d}.ckpt", map_location="cpu", weights_only=False)


def assert_same_training_state(first: dict, second: dict) -> None:
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for name, tensor in first["state_dict"].items():
        assert torch.equal(tensor, second["state_dict"][name]), name
    for optimizer_a, optimizer_b in zip(first["optimizer_states"], second["optimizer_states"], strict=True):
        for index, state in optimizer_a["state"].items():
            for key, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(optimizer_b["state"][index][key])), key


@pytest.mark.slow
def test_resume_continues_to_max_steps(tmp_path):
    common = ["experiment=fashion_mnist", "logger=csv", f"run.output={tmp_path}/out", "trainer.deterministic=true",
              "run.checkpoint_every_n_steps=3", "trainer.log_every_n_steps=1", "data.image_size=16", *TINY_MODEL]
    env = {"FASHION_GAN_CACHE": str(tmp_path / "cache")}

    first = run_train([*common, "run.id=resumed", "trainer.max_steps=6"], env=env)
    second = run_train([*common, "run.id=resumed", "trainer.max_steps=9"], env=env)
    straight = run_train([*common, "run.id=straight", "trainer.max_steps=9"], env=env)

    for result in (first, second, straight):
        assert result.returncode == 0, result.stderr[-4000:]
    resumed_dir, straight_dir = tmp_path / "out/runs/resumed", tmp_path / "out/runs/straight"
    summary = json.loads((resumed_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == 6
    assert summary["steps"] == 9
    assert "Resuming run resumed from step 6" in second.stderr
    resumed, uninterrupted = final_state(resumed_dir, 9), final_state(straight_dir, 9)
    assert resumed["global_step"] == 9
    assert_same_training_state(resumed, uninterrupted)
    steps = [line.split(",")[0] for line in (resumed_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [str(step) for step in range(1, 10)]


@pytest.mark.slow
def test_same_run_id_with_other_config_is_rejected(tmp_path):
    common = ["experiment=fashion_mnist", "logger=none", f"run.output={tmp_path}/out", "trainer.max_steps=2",
              "data.image_size=16", "run.id=taken", *TINY_MODEL]
    env = {"FASHION_GAN_CACHE": str(tmp_path / "cache")}
    assert run_train(common, env=env).returncode == 0
    summary_before = (tmp_path / "out/runs/taken/summary.json").read_text()

    rejected = run_train([*common, "model.lr=0.001"], env=env)

    assert rejected.returncode == 7
    assert "model.lr: 0.0002 -> 0.001" in rejected.stderr
    assert "run.resume=always" in rejected.stderr
    assert "Traceback" not in rejected.stderr
    assert (tmp_path / "out/runs/taken/summary.json").read_text() == summary_before


@pytest.mark.slow
def test_multirun_gives_distinct_runs(tmp_path):
    result = run_train([
        "-m", "experiment=fashion_mnist", "logger=csv", f"run.output={tmp_path}/out", "trainer.max_steps=2",
        "data.image_size=16", "model.lr=0.0001,0.0003", *TINY_MODEL,
    ], env={"FASHION_GAN_CACHE": str(tmp_path / "cache")}, cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-4000:]
    run_dirs = sorted((tmp_path / "out/runs").iterdir())
    assert len(run_dirs) == 2
    learning_rates = sorted(yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["lr"] for run_dir in run_dirs)
    assert learning_rates == [0.0001, 0.0003]
    assert all((run_dir / "checkpoints/last.ckpt").exists() for run_dir in run_dirs)
    assert np.unique([run_dir.name for run_dir in run_dirs]).size == 2
