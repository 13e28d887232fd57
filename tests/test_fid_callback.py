"""FidCallback: scores at the evaluation steps, cached real statistics, the metrics.csv path, offline inception."""

import csv
import logging
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fashion_gan.callbacks.fid import FidCallback, real_statistics_cache_path
from fashion_gan.callbacks.metrics import MetricsCallback
from fashion_gan.config import MetricsConfig
from fashion_gan.metrics.classifier import uint8_to_unit_range

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(),
                                reason=f"Fashion-MNIST not installed at {FASHION_MNIST_DIR}")
# The collapse test needs enough images to separate the scores. The tests of when and where values
# appear use fewer images, so they stay quick on a small machine.
COLLAPSE_NUM_SAMPLES = 500
PIPELINE_NUM_SAMPLES = 100


class ArrayGenerator(torch.nn.Module):
    """Test-only stand-in for the DCGAN module: `sample` returns the next images of a uint8 array, ignoring the noise."""

    def __init__(self, images: np.ndarray) -> None:
        super().__init__()
        self.images = images
        self.position = 0
        self.hparams = SimpleNamespace(latent_dim=4)
        self.register_buffer("fixed_noise", torch.zeros(1, 4))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        indices = np.arange(self.position, self.position + len(noise)) % len(self.images)
        self.position += len(noise)
        return uint8_to_unit_range(torch.from_numpy(self.images[indices]))


def fake_trainer(max_steps: int = 100, log_every_n_steps: int = 2) -> SimpleNamespace:
    return SimpleNamespace(global_step=0, max_steps=max_steps, log_every_n_steps=log_every_n_steps,
                           is_global_zero=True, callback_metrics={})


@pytest.fixture(scope="module")
def fashion_images() -> tuple[np.ndarray, np.ndarray]:
    """(1,000 training images, 1,000 test images), both uint8 (N, 1, 28, 28)."""
    from fashion_gan.data.fashion_mnist import load_idx

    train_images, _ = load_idx(FASHION_MNIST_DIR, "train")
    test_images, _ = load_idx(FASHION_MNIST_DIR, "test")
    return np.ascontiguousarray(train_images[:1000, None]), np.ascontiguousarray(test_images[:1000, None])


@pytest.fixture(scope="module")
def shared_decoded(tmp_path_factory, fashion_images):
    """A decoded array whose real statistics are computed by the first test and reused by the others."""
    return SimpleNamespace(array=fashion_images[0],
                           cache_path=tmp_path_factory.mktemp("decoded") / "fashion_mnist-1x28-shared.npy")


@pytest.fixture
def decoded(tmp_path, fashion_images):
    return SimpleNamespace(array=fashion_images[0], cache_path=tmp_path / "fashion_mnist-1x28-abc123.npy")


def make_callback(decoded, extractor: str = "fashion_mnist_classifier", every_n_steps: int = 2,
                  num_samples: int = PIPELINE_NUM_SAMPLES) -> FidCallback:
    config = MetricsConfig(fid_extractor=extractor, eval_every_n_steps=every_n_steps, num_samples=num_samples)
    return FidCallback(config, decoded)


def end_batch(callback, trainer, module, step: int) -> None:
    trainer.global_step = step
    callback.on_train_batch_end(trainer, module, None, None, step - 1)


def test_collapse_raises_fid_keeps_best(decoded, fashion_images):
    callback = make_callback(decoded, num_samples=COLLAPSE_NUM_SAMPLES)
    trainer = fake_trainer()
    module = ArrayGenerator(fashion_images[1])
    callback.on_train_start(trainer, module)

    end_batch(callback, trainer, module, step=2)
    varied_fid = float(trainer.callback_metrics["val/fid"])
    assert float(trainer.callback_metrics["val/class_coverage"]) > 0.8
    assert float(trainer.callback_metrics["val/fid_best"]) == pytest.approx(varied_fid)

    module.images = np.repeat(fashion_images[1][:1], 10, axis=0)  # mode collapse: one image only
    end_batch(callback, trainer, module, step=3)
    assert "val/fid" not in trainer.callback_metrics  # step 2 was logged, step 3 is no evaluation step
    end_batch(callback, trainer, module, step=4)
    collapsed_fid = float(trainer.callback_metrics["val/fid"])
    assert float(trainer.callback_metrics["val/class_coverage"]) < 0.05
    assert collapsed_fid > 5 * varied_fid
    assert float(trainer.callback_metrics["val/fid_best"]) == pytest.approx(varied_fid)


def test_evaluates_at_last_step(shared_decoded, fashion_images):
    callback = make_callback(shared_decoded, every_n_steps=10)
    trainer = fake_trainer(max_steps=7, log_every_n_steps=5)
    module = ArrayGenerator(fashion_images[1])
    callback.on_train_start(trainer, module)
    for step in range(1, 7):
        end_batch(callback, trainer, module, step)
        assert "val/fid" not in trainer.callback_metrics
    end_batch(callback, trainer, module, step=7)
    assert "val/fid" in trainer.callback_metrics


def test_real_statistics_cached_beside_array(decoded, fashion_images, caplog):
    module = ArrayGenerator(fashion_images[1])
    make_callback(decoded).on_train_start(fake_trainer(), module)
    cache_path = real_statistics_cache_path(decoded.cache_path, "fashion_mnist_classifier")
    assert cache_path.parent == decoded.cache_path.parent
    assert cache_path.name == "fashion_mnist-1x28-abc123.fid-fashion_mnist_classifier.npz"
    assert cache_path.is_file()

    with caplog.at_level(logging.INFO, logger="fashion_gan.metrics.fid"):
        make_callback(decoded).on_train_start(fake_trainer(), module)
    assert "reusing real FID statistics" in caplog.text


def test_scores_reach_metrics_csv_at_eval_step(tmp_path, shared_decoded, fashion_images):
    fid = make_callback(shared_decoded, every_n_steps=3)
    pusher = SimpleNamespace(push=lambda path: None)
    metrics = MetricsCallback(tmp_path, log_every_n_steps=1, images_per_step=16, max_steps=6, pusher=pusher,
                              write_csv=True)
    trainer = fake_trainer(max_steps=6, log_every_n_steps=1)
    module = ArrayGenerator(fashion_images[1])
    fid.on_train_start(trainer, module)
    metrics.on_train_start(trainer, module)
    for step in range(1, 7):
        trainer.global_step = step
        # The order of train.py: metric callbacks before MetricsCallback.
        fid.on_train_batch_end(trainer, module, None, None, step - 1)
        metrics.on_train_batch_end(trainer, module, None, None, step - 1)

    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = {int(row["step"]): row for row in csv.DictReader(handle)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert [step for step, row in rows.items() if row["val/fid"]] == [3, 6]
    assert [step for step, row in rows.items() if row["val/class_coverage"]] == [3, 6]
    assert float(rows[6]["val/fid_best"]) <= float(rows[3]["val/fid"]) * (1 + 1e-5)
    assert metrics.last_values["val/fid"] == pytest.approx(float(rows[6]["val/fid"]), rel=1e-5)


def test_off_grid_eval_written_at_next_log_step(shared_decoded, fashion_images):
    callback = make_callback(shared_decoded, every_n_steps=3)
    trainer = fake_trainer(max_steps=100, log_every_n_steps=2)
    module = ArrayGenerator(fashion_images[1])
    callback.on_train_start(trainer, module)
    end_batch(callback, trainer, module, step=3)
    assert "val/fid" in trainer.callback_metrics
    end_batch(callback, trainer, module, step=4)  # MetricsCallback writes this row, with the step-3 score
    assert "val/fid" in trainer.callback_metrics
    end_batch(callback, trainer, module, step=5)
    assert "val/fid" not in trainer.callback_metrics


def test_best_fid_restored_on_resume(shared_decoded, fashion_images):
    trainer = fake_trainer()
    first = make_callback(shared_decoded)
    first.on_train_start(trainer, ArrayGenerator(fashion_images[1]))
    end_batch(first, trainer, ArrayGenerator(fashion_images[1]), step=2)
    state = first.state_dict()
    assert state["best_fid"] == pytest.approx(float(trainer.callback_metrics["val/fid"]))

    resumed = make_callback(shared_decoded)
    resumed.load_state_dict(state)
    resumed_trainer = fake_trainer()
    collapsed = ArrayGenerator(np.repeat(fashion_images[1][:1], 10, axis=0))
    resumed.on_train_start(resumed_trainer, collapsed)
    end_batch(resumed, resumed_trainer, collapsed, step=4)
    assert float(resumed_trainer.callback_metrics["val/fid_best"]) == pytest.approx(state["best_fid"])
    assert float(resumed_trainer.callback_metrics["val/fid"]) > state["best_fid"]


def test_inception_offline_warns_and_continues(decoded, fashion_images, tmp_path, monkeypatch, caplog):
    # No torch hub cache and no network: the Inception weights cannot be had, whether or not
    # torch-fidelity is installed.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def refuse_connection(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse_connection)
    callback = make_callback(decoded, extractor="inception")
    trainer = fake_trainer()
    module = ArrayGenerator(fashion_images[1])
    with caplog.at_level(logging.WARNING, logger="fashion_gan.callbacks.fid"):
        callback.on_train_start(trainer, module)
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "continues without val/fid" in warnings[0].getMessage()
    assert "inception" in warnings[0].getMessage()

    end_batch(callback, trainer, module, step=2)
    assert trainer.callback_metrics == {}
    assert not list(decoded.cache_path.parent.glob("*.npz"))
