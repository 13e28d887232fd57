"""Config validation: types, unknown keys and values are rejected before any side effect."""

import subprocess
import sys
from pathlib import Path

import pytest

from fashion_gan.config import ALLOWED_IMAGE_SIZES, validate_config
from fashion_gan.errors import ConfigError, DatasetError, ExitCode
from training_helpers import PROJECT_DIR, compose_config


def test_defaults_validate():
    config = validate_config(compose_config([]))

    assert config.data.kind == "fashion_mnist"
    assert config.model.lr == pytest.approx(2e-4)
    assert config.model.beta1 == pytest.approx(0.5)
    assert config.model.beta2 == pytest.approx(0.999)


@pytest.mark.parametrize("experiment, channels, image_size, dropout", [
    ("fashion_mnist", 1, 32, 0.0),
    ("fashion_photos", 3, 64, 0.3),
])
def test_experiment_presets(experiment, channels, image_size, dropout):
    overrides = [f"experiment={experiment}", "data.source=/tmp"]
    config = validate_config(compose_config(overrides))

    assert config.data.channels == channels
    assert config.data.image_size == image_size
    assert config.model.dropout == pytest.approx(dropout)
    assert config.run.experiment == experiment


def test_debug_preset_overrides_root_values():
    config = validate_config(compose_config(["debug=smoke"]))

    assert config.trainer.max_steps == 6
    assert config.run.checkpoint_every_n_steps == 3


@pytest.mark.parametrize("image_size", [48, 60, 0, 512])
def test_image_size_rejected(image_size):
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config([f"data.image_size={image_size}"]))

    message = str(error.value)
    assert "data.image_size" in message
    assert repr(image_size) in message
    assert ", ".join(map(str, ALLOWED_IMAGE_SIZES)) in message


@pytest.mark.parametrize("override, key, allowed", [
    ("data.channels=2", "data.channels", "1 (grayscale) or 3 (RGB)"),
    ("model.lr=0", "model.lr", "> 0"),
    ("model.lr=-0.1", "model.lr", "> 0"),
    ("data.batch_size=0", "data.batch_size", ">= 1"),
    ("model.dropout=1.5", "model.dropout", "[0, 1)"),
    ("trainer.precision=fp8", "trainer.precision", "bf16-mixed"),
    ("run.resume=maybe", "run.resume", "always"),
    ("run.id=has_underscore", "run.id", "a-z"),
])
def test_bad_values_rejected(override, key, allowed):
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config([override]))

    assert key in str(error.value)
    assert allowed in str(error.value)


def test_wrong_type_rejected():
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config(["data.batch_size=many"]))

    assert "data.batch_size" in str(error.value)


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError) as error:
        validate_config({"model": {"lrr": 0.1}})

    assert "model.lrr" in str(error.value)
    assert 'Did you mean "model.lr"' in str(error.value)


def test_image_folder_needs_source():
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config(["data=image_folder"]))

    assert "data.source" in str(error.value)


def test_relative_source_resolves_against_original_cwd(tmp_path):
    (tmp_path / "photos").mkdir()
    config = validate_config(compose_config(["data=image_folder", "data.source=photos", "run.output=out"]),
                             original_cwd=tmp_path)

    assert config.data.source == str(tmp_path / "photos")
    assert config.run.output == str(tmp_path / "out")


def test_missing_local_source_rejected(tmp_path):
    with pytest.raises(DatasetError) as error:
        validate_config(compose_config(["data=image_folder", "data.source=missing"]), original_cwd=tmp_path)

    assert str(tmp_path / "missing") in str(error.value)


@pytest.mark.parametrize("override, key", [
    ("model.lr=inf", "model.lr"),
    ("storage.endpoint_url=notaurl", "storage.endpoint_url"),
])
def test_non_finite_and_malformed_values_rejected(override, key):
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config([override]))

    assert key in str(error.value)


def test_uris_are_not_rewritten(tmp_path):
    overrides = ["data=image_folder", "data.source=s3://bucket/photos", "run.output=dataset:x"]
    config = validate_config(compose_config(overrides), original_cwd=tmp_path)

    assert config.data.source == "s3://bucket/photos"


@pytest.mark.parametrize("arguments, expected", [
    (["model.lrr=0.1"], 'Did you mean "model.lr"'),
    (["experiment=fashion_photo"], 'Did you mean "fashion_photos"'),
    (["data.image_size=48"], "16, 32, 64, 128, 256"),
])
def test_train_py_rejects_bad_input_without_traceback(tmp_path, arguments, expected):
    result = subprocess.run([sys.executable, str(PROJECT_DIR / "train.py"), *arguments, f"run.output={tmp_path}/out"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)

    assert result.returncode == ExitCode.CONFIG
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert list(Path(tmp_path).iterdir()) == []
