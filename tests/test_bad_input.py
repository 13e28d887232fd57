"""Bad input end to end: each case checks the message, the exit code, no traceback, and no stray files.

Every job runs with its own working folder and HOME. After the job, both must be unchanged: a job
may write only into its run folder (`out/`) and its cache folder (`cache/`).
"""

import json
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from reliability_helpers import TRAIN_SCRIPT, child_environment
from training_helpers import TINY_MODEL

JOB_TIMEOUT_S = 300
# A tiny image-folder job: 16x16 grayscale, one or two steps.
FOLDER_JOB = ["data.kind=image_folder", "data.channels=1", "data.image_size=16", "logger=none",
              "trainer.max_steps=2", "run.checkpoint_every_n_steps=1", *TINY_MODEL]


@dataclass
class Workspace:
    """The folders of one bad-input job; only `out` and `cache` may gain files."""

    root: Path
    bucket: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for folder in (self.cwd, self.home, self.data):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def cwd(self) -> Path:
        return self.root / "cwd"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "FASHION_GAN_CACHE": str(self.cache), **self.extra_env}


def tree(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*")}


def run_job(workspace: Workspace, arguments: list[str], module: str | None = None) -> subprocess.CompletedProcess:
    """Run train.py (or `python -m MODULE`) in the workspace and check it left no stray files."""
    before = {"cwd": tree(workspace.cwd), "home": tree(workspace.home)}
    program = ["-m", module] if module else [str(TRAIN_SCRIPT)]
    result = subprocess.run([sys.executable, *program, *arguments], cwd=workspace.cwd,
                            env=child_environment(workspace.env()), capture_output=True, text=True,
                            timeout=JOB_TIMEOUT_S)
    assert tree(workspace.cwd) == before["cwd"], "the job wrote into its working folder"
    assert tree(workspace.home) == before["home"], "the job wrote into HOME"
    return result


def save_png(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(path)


def save_images(folder: Path, count: int, size: int = 16) -> None:
    for index in range(count):
        save_png(folder / f"image_{index:03d}.png", size, seed=index)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def save_decompression_bomb(path: Path, side: int = 30000) -> None:
    """Write a PNG whose header declares side x side pixels (900 million) in a few dozen bytes."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    data = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data)
                     + png_chunk(b"IEND", b""))


# Cases ------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One bad input: `prepare` builds it and returns the job's arguments."""

    name: str
    prepare: Callable[[Workspace], list[str]]
    exit_code: int
    messages: Callable[[Workspace], list[str]]
    module: str | None = None
    needs_s3: bool = False
    check: Callable[[Workspace, subprocess.CompletedProcess], None] | None = None


def folder_job(workspace: Workspace, source: Path | str, *extra: str) -> list[str]:
    return [*FOLDER_JOB, f"data.source={source}", f"run.output={workspace.out}", "run.id=bad-input", *extra]


def prepare_empty_folder(workspace: Workspace) -> list[str]:
    (workspace.data / "empty").mkdir()
    return folder_job(workspace, workspace.data / "empty")


def prepare_all_bad(workspace: Workspace) -> list[str]:
    folder = workspace.data / "bad"
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_bytes(b"this is not a jpeg")
    save_png(folder / "whole.png", 16, seed=1)
    (folder / "truncated.png").write_bytes((folder / "whole.png").read_bytes()[:40])
    (folder / "whole.png").unlink()
    return folder_job(workspace, folder)


def prepare_small_images(workspace: Workspace) -> list[str]:
    save_images(workspace.data / "small", count=20, size=8)
    return folder_job(workspace, workspace.data / "small")


def check_small_images(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    summary = json.loads((workspace.out / "runs/bad-input/summary.json").read_text())
    assert summary["state"] == "succeeded"
    assert summary["dataset_images"] == 20
    assert summary["skipped_files"] == 0


def prepare_bomb(workspace: Workspace) -> list[str]:
    folder = workspace.data / "with-bomb"
    save_images(folder, count=20)
    save_decompression_bomb(folder / "bomb.png")
    return folder_job(workspace, folder)


def check_bomb(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    summary = json.loads((workspace.out / "runs/bad-input/summary.json").read_text())
    assert summary["state"] == "succeeded"
    assert summary["dataset_images"] == 20
    assert summary["skipped_file_names"] == ["bomb.png"]


def prepare_missing_folder(workspace: Workspace) -> list[str]:
    return folder_job(workspace, workspace.data / "no-such-folder")


def prepare_missing_bucket(workspace: Workspace) -> list[str]:
    return folder_job(workspace, "s3://no-such-bucket-fg/photos")


def prepare_missing_version(workspace: Workspace) -> list[str]:
    from fashion_gan.storage import open_store
    from fashion_gan.storage.datasets import upload_dataset

    save_images(workspace.data / "tiny", count=4)
    store = open_store(f"s3://{workspace.bucket}/store")
    assert upload_dataset(store, workspace.data / "tiny", "tiny") == 1
    return folder_job(workspace, "dataset:tiny/9", f"data.datasets_uri=s3://{workspace.bucket}/store")


def prepare_config_typo(workspace: Workspace) -> list[str]:
    return ["trainer.max_stpes=3", f"run.output={workspace.out}"]


def prepare_floyd_typo(workspace: Workspace) -> list[str]:
    (workspace.cwd / "floyd.yml").write_text(
        "machne: cpu\nbackend: local\ncommand: python train.py\noutput: ../out\n")
    return ["run", "--file", str(workspace.cwd / "floyd.yml")]


CASES = [
    Case("empty folder", prepare_empty_folder, 3,
         lambda w: [f"Image folder {w.data / 'empty'} contains no images", "found no files"]),
    Case("every image bad", prepare_all_bad, 3,
         lambda w: ["None of the 3 image files", "empty.png", "text.jpg", "truncated.png"]),
    Case("images smaller than image_size", prepare_small_images, 0,
         lambda w: ["Upscaled 20 of 20 images", "image_size=16"], check=check_small_images),
    Case("decompression bomb", prepare_bomb, 0,
         lambda w: ["Skipped 1 image files", "bomb.png (decompression bomb"], check=check_bomb),
    Case("missing source folder", prepare_missing_folder, 3,
         lambda w: [f"Dataset source {w.data / 'no-such-folder'} does not exist"]),
    Case("missing bucket", prepare_missing_bucket, 4,
         lambda w: ["bucket 'no-such-bucket-fg' not found"], needs_s3=True),
    Case("missing dataset version", prepare_missing_version, 3,
         lambda w: ["dataset version tiny/9 not found", "complete versions: 1"], needs_s3=True),
    Case("config key typo", prepare_config_typo, 2,
         lambda w: ["Unknown config key 'trainer.max_stpes'", 'Did you mean "trainer.max_steps"']),
    Case("floyd.yml key typo", prepare_floyd_typo, 2,
         lambda w: ["unknown key 'machne'", "did you mean 'machine'"], module="fashion_gan.cli"),
]


@pytest.fixture
def s3_bucket_if_needed(request):
    case: Case = request.param
    return case, (request.getfixturevalue("s3_bucket") if case.needs_s3 else None)


@pytest.mark.slow
@pytest.mark.parametrize("s3_bucket_if_needed", CASES, ids=[case.name for case in CASES], indirect=True)
def test_bad_input_case(s3_bucket_if_needed, tmp_path):
    case, bucket = s3_bucket_if_needed
    workspace = Workspace(tmp_path, bucket=bucket)
    arguments = case.prepare(workspace)

    result = run_job(workspace, arguments, module=case.module)

    assert result.returncode == case.exit_code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    output = result.stdout + result.stderr
    for message in case.messages(workspace):
        assert message in output, f"{message!r} not in:\n{output[-3000:]}"
    if case.check is not None:
        case.check(workspace, result)


@pytest.mark.slow
def test_run_id_with_other_config(tmp_path):
    workspace = Workspace(tmp_path)
    save_images(workspace.data / "images", count=20)
    arguments = folder_job(workspace, workspace.data / "images")
    first = run_job(workspace, arguments)
    assert first.returncode == 0, first.stderr[-3000:]
    summary_path = workspace.out / "runs/bad-input/summary.json"
    summary_before = summary_path.read_text()

    rejected = run_job(workspace, [*arguments, "model.lr=0.001"])

    assert rejected.returncode == 7, rejected.stderr[-3000:]
    assert "Traceback" not in rejected.stderr
    assert "Run id 'bad-input' already exists with a different config (model.lr: 0.0002 -> 0.001)" in rejected.stderr
    assert "run.resume=always" in rejected.stderr
    assert summary_path.read_text() == summary_before

    forced = run_job(workspace, [*arguments, "model.lr=0.001", "run.resume=always", "trainer.max_steps=3"])

    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "Resuming run bad-input from step 2" in forced.stderr
    assert json.loads(summary_path.read_text())["steps"] == 3


def mount_tmpfs(mount_point: Path, size_bytes: int) -> None:
    mount_point.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")


@pytest.mark.slow
def test_full_disk_keeps_previous_checkpoint(tmp_path):
    workspace = Workspace(tmp_path)
    save_images(workspace.data / "images", count=20)
    arguments = [*folder_job(workspace, workspace.data / "images"), "trainer.max_steps=6",
                 "run.checkpoint_every_n_steps=2"]
    # The checkpoint of this model is about 130 kB; the tmpfs has room for one checkpoint but not a second.
    checkpoint_dir = workspace.out / "runs/bad-input/checkpoints"
    mount_tmpfs(checkpoint_dir, size_bytes=200 * 1024)
    try:
        result = run_job(workspace, arguments)

        assert result.returncode == 4, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        assert f"Could not write the checkpoint of step 4 to {checkpoint_dir / 'step_000004.ckpt'}" in result.stderr
        assert "the disk is full" in result.stderr
        assert "The previous checkpoint (step 2) is kept" in result.stderr
        assert sorted(path.name for path in checkpoint_dir.iterdir()) == ["last.ckpt", "latest.json",
                                                                          "step_000002.ckpt"]
        pointer = json.loads((checkpoint_dir / "latest.json").read_text())
        assert pointer["step"] == 2
        checkpoint = torch.load(checkpoint_dir / "step_000002.ckpt", map_location="cpu", weights_only=False)
        assert checkpoint["global_step"] == 2
        summary = json.loads((workspace.out / "runs/bad-input/summary.json").read_text())
        assert summary["state"] == "failed"
        assert summary["exit_code"] == 4
    finally:
        subprocess.run(["umount", "--lazy", str(checkpoint_dir)], check=False)
