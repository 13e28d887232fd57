"""Child process of the framework-overhead benchmark: the Lightning module vs a plain loop.

Both variants train the same DCGAN (the project's module, its networks and optimizers) on one
fixed uint8 batch, repeated every step, with the precision that `trainer.precision=auto` picks.
  lightning   pl.Trainer.fit on fashion_gan.models.DCGAN (its training_step with seeding,
              NaN checks and logging every 10 steps), no callbacks besides the step timer
  plain       the same D and G updates written as a plain PyTorch loop under torch.autocast
Each of `settings.repeats` rounds is one Lightning fit that runs one plain step, on networks of
its own, after each Lightning step. Steps of the two variants thus alternate, and a change in the
machine's speed, which moved 25-step stretches of training by 5 to 15 % on the 2-core VM where this
was built, reaches both alike.
"""

from __future__ import annotations

import itertools
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


class PlainLoop:
    """The project's D and G updates as a plain PyTorch loop, on networks and optimizers of its own."""

    def __init__(self, settings: BenchSettings, precision: str) -> None:
        module = build_module(settings)
        self.latent_dim = settings.latent_dim
        self.label_smoothing = settings.label_smoothing
        self.generator, self.discriminator = module.generator, module.discriminator
        self.generator_optimizer, self.discriminator_optimizer = module.configure_optimizers()
        self.batch = fixed_batch(settings)
        self.flip_rng = torch.Generator().manual_seed(settings.seed)
        self.use_bf16 = precision == "bf16-mixed"

    def step(self) -> None:
        """Run one discriminator update and one generator update."""
        from fashion_gan.models.dcgan import prepare_real_batch

        real = prepare_real_batch(self.batch, self.flip_rng, channels_last=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.use_bf16):
            fake = self.generator(torch.randn(real.shape[0], self.latent_dim))
            self.discriminator_optimizer.zero_grad(set_to_none=True)
            real_logits = self.discriminator(real)
            fake_logits = self.discriminator(fake.detach())
            d_loss = F.binary_cross_entropy_with_logits(
                real_logits, torch.full_like(real_logits, 1.0 - self.label_smoothing)
            ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        d_loss.backward()
        self.discriminator_optimizer.step()

        self.generator_optimizer.zero_grad(set_to_none=True)
        self.discriminator.requires_grad_(False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.use_bf16):
            generated_logits = self.discriminator(fake)
            g_loss = F.binary_cross_entropy_with_logits(generated_logits, torch.ones_like(generated_logits))
        g_loss.backward()
        self.discriminator.requires_grad_(True)
        self.generator_optimizer.step()


def train_interleaved(settings: BenchSettings, precision: str, steps: int) -> dict[str, list[float]]:
    """Run `steps` Lightning steps with one plain step after each, and return each variant's step durations.

    A Lightning step's duration runs from the end of the plain step before it to the Lightning
    module's next on_train_batch_end, so it covers the whole loop: fetching the batch, the hooks,
    training_step and the bookkeeping after it.
    """
    import pytorch_lightning as pl

    class InterleavedStepTimer(pl.Callback):
        def __init__(self) -> None:
            self.plain = PlainLoop(settings, precision)
            self.durations: dict[str, list[float]] = {"lightning": [], "plain": []}
            self.previous_end = 0.0  # end of the previous plain step, or the start of training

        def on_train_start(self, trainer, pl_module) -> None:
            self.previous_end = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            lightning_end = time.perf_counter()
            self.durations["lightning"].append(lightning_end - self.previous_end)

            self.plain.step()
            self.previous_end = time.perf_counter()
            self.durations["plain"].append(self.previous_end - lightning_end)

    from fashion_gan.config import TrainerConfig

    timer = InterleavedStepTimer()
    # The module logs its losses every log_every_n_steps steps, so the benchmark uses train.py's default.
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=steps, max_epochs=-1,
                         log_every_n_steps=TrainerConfig.log_every_n_steps,
                         logger=False, callbacks=[timer], enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, limit_val_batches=0,
                         num_sanity_val_steps=0, use_distributed_sampler=False)
    loader = torch.utils.data.DataLoader(RepeatedBatch(fixed_batch(settings)), batch_size=None)
    trainer.fit(build_module(settings), train_dataloaders=loader)
    return timer.durations


def train_rounds(settings: BenchSettings, precision: str, steps: int) -> dict[str, list[list[float]]]:
    """Run `settings.repeats` interleaved rounds and return, per variant and round, the step end times.

    The end times count only that variant's steps (the running sum of its durations), so images/s
    come out as for a run of that variant alone.
    """
    runs: dict[str, list[list[float]]] = {"plain": [], "lightning": []}
    for round_number in range(settings.repeats):
        print(f"framework round {round_number + 1}: lightning and plain steps interleaved", flush=True)
        durations = train_interleaved(settings, precision, steps)
        for variant, variant_durations in durations.items():
            runs[variant].append(list(itertools.accumulate(variant_durations)))
    return runs


def main(argv: list[str]) -> None:
    arguments = child_parser(__doc__.splitlines()[0]).parse_args(argv)
    settings = BenchSettings.from_json(arguments.settings)
    from fashion_gan.train import resolve_precision

    precision = resolve_precision("auto", "cpu")
    steps = settings.warmup_steps + settings.measure_steps
    write_result(arguments.result, {"runs": train_rounds(settings, precision, steps), "precision": precision})


if __name__ == "__main__":
    main(sys.argv[1:])
