"""`fashion-gan runs list` and `runs compare`: tables, curves and sample grids from local and S3 storage."""

import json
from pathlib import Path

import boto3
import pytest
import yaml
from PIL import Image

from fashion_gan.cli import main
from fashion_gan.errors import ConfigError, ExitCode
from fashion_gan.runs import (
    CURVES_DPI,
    CURVES_FIGSIZE_IN,
    SAMPLES_CAPTION_PX,
    SAMPLES_MARGIN_PX,
    RunRecord,
    comparison_rows,
    differing_config_keys,
    load_run,
    parse_metrics_csv,
    plot_curves,
)
from fashion_gan.storage import open_store
from training_helpers import FASHION_MNIST_DIR, TINY_MODEL, run_train

IMAGE_SIZE = 16
GRID_COLUMNS = 4  # TINY_MODEL's model.sample_count=16 draws a 4 x 4 grid
GRID_SIDE = GRID_COLUMNS * (IMAGE_SIZE + 2) + 2  # torchvision make_grid with 2-pixel padding
# (run id, learning rate, dropout): two runs share each value, so both keys differ across the three.
RUNS = [("cmp-a", "0.0002", "0.0"), ("cmp-b", "0.0001", "0.0"), ("cmp-c", "0.0002", "0.3")]


def run_cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory) -> Path:
    """Train three tiny runs (4 steps, FID on 64 samples every 2 steps) into one output folder; return it."""
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    output = tmp_path_factory.mktemp("outputs")
    cache_dir = tmp_path_factory.mktemp("cache")
    for run_id, lr, dropout in RUNS:
        result = run_train([
            "experiment=fashion_mnist", f"data.image_size={IMAGE_SIZE}", *TINY_MODEL, "trainer.max_steps=4",
            "trainer.log_every_n_steps=2", "run.sample_every_n_steps=2", "run.checkpoint_every_n_steps=4",
            "logger=csv", "metrics=fid", "metrics.num_samples=64", "metrics.eval_every_n_steps=2",
            f"model.lr={lr}", f"model.dropout={dropout}", f"run.id={run_id}", f"run.output={output}",
        ], env={"FASHION_GAN_CACHE": str(cache_dir)})
        assert result.returncode == 0, result.stderr[-4000:]
    return output


def table_rows(text: str) -> dict[str, list[str]]:
    """Return {first cell: other cells} of the rows of a rich table printed as text."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│┃").split("│")]
        if len(cells) > 1 and cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_compare_prints_differing_keys(finished_runs, tmp_path, capsys):
    plot_path = tmp_path / "curves.png"
    samples_path = tmp_path / "grid.png"
    status = run_cli(["runs", "compare", *(run_id for run_id, _, _ in RUNS), "--storage", str(finished_runs),
                      "--plot", str(plot_path), "--samples", str(samples_path)])
    output = capsys.readouterr().out
    assert status == 0, output

    rows = table_rows(output)
    assert rows["model.lr"] == ["0.0002", "0.0001", "0.0002"]
    assert rows["model.dropout"] == ["0", "0", "0.3"]
    assert "data.image_size" not in rows
    assert "run.id" not in rows
    assert rows["state"] == ["succeeded"] * 3
    assert rows["steps"] == ["4"] * 3
    for label in ("val/fid (final)", "val/fid (best)", "val/class_coverage (final)", "images/s",
                  "train/d_loss (final)"):
        assert all(cell != "-" for cell in rows[label]), label
    final_fids = [float(cell) for cell in rows["val/fid (final)"]]
    best_fids = [float(cell) for cell in rows["val/fid (best)"]]
    assert all(best <= final for best, final in zip(best_fids, final_fids, strict=True))

    assert str(plot_path) in output
    assert str(samples_path) in output


@pytest.mark.slow
def test_compare_writes_curves_png(finished_runs, tmp_path, capsys):
    plot_path = tmp_path / "nested" / "curves.png"
    assert run_cli(["runs", "compare", "cmp-a", "cmp-b", "--storage", str(finished_runs),
                    "--plot", str(plot_path)]) == 0
    with Image.open(plot_path) as image:
        assert image.format == "PNG"
        assert image.size == (round(CURVES_FIGSIZE_IN[0] * CURVES_DPI), round(CURVES_FIGSIZE_IN[1] * CURVES_DPI))
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    # Two run colors plus axes and text: far more than a blank white figure.
    assert len(colors) > 50


@pytest.mark.slow
def test_compare_samples_side_by_side(finished_runs, tmp_path):
    samples_path = tmp_path / "grid.png"
    assert run_cli(["runs", "compare", *(run_id for run_id, _, _ in RUNS), "--storage", str(finished_runs),
                    "--samples", str(samples_path)]) == 0
    with Image.open(samples_path) as image:
        canvas = image.convert("RGB")
    assert canvas.size == (SAMPLES_MARGIN_PX * 4 + 3 * GRID_SIDE, SAMPLES_MARGIN_PX * 2 + SAMPLES_CAPTION_PX + GRID_SIDE)

    top = SAMPLES_MARGIN_PX + SAMPLES_CAPTION_PX
    for index, (run_id, _, _) in enumerate(RUNS):
        left = SAMPLES_MARGIN_PX + index * (GRID_SIDE + SAMPLES_MARGIN_PX)
        tile = canvas.crop((left, top, left + GRID_SIDE, top + GRID_SIDE))
        with Image.open(finished_runs / "runs" / run_id / "samples" / "step_000004.png") as final_grid:
            assert tile.tobytes() == final_grid.convert("RGB").tobytes(), run_id
        caption = canvas.crop((left, 0, left + GRID_SIDE, top))
        assert caption.getextrema()[0][0] < 128, f"no caption text above {run_id}"


@pytest.mark.slow
def test_runs_list_shows_every_run(finished_runs, capsys):
    assert run_cli(["runs", "list", "--storage", str(finished_runs)]) == 0
    rows = table_rows(capsys.readouterr().out)
    for run_id, _, _ in RUNS:
        assert rows[run_id][0] == "succeeded"
        assert rows[run_id][1] == "fashion_mnist"
        assert rows[run_id][2] == "4"


@pytest.mark.slow
def test_compare_reads_runs_from_s3(finished_runs, s3_bucket, tmp_path, capsys):
    client = boto3.client("s3")
    for run_id in ("cmp-a", "cmp-c"):
        run_dir = finished_runs / "runs" / run_id
        for path in [run_dir / "config.yaml", run_dir / "summary.json", run_dir / "metrics.csv",
                     *sorted((run_dir / "samples").glob("*.png"))]:
            client.upload_file(str(path), s3_bucket, f"team/runs/{run_id}/{path.relative_to(run_dir).as_posix()}")

    samples_path = tmp_path / "grid.png"
    storage = f"s3://{s3_bucket}/team"
    assert run_cli(["runs", "compare", "cmp-a", "cmp-c", "--storage", storage, "--samples", str(samples_path)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["model.dropout"] == ["0", "0.3"]
    assert "model.lr" not in rows
    with Image.open(samples_path) as image:
        assert image.size == (SAMPLES_MARGIN_PX * 3 + 2 * GRID_SIDE, SAMPLES_MARGIN_PX * 2 + SAMPLES_CAPTION_PX + GRID_SIDE)

    assert run_cli(["runs", "list", "--storage", storage]) == 0
    assert sorted(run_id for run_id in table_rows(capsys.readouterr().out) if run_id.startswith("cmp-")) == [
        "cmp-a", "cmp-c"]


@pytest.mark.slow
def test_generate_interpolation_strip_from_run(finished_runs, tmp_path):
    strip_path = tmp_path / "strip.png"
    checkpoint = finished_runs / "runs" / "cmp-a" / "checkpoints" / "last.ckpt"
    assert run_cli(["generate", "--checkpoint", str(checkpoint), "--interpolate", "8", "--out", str(strip_path)]) == 0
    with Image.open(strip_path) as image:
        # One row of 8 images with 2-pixel padding around each.
        assert image.size == (8 * (IMAGE_SIZE + 2) + 2, IMAGE_SIZE + 2 * 2)
        columns = [image.convert("L").crop((2 + i * (IMAGE_SIZE + 2), 2, 2 + i * (IMAGE_SIZE + 2) + IMAGE_SIZE,
                                            2 + IMAGE_SIZE)).tobytes() for i in range(8)]
    assert columns[0] != columns[-1]  # the two ends are different latent points


def test_unknown_run_lists_known_ones(tmp_path, capsys):
    store = open_store(str(tmp_path))
    store.write_bytes("runs/fg-known00001/config.yaml", yaml.safe_dump({"model": {"lr": 0.1}}).encode())
    with pytest.raises(ConfigError, match="fg-known00001"):
        load_run(store, "fg-missing0001")
    assert run_cli(["runs", "compare", "fg-missing0001", "--storage", str(tmp_path)]) == ExitCode.CONFIG
    assert "not found" in capsys.readouterr().err


def test_runs_list_empty_storage(tmp_path, capsys):
    assert run_cli(["runs", "list", "--storage", str(tmp_path)]) == 0
    assert "no runs in" in capsys.readouterr().out


def test_differing_keys_nested_and_missing():
    runs = [
        RunRecord("a", {"model": {"lr": 0.1, "dropout": 0.0}, "run": {"id": "a", "seed": 1}, "logger": {"tags": ["x"]}}),
        RunRecord("b", {"model": {"lr": 0.1, "dropout": 0.3}, "run": {"id": "b", "seed": 1}, "logger": {"tags": ["y"]}}),
        RunRecord("c", {"model": {"lr": 0.1}, "run": {"id": "c", "seed": 1}, "logger": {"tags": ["x"]}}),
    ]
    assert differing_config_keys(runs) == ["logger.tags", "model.dropout"]


def test_rows_fall_back_to_metrics_csv():
    csv_text = ("step,train/d_loss,train/g_loss,perf/images_per_s,val/fid,val/fid_best\n"
                "2,1.5,0.7,100,50.0,50.0\n"
                "4,1.25,0.8,,40.0,40.0\n"
                "6,1.0,0.9,120,45.0,40.0\n")
    running = RunRecord("r", {"model": {"lr": 0.1}}, summary=None, metrics=parse_metrics_csv(csv_text))
    finished = RunRecord("f", {"model": {"lr": 0.2}}, summary={
        "state": "succeeded", "steps": 8, "val_fid": 30.0, "val_fid_best": 25.0, "images_per_s": 321.0,
        "final_losses": {"train/d_loss": 0.5, "train/g_loss": 2.0}})
    rows = dict(comparison_rows([running, finished]))
    assert rows["model.lr"] == ["0.1", "0.2"]
    assert rows["state"] == ["running or killed", "succeeded"]
    assert rows["steps"] == ["6", "8"]
    assert rows["train/d_loss (final)"] == ["1", "0.5"]
    assert rows["val/fid (final)"] == ["45", "30"]
    assert rows["val/fid (best)"] == ["40", "25"]
    assert rows["images/s"] == ["120", "321"]
    assert rows["val/class_coverage (final)"] == ["-", "-"]


def test_parse_metrics_csv_empty_cells():
    rows = parse_metrics_csv("step,train/d_loss,val/fid\n2,1.5,\n4,,3.25\n")
    assert rows == [{"step": 2.0, "train/d_loss": 1.5, "val/fid": None},
                    {"step": 4.0, "train/d_loss": None, "val/fid": 3.25}]


def test_plot_without_fid_still_draws(tmp_path):
    runs = [RunRecord(run_id, {"model": {"lr": lr}}, metrics=parse_metrics_csv(
        "step,train/d_loss,train/g_loss\n1,1.4,0.7\n2,1.3,0.8\n3,1.2,0.9\n")) for run_id, lr in (("a", 0.1), ("b", 0.2))]
    path = plot_curves(runs, tmp_path / "curves.png")
    with Image.open(path) as image:
        assert image.size == (round(CURVES_FIGSIZE_IN[0] * CURVES_DPI), round(CURVES_FIGSIZE_IN[1] * CURVES_DPI))


def test_summary_json_fields_used_by_compare(tmp_path):
    # The keys `runs compare` reads from summary.json, as train.py writes them.
    store = open_store(str(tmp_path))
    summary = {"state": "succeeded", "steps": 4, "val_fid": 12.5, "val_fid_best": 11.0, "images_per_s": 99.0}
    store.write_bytes("runs/fg-summary0001/config.yaml", b"model:\n  lr: 0.1\n")
    store.write_bytes("runs/fg-summary0001/summary.json", json.dumps(summary).encode())
    record = load_run(store, "fg-summary0001")
    assert record.metrics == []
    rows = dict(comparison_rows([record]))
    assert rows["val/fid (best)"] == ["11"]
    assert rows["steps"] == ["4"]
