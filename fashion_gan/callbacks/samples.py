"""Fixed-noise sample grids during training, the real-image grid, and the final timelapse GIF."""

import logging
import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torchvision.utils import make_grid

from fashion_gan.callbacks.pusher import OutputPusher
from fashion_gan.run_outputs import sample_name

log = logging.getLogger(__name__)

# zlib level of the grid PNGs, which are drawn on the training thread. Level 1 wrote a 64-image grid
# in 18 ms against 74 ms at PIL's default (6), for a file about 20 % larger.
GRID_PNG_COMPRESS_LEVEL = 1


class SampleGridCallback(pl.Callback):
    """Write `samples/real.png` at the start and `samples/step_NNNNNN.png` every `every_n_steps`.

    The grids come from the module's fixed noise batch, so grids of one run show the same latent
    points over training. Each grid is pushed and logged to W&B when a WandbLogger is attached.
    """

    def __init__(self, local_run_dir: Path, every_n_steps: int, pusher: OutputPusher,
                 real_images: np.ndarray, loggers: list | None = None) -> None:
        self.sample_dir = local_run_dir / "samples"
        self.every_n_steps = every_n_steps
        self.pusher = pusher
        self.real_images = real_images
        self.loggers = loggers or []
        self.last_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.sample_dir.mkdir(parents=True, exist_ok=True)
        real_path = self.sample_dir / "real.png"
        # np.array copies: the images may be a read-only memory map, which torch.from_numpy warns about.
        real = torch.from_numpy(np.array(self.real_images)).float().div(127.5).sub(1.0)
        _save_grid(real, real_path)
        self.pusher.push(real_path)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw(trainer, pl_module)
        if trainer.is_global_zero:
            self.write_timelapse()

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self.last_step or step == 0:
            return None
        # The grid shows the model in the precision it trains in. Under bf16 autocast the 64-image
        # forward pass took 20 ms on the CPU against 64 ms in float32.
        with trainer.precision_plugin.forward_context():
            images = pl_module.sample()
        images = images.float().cpu()
        path = self.sample_dir / sample_name(step)
        _save_grid(images, path)
        self.last_step = step
        self.pusher.push(path)
        for logger in self.loggers:
            logger.log_image(key="samples/fixed_noise", images=[str(path)], step=step, caption=[f"step {step}"])
        return path

    def write_timelapse(self) -> Path | None:
        """Write `samples/timelapse.gif` from every step grid in the sample folder, in step order."""
        from fashion_gan.sampling import write_timelapse_gif

        frames = sorted(self.sample_dir.glob("step_*.png"))
        if not frames:
            return None
        path = self.sample_dir / "timelapse.gif"
        write_timelapse_gif(frames, path)
        self.pusher.push(path)
        return path


def _save_grid(images: torch.Tensor, path: Path) -> None:
    rows = max(1, int(math.sqrt(images.shape[0])))
    grid = make_grid(images, nrow=rows, normalize=True, value_range=(-1.0, 1.0), padding=2)
    # Round to the nearest of the 256 levels, as torchvision's save_image does.
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    temporary = path.with_name(path.name + ".partial.png")
    Image.fromarray(pixels).save(temporary, format="PNG", compress_level=GRID_PNG_COMPRESS_LEVEL)
    temporary.replace(path)

