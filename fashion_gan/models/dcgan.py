"""The DCGAN LightningModule: adversarial training of a Generator against a Discriminator."""

import copy
import logging
import math

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from fashion_gan.errors import ConfigError, TrainingDivergedError
from fashion_gan.models.discriminator import Discriminator
from fashion_gan.models.generator import Generator

log = logging.getLogger(__name__)

# State dict keys of the EMA generator start with this; fashion_gan.sampling.load_generator looks for them.
EMA_STATE_PREFIX = "generator_ema."


def derive_step_seeds(seed: int, step: int, rank: int) -> tuple[int, int]:
    """Return (noise_seed, dropout_seed) for one training step of one process.

    The seeds depend only on the run seed, the global step and the global rank, so a resumed
    run draws the same noise, flips and dropout masks as an uninterrupted one.
    """
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint64)
    # Drop the top bit so each seed fits the signed 64-bit integer that torch seeds are stored in.
    return int(state[0] >> np.uint64(1)), int(state[1] >> np.uint64(1))


def prepare_real_batch(batch: torch.Tensor, flip_rng: torch.Generator | None, channels_last: bool) -> torch.Tensor:
    """Return uint8 images (B, C, H, W) as float32 in [-1, 1], each flipped left-right with probability 1/2.

    `flip_rng` draws the flips (None = no flips). The memory-format change and the flip run on the
    uint8 tensor, a quarter of the float bytes, and nothing reads a value back to the host, so on a
    GPU this queues kernels without waiting. DecodedArrayDataModule's batches already are
    channels_last views, so for a channels_last model the format change costs nothing.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batch = batch.contiguous(memory_format=memory_format)
    if flip_rng is not None:
        flip = torch.rand(batch.shape[0], generator=flip_rng, device=batch.device) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    # .float() keeps the memory format; the in-place scaling then adds no allocation.
    return batch.float().div_(127.5).sub_(1.0)


def _skip_closure() -> None:
    """Serve as the closure of an optimizer step whose gradients were computed beforehand."""


class DCGAN(pl.LightningModule):
    """Train a DCGAN with Lightning manual optimization: one D update and one G update per global step.

    The updates alternate as in the DCGAN paper: D steps first, then the G loss is computed against
    the updated D. Each loss is checked for NaN/inf before its optimizer step, so non-finite
    gradients never reach the weights.

    Batches are uint8 tensors of shape (B, channels, image_size, image_size) on the training
    device. `inject_nan_at_step` exists for tests only: it makes the discriminator loss NaN at
    that global step.

    With `ema_decay` > 0 the module also keeps `generator_ema`, an exponential moving average of the
    generator's weights updated after every G step. It is part of the checkpoint, and `sample()`
    (sample grids, FID) and `fashion_gan.sampling.load_generator` use it in place of the raw generator.
    """

    def __init__(
        self,
        latent_dim: int = 100,
        generator_features: int = 64,
        discriminator_features: int = 64,
        channels: int = 1,
        image_size: int = 64,
        dropout: float = 0.0,
        generator_lr: float = 2e-4,
        discriminator_lr: float = 2e-4,
        adam_beta1: float = 0.5,
        adam_beta2: float = 0.999,
        label_smoothing: float = 0.0,
        sample_count: int = 64,
        augment_flip: bool = False,
        seed: int = 0,
        channels_last: bool = False,
        check_finite_every_n_steps: int = 1,
        inject_nan_at_step: int | None = None,
        ema_decay: float = 0.0,
        ema_start_step: int = 0,
    ) -> None:
        super().__init__()
        _check_training_settings(
            generator_lr=generator_lr,
            discriminator_lr=discriminator_lr,
            adam_beta1=adam_beta1,
            adam_beta2=adam_beta2,
            label_smoothing=label_smoothing,
            sample_count=sample_count,
            seed=seed,
            check_finite_every_n_steps=check_finite_every_n_steps,
            ema_decay=ema_decay,
            ema_start_step=ema_start_step,
        )
        self.save_hyperparameters()
        self.automatic_optimization = False

        # Seed the initial weights and the fixed noise without disturbing the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.generator = Generator(latent_dim, generator_features, channels, image_size)
            self.discriminator = Discriminator(discriminator_features, channels, image_size, dropout)
            fixed_noise = torch.randn(sample_count, latent_dim)
        # The average starts from the initial weights. It gets no gradients and no optimizer: only
        # _update_generator_ema changes it.
        self.generator_ema = _frozen_copy(self.generator) if ema_decay > 0 else None
        # A buffer, so the checkpoint stores it and sample grids of a resumed run use the same noise.
        self.register_buffer("fixed_noise", fixed_noise)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Generate images in [-1, 1] from noise of shape (B, latent_dim)."""
        return self.generator(z)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Generate images in [-1, 1] from `noise`, or from the fixed noise buffer when it is None.

        Uses the EMA generator when ema_decay > 0, else the trained generator. It runs in eval mode,
        so batch norm uses its running statistics and each image depends only on its own noise
        vector. The previous train/eval mode is restored.
        """
        if noise is None:
            noise = self.fixed_noise
        generator = self.generator_ema if self.generator_ema is not None else self.generator
        was_training = generator.training
        generator.eval()
        try:
            return generator(noise.to(self.device))
        finally:
            generator.train(was_training)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Create one Adam optimizer for the generator and one for the discriminator, in that order."""
        betas = (self.hparams.adam_beta1, self.hparams.adam_beta2)
        # The fused kernel updates all parameters of an optimizer in one pass; torch 2.14 has it for
        # CPU and CUDA. It took about 6 % off a float32 CPU step of the 64x64 model.
        fused = self.device.type in ("cpu", "cuda")
        generator_optimizer = torch.optim.Adam(
            self.generator.parameters(), lr=self.hparams.generator_lr, betas=betas, fused=fused
        )
        discriminator_optimizer = torch.optim.Adam(
            self.discriminator.parameters(), lr=self.hparams.discriminator_lr, betas=betas, fused=fused
        )
        return [generator_optimizer, discriminator_optimizer]

    def on_fit_start(self) -> None:
        """Reject float16 precision, whose shared gradient scaler does not fit two optimizers per step."""
        precision = str(self.trainer.precision)
        if precision.startswith("16"):
            raise ConfigError(
                f"trainer precision {precision!r} is not supported by the DCGAN module: "
                "use 'bf16-mixed' for mixed precision, or '32-true'."
            )
        log.info(
            "training a %dx%d DCGAN: %d generator and %d discriminator parameters, precision %s",
            self.hparams.image_size,
            self.hparams.image_size,
            sum(p.numel() for p in self.generator.parameters()),
            sum(p.numel() for p in self.discriminator.parameters()),
            precision,
        )

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        """Run one D update and one G update, count them as one global step, and log their losses.

        The losses are logged only on the steps whose metrics something reads (`_is_logging_step`).

        NOTE: only single-device training has been run. Whether DDP's gradient reducer accepts the
        two backward passes per step, the second with the discriminator toggled off, is untested.
        """
        step = self.global_step
        noise_seed, dropout_seed = derive_step_seeds(self.hparams.seed, step, self.global_rank)
        rng = torch.Generator(device=self.device).manual_seed(noise_seed)
        cuda_devices = [self.device.index or 0] if self.device.type == "cuda" else []
        generator_optimizer, discriminator_optimizer = self.optimizers()
        with torch.random.fork_rng(devices=cuda_devices):
            # Dropout draws from the global RNG: reseed it per step, and restore the caller's state after.
            torch.manual_seed(dropout_seed)
            real = self._prepare_real_batch(batch, rng)
            noise = torch.randn(real.shape[0], self.hparams.latent_dim, generator=rng, device=real.device)
            fake = self.generator(noise)

            # Update D to minimise BCE(D(x), 1 - label_smoothing) + BCE(D(G(z)), 0): real as real, G(z) as fake.
            discriminator_optimizer.zero_grad(set_to_none=True)
            real_logits = self.discriminator(real)
            fake_logits = self.discriminator(fake.detach())
            real_target = torch.full_like(real_logits, 1.0 - self.hparams.label_smoothing)
            d_loss = F.binary_cross_entropy_with_logits(real_logits, real_target) + \
                F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
            if step == self.hparams.inject_nan_at_step:
                d_loss = d_loss * math.nan
            self._raise_if_diverged("d_loss", d_loss, step)
            self.manual_backward(d_loss)
            # In manual optimization every LightningOptimizer.step adds one to global_step (pytorch_lightning
            # 2.6.6, loops/optimization/manual.py). This strategy call applies precision handling uncounted,
            # so the G step below is the one that counts.
            self.trainer.strategy.optimizer_step(discriminator_optimizer.optimizer, closure=_skip_closure)

            # Update G to minimise the non-saturating loss -log D(G(z)) against the updated D.
            generator_optimizer.zero_grad(set_to_none=True)
            # Toggling sets requires_grad=False on the discriminator, so the G loss adds no gradient to D.
            with self.toggled_optimizer(generator_optimizer):
                generated_logits = self.discriminator(fake)
                g_loss = F.binary_cross_entropy_with_logits(generated_logits, torch.ones_like(generated_logits))
                self._raise_if_diverged("g_loss", g_loss, step)
                self.manual_backward(g_loss)
            generator_optimizer.step()
            if self.generator_ema is not None:
                self._update_generator_ema(step)

        if self._is_logging_step(step + 1):
            self._log_step(d_loss, g_loss, real_logits, fake_logits, batch_size=real.shape[0])

    @torch.no_grad()
    def _update_generator_ema(self, step: int) -> None:
        """Move the EMA weights and BatchNorm running statistics towards the generator's.

        Before `ema_start_step` the average copies the generator (decay 0). From there the decay warms
        up as min(ema_decay, (1 + k) / (10 + k)) with k = step - ema_start_step, the schedule of
        TensorFlow's ExponentialMovingAverage with num_updates: a fixed 0.999 would still give the
        starting weights a share of 0.999**1000 = 37 % after 1000 steps. The decay is a Python float
        and the updates are in-place foreach kernels on the device, so this adds no host sync.

        Early in training the generator changes fast, so an average over it lags behind. In one
        500-step Fashion-MNIST run of benchmarks/fid_recipe.py, averaging from step 0 gave val/fid 72.1
        against 62.5 for the generator itself, hence the later start.
        """
        # NOTE: under trainer.precision=bf16-true the average is stored in bfloat16, whose 8-bit mantissa
        # rounds away updates smaller than ~0.4 % of a weight, so late in training the average barely moves.
        steps_averaged = step - self.hparams.ema_start_step
        decay = 0.0 if steps_averaged < 0 else min(self.hparams.ema_decay, (1 + steps_averaged) / (10 + steps_averaged))
        averaged, current = list(self.generator_ema.parameters()), list(self.generator.parameters())
        counters, current_counters = [], []
        # The running means and variances are averaged like the weights. Copying the trained generator's
        # statistics, which describe other weights' activations, gave the averaged weights a val/fid of 67
        # after 500 steps against 58 with statistics recomputed for them (benchmarks/fid_recipe.py, seed 42).
        for ema_buffer, buffer in zip(self.generator_ema.buffers(), self.generator.buffers(), strict=True):
            if ema_buffer.is_floating_point():
                averaged.append(ema_buffer)
                current.append(buffer)
            else:
                counters.append(ema_buffer)  # num_batches_tracked
                current_counters.append(buffer)
        torch._foreach_lerp_(averaged, current, 1.0 - decay)
        torch._foreach_copy_(counters, current_counters)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Let a checkpoint with and one without EMA weights load into a module configured the other way."""
        state = checkpoint["state_dict"]
        has_ema = any(key.startswith(EMA_STATE_PREFIX) for key in state)
        if self.generator_ema is not None and not has_ema:
            log.warning("the checkpoint has no EMA generator weights: the average restarts from its generator weights")
            for key in [key for key in state if key.startswith("generator.")]:
                state[EMA_STATE_PREFIX + key.removeprefix("generator.").removeprefix("_orig_mod.")] = state[key].clone()
        elif self.generator_ema is None and has_ema:
            log.warning("model.ema_decay is 0, so the checkpoint's EMA generator weights are dropped")
            for key in [key for key in state if key.startswith(EMA_STATE_PREFIX)]:
                del state[key]

    def _prepare_real_batch(self, batch: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """Scale a uint8 batch to float in [-1, 1] on its device, and flip it when augment_flip is set."""
        expected_shape = (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)
        if batch.dtype != torch.uint8 or batch.ndim != 4 or tuple(batch.shape[1:]) != expected_shape:
            raise ConfigError(
                f"the training batch has dtype {batch.dtype} and shape {tuple(batch.shape)}, but the model "
                f"expects uint8 images of shape (B, {', '.join(map(str, expected_shape))}). Decode the dataset "
                "with the same channels and image_size as the model."
            )
        return prepare_real_batch(batch, rng if self.hparams.augment_flip else None, self.hparams.channels_last)

    def _is_logging_step(self, global_step: int) -> bool:
        """Return whether the metrics of the step that ends at `global_step` are read, so worth logging.

        MetricsCallback reads trainer.callback_metrics every trainer.log_every_n_steps steps and at
        max_steps, and the progress bar shows the last values logged. Lightning's log_dict moves and
        updates each metric in its result collection: about 4 ms per call (pytorch_lightning 2.6.6,
        cProfile of benchmarks/framework.py's Lightning fit on a 2-core Xeon), 1 % of a 64x64 CPU step.
        """
        trainer = self.trainer
        every_n_steps = max(trainer.log_every_n_steps, 1)  # a barebones Trainer sets 0
        return global_step % every_n_steps == 0 or global_step == trainer.max_steps

    def _log_step(
        self,
        d_loss: torch.Tensor,
        g_loss: torch.Tensor,
        real_logits: torch.Tensor,
        fake_logits: torch.Tensor,
        batch_size: int,
    ) -> None:
        """Log the losses and the mean probability D assigns to real and to generated images."""
        metrics = {
            "train/d_loss": d_loss.detach(),
            "train/g_loss": g_loss.detach(),
            "train/d_real": torch.sigmoid(real_logits.detach().float()).mean(),
            "train/d_fake": torch.sigmoid(fake_logits.detach().float()).mean(),
        }
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)

    def _raise_if_diverged(self, name: str, loss: torch.Tensor, step: int) -> None:
        """Raise TrainingDivergedError when `loss` is NaN or infinite, before its optimizer step.

        Runs every check_finite_every_n_steps steps (0 disables it). A non-finite loss in a step
        that is not checked still reaches the weights, and the next check then finds it.
        """
        every_n_steps = self.hparams.check_finite_every_n_steps
        if every_n_steps == 0 or step % every_n_steps != 0:
            return
        # NOTE: bool() on a GPU tensor makes the host wait for the step's kernels (twice per checked
        # step). Raise check_finite_every_n_steps on GPUs where that costs throughput.
        if bool(torch.isfinite(loss.detach()).all()):
            return
        raise TrainingDivergedError(
            f"Training diverged at step {step}: {name}={loss.item():.4g} is not finite, so this step's "
            "optimizer update was not applied and the last checkpoint stays the run's latest. Resume from it "
            "with a lower model.lr or more model.label_smoothing."
        )

def _frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """Return a deep copy of `module` whose parameters require no gradient."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    return clone


def _check_training_settings(
    generator_lr: float,
    discriminator_lr: float,
    adam_beta1: float,
    adam_beta2: float,
    label_smoothing: float,
    sample_count: int,
    seed: int,
    check_finite_every_n_steps: int,
    ema_decay: float = 0.0,
    ema_start_step: int = 0,
) -> None:
    """Raise ConfigError naming the first optimizer or training setting that is out of range."""
    for name, lr in (("generator_lr", generator_lr), ("discriminator_lr", discriminator_lr)):
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"{name}={lr!r} is invalid: use a positive learning rate such as 2e-4.")
    for name, beta in (("adam_beta1", adam_beta1), ("adam_beta2", adam_beta2)):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"{name}={beta!r} is invalid: Adam betas must be in [0, 1).")
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(
            f"label_smoothing={label_smoothing!r} is invalid: use a value in [0, 1); "
            "the real target becomes 1 - label_smoothing."
        )
    if isinstance(sample_count, bool) or not isinstance(sample_count, int) or sample_count < 1:
        raise ConfigError(f"sample_count={sample_count!r} is invalid: use a positive number of sample images.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} is invalid: use a non-negative integer.")
    if not isinstance(check_finite_every_n_steps, int) or check_finite_every_n_steps < 0:
        raise ConfigError(
            f"check_finite_every_n_steps={check_finite_every_n_steps!r} is invalid: "
            "use a positive number of steps, or 0 to disable the NaN/inf check."
        )
    if not (isinstance(ema_decay, (int, float)) and 0.0 <= ema_decay < 1.0):
        raise ConfigError(
            f"ema_decay={ema_decay!r} is invalid: use a value in [0, 1), such as 0.999, or 0 to train without "
            "an EMA generator."
        )
    if isinstance(ema_start_step, bool) or not isinstance(ema_start_step, int) or ema_start_step < 0:
        raise ConfigError(
            f"ema_start_step={ema_start_step!r} is invalid: use the global step (>= 0) from which the "
            "generator's weights are averaged."
        )
