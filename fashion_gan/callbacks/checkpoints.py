"""Periodic, final and on-demand checkpoints, written atomically and pushed in the background."""

import errno
import logging
import os
from pathlib import Path

import pytorch_lightning as pl
import torch

from fashion_gan.callbacks.pusher import OutputPusher
from fashion_gan.errors import StorageError, TrainingDivergedError
from fashion_gan.run_outputs import checkpoint_name

log = logging.getLogger(__name__)


class CheckpointPushCallback(pl.Callback):
    """Save `checkpoints/step_NNNNNN.ckpt` every `every_n_steps` and at the end, and push each one.

    A checkpoint is saved to a temporary name and renamed, so a crash or a full disk never leaves a
    partial file under a checkpoint's name. `last.ckpt` and the pointer in storage move only afterwards.
    """

    def __init__(self, local_run_dir: Path, every_n_steps: int, pusher: OutputPusher) -> None:
        self.checkpoint_dir = local_run_dir / "checkpoints"
        self.every_n_steps = every_n_steps
        self.pusher = pusher
        self.last_saved_step: int | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer, pl_module)

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Save and push a checkpoint of the current step, unless this step is already saved."""
        step = trainer.global_step
        if step == self.last_saved_step or step == 0:
            return None
        _require_finite_weights(pl_module, step)

        final_path = self.checkpoint_dir / checkpoint_name(step)
        temporary_path = final_path.with_suffix(".ckpt.partial")
        # Every rank takes part in save_checkpoint (a collective under DDP); only rank zero writes.
        try:
            trainer.save_checkpoint(temporary_path)
            if trainer.is_global_zero:
                os.replace(temporary_path, final_path)
                _replace_link(final_path, self.checkpoint_dir / "last.ckpt")
        except OSError as error:
            if trainer.is_global_zero:
                temporary_path.unlink(missing_ok=True)
            free = "the disk is full" if error.errno == errno.ENOSPC else f"the write failed ({error.strerror})"
            raise StorageError(
                f"Could not write the checkpoint of step {step} to {final_path}: {free}. "
                f"The previous checkpoint (step {self.last_saved_step}) is kept. Free disk space and rerun "
                f"with the same run.id to resume."
            ) from error

        self.last_saved_step = step
        if trainer.is_global_zero:
            log.info("Saved checkpoint %s", final_path)
            self.pusher.push_checkpoint(final_path, step)
        return final_path


def _require_finite_weights(pl_module: pl.LightningModule, step: int) -> None:
    for name, parameter in pl_module.named_parameters():
        if not torch.isfinite(parameter).all():
            raise TrainingDivergedError(
                f"Parameter '{name}' is NaN or infinite at step {step}; the checkpoint was not saved and "
                f"the run's latest checkpoint is unchanged. Lower model.lr or enable model.label_smoothing."
            )


def _replace_link(target: Path, link_path: Path) -> None:
    temporary = link_path.with_suffix(".tmp-link")
    temporary.unlink(missing_ok=True)
    try:
        os.link(target, temporary)
    except OSError:
        import shutil

        shutil.copyfile(target, temporary)
    os.replace(temporary, link_path)
