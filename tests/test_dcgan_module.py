"""Tests of the DCGAN LightningModule, trained for a few steps by a real pytorch_lightning Trainer on the CPU."""

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, IterableDataset

from fashion_gan import sampling
from fashion_gan.errors import ConfigError, TrainingDivergedError
from fashion_gan.models import ALLOWED_IMAGE_SIZES, DCGAN
from fashion_gan.models.dcgan import derive_step_seeds

pytestmark = pytest.mark.filterwarnings(
    "ignore:The '.*dataloader' does not have many workers",
    "ignore:.*LeafSpec.*is deprecated",
    # Lightning 2.6 warns that manual-optimization checkpoints hold the weights after the step's
    # updates. That is intended: such a checkpoint also records global_step = step + 1.
    "ignore:Using ModelCheckpoint with manual optimization",
    "ignore:Be aware that when using `ckpt_path`",
)

BATCH_SIZE = 4


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Run on one intra-op thread, because these tiny models gain nothing from more.

    On a CPU shared with other processes, extra OpenMP threads spin-wait and slow every step down.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def restore_deterministic_flag(monkeypatch):
    """Undo the global flag and environment variable that Trainer(deterministic=True) sets."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


def tiny_module(image_size: int = 16, channels: int = 1, **overrides) -> DCGAN:
    settings = {
        "latent_dim": 8,
        "generator_features": 8,
        "discriminator_features": 8,
        "channels": channels,
        "image_size": image_size,
        "sample_count": 4,
        "seed": 11,
    }
    settings.update(overrides)
    return DCGAN(**settings)


class RepeatedBatch(IterableDataset):
    """An endless stream of one batch, so the batch of every step, resumed or not, is the same."""

    def __init__(self, batch: torch.Tensor) -> None:
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def uint8_loader(image_size: int = 16, channels: int = 1) -> DataLoader:
    shape = (BATCH_SIZE, channels, image_size, image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    return DataLoader(RepeatedBatch(images), batch_size=None)


def make_trainer(max_steps: int, **overrides) -> pl.Trainer:
    settings = {
        "max_steps": max_steps,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "deterministic": True,
    }
    settings.update(overrides)
    return pl.Trainer(**settings)


def fit(module: DCGAN, max_steps: int, ckpt_path=None, **trainer_overrides) -> pl.Trainer:
    trainer = make_trainer(max_steps, **trainer_overrides)
    loader = uint8_loader(module.hparams.image_size, module.hparams.channels)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def adam_step_counts(trainer: pl.Trainer) -> list[float]:
    """Return the Adam 'step' count of the first parameter of each optimizer (generator first)."""
    return [float(optimizer.state_dict()["state"][0]["step"]) for optimizer in trainer.optimizers]


def assert_state_dicts_equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def assert_optimizer_states_equal(first: dict, second: dict) -> None:
    assert first["state"].keys() == second["state"].keys()
    for index, param_state in first["state"].items():
        for name, value in param_state.items():
            assert torch.equal(value, second["state"][index][name]), (index, name)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("image_size", ALLOWED_IMAGE_SIZES)
def test_one_training_step_each_size(image_size, channels):
    module = tiny_module(image_size, channels, dropout=0.2, augment_flip=True)
    trainer = fit(module, max_steps=1)

    assert trainer.global_step == 1
    assert adam_step_counts(trainer) == [1.0, 1.0]
    for key in ("train/d_loss", "train/g_loss", "train/d_real", "train/d_fake"):
        assert math.isfinite(trainer.callback_metrics[key].item()), key
    assert module.sample().shape == (4, channels, image_size, image_size)
    assert module.discriminator(module.sample()).shape == (4,)


def test_seven_steps_update_each_network_seven_times():
    trainer = fit(tiny_module(), max_steps=7)
    assert trainer.global_step == 7
    assert adam_step_counts(trainer) == [7.0, 7.0]


def test_logged_probabilities_are_in_unit_interval():
    trainer = fit(tiny_module(), max_steps=2)
    for key in ("train/d_real", "train/d_fake"):
        value = trainer.callback_metrics[key].item()
        assert 0.0 < value < 1.0, key


def test_hyperparameters_hold_only_model_settings():
    module = tiny_module()
    assert set(module.hparams) == {
        "latent_dim", "generator_features", "discriminator_features", "channels", "image_size", "dropout",
        "generator_lr", "discriminator_lr", "adam_beta1", "adam_beta2", "label_smoothing", "sample_count",
        "augment_flip", "seed", "channels_last", "check_finite_every_n_steps", "inject_nan_at_step",
        "ema_decay", "ema_start_step",
    }


def test_default_optimizer_settings():
    module = DCGAN()
    generator_optimizer, discriminator_optimizer = module.configure_optimizers()
    for optimizer in (generator_optimizer, discriminator_optimizer):
        assert isinstance(optimizer, torch.optim.Adam)
        assert optimizer.defaults["lr"] == 2e-4
        assert optimizer.defaults["betas"] == (0.5, 0.999)
    assert module.fixed_noise.shape == (64, 100)


def test_same_seed_runs_are_bitwise_equal():
    settings = {"dropout": 0.3, "augment_flip": True, "label_smoothing": 0.1}
    first = tiny_module(**settings)
    second = tiny_module(**settings)
    fit(first, max_steps=5)
    fit(second, max_steps=5)
    assert_state_dicts_equal(first.state_dict(), second.state_dict())


def test_different_seed_changes_weights():
    first = tiny_module(seed=1)
    second = tiny_module(seed=2)
    assert not torch.equal(first.generator.net[0][0].weight, second.generator.net[0][0].weight)
    assert not torch.equal(first.fixed_noise, second.fixed_noise)


def test_checkpoint_round_trip_restores_both_optimizers(tmp_path):
    interrupted = tiny_module(dropout=0.3, augment_flip=True)
    first_trainer = fit(interrupted, max_steps=3)
    checkpoint_path = tmp_path / "step3.ckpt"
    first_trainer.save_checkpoint(checkpoint_path)

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert len(checkpoint["optimizer_states"]) == 2
    for saved, live in zip(checkpoint["optimizer_states"], first_trainer.optimizers, strict=True):
        assert_optimizer_states_equal(saved, live.state_dict())
    assert torch.equal(checkpoint["state_dict"]["fixed_noise"], interrupted.fixed_noise)

    # A differently seeded module proves the weights, buffers and optimizer states come from the file.
    resumed = tiny_module(dropout=0.3, augment_flip=True, seed=99)
    resumed_trainer = make_trainer(3)
    resumed_trainer.fit(resumed, uint8_loader(), ckpt_path=checkpoint_path)
    assert resumed_trainer.global_step == 3
    assert_state_dicts_equal(resumed.state_dict(), interrupted.state_dict())
    for restored, original in zip(resumed_trainer.optimizers, first_trainer.optimizers, strict=True):
        assert_optimizer_states_equal(restored.state_dict(), original.state_dict())


def test_resume_from_mid_run_checkpoint_is_bitwise_exact(tmp_path):
    settings = {"dropout": 0.3, "augment_flip": True, "label_smoothing": 0.1}
    uninterrupted = tiny_module(**settings)
    uninterrupted_trainer = fit(uninterrupted, max_steps=6)

    checkpointing = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    first_half = tiny_module(**settings)
    fit(first_half, max_steps=4, enable_checkpointing=True, callbacks=[checkpointing])
    checkpoint_path = tmp_path / "step=3.ckpt"
    assert torch.load(checkpoint_path, map_location="cpu", weights_only=True)["global_step"] == 3

    resumed = tiny_module(**settings)
    resumed_trainer = fit(resumed, max_steps=6, ckpt_path=checkpoint_path)
    assert resumed_trainer.global_step == 6
    assert adam_step_counts(resumed_trainer) == [6.0, 6.0]
    assert_state_dicts_equal(resumed.state_dict(), uninterrupted.state_dict())
    for restored, original in zip(resumed_trainer.optimizers, uninterrupted_trainer.optimizers, strict=True):
        assert_optimizer_states_equal(restored.state_dict(), original.state_dict())


def test_load_generator_matches_trained_generator(tmp_path):
    module = tiny_module(image_size=32, channels=3)
    trainer = fit(module, max_steps=2)
    checkpoint_path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint_path)

    generator = sampling.load_generator(checkpoint_path)
    assert not generator.training
    assert (generator.latent_dim, generator.channels, generator.image_size) == (8, 3, 32)
    assert torch.equal(sampling.generate(generator, module.fixed_noise), module.sample())


def test_load_generator_missing_file_rejected(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint not found"):
        sampling.load_generator(tmp_path / "absent.ckpt")


def test_load_generator_foreign_file_rejected(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ConfigError, match="not a DCGAN checkpoint"):
        sampling.load_generator(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="failed to read checkpoint"):
        sampling.load_generator(path)


def test_injected_nan_raises_before_update():
    module = tiny_module(inject_nan_at_step=2)
    trainer = make_trainer(5)
    with pytest.raises(TrainingDivergedError, match="at step 2"):
        trainer.fit(module, uint8_loader())
    assert trainer.global_step == 2
    assert adam_step_counts(trainer) == [2.0, 2.0]
    for name, parameter in module.named_parameters():
        assert torch.isfinite(parameter).all(), name


def test_disabled_finite_check_lets_nan_through():
    module = tiny_module(inject_nan_at_step=1, check_finite_every_n_steps=0)
    fit(module, max_steps=2)
    assert not torch.isfinite(module.discriminator.net[0][0].weight).all()


def test_sparse_finite_check_finds_nan_later():
    module = tiny_module(inject_nan_at_step=1, check_finite_every_n_steps=2)
    with pytest.raises(TrainingDivergedError, match="at step 2"):
        fit(module, max_steps=4)


def test_bf16_autocast_step_runs():
    module = tiny_module(image_size=32, channels=3)
    trainer = fit(module, max_steps=2, precision="bf16-mixed")
    assert trainer.global_step == 2
    assert math.isfinite(trainer.callback_metrics["train/g_loss"].item())
    assert module.generator.net[0][0].weight.dtype == torch.float32


def test_channels_last_module_trains():
    module = tiny_module(image_size=32, channels=3, channels_last=True)
    first_conv = module.discriminator.net[0][0].weight
    assert first_conv.is_contiguous(memory_format=torch.channels_last)
    trainer = fit(module, max_steps=2)
    assert trainer.global_step == 2
    assert module.discriminator.net[0][0].weight.is_contiguous(memory_format=torch.channels_last)


def test_float16_precision_rejected():
    with pytest.raises(ConfigError, match="bf16-mixed"):
        fit(tiny_module(), max_steps=1, precision="16-true")


def test_batch_of_wrong_shape_rejected():
    module = tiny_module(image_size=16, channels=1)
    trainer = make_trainer(1)
    with pytest.raises(ConfigError, match=r"shape \(4, 3, 16, 16\)"):
        trainer.fit(module, uint8_loader(image_size=16, channels=3))


def test_flip_augmentation_mirrors_some_images():
    module = tiny_module(augment_flip=True)
    batch = torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8)
    scaled = batch.float() / 127.5 - 1.0
    prepared = module._prepare_real_batch(batch, torch.Generator().manual_seed(0))
    flipped = [torch.equal(prepared[i], scaled[i].flip(-1)) for i in range(64)]
    unchanged = [torch.equal(prepared[i], scaled[i]) for i in range(64)]
    assert all(was_flipped or same for was_flipped, same in zip(flipped, unchanged, strict=True))
    assert 10 < sum(flipped) < 54


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("generator_lr", 0.0),
        ("discriminator_lr", float("nan")),
        ("adam_beta1", 1.0),
        ("label_smoothing", 1.0),
        ("sample_count", 0),
        ("seed", -1),
        ("check_finite_every_n_steps", -1),
    ],
)
def test_invalid_training_setting_rejected(setting, value):
    with pytest.raises(ConfigError, match=setting):
        tiny_module(**{setting: value})


def test_step_seeds_depend_on_seed_step_and_rank():
    base = derive_step_seeds(seed=0, step=5, rank=0)
    assert derive_step_seeds(seed=0, step=5, rank=0) == base
    assert derive_step_seeds(seed=1, step=5, rank=0) != base
    assert derive_step_seeds(seed=0, step=6, rank=0) != base
    assert derive_step_seeds(seed=0, step=5, rank=1) != base
    assert all(0 <= value < 2**63 for value in base)


def test_step_zero_metrics_use_smoothed_real_target():
    smoothing = 0.2
    batch = next(iter(uint8_loader()))
    reference = tiny_module()
    real_logits = reference.discriminator(batch.float() / 127.5 - 1.0).detach()

    plain = fit(tiny_module(), max_steps=1).callback_metrics
    smoothed = fit(tiny_module(label_smoothing=smoothing), max_steps=1).callback_metrics
    # BCE(x, t) = softplus(x) - t * x, so lowering the real target by s raises the loss by s * mean(x).
    expected_increase = smoothing * real_logits.mean()
    assert torch.allclose(smoothed["train/d_loss"] - plain["train/d_loss"], expected_increase, atol=1e-5)
    assert torch.allclose(plain["train/d_real"], torch.sigmoid(real_logits).mean(), atol=1e-6)
    # Updates alternate: the G loss is computed against the D that this step updated, so it depends
    # on the smoothing that changed D's update.
    assert not torch.equal(plain["train/g_loss"], smoothed["train/g_loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_channels_last_steps():
    module = tiny_module(image_size=64, channels=3, channels_last=True, dropout=0.2, augment_flip=True)
    trainer = fit(module, max_steps=3, accelerator="gpu", devices=1, precision="bf16-mixed", deterministic=False)
    assert trainer.global_step == 3
    assert adam_step_counts(trainer) == [3.0, 3.0]
    for key in ("train/d_loss", "train/g_loss", "train/d_real", "train/d_fake"):
        assert math.isfinite(trainer.callback_metrics[key].item()), key
    assert module.discriminator.net[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert module.sample().device.type == "cuda"


class LoggedLossRecorder(pl.Callback):
    """Record the d_loss in trainer.callback_metrics after every step (None before the first log)."""

    def __init__(self) -> None:
        self.d_losses: list[float | None] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        value = trainer.callback_metrics.get("train/d_loss")
        self.d_losses.append(None if value is None else value.item())


def test_losses_logged_every_n_steps_and_last():
    recorder = LoggedLossRecorder()
    fit(tiny_module(), max_steps=7, log_every_n_steps=3, callbacks=[recorder])

    first, second, third, fourth, fifth, sixth, seventh = recorder.d_losses
    assert first is None
    assert second is None
    assert third is not None
    assert fourth == third
    assert fifth == third
    assert sixth is not None and sixth != third
    assert seventh is not None and seventh != sixth
