"""Tests of the generator's exponential moving average (model.ema_decay) in the DCGAN module."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from fashion_gan import sampling
from fashion_gan.config import validate_config
from fashion_gan.errors import ConfigError
from fashion_gan.models import DCGAN
from training_helpers import compose_config

pytestmark = pytest.mark.filterwarnings(
    "ignore:The '.*dataloader' does not have many workers",
    "ignore:.*LeafSpec.*is deprecated",
    "ignore:Be aware that when using `ckpt_path`",
)


@pytest.fixture(autouse=True)
def single_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RepeatedBatch(IterableDataset):
    def __init__(self, batch: torch.Tensor) -> None:
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def tiny_module(**overrides) -> DCGAN:
    settings = {"latent_dim": 8, "generator_features": 8, "discriminator_features": 8, "channels": 1,
                "image_size": 16, "sample_count": 4, "seed": 3, "ema_decay": 0.9}
    settings.update(overrides)
    return DCGAN(**settings)


def fit(module: DCGAN, max_steps: int, ckpt_path=None) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    trainer.fit(module, DataLoader(RepeatedBatch(images), batch_size=None), ckpt_path=ckpt_path)
    return trainer


def parameters_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in module.parameters()]


def test_ema_starts_as_copy_of_generator():
    module = tiny_module()
    for ema, trained in zip(module.generator_ema.parameters(), module.generator.parameters(), strict=True):
        assert torch.equal(ema, trained)
        assert not ema.requires_grad


def test_ema_off_when_decay_is_zero():
    module = tiny_module(ema_decay=0.0)
    assert module.generator_ema is None
    assert not any(key.startswith("generator_ema.") for key in module.state_dict())


def test_ema_follows_warmup_schedule():
    # Replay the two updates by hand: decay min(0.9, (1 + s) / (10 + s)) is 0.1 at step 0 and 2/11 at step 1.
    module = tiny_module()
    expected = parameters_of(module.generator)
    generator_after = []

    class RecordGenerator(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            generator_after.append(parameters_of(pl_module.generator))

    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[RecordGenerator()])
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    trainer.fit(module, DataLoader(RepeatedBatch(images), batch_size=None))

    for step, weights in enumerate(generator_after):
        decay = min(0.9, (1 + step) / (10 + step))
        expected = [torch.lerp(ema, new, 1.0 - decay) for ema, new in zip(expected, weights, strict=True)]
    for ema, value in zip(module.generator_ema.parameters(), expected, strict=True):
        torch.testing.assert_close(ema, value)
    assert not torch.equal(next(module.generator_ema.parameters()), next(module.generator.parameters()))


def test_ema_copies_until_start_step():
    # Steps 0 and 1 come before ema_start_step=2: the average equals the generator. Step 2 is the
    # first averaged one, with decay min(0.9, 1 / 10) = 0.1.
    module = tiny_module(ema_start_step=2)
    generator_after = []

    class RecordGenerator(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            generator_after.append(parameters_of(pl_module.generator))
            if trainer.global_step == 2:
                for ema, trained in zip(pl_module.generator_ema.parameters(), pl_module.generator.parameters(),
                                        strict=True):
                    assert torch.equal(ema, trained)

    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[RecordGenerator()])
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    trainer.fit(module, DataLoader(RepeatedBatch(images), batch_size=None))

    expected = [torch.lerp(before, after, 0.9) for before, after in zip(generator_after[1], generator_after[2],
                                                                       strict=True)]
    for ema, value in zip(module.generator_ema.parameters(), expected, strict=True):
        torch.testing.assert_close(ema, value)
    assert not torch.equal(next(module.generator_ema.parameters()), next(module.generator.parameters()))


@pytest.mark.parametrize("value", [-1, 1.5])
def test_invalid_ema_start_rejected(value):
    with pytest.raises(ConfigError, match="ema_start_step"):
        tiny_module(ema_start_step=value)


def test_ema_averages_batchnorm_statistics():
    module = tiny_module()
    fit(module, max_steps=3)
    ema_buffers, buffers = dict(module.generator_ema.named_buffers()), dict(module.generator.named_buffers())
    assert int(ema_buffers["net.0.1.num_batches_tracked"]) == 3
    # Three steps of batch statistics moved the trained running mean further from its initial zeros.
    assert 0 < ema_buffers["net.0.1.running_mean"].abs().sum() < buffers["net.0.1.running_mean"].abs().sum()


def test_sample_uses_ema_generator():
    module = tiny_module()
    fit(module, max_steps=3)
    module.generator_ema.eval()
    with torch.no_grad():
        expected = module.generator_ema(module.fixed_noise)
    module.generator_ema.train()
    assert torch.equal(module.sample(), expected)
    assert module.generator_ema.training  # sample() restores the train mode it found


def test_load_generator_prefers_ema_weights(tmp_path):
    module = tiny_module()
    trainer = fit(module, max_steps=3)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)

    generator = sampling.load_generator(path)

    for loaded, ema in zip(generator.state_dict().values(), module.generator_ema.state_dict().values(), strict=True):
        assert torch.equal(loaded, ema)
    assert torch.equal(sampling.generate(generator, module.fixed_noise), module.sample())


def test_checkpoint_without_ema_resumes_with_ema(tmp_path):
    plain = tiny_module(ema_decay=0.0)
    trainer = fit(plain, max_steps=2)
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)

    resumed = tiny_module()
    fit(resumed, max_steps=2, ckpt_path=path)

    for ema, trained in zip(resumed.generator_ema.parameters(), plain.generator.parameters(), strict=True):
        assert torch.equal(ema, trained)


def test_checkpoint_with_ema_resumes_without_ema(tmp_path):
    averaged = tiny_module()
    trainer = fit(averaged, max_steps=2)
    path = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(path)

    resumed = tiny_module(ema_decay=0.0)
    fit(resumed, max_steps=2, ckpt_path=path)

    assert resumed.generator_ema is None
    assert torch.equal(next(resumed.generator.parameters()), next(averaged.generator.parameters()))


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_invalid_ema_decay_rejected(value):
    with pytest.raises(ConfigError, match="ema_decay"):
        tiny_module(ema_decay=value)
    with pytest.raises(ConfigError, match="model.ema_decay"):
        validate_config(compose_config([f"model.ema_decay={value}"]))


def test_default_config_enables_ema():
    model = validate_config(compose_config([])).model
    assert model.ema_decay == 0.999
    assert model.ema_start_step == 1000
