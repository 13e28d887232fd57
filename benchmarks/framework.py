"""Child process of the framework-overhead benchmark: the Lightning module vs a plain loop.

Both variants train the same DCGAN (the project's module, its networks and optimizers) on one
fixed uint8 batch, repeated every step, with the precision that `trainer.precision=auto` picks.
  lightning   pl.Trainer.fit on fashion_gan.models.DCGAN (its training_step with seeding,
              NaN checks and logging), no callbacks besides the step timer
  plain       the same D and G updates written as a plain PyTorch loop under torch.autocast
The process runs `settings.repeats` rounds of both, the order alternating between rounds, so both
sides share the process's memory layout and thread placement. Single runs in separate processes
differed by up to 8 %.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import BenchSettings, child_parser, write_result


def fixed_batch(settings: BenchSettings) -> torch.Tensor:
    """Return one uint8 batch with the benchmark's shape; the same bytes for both variants."""
    generator = np.random.default_rng(settings.seed)
    shape = (settings.batch_size, settings.channels, settings.image_size, settings.image_size)
    return torch.from_numpy(generator.integers(0, 256, size=shape, dtype=np.uint8))


def build_module(settings: BenchSettings):
    from fashion_gan.models import DCGAN

    return DCGAN(
        latent_dim=settings.latent_dim,
        generator_features=settings.generator_features,
        discriminator_features=settings.discriminator_features,
        channels=settings.channels,
        image_size=settings.image_size,
        dropout=settings.dropout,
        generator_lr=settings.lr,
        discriminator_lr=settings.lr,
        adam_beta1=settings.beta1,
        adam_beta2=settings.beta2,
        label_smoothing=settings.label_smoothing,
        augment_flip=True,
        seed=settings.seed,
        channels_last=True,
    )


class RepeatedBatch(torch.utils.data.IterableDataset):
    def __init__(self, batch: torch.Tensor) -> None:
        super().__init__()
        self.batch = batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.batch


def train_lightning(settings: BenchSettings, precision: str, steps: int) -> list[float]:
    import pytorch_lightning as pl

    step_end_times: list[float] = []

    class StepTimer(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step_end_times.append(time.perf_counter())

    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=steps, max_epochs=-1,
                         logger=False, callbacks=[StepTimer()], enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, limit_val_batches=0,
                         num_sanity_val_steps=0, use_distributed_sampler=False)
    loader = torch.utils.data.DataLoader(RepeatedBatch(fixed_batch(settings)), batch_size=None)
    trainer.fit(build_module(settings), train_dataloaders=loader)
    return step_end_times


def train_plain(settings: BenchSettings, precision: str, steps: int) -> list[float]:
    from fashion_gan.models.dcgan import prepare_real_batch

    module = build_module(settings)
    flip_rng = torch.Generator().manual_seed(settings.seed)
    generator, discriminator = module.generator, module.discriminator
    generator_optimizer, discriminator_optimizer = module.configure_optimizers()
    batch = fixed_batch(settings)
    use_bf16 = precision == "bf16-mixed"
    step_end_times: list[float] = []
    for _ in range(steps):
        real = prepare_real_batch(batch, flip_rng, channels_last=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            fake = generator(torch.randn(real.shape[0], settings.latent_dim))
            discriminator_optimizer.zero_grad(set_to_none=True)
            real_logits = discriminator(real)
            fake_logits = discriminator(fake.detach())
            d_loss = F.binary_cross_entropy_with_logits(
                real_logits, torch.full_like(real_logits, 1.0 - settings.label_smoothing)
            ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        d_loss.backward()
        discriminator_optimizer.step()

        generator_optimizer.zero_grad(set_to_none=True)
        discriminator.requires_grad_(False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            generated_logits = discriminator(fake)
            g_loss = F.binary_cross_entropy_with_logits(generated_logits, torch.ones_like(generated_logits))
        g_loss.backward()
        discriminator.requires_grad_(True)
        generator_optimizer.step()
        step_end_times.append(time.perf_counter())
    return step_end_times


def train_alternating(settings: BenchSettings, precision: str, steps: int) -> dict[str, list[list[float]]]:
    """Run plain and Lightning training `settings.repeats` times each in this process, alternating the order."""
    trainers = {"plain": train_plain, "lightning": train_lightning}
    runs: dict[str, list[list[float]]] = {variant: [] for variant in trainers}
    for round_number in range(settings.repeats):
        order = ("plain", "lightning") if round_number % 2 == 0 else ("lightning", "plain")
        for variant in order:
            print(f"framework round {round_number + 1}: {variant}", flush=True)
            runs[variant].append(trainers[variant](settings, precision, steps))
    return runs


def main(argv: list[str]) -> None:
    arguments = child_parser(__doc__.splitlines()[0]).parse_args(argv)
    settings = BenchSettings.from_json(arguments.settings)
    from fashion_gan.train import resolve_precision

    precision = resolve_precision("auto", "cpu")
    steps = settings.warmup_steps + settings.measure_steps
    write_result(arguments.result, {"runs": train_alternating(settings, precision, steps), "precision": precision})


if __name__ == "__main__":
    main(sys.argv[1:])
