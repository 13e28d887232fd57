"""Tests of the FID benchmark (benchmarks/fid_recipe.py) and its section of benchmarks/RESULTS.md."""

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.fid_recipe import FID_RESULTS_PATH, FidSettings, project_command, summarize_runs

PROJECT_DIR = Path(__file__).resolve().parents[1]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def fake_run(seed: int, classic_fid: float, project_fid: float) -> dict:
    classic = {"fid": classic_fid, "class_coverage": 0.9, "real_pipeline_fid": 1.5, "train_s": 100.0,
               "precision": "32-true"}
    project = {"fid": project_fid, "class_coverage": 0.95, "logged_val_fid": project_fid, "train_s": 90.0,
               "precision": "bf16-mixed", "command": "python train.py experiment=fashion_mnist"}
    return {"seed": seed, "classic": classic, "project": project}


def fake_result(runs: list[dict]) -> dict:
    context = {"started": "2026-01-01 00:00 UTC", "command": "python -m benchmarks.run --only fid",
               "duration_s": 60.0, "load_before": "0.00 0.00 0.00", "load_after": "0.00 0.00 0.00"}
    return {"settings": vars(FidSettings()), "runs": runs, "summary": summarize_runs(runs), "context": context}


def test_summary_counts_seeds_where_project_is_lower():
    summary = summarize_runs([fake_run(1, 30.0, 20.0), fake_run(2, 25.0, 27.0)])
    assert summary["classic"]["fid_mean"] == pytest.approx(27.5)
    assert summary["project"]["fid_mean"] == pytest.approx(23.5)
    assert summary["project_lower_on"] == 1
    assert summary["seeds"] == 2


@pytest.mark.parametrize(("project_fid", "verdict"), [(20.0, "pass"), (40.0, "FAIL")])
def test_fid_section_reports_both_recipes(project_fid, verdict):
    figures: dict[str, float] = {}
    lines = report._fid_lines(fake_result([fake_run(42, 30.0, project_fid)]), {}, figures)
    text = "\n".join(lines)
    assert f"| 42 | 30.00 | 0.900 | {project_fid:.2f} | 0.950 | {project_fid:.2f} |" in text
    assert figures["fid_difference"] == pytest.approx(project_fid - 30.0)
    acceptance = "\n".join(report._acceptance_lines(figures))
    assert f"| {project_fid - 30.0:.2f} | {verdict} |" in acceptance


def test_project_command_keeps_model_defaults():
    command = project_command(FidSettings(steps=300, seed=7, work_dir="/tmp/work"), "fid-project-7")
    assert command[1:5] == ["train.py", "experiment=fashion_mnist", "logger=none", "metrics=fid"]
    assert "trainer.max_steps=300" in command
    assert "run.seed=7" in command
    # The project's own improvements stay at their configured defaults.
    assert not any(part.startswith(("model.ema_decay", "model.label_smoothing", "trainer.precision"))
                   for part in command)


@pytest.mark.slow
def test_quick_fid_benchmark_writes_section(tmp_path):
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR}")
    recorded_before = FID_RESULTS_PATH.read_bytes() if FID_RESULTS_PATH.exists() else None
    output = tmp_path / "RESULTS.md"

    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--only", "fid", "--quick", "--fid-seeds", "3",
         "--work-dir", str(tmp_path / "work"), "--output", str(output)],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=900,
    )

    assert completed.returncode == 0, completed.stderr[-4000:]
    text = output.read_text()
    assert "## Sample quality after the same number of steps (FID)" in text
    assert "2 steps per recipe and seed" in text
    row = next(line for line in text.splitlines() if line.startswith("| 3 |"))
    classic_fid, project_fid = float(row.split("|")[2]), float(row.split("|")[4])
    assert classic_fid > 0
    assert project_fid > 0
    assert "val/fid after the same steps" in text
    # A quick run must not replace the recorded figures.
    assert (FID_RESULTS_PATH.read_bytes() if FID_RESULTS_PATH.exists() else None) == recorded_before
