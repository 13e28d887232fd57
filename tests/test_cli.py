"""The `fashion-gan` command line, driven through `main()` with the local backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fashion_gan.cli import main
from fashion_gan.errors import ExitCode

# A job command that ignores the Hydra overrides appended to its argv and prints them back.
ECHO_COMMAND = "python -c 'import sys; print(\"args:\", *sys.argv[1:])'"


def write_floyd(folder: Path, text: str) -> Path:
    path = folder / "floyd.yml"
    path.write_text(text)
    return path


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("FASHION_GAN_HOME", str(path))
    return path


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def run_cli(args: list[str]) -> int:
    """Run the CLI and return its exit status."""
    try:
        main(args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def job_ids_in(home: Path) -> list[str]:
    return sorted(path.stem for path in (home / "jobs").glob("fg-*.json"))


def test_help_does_not_import_torch_or_boto3():
    code = ("import sys; from fashion_gan.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('MODULES', 'torch' in sys.modules, 'boto3' in sys.modules, 'docker' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "run" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "MODULES False False False"


def test_run_follow_prints_id_and_log(home, project, capsys):
    write_floyd(project, f"command: {ECHO_COMMAND}\ninput: ['./images:photos']\n")

    status = run_cli(["run", "--follow", "--", "trainer.max_steps=3"])

    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    job_id = lines[0]
    assert job_ids_in(home) == [job_id]
    assert lines[1] == (f"args: run.id={job_id} run.output={project / 'outputs'} "
                        f"data.source={project / 'images'} trainer.max_steps=3")


def test_run_task_and_flags_reach_record(home, project, capsys):
    write_floyd(project, f"command: {ECHO_COMMAND}\nmachine: gpu\ntask:\n  smoke:\n    description: smoke\n")

    status = run_cli(["run", "--task", "smoke", "--cpu", "--data", "fashion/2:photos", "-m", "flagged"])

    assert status == 0
    job_id = capsys.readouterr().out.strip()
    record = json.loads((home / "jobs" / f"{job_id}.json").read_text())
    assert record["backend"] == "local"
    assert record["spec"]["machine"] == {"name": "cpu", "gpu_count": 0}
    assert record["spec"]["description"] == "flagged"
    assert record["spec"]["inputs"] == [{"source": "fashion/2", "destination": "photos"}]
    run_cli(["logs", job_id, "--follow"])


def test_status_table_and_logs(home, project, capsys):
    write_floyd(project, f"command: {ECHO_COMMAND}\ndescription: table row\n")
    run_cli(["run", "--follow"])
    job_id = capsys.readouterr().out.splitlines()[0]

    assert run_cli(["status"]) == 0
    table = capsys.readouterr().out
    assert job_id in table
    assert "succeeded" in table
    assert "table row" in table
    for column in ("id", "backend", "state", "created", "duration", "machine", "description"):
        assert column in table

    assert run_cli(["status", job_id]) == 0
    assert "succeeded" in capsys.readouterr().out

    assert run_cli(["logs", job_id]) == 0
    assert capsys.readouterr().out.startswith("args: run.id=")


def test_failed_job_with_follow_exits_with_runner_code(home, project, capsys):
    write_floyd(project, "command: python -c 'import sys; print(\"boom\"); sys.exit(3)'\n")

    status = run_cli(["run", "--follow"])

    captured = capsys.readouterr()
    assert status == ExitCode.RUNNER
    assert "failed: exited with code 3: boom" in captured.err
    assert "Traceback" not in captured.err


def test_stop_reports_state(home, project, capsys):
    write_floyd(project, f"command: {ECHO_COMMAND}\n")
    run_cli(["run", "--follow"])
    job_id = capsys.readouterr().out.splitlines()[0]

    assert run_cli(["stop", job_id]) == 0
    assert capsys.readouterr().out.strip() == f"{job_id}: succeeded"


def test_bad_yaml_exits_with_config_code_and_location(home, project, capsys):
    write_floyd(project, "command: [python\nmachine: cpu\n")

    status = run_cli(["run"])

    captured = capsys.readouterr()
    assert status == ExitCode.CONFIG
    # The unclosed list ends where `machine:` starts a mapping: line 2, column 8.
    assert "floyd.yml:2:8: invalid YAML at line 2, column 8" in captured.err
    assert "Traceback" not in captured.err
    assert job_ids_in(home) == []


def test_unknown_key_message_has_suggestion(home, project, capsys):
    write_floyd(project, "comand: python train.py\n")
    assert run_cli(["run"]) == ExitCode.CONFIG
    assert "did you mean 'command'?" in capsys.readouterr().err


def test_conflicting_machine_flags_rejected(home, project, capsys):
    write_floyd(project, f"command: {ECHO_COMMAND}\n")
    assert run_cli(["run", "--gpu", "--cpu"]) == ExitCode.CONFIG
    assert "conflicting machine options" in capsys.readouterr().err


def test_unknown_job_exits_with_runner_code(home, capsys):
    assert run_cli(["logs", "fg-zzzzzzzzzz"]) == ExitCode.RUNNER
    assert "job fg-zzzzzzzzzz not found" in capsys.readouterr().err


def test_status_without_jobs(home, capsys):
    assert run_cli(["status"]) == 0
    assert "no jobs" in capsys.readouterr().out


def test_data_upload_and_list_with_local_storage(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.new("RGB", (8, 8), (index * 100, 0, 0)).save(images / f"shirt_{index}.png")
    storage = tmp_path / "storage"

    assert run_cli(["data", "upload", str(images), "--name", "shirts", "--storage", str(storage)]) == 0
    assert capsys.readouterr().out.strip() == "shirts/1"

    assert run_cli(["data", "list", "shirts", "--storage", str(storage)]) == 0
    listing = capsys.readouterr().out
    assert "shirts" in listing
    assert "complete" in listing


def test_data_upload_missing_folder_exits_with_dataset_code(tmp_path, capsys):
    status = run_cli(["data", "upload", str(tmp_path / "missing"), "--name", "x", "--storage", str(tmp_path)])
    assert status == ExitCode.DATASET
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow  # imports torch
def test_generate_grid_and_interpolation_from_checkpoint(tmp_path, capsys):
    import torch
    from PIL import Image

    from fashion_gan.models.generator import Generator

    hyperparameters = {"latent_dim": 8, "generator_features": 4, "channels": 3, "image_size": 16}
    generator = Generator(**hyperparameters)
    checkpoint = tmp_path / "tiny.ckpt"
    torch.save({"hyper_parameters": hyperparameters,
                "state_dict": {f"generator.{key}": value for key, value in generator.state_dict().items()}},
               checkpoint)

    grid_path = tmp_path / "grid.png"
    assert run_cli(["generate", "--checkpoint", str(checkpoint), "--n", "4", "--out", str(grid_path)]) == 0
    strip_path = tmp_path / "strip.png"
    assert run_cli(["generate", "--checkpoint", str(checkpoint), "--out", str(strip_path), "--interpolate", "5"]) == 0

    # 2 x 2 grid of 16-pixel images with 2-pixel padding; a strip of 5 images in one row.
    assert Image.open(grid_path).size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
    assert Image.open(strip_path).size == (5 * 16 + 6 * 2, 16 + 2 * 2)


def test_generate_missing_checkpoint_exits_with_config_code(tmp_path, capsys):
    status = run_cli(["generate", "--checkpoint", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "g.png")])
    assert status == ExitCode.CONFIG
    assert "checkpoint not found" in capsys.readouterr().err


def test_checkpoint_reference_by_job_id_downloads_latest(home, tmp_path):
    import hashlib

    from fashion_gan.cli import _checkpoint_path
    from fashion_gan.runner.backend import JobSpec, parse_machine
    from fashion_gan.runner.jobs import create_record

    job_id = "fg-0000000abc"
    output = tmp_path / "outputs"
    checkpoint_bytes = b"checkpoint bytes"
    run_dir = output / "runs" / job_id / "checkpoints"
    run_dir.mkdir(parents=True)
    (run_dir / "step_000006.ckpt").write_bytes(checkpoint_bytes)
    (run_dir / "latest.json").write_text(json.dumps({
        "key": "checkpoints/step_000006.ckpt", "step": 6,
        "sha256": hashlib.sha256(checkpoint_bytes).hexdigest(), "size": len(checkpoint_bytes)}))
    spec = JobSpec(job_id=job_id, image="", command=["python"], machine=parse_machine("cpu"), output_uri=str(output))
    create_record(home / "jobs", spec, "local")

    path = _checkpoint_path(job_id, tmp_path / "cache")

    assert path.read_bytes() == checkpoint_bytes
    assert path.name == "step_000006.ckpt"


def test_status_lists_unqueryable_job_as_unknown(home, capsys):
    from fashion_gan.runner.backend import JobSpec, parse_machine
    from fashion_gan.runner.jobs import create_record

    spec = JobSpec(job_id="fg-00000000bd", image="", command=["python"], machine=parse_machine("cpu"),
                   backend_options={"bogus_option": 1})
    create_record(home / "jobs", spec, "local")

    assert run_cli(["status"]) == 0
    output = capsys.readouterr().out
    assert "fg-00000000bd" in output
    assert "unknown" in output
    assert "status unknown: unknown option(s) bogus_option" in output


def test_generate_rejects_zero_images(tmp_path, capsys):
    status = run_cli(["generate", "--checkpoint", "x.ckpt", "--n", "0"])
    assert status == 2  # click's usage error
    assert "Invalid value for '--n'" in capsys.readouterr().err
