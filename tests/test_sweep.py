"""W&B runs that line up: a Hydra multirun in one group, the same keys, summaries and the generator artifact."""

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser

from fashion_gan.runner.spec import RunOptions, build_command, parse_floyd_text, resolve_job
from fashion_gan.sampling import load_generator, sample_grid
from fashion_gan.tracking import build_run_name
from training_helpers import FASHION_MNIST_DIR, TINY_MODEL, run_train
from wandb_files import history_rows, read_records, run_files, run_info

LEARNING_RATES = ("0.0001", "0.0002")
SUMMARY_KEYS = {"steps", "images_per_s", "val_fid", "val_fid_best", "val_class_coverage", "dataset_digest"}
METRIC_KEYS = {"train/d_loss", "train/g_loss", "train/d_real", "train/d_fake", "perf/images_per_s",
               "val/fid", "val/fid_best", "val/class_coverage"}


def records_of(path: Path, kind: str) -> list:
    return [getattr(record, kind) for record in read_records(path) if record.WhichOneof("record_type") == kind]


def final_summary(path: Path) -> dict:
    """Merge the summary records of an offline run file in order: the run's summary at its end."""
    summary = {}
    for record in records_of(path, "summary"):
        for item in record.update:
            summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory) -> list[Path]:
    """Run a two-job multirun over the learning rate, W&B offline; return the two run folders."""
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    work_dir = tmp_path_factory.mktemp("sweep")
    output = work_dir / "outputs"
    result = run_train([
        "-m", "experiment=fashion_mnist", "data.image_size=16", *TINY_MODEL, "trainer.max_steps=4",
        "trainer.log_every_n_steps=2", "run.sample_every_n_steps=2", "run.checkpoint_every_n_steps=4",
        "model.ema_start_step=0",
        "metrics=fid", "metrics.num_samples=64", "metrics.eval_every_n_steps=2", "logger.tags=[dcgan,sweep-test]",
        f"model.lr={','.join(LEARNING_RATES)}", f"run.output={output}",
    ], env={"FASHION_GAN_CACHE": str(work_dir / "cache"), "WANDB_MODE": "offline",
            "WANDB_DATA_DIR": str(work_dir / "wandb-data"), "WANDB_CACHE_DIR": str(work_dir / "wandb-cache")},
        cwd=work_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dirs = sorted(path for path in (output / "runs").iterdir() if path.is_dir())
    assert len(run_dirs) == 2, result.stderr[-4000:]
    return run_dirs


@pytest.mark.slow
def test_sweep_runs_share_one_group(sweep_runs):
    infos = [run_info(run_files(run_dir)[0]) for run_dir in sweep_runs]
    groups = {info["group"] for info in infos}
    assert len(groups) == 1
    assert groups.pop().startswith("fashion_mnist-sweep-")
    assert [info["job_type"] for info in infos] == ["train", "train"]
    assert sorted(str(info["config"]["model.lr"]) for info in infos) == sorted(
        str(float(rate)) for rate in LEARNING_RATES)
    for run_dir in sweep_runs:
        run_record = records_of(run_files(run_dir)[0], "run")[0]
        assert set(run_record.tags) == {"dcgan", "sweep-test"}
        assert run_record.display_name.endswith(f" ({run_dir.name})")
        name_parts = run_record.display_name.rsplit(" (", 1)[0].split(",")
        assert len([rate for rate in LEARNING_RATES if f"lr={rate}" in name_parts]) == 1


@pytest.mark.slow
def test_sweep_runs_log_same_keys_at_csv_steps(sweep_runs):
    logged_keys = []
    for run_dir in sweep_runs:
        rows = history_rows(run_files(run_dir)[0])
        logged_keys.append({key for row in rows for key in row if not key.startswith(("_", "samples/"))})
        fid_steps = sorted(row["trainer/global_step"] for row in rows if "val/fid" in row)
        loss_steps = sorted(row["trainer/global_step"] for row in rows if "train/d_loss" in row)
        with open(run_dir / "metrics.csv", newline="") as handle:
            csv_rows = list(csv.DictReader(handle))
        assert fid_steps == [int(row["step"]) for row in csv_rows if row["val/fid"]] == [2, 4]
        assert loss_steps == [2, 4]
        fid_by_step = {row["trainer/global_step"]: row["val/fid"] for row in rows if "val/fid" in row}
        for row in csv_rows:
            assert float(row["val/fid"]) == pytest.approx(fid_by_step[int(row["step"])], rel=1e-5)
    assert logged_keys[0] == logged_keys[1]
    assert METRIC_KEYS <= logged_keys[0]


@pytest.mark.slow
def test_sweep_summary_has_final_and_best(sweep_runs):
    for run_dir in sweep_runs:
        summary = final_summary(run_files(run_dir)[0])
        run_summary = json.loads((run_dir / "summary.json").read_text())
        assert SUMMARY_KEYS <= set(summary)
        assert summary["steps"] == 4
        assert summary["val_fid"] == pytest.approx(run_summary["val_fid"])
        assert summary["val_fid_best"] <= summary["val_fid"]
        assert summary["images_per_s"] > 0
        assert summary["dataset_digest"] == run_summary["dataset_digest"]
        # W&B keeps the last logged value of each metric key as well.
        assert summary["val/fid"] == pytest.approx(summary["val_fid"])


@pytest.mark.slow
def test_sweep_logs_generator_artifact(sweep_runs, tmp_path):
    for run_dir in sweep_runs:
        artifacts = records_of(run_files(run_dir)[0], "artifact")
        assert [(artifact.type, artifact.name) for artifact in artifacts] == [("model", f"generator-{run_dir.name}")]
        artifact = artifacts[0]
        metadata = json.loads(artifact.metadata)
        run_summary = json.loads((run_dir / "summary.json").read_text())
        assert metadata["dataset_digest"] == run_summary["dataset_digest"]
        assert "dataset_version" in metadata
        assert metadata["dataset_version"] == run_summary["dataset_version"]
        assert metadata["steps"] == 4
        assert set(artifact.aliases) == {"latest", "step-4"}
        [entry] = artifact.manifest.contents
        assert entry.path == "generator.pt"
        # The artifact contains the weight average, which differs from the trained generator after 4 steps.
        weights = torch.load(entry.local_path, map_location="cpu", weights_only=False)["state_dict"]
        checkpoint = torch.load(run_dir / "checkpoints" / "step_000004.ckpt", map_location="cpu",
                                weights_only=False)["state_dict"]
        assert weights.keys() == {key for key in checkpoint if key.startswith("generator.")}
        assert all(torch.equal(value, checkpoint[f"generator_ema.{key.removeprefix('generator.')}"])
                   for key, value in weights.items())
        assert not all(torch.equal(value, checkpoint[key]) for key, value in weights.items())
        # The staged copy, which `wandb sync` uploads, loads like a checkpoint.
        generator = load_generator(entry.local_path)
        assert generator.image_size == 16
        assert tuple(sample_grid(generator, 4, seed=0).shape) == (3, 2 * 16 + 3 * 2, 2 * 16 + 3 * 2)


def test_run_name_keeps_dotted_values():
    name = build_run_name(["experiment=fashion_mnist", "model.lr=0.0002", "run.id=x", "+logger.tags=[a]"], "fg-1")
    assert name == "experiment=fashion_mnist,lr=0.0002,tags=[a] (fg-1)"


def test_floyd_tags_become_logger_tags_override():
    command = build_command("python train.py", "fg-abcdefghij", "s3://bucket/prefix", None, ["model.lr=0.1"],
                            tags=["dcgan", "owner=ml-team"])
    assert command[-2:] == ["logger.tags=[dcgan,'owner=ml-team']", "model.lr=0.1"]
    override = OverridesParser.create().parse_override(command[-2])
    assert override.key_or_group == "logger.tags"
    assert override.value() == ["dcgan", "owner=ml-team"]


def test_no_tags_no_override():
    command = build_command("python train.py", "fg-abcdefghij", "s3://bucket/prefix", None, [])
    assert not any(part.startswith("logger.tags") for part in command)


def test_resolved_job_passes_floyd_tags(tmp_path):
    config = parse_floyd_text("command: python train.py\ntags: [dcgan, fashion]\n", tmp_path / "floyd.yml")
    spec = resolve_job(config, RunOptions(hydra_overrides=["logger.tags=[mine]"]), "fg-abcdefghij").spec
    assert spec.tags == ["dcgan", "fashion"]
    # The runner's value first, then the command line's, which Hydra applies last.
    assert spec.command.index("logger.tags=[dcgan,fashion]") < spec.command.index("logger.tags=[mine]")
